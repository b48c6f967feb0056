"""The extension exports its module init and nothing of the C++ runtime it was linked with.

A toolchain that links libstdc++ statically (the GPU host's /opt/gcc did) used to make
``llmem._core`` export the runtime's ~4000 symbols, and ``import torch`` after ``import llmem``
then crashed inside torch's import. CMakeLists links the module with ``--exclude-libs,ALL``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import llmem._core as core

RUNTIME_PREFIXES = ("__cxa_", "__gxx_", "__once_proxy", "__dynamic_cast", "_Unwind_")


def _exported(path: str) -> list[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", path], check=True, capture_output=True, text=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None,
                    reason="reads the ELF dynamic symbol table with binutils' nm (Linux)")
def test_only_module_symbols_exported() -> None:
    names = _exported(core.__file__)
    assert "PyInit__core" in names
    leaked = [n for n in names if n.startswith(RUNTIME_PREFIXES)]
    assert leaked == [], f"C++ runtime symbols exported by {core.__file__}: {leaked[:10]}"


def test_torch_imports_after_llmem() -> None:
    pytest.importorskip("torch")
    code = "import llmem, llmem.toy; import torch; print(torch.zeros(2).sum().item())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "0.0"
