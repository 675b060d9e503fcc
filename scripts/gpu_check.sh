#!/usr/bin/env bash
# The whole GPU check, for a lent GPU machine (see CONTRIBUTING.md): build with CUDA, run every
# test (the @requires_cuda ones run there), run the CUDA benchmarks, and leave the logs and a
# summary under $OUT. That machine's python3 already has torch, pytest, pytest-benchmark,
# pandas, rich, CMake, ninja, pybind11 and scikit-build-core; it has no network.
# Usage there: bash scripts/gpu_check.sh [pytest -k expression for the benchmarks]
set -uo pipefail
OUT=${OUT:-/tmp/affectkit-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 AFFECTKIT_CUDA=ON
# sm_90 alone is enough on an H100/H200 and halves the build.
export AFFECTKIT_CUDA_ARCHS=${AFFECTKIT_CUDA_ARCHS:-90-real}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1; then
  echo "build failed"; tail -40 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
python3 -m affectkit info --json | tee "$OUT/info.json"

# Every test; the summary lists what was skipped and why (no CUDA test may skip here).
timeout 300 python3 -m pytest tests -q -x --benchmark-disable -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25

# CUDA benchmarks against the stock path, with the speed-up summary.
timeout 240 python3 -m pytest benchmarks -q --benchmark-only -k "cuda${1:+ and ($1)}" -p no:cacheprovider \
  --benchmark-columns=min,median,rounds --benchmark-json="$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.log" | grep -A200 "speed-up" | head -80
cat "$OUT/gpu.txt"
