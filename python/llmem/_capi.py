"""Where the C API's files are: the header for C/C++/Cython consumers and the CMake package.

The C API itself is the capsule ``llmem._core._C_API`` (see docs/capi.md); Cython code cimports
``llmem.capi`` (``llmem/capi.pxd``, found on ``sys.path`` like any package's .pxd).
"""

from __future__ import annotations

import os

__all__ = ["get_include", "get_cmake_dir"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_HEADER = os.path.join("llmem", "llmem_capi.h")


def get_include() -> str:
    """The directory to put on the include path for ``#include <llmem/llmem_capi.h>`` (as
    ``numpy.get_include()``): the wheel's ``llmem/include``, or in a source checkout installed in
    editable mode, the tree's ``csrc/include``."""
    for candidate in (os.path.join(_HERE, "include"),
                      os.path.join(os.path.dirname(os.path.dirname(_HERE)), "csrc", "include")):
        if os.path.isfile(os.path.join(candidate, _HEADER)):
            return candidate
    raise FileNotFoundError(f"llmem's C header {_HEADER} is not installed next to {_HERE}")


def get_cmake_dir() -> str:
    """The directory holding ``llmemConfig.cmake``: ``cmake -Dllmem_DIR=$(python -c 'import llmem;
    print(llmem.get_cmake_dir())')`` lets ``find_package(llmem CONFIG)`` find the target
    ``llmem::capi`` (the header; the functions come from the capsule at run time)."""
    return os.path.join(_HERE, "cmake")
