"""Compile capi_driver.pyx (a Cython consumer of llmem's C API) into a directory and import it.

Used by tests/python/test_capi.py and bench/bench_capi.py: Cython from PyPI, the running
interpreter's compiler settings (setuptools' build_ext), llmem.get_include() for the header and
the installed llmem package for ``from llmem cimport capi``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import llmem

HERE = os.path.dirname(os.path.abspath(__file__))


def build(out_dir: str):
    """Build the extension in ``out_dir`` and return the imported module."""
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    os.makedirs(out_dir, exist_ok=True)
    src = os.path.join(out_dir, "capi_driver.pyx")
    shutil.copyfile(os.path.join(HERE, "capi_driver.pyx"), src)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(llmem.__file__)))
    ext = Extension("capi_driver", [src], include_dirs=[llmem.get_include()],
                    extra_compile_args=["-O2", "-Wno-unused-function"])
    modules = cythonize([ext], include_path=[package_root], quiet=True, language_level=3,
                        build_dir=os.path.join(out_dir, "c"))
    dist = Distribution({"ext_modules": modules, "script_name": "setup.py"})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib = out_dir
    cmd.build_temp = os.path.join(out_dir, "tmp")
    dist.run_command("build_ext")
    built = dist.get_command_obj("build_ext").get_outputs()[0]
    spec = importlib.util.spec_from_file_location("capi_driver", built)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
