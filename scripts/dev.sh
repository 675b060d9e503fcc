#!/usr/bin/env bash
# One entry point for the README's commands:
#   scripts/dev.sh run     set up .venv, build affectkit, run the main job
#   scripts/dev.sh test    set up .venv, build affectkit, run the C++ (also cross-built for
#                          aarch64, under qemu-user) and Python test suites
#   scripts/dev.sh bench   set up .venv, build affectkit, run the benchmarks for real
# Environment: PYTHON (interpreter for the venv, default python3), AFFECTKIT_VENV (default
# .venv), AFFECTKIT_TORCH (pip spec, default torch==2.13.0), AFFECTKIT_TORCH_INDEX (a wheel
# index URL to take torch from, e.g. a CPU-only one), AFFECTKIT_CUDA (AUTO|ON|OFF).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${AFFECTKIT_VENV:-.venv}
TORCH_SPEC=${AFFECTKIT_TORCH:-torch==2.13.0}
VPY="$VENV/bin/python"

setup() {
  [ -x "$VPY" ] || "$PY" -m venv "$VENV"
  # torch first and pinned: an unpinned torch on a fresh machine pulls a multi-GB CUDA build.
  "$VPY" -m pip install -q --disable-pip-version-check \
    ${AFFECTKIT_TORCH_INDEX:+--index-url "$AFFECTKIT_TORCH_INDEX"} "$TORCH_SPEC"
  "$VPY" -m pip install -q --disable-pip-version-check -r scripts/requirements-build.txt
  # No build isolation: reuse the build tools above and the incremental build/ folder.
  "$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation ".[test,audio]"
  install_espeak
}

install_espeak() {
  # tests/test_audio_features.py synthesises speech with espeak-ng; without it those tests
  # skip with a reason, so a machine without root or apt-get only gets a note.
  command -v espeak-ng >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq espeak-ng || { apt-get update -qq && apt-get install -y -qq espeak-ng; }; } \
      >/dev/null 2>&1 || true
  fi
  command -v espeak-ng >/dev/null || echo "note: espeak-ng is not installed; the audio tests that need it will skip" >&2
}

cpp_tests() {
  # Install the C++ package from the build pip just made (no recompilation), then build a
  # separate consumer project with find_package(affectkit) and run it under ctest.
  local build prefix
  build=$(dirname "$(ls -t build/*/CMakeCache.txt | head -n 1)")
  prefix="$PWD/build/cpp-install"
  rm -rf "$prefix" build/cpp-tests
  "$VENV/bin/cmake" --install "$build" --component dev --prefix "$prefix" >/dev/null
  "$VENV/bin/cmake" -S tests/cpp -B build/cpp-tests -G Ninja -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
  "$VENV/bin/cmake" --build build/cpp-tests >/dev/null
  "$VENV/bin/ctest" --test-dir build/cpp-tests --output-on-failure
}

case "${1:-}" in
  run)
    setup
    "$VENV/bin/affectkit" info
    "$VENV/bin/affectkit" selfcheck
    # The main job: emotions and valence/arousal/dominance of the bundled example dialogue.
    "$VENV/bin/affectkit" analyze --file python/affectkit/examples/dialogue.txt
    ;;
  test)
    setup
    cpp_tests
    # The C++ core cross-built for aarch64, its tests under qemu-user (tools permitting).
    bash scripts/cross_check.sh "$VENV/bin/cmake"
    # Benchmarks run once each as smoke tests; exit code 5 (no tests) fails under set -e.
    "$VPY" -m pytest --benchmark-disable "${@:2}"
    ;;
  bench)
    setup
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$VPY" -m pytest benchmarks --benchmark-only \
      --benchmark-columns=min,median,mean,rounds --benchmark-sort=name "${@:2}"
    ;;
  *)
    echo "usage: $0 run|test|bench [pytest args]" >&2
    exit 2
    ;;
esac
