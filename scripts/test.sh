#!/usr/bin/env bash
# llmem's test command (the README's, and what .ci/run calls). On a fresh machine it installs what
# is missing (Debian's libgtest-dev when root, the Python build and test packages), then:
#   1. builds the C++ core's GoogleTest suite and runs it with ctest,
#   2. builds and runs the same suite under AddressSanitizer + UndefinedBehaviorSanitizer,
#   2b. builds the core's thread tests and the extension under ThreadSanitizer and runs them (and
#       the Python thread tests against that extension),
#   3. installs the package into a private virtualenv (build/test-venv) and runs pytest,
#   4. checks the type stubs of the compiled core, runs mypy --strict and basedpyright, builds the
#      reference docs (Sphinx, warnings as errors) and a manylinux wheel that it installs into a
#      fresh virtualenv of another Python version (scripts/wheel_check.sh).
# Extra arguments go to pytest (e.g. scripts/test.sh -k batch).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
jobs="${LLMEM_JOBS:-2}"
venv="$root/build/test-venv"

step() { printf '\n==> %s\n' "$*"; }

step "system packages"
if ! dpkg -s libgtest-dev >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev >/dev/null
    else
        echo "libgtest-dev is missing: run 'sudo apt-get install libgtest-dev' (or run this as root)" >&2
        exit 1
    fi
fi
echo "libgtest-dev: $(dpkg -s libgtest-dev | sed -n 's/^Version: //p')"
# redis-server: the store tests start a private one on a unix socket (tests/python/redis_server.py)
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "redis-server is missing: the Redis store tests will be skipped ('sudo apt-get install redis-server')" >&2
    fi
fi

step "python environment ($venv)"
# an isolated venv: with the system site-packages, an editable llmem installed there (a developer's
# checkout) would shadow the build under test through its import hook
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
vpy="$venv/bin/python"
missing=()
for mod_pkg in scikit_build_core:scikit-build-core pybind11:pybind11 cmake:cmake ninja:ninja \
               numpy:numpy pytest:pytest hypothesis:hypothesis gguf:gguf \
               Cython:cython setuptools:setuptools redis:redis; do  # Cython, setuptools: the C API's Cython test
    "$vpy" -c "import ${mod_pkg%%:*}" 2>/dev/null || missing+=("${mod_pkg#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    "$vpy" -m pip install -q "${missing[@]}"
fi
# the tools of the packaging, type, stub and docs checks (and the optional packages whose tests
# would otherwise be skipped: prometheus-client, matplotlib)
tools=()
for mod_pkg in mypy:mypy basedpyright:basedpyright pybind11_stubgen:pybind11-stubgen sphinx:sphinx \
               myst_parser:myst-parser prometheus_client:prometheus-client matplotlib:matplotlib; do
    "$vpy" -c "import ${mod_pkg%%:*}" 2>/dev/null || tools+=("${mod_pkg#*:}")
done
if [ ${#tools[@]} -gt 0 ]; then
    "$vpy" -m pip install -q "${tools[@]}"
fi
# torch storage (issue 17): the CPU wheel of exactly this version (a plain `torch` or a range could
# pull a multi-GB CUDA build); tests/python/test_torch_*.py run on CPU, and on CUDA where present
"$vpy" -c "import torch" 2>/dev/null || "$vpy" -m pip install -q torch==2.13.0
export PATH="$venv/bin:$PATH"   # the venv's cmake/ninja when they came from PyPI

run_ctest() {  # build dir, extra cmake args...
    local dir="$1"; shift
    cmake -S . -B "$dir" -G Ninja -DLLMEM_BUILD_PYTHON=OFF -DLLMEM_BUILD_TESTS=ON -DLLMEM_WERROR=ON "$@" >/dev/null
    cmake --build "$dir" -j "$jobs"
    ctest --test-dir "$dir" --output-on-failure -j "$jobs"
}

step "C++ unit tests"
run_ctest build/cpp-tests -DCMAKE_BUILD_TYPE=Release

step "C++ unit tests under ASan + UBSan"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_ctest build/cpp-asan -DCMAKE_BUILD_TYPE=Debug -DLLMEM_SANITIZE=ON

# --- ThreadSanitizer (issue 20) -------------------------------------------------------------------
# The core's thread tests (llmem_thread_tests alone) and the extension, built once with
# -fsanitize=thread into build/tsan, then the Python thread tests run against that extension with
# libtsan preloaded. scripts/tsan-python.supp names numpy's libraries and one glibc function, never
# llmem code: a race in llmem fails the step. Only these two targets are built (a few minutes).
step "ThreadSanitizer: core thread tests and the Python thread tests"
tsan_dir=build/tsan
cmake -S . -B "$tsan_dir" -G Ninja -DLLMEM_BUILD_PYTHON=ON -DLLMEM_BUILD_TESTS=ON -DLLMEM_TSAN=ON -DLLMEM_WERROR=ON \
      -DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_FLAGS="-O1 -g" -DPython_EXECUTABLE="$vpy" \
      -Dpybind11_DIR="$("$vpy" -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build "$tsan_dir" -j "$jobs" --target llmem_thread_tests _core
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" "$tsan_dir/tests/cpp/llmem_thread_tests"
rm -rf "$tsan_dir/pkg" && mkdir -p "$tsan_dir/pkg/llmem"
cp -r python/llmem/. "$tsan_dir/pkg/llmem/"
cp "$tsan_dir"/_core*.so "$tsan_dir/pkg/llmem/"
tsan_lib="$(${CXX:-g++} -print-file-name=libtsan.so)"
# python -S: no site hooks, so an llmem installed in the venv (an editable one's import hook
# included) cannot shadow the TSan build; the venv's packages come through PYTHONPATH instead
tsan_site="$("$vpy" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"] + ":" + p["platlib"])')"
tsan_env=(env LD_PRELOAD="$tsan_lib" PYTHONPATH="$root/$tsan_dir/pkg:$tsan_site" LLMEM_THREAD_OPS=60
          TSAN_OPTIONS="suppressions=$root/scripts/tsan-python.supp halt_on_error=1 exitcode=66 report_signal_unsafe=0")
"${tsan_env[@]}" "$vpy" -S -c 'import llmem._core as c, sys; sys.exit(0 if "/build/tsan/pkg/" in c.__file__ else 1)' || {
    echo "the TSan run would not import the TSan build of llmem" >&2; exit 1; }
# -s: a report is written to stderr as it happens (pytest's capture would lose it when TSan halts)
"${tsan_env[@]}" "$vpy" -S -m pytest -q -s -p no:cacheprovider tests/python/test_threads.py \
    tests/python/test_reliability_defects.py -k "thread or dropped"
# --- end ThreadSanitizer ---------------------------------------------------------------------------

step "build and install the package"
"$vpy" -m pip install -q --no-build-isolation --no-deps .

step "pytest"
cd "$root"
installed="$("$vpy" -c 'import llmem, os; print(os.path.dirname(llmem.__file__))')"
case "$installed" in
    "$venv"/*) echo "testing the llmem installed in $installed" ;;
    *) echo "llmem imports from $installed, not from the build under test" >&2; exit 1 ;;
esac
"$vpy" -m pytest -q "$@"

timed() {  # name, command...: run a step and say how long it took
    local name="$1" t0; shift
    t0=$(date +%s)
    "$@"
    echo "$name: $(( $(date +%s) - t0 )) s"
}

step "type stubs of llmem._core against the built module"
timed "stub check" env PYTHON="$vpy" scripts/gen_stubs.sh --check

step "type checks: mypy --strict, basedpyright, type completeness"
timed "type checks" env PYTHON="$vpy" scripts/typecheck.sh

step "reference docs (Sphinx, warnings are errors)"
timed "docs" "$vpy" -m sphinx -q -W --keep-going -b html docs build/docs

step "manylinux wheel on another Python, installed without a compiler"
if [ "${LLMEM_SKIP_WHEEL_CHECK:-0}" = 1 ]; then
    echo "skipped (LLMEM_SKIP_WHEEL_CHECK=1)"
else
    # the system toolchain here (a few minutes; the tag this glibc allows, manylinux_2_35 on Debian 12):
    # the zig toolchain's manylinux_2_28 build first compiles zig's libc++ for the target (tens of
    # minutes on a fresh machine), so it is run by hand (LLMEM_WHEEL_TOOLCHAIN=zig) and by the
    # wheels workflow, not by every test run
    timed "wheel check" env LLMEM_WHEEL_TOOLCHAIN="${LLMEM_WHEEL_TOOLCHAIN:-native}" scripts/wheel_check.sh
fi
