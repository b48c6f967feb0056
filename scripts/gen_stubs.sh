#!/usr/bin/env bash
# The type stubs of the compiled core, python/llmem/_core.pyi, generated from the built module by
# pybind11-stubgen (PyPI). Regenerate after changing the bindings:
#   scripts/gen_stubs.sh            # rewrite python/llmem/_core.pyi
#   scripts/gen_stubs.sh --check    # fail (with the diff) when the kept stubs differ from the module
# PYTHON names the interpreter whose llmem is used (default: the test venv's).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$root/build/test-venv/bin/python}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
(cd "$out" && "$py" -m pybind11_stubgen llmem._core -o "$out" --numpy-array-use-type-var \
    --enum-class-locations 'Status:llmem._core' --enum-class-locations 'SWAType:llmem._core' >/dev/null)
gen="$out/llmem/_core.pyi"
[ -f "$gen" ] || { echo "gen_stubs: pybind11-stubgen wrote no llmem/_core.pyi" >&2; exit 1; }
# What pybind11-stubgen leaves for a strict checker, made exact: enum members as assignments of
# their values (typing's rule for stubs), no re-declared IntEnum internals, and bare containers
# (a py::list / py::dict / py::tuple return) with their element types spelled out as Any.
"$py" - "$gen" <<'PYEOF'
import importlib, re, sys
path = sys.argv[1]
core = importlib.import_module("llmem._core")
text = open(path).read()
def member(m):
    cls, name = m.group(3), m.group(2)
    return f"{m.group(1)}{name} = {int(getattr(getattr(core, cls), name))}"
text = re.sub(r"^( +)(\w+): typing\.ClassVar\[(Status|SWAType)\].*$", member, text, flags=re.M)
text = re.sub(r"    @classmethod\n    def __new__\(cls, value\):\n        \.\.\.\n    def __format__\(self, format_spec\):\n        \.\.\.\n", "", text)
text = re.sub(r"-> list:", "-> list[typing.Any]:", text)
text = re.sub(r"-> dict:", "-> dict[str, typing.Any]:", text)
text = re.sub(r"-> tuple:", "-> tuple[typing.Any, ...]:", text)
text = re.sub(r"([\[ ])(list|dict)([,\]])", r"\1\2[typing.Any]\3", text).replace("dict[typing.Any]", "dict[str, typing.Any]")
# the decode-step functions are plain CPython functions (csrc/bindings/register_decode_step.cpp)
# whose text signatures carry no types: positional-only parameters of any type, any result
def any_params(m):
    params = ", ".join(f"{p.strip()}: typing.Any" for p in m.group(2).split(","))
    return f"def {m.group(1)}({params}, /) -> typing.Any:"
text = re.sub(r"^def (kv_decode_step|kv_iswa_decode_step|_decode_step_fast_layout)\(([^):]*)\):$", any_params,
              text, flags=re.M)
# MemoryLock is a C type (csrc/capi/memory_lock.cpp) without signatures: its RLock protocol, typed
ml = (
    "class MemoryLock:\n"
    '    """\n    The re-entrant lock of an llmem memory (memory.lock), shared with the C API.\n    \n'
    "    Used like threading.RLock (acquire/release/with); C code reaches the same mutex through "
    'llmem._core._C_API without the GIL.\n    """\n'
    "    def __init__(self) -> None:\n        ...\n"
    "    def __enter__(self) -> bool:\n        ...\n"
    "    def __exit__(self, *args: object) -> None:\n        ...\n"
    '    def _is_owned(self) -> bool:\n        """\n        Whether the calling thread holds the lock.\n        """\n'
    "    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:\n        ...\n"
    '    def locked(self) -> bool:\n        """\n        Whether any thread holds the lock.\n        """\n'
    '    def release(self) -> None:\n        """\n        Release the lock once (RuntimeError if not held by this thread).\n        """\n'
)
text, n = re.subn(r"^class MemoryLock:\n(?:(?:    .*)?\n)*", ml, text, count=1, flags=re.M)
assert n == 1, "gen_stubs: no MemoryLock class in the stubs"
open(path, "w").write(text)
PYEOF
kept="$root/python/llmem/_core.pyi"
if [ "${1:-}" = "--check" ]; then
    if ! diff -u "$kept" "$gen"; then
        echo "gen_stubs: python/llmem/_core.pyi is out of date: run scripts/gen_stubs.sh" >&2
        exit 1
    fi
    echo "gen_stubs: python/llmem/_core.pyi matches the built module"
else
    cp "$gen" "$kept"
    echo "gen_stubs: wrote python/llmem/_core.pyi"
fi
