#!/usr/bin/env bash
# The C++ core built for 64-bit ARM (the NEON build of the baseline kernels, which no x86
# machine runs) and its C++ tests run under qemu-user: correctness only, emulated time says
# nothing about speed. Needs Debian's g++-aarch64-linux-gnu and qemu-user: installed here when
# running as root with apt-get, else the check says so and stops (exit 0).
# Usage: scripts/cross_check.sh [cmake]   (the cmake to use; default: cmake on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
CMAKE=${1:-cmake}
CTEST=$(dirname "$(command -v "$CMAKE")")/ctest

have_tools() { command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; }
if ! have_tools && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -qq g++-aarch64-linux-gnu qemu-user ||
    { apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu qemu-user; }; } >/dev/null 2>&1 || true
fi
if ! have_tools; then
  echo "note: g++-aarch64-linux-gnu or qemu-user is missing; the aarch64 check did not run" >&2
  exit 0
fi

build=build/cross-aarch64
rm -rf "$build"
"$CMAKE" -S . -B "$build/core" -G Ninja -DCMAKE_TOOLCHAIN_FILE="$PWD/cmake/aarch64-linux-gnu.cmake" \
  -DCMAKE_BUILD_TYPE=Release -DAFFECTKIT_CUDA=OFF -DAFFECTKIT_PYTHON=OFF >/dev/null
"$CMAKE" --build "$build/core" >/dev/null
"$CMAKE" --install "$build/core" --component dev --prefix "$PWD/$build/install" >/dev/null
"$CMAKE" -S tests/cpp -B "$build/tests" -G Ninja -DCMAKE_TOOLCHAIN_FILE="$PWD/cmake/aarch64-linux-gnu.cmake" \
  -Daffectkit_DIR="$PWD/$build/install/lib/cmake/affectkit" >/dev/null
"$CMAKE" --build "$build/tests" >/dev/null
"$CTEST" --test-dir "$build/tests" --output-on-failure
