#!/usr/bin/env bash
# Memory errors and leaks under valgrind (issue 8). Not part of CI: it takes several minutes.
#   1. the C++ GoogleTest suite (RelWithDebInfo build in build/cpp-valgrind),
#   2. a core subset of pytest against the installed package, with PYTHONMALLOC=malloc so that
#      valgrind sees every allocation, and scripts/valgrind-python.supp for CPython/numpy noise.
# Only *definite* leaks and memory errors fail (exit status 1); "possibly lost" and "still
# reachable" blocks are interpreter caches that live until exit.
#
#   scripts/valgrind.sh                 # both parts, the default pytest subset
#   scripts/valgrind.sh -k hybrid       # extra arguments go to pytest
#   PYTHON=/path/to/venv/bin/python scripts/valgrind.sh   # a Python with llmem, numpy, pytest
#                                         (default: build/test-venv from scripts/test.sh)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
jobs="${LLMEM_JOBS:-2}"
python="${PYTHON:-$root/build/test-venv/bin/python}"
logs="$root/build/valgrind"
rm -rf "$logs"
mkdir -p "$logs"
vg=(valgrind --leak-check=full --errors-for-leak-kinds=definite --show-leak-kinds=definite
    --error-exitcode=1 --num-callers=30)

step() { printf '\n==> %s\n' "$*"; }

# Errors and definite leaks in a valgrind log whose stack passes through llmem's compiled core
# (the suppressions cover interpreter noise; this count does not depend on them).
llmem_records() {  # log file
    "${PYTHON_FOR_REPORT:-python3}" - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
records = re.split(r"\n==\d+== \n", text)
kinds = ("Invalid", "Conditional", "Use of uninitialised", "Mismatched", "Syscall param", "definitely lost")
hits = [r for r in records if any(k in r for k in kinds) and ("_core.cpython" in r or "llmem" in r)]
for r in hits:
    print(r)
summary = re.findall(r"(ERROR SUMMARY: .*|definitely lost: .*)", text)
print("\n".join(summary))
print(f"records involving llmem: {len(hits)}")
sys.exit(1 if hits else 0)
PY
}

step "C++ unit tests under valgrind"
cmake -S . -B build/cpp-valgrind -G Ninja -DLLMEM_BUILD_PYTHON=OFF -DLLMEM_BUILD_TESTS=ON \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build/cpp-valgrind -j "$jobs"
"${vg[@]}" --log-file="$logs/cpp.log" build/cpp-valgrind/tests/cpp/llmem_tests --gtest_brief=1
grep -E "ERROR SUMMARY|definitely lost" "$logs/cpp.log" || echo "no definite leaks"

step "pytest core subset under valgrind ($python)"
# the core of each memory type (KV, recurrent, hybrid), the error types and the threads test:
# ~120 tests, several minutes (a test runs ~50x slower under valgrind). More files can be added
# as arguments, e.g. tests/python/test_atomicity.py (173 tests) or test_bad_arguments.py (312).
subset=(tests/python/test_kv_cache.py tests/python/test_recurrent.py tests/python/test_hybrid.py
        tests/python/test_errors.py tests/python/test_threads.py)
# hypothesis model tests run hundreds of examples: a handful is enough to cover their code paths
# valgrind's own exit status counts the interpreter's unsuppressed noise too, so the verdict is
# llmem_records below; %p keeps the logs of subprocesses a test may start apart
status=0
PYTHONMALLOC=malloc LLMEM_THREAD_OPS=20 LLMEM_HYPOTHESIS_PROFILE=valgrind "${vg[@]}" --error-exitcode=99 --suppressions="$root/scripts/valgrind-python.supp" \
    --log-file="$logs/pytest.%p.log" "$python" -m pytest -q -p no:cacheprovider \
    "${subset[@]}" "$@" || status=$?
# 99 is valgrind's error exit code (judged below); anything else is a failed test
if [ "$status" -ne 0 ] && [ "$status" -ne 99 ]; then
    echo "pytest failed under valgrind (exit $status)" >&2
    exit "$status"
fi
verdict=0
for log in "$logs"/pytest.*.log; do
    echo "-- $log"
    llmem_records "$log" || verdict=1
done
echo "logs: $logs"
exit "$verdict"
