#!/usr/bin/env bash
# The whole GPU check, for a lent GPU machine (see CONTRIBUTING.md): build with CUDA, run the
# CUDA tests (each file in its own process, so one kernel fault cannot hide the other files'
# results), time the issues' CUDA targets against the stock path, run the new-kernel tests
# under compute-sanitizer, and leave the logs under $OUT (at most 8 files come back).
# That machine's python3 already has torch, pytest, CMake, ninja, pybind11 and
# scikit-build-core; it has no network.
# Usage there: bash scripts/gpu_check.sh [parts: any of tests,targets,sanitizer,oldkernels]
set -uo pipefail
OUT=${OUT:-/tmp/affectkit-gpu}
mkdir -p "$OUT"
PARTS=${1:-tests,targets,sanitizer}
export PYTHONUNBUFFERED=1 AFFECTKIT_CUDA=ON
# sm_90 alone is enough on an H100/H200 and halves the build.
export AFFECTKIT_CUDA_ARCHS=${AFFECTKIT_CUDA_ARCHS:-90-real}
LOG="$OUT/log.txt"
PYTEST=(python3 -m pytest -q -rs -p no:cacheprovider --benchmark-disable)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$LOG"
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1; then
  echo "build failed"; tail -60 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s" | tee -a "$LOG"
python3 -m affectkit info --json 2>&1 | tr -d '\n ' | tee -a "$LOG"; echo
cd /tmp  # import the installed package, never the source tree
REPO=$OLDPWD

if [[ $PARTS == *tests* ]]; then
  for f in test_core_module:40 test_masked_mean:60 test_cuda_graphs:60 test_cross_modal_attention:150 \
           test_nn_attention:45 test_graph_ops:90 test_exact_knn:90; do
    echo "=== ${f%:*}" | tee -a "$OUT/tests.log"
    timeout "${f#*:}" "${PYTEST[@]}" -v "$REPO/tests/${f%:*}.py" -k "cuda or core_module or graphs" 2>&1 \
      | tee -a "$OUT/tests.log" | grep -E "FAILED|Error|error|passed|failed" | tail -8
  done
  if grep -q "Segmentation fault\|Fatal Python" "$OUT/tests.log"; then  # where exactly, if anything crashed
    timeout 90 cuda-gdb -q -batch -ex run -ex bt --args "${PYTEST[@]}" "$REPO/tests/test_core_module.py" \
      > "$OUT/gdb.log" 2>&1; grep -A12 "SIGSEGV" "$OUT/gdb.log" | head -30
  fi
fi

if [[ $PARTS == *targets* ]]; then
  for part in attention fusion graph knn; do
    timeout 90 python3 "$REPO/benchmarks/gpu_targets.py" --only "$part" --out "$OUT/targets.md" 2>&1 \
      | tee -a "$LOG" | grep -v '^|'
  done
fi
if [[ $PARTS == *oldkernels* ]]; then  # the kernels before the tensor-core paths, for the record
  AFFECTKIT_ATTENTION_TENSOR_CORES=0 AFFECTKIT_KNN_TENSOR_CORES=0 timeout 60 python3 "$REPO/benchmarks/gpu_targets.py" \
    --only attention-small,knn --out "$OUT/targets_old.md" 2>&1 | tee -a "$LOG" | grep -v '^|'
fi

if [[ $PARTS == *sanitizer* ]]; then
  timeout 120 compute-sanitizer --tool memcheck --print-limit 20 "${PYTEST[@]}" -x \
    "$REPO/tests/test_cross_modal_attention.py" "$REPO/tests/test_exact_knn.py" "$REPO/tests/test_graph_ops.py" \
    -k "${SANITIZE_K:-tensor_core and not compile}" > "$OUT/sanitizer.log" 2>&1
  echo "sanitizer exit $?"; grep -m8 "ERROR SUMMARY\|Invalid\|passed\|failed" "$OUT/sanitizer.log"
fi
echo "=== targets"; cat "$OUT/targets.md" 2>/dev/null
grep -h -E "^[0-9]+ (passed|failed)|passed|failed" "$OUT/tests.log" 2>/dev/null | grep -v "^tests\|::" 
