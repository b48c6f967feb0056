#!/usr/bin/env bash
# Static type checks of the package and of the examples a user copies: mypy --strict and
# basedpyright (pyright's engine with its JavaScript bundled, from PyPI), on python/llmem, the
# README's python blocks and examples/; then pyright's type completeness of the public API
# (--verifytypes, reported in README). PYTHON names the interpreter (default: the test venv's).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/build/test-venv/bin/python}"
bin="$(dirname "$py")"
ex="$root/build/typecheck-examples"
rm -rf "$ex"; mkdir -p "$ex"
"$py" - "$ex" <<'PYEOF'
import pathlib, re, sys
out = pathlib.Path(sys.argv[1])
blocks = re.findall(r"```python\n(.*?)```", pathlib.Path("README.md").read_text(), re.S)
for i, b in enumerate(blocks):
    (out / f"readme_example_{i}.py").write_text(b)
PYEOF
targets=("$ex" examples)
"$py" -m mypy --strict python/llmem
"$py" -m mypy --strict "${targets[@]}"
"$bin/basedpyright" --pythonpath "$py" --level error "${targets[@]}" python/llmem
# the package as checked in (an editable install is invisible to static tools)
# (verifytypes exits non-zero below 100% completeness; its report goes to a file so
# that no reader stopping early can fail the pipeline)
report="$(mktemp)"
PYTHONPATH="$root/python" "$bin/basedpyright" --pythonpath "$py" --ignoreexternal --verifytypes llmem \
    > "$report" || { cat "$report"; rm -f "$report"; exit 1; }
grep -E "Symbols exported|With (known|ambiguous|unknown) type|score" "$report"
rm -f "$report"
