#!/usr/bin/env bash
# The whole GPU check, for a lent GPU machine (see CONTRIBUTING.md): build with CUDA, then run
# the given steps in order, leaving logs under $OUT (at most 8 files come back):
#   tests/FILE.py:SECONDS[:K]  that file's CUDA tests (or those matching -k K, no spaces; commas
#                           in K mean "or": compacted,ties runs -k "compacted or ties"), in
#                           its own process (one kernel fault cannot hide another file's
#                           results), with a time limit
#   targets[:PARTS]         benchmarks/gpu_targets.py (the issues' CUDA targets vs stock)
#   old-kernels             the same for the kernels before the tensor-core paths
#   variants:VAR:V1,V2:PART  gpu_targets.py's PART once per value of the environment variable
#                           VAR (one process each; "default" leaves it unset), e.g.
#                           variants:AFFECTKIT_ATTENTION_LONG_KERNEL:default,0:attention-long
#   bench:EXPR              the pytest benchmarks matching -k "EXPR and cuda" (no spaces in
#                           EXPR), e.g. bench:m2fnet for #7's training step and latency
#   ncu:REGEX:PART[:MATCH]  Nsight Compute (speed of light, occupancy, stall reasons) over the
#                           kernels matching REGEX in one run of a gpu_targets.py part, only
#                           its cases whose name contains MATCH (no spaces; "_" stands for a
#                           space), e.g. ncu:tc_conv_kernel:graph:N=62
#   ncusrc:REGEX:PART[:MATCH]  one run of the first matching kernel: speed of light, occupancy
#                           and memory lines into log.txt, its warp-stall samples per SASS
#                           instruction as CSV (ncu_source_PART_KERNEL.csv) and the hottest 40
#                           instructions with their stall reasons (scripts/ncu_hot_lines.py)
#   sanitizer               compute-sanitizer memcheck over the CUDA tests matching -k "$SANITIZE_K"
#   probe                   scripts/probe/wgmma_probe.cu: the k-NN kernel's wgmma helpers alone
#                           (descriptors, swizzle, accumulator layout) against a float64 product;
#                           then wgmma_attention_probe.cu: P from registers and an N-major V
#                           (which descriptor offsets work); then wgmma_graph_probe.cu: the
#                           graph wg kernel's tf32 and bf16 products, also with the left
#                           operand from registers
#   env:VAR=VALUE           export VAR=VALUE for the steps after it (env:VAR= unsets it), e.g.
#                           env:AFFECTKIT_KNN_WGMMA=1 tests/test_exact_knn.py:150 runs a whole
#                           test file on a candidate kernel before it becomes the default
# Without arguments: every CUDA test file, all targets. That machine's python3 already has
# torch, pytest, CMake, ninja, pybind11 and scikit-build-core; it has no network.
set -uo pipefail
OUT=${OUT:-/tmp/affectkit-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 AFFECTKIT_CUDA=ON
# sm_90 alone is enough on an H100/H200 and halves the build.
export AFFECTKIT_CUDA_ARCHS=${AFFECTKIT_CUDA_ARCHS:-90-real}
LOG="$OUT/log.txt"
PYTEST=(python3 -m pytest -q -rs -p no:cacheprovider --benchmark-disable)
ALL_TESTS="tests/test_cross_modal_attention.py:150 tests/test_exact_knn.py:150 tests/test_graph_ops.py:90
  tests/test_index_cuda.py:60 tests/test_cuda_graphs.py:60 tests/test_masked_mean.py:60 tests/test_nn_attention.py:60
  tests/test_core_module.py:40 tests/test_attention_long_cuda.py:200 tests/test_graph_conv_cuda_fast.py:300
  tests/test_exact_knn_mma.py:200:mma tests/test_attention_key_groups_cuda.py:200"
STEPS=${*:-probe $ALL_TESTS targets}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$LOG"
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1; then
  echo "build failed"; tail -60 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s" | tee -a "$LOG"
python3 -m affectkit info --json 2>&1 | tr -d '\n ' | tee -a "$LOG"; echo
REPO=$PWD
cd /tmp  # import the installed package, never the source tree
# pytest-timeout's --session-timeout ends a test step between tests before its hard limit, so
# that pytest still prints the failures of the tests that ran (a killed step prints none).
HAS_SESSION_TIMEOUT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo 1)

for step in $STEPS; do
  t0=$(date +%s)
  case $step in
    tests/*)
      IFS=: read -r file limit kexpr <<< "$step"
      kexpr=${kexpr//,/ or }
      echo "=== $file ${kexpr:-}" | tee -a "$OUT/tests.log"
      soft=(); [[ -n $HAS_SESSION_TIMEOUT ]] && soft=(--session-timeout "$(( limit > 40 ? limit - 20 : limit ))")
      timeout "$limit" "${PYTEST[@]}" "${soft[@]}" -v "$REPO/$file" -k "${kexpr:-cuda or core_module or graphs}" 2>&1 \
        | tee -a "$OUT/tests.log" | grep -E "FAILED|Error|rror:|Fatal| passed| failed" | tail -8
      if [[ $file == *core_module* ]] && grep -q "Fatal Python" "$OUT/tests.log"; then
        timeout 45 cuda-gdb -q -batch -ex run -ex bt --args "${PYTEST[@]}" "$REPO/$file" > "$OUT/gdb.log" 2>&1
        grep -A14 "SIGSEGV" "$OUT/gdb.log" | head -24
      fi ;;
    targets*)
      parts=${step#targets}; parts=${parts#:}
      for part in $(echo "${parts:-attention,fusion,graph,knn}" | tr , ' '); do
        timeout 90 python3 "$REPO/benchmarks/gpu_targets.py" --only "$part" --out "$OUT/targets.md" 2>&1 \
          | tee -a "$LOG" | grep -v '^|'
      done ;;
    old-kernels)
      AFFECTKIT_ATTENTION_TENSOR_CORES=0 AFFECTKIT_KNN_TENSOR_CORES=0 timeout 90 python3 \
        "$REPO/benchmarks/gpu_targets.py" --only attention-small,knn --out "$OUT/targets_old.md" 2>&1 \
        | tee -a "$LOG" | grep -v '^|' ;;
    variants:*)
      IFS=: read -r _ var values part <<< "$step"
      for value in ${values//,/ }; do
        echo "--- $var=$value" | tee -a "$OUT/targets.md"
        env $( [[ $value == default ]] || echo "$var=$value" ) timeout 90 python3 \
          "$REPO/benchmarks/gpu_targets.py" --only "$part" --out "$OUT/targets.md" 2>&1 | tee -a "$LOG" | grep -v '^|'
      done ;;
    ncu:*)
      IFS=: read -r _ regex part match <<< "$step"
      # --clock-control none: measure the card at its own clocks (the device notes ask this).
      # --print-details all (where this ncu has it): the stall reasons and source-line tables.
      details=(); ncu --help 2>/dev/null | grep -q -- "--print-details" && details=(--print-details all)
      timeout 240 ncu --clock-control none --kernel-name "regex:$regex" --launch-count 2 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis --section SchedulerStats --section SourceCounters "${details[@]}" \
        python3 "$REPO/benchmarks/gpu_targets.py" --only "$part" --match "${match//_/ }" > "$OUT/ncu_$part.txt" 2>&1
      echo "ncu exit $?"; grep -E "Duration|Throughput|Hit Rate|Achieved Occupancy|Pipe|Stall|Issued Warp|No Eligible" \
        "$OUT/ncu_$part.txt" | head -40
      # The stall reasons as raw metrics (warps stalled per issuing cycle, by reason): the
      # sections above printed none in the twentieth and twenty-first sessions' runs. A second
      # run, so that a metric this ncu rejects costs only this part; appended to the same file
      # (at most 8 files come back). Not yet run on a GPU.
      echo "=== stall reasons" >> "$OUT/ncu_$part.txt"
      timeout 120 ncu --clock-control none --kernel-name "regex:$regex" --launch-count 1 \
        --metrics "regex:^smsp__average_warps_issue_stalled_[a-z_]+_per_issue_active\.ratio$" \
        python3 "$REPO/benchmarks/gpu_targets.py" --only "$part" --match "${match//_/ }" >> "$OUT/ncu_$part.txt" 2>&1
      echo "ncu stalls exit $?"; grep -E "issue_stalled" "$OUT/ncu_$part.txt" | sort -k3 -g -r | head -12 ;;
    ncusrc:*)
      IFS=: read -r _ regex part match <<< "$step"
      timeout 240 ncu --clock-control none --kernel-name "regex:$regex" --launch-count 1 \
        --section SourceCounters --section WarpStateStats --section SpeedOfLight --section Occupancy \
        --section MemoryWorkloadAnalysis --section SchedulerStats -f -o /tmp/ncu_src \
        python3 "$REPO/benchmarks/gpu_targets.py" --only "$part" --match "${match//_/ }" > /tmp/ncu_src.log 2>&1
      echo "ncu source exit $?"; tail -3 /tmp/ncu_src.log
      ncu --import /tmp/ncu_src.ncu-rep --page details 2>&1 | grep -E "Duration|Throughput|Hit Rate|Occupancy|Issued Warp|No Eligible|Registers" \
        | tee -a "$LOG"
      # The report itself stays there (one file less to bring back); its source page comes as CSV,
      # one a part and kernel (the name's leading letters: wg, warp, mma).
      csv="$OUT/ncu_source_${part}_${regex%%[^A-Za-z0-9]*}.csv"
      ncu --import /tmp/ncu_src.ncu-rep --page source --csv --print-source sass > "$csv" 2>&1 \
        || ncu --import /tmp/ncu_src.ncu-rep --page source --csv > "$csv" 2>&1
      python3 "$REPO/scripts/ncu_hot_lines.py" "$csv" 40 2>&1 | tee -a "$LOG" ;;
    bench:*)
      timeout 150 python3 -m pytest -q -p no:cacheprovider "$REPO/benchmarks" --benchmark-only \
        -k "${step#bench:} and cuda" --benchmark-columns=min,median,rounds 2>&1 | tee -a "$OUT/bench.log" \
        | grep -A40 "speed-up" ;;
    probe)
      : > "$OUT/probe.log"
      for probe in wgmma_probe wgmma_attention_probe wgmma_graph_probe; do
        "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a \
          -I "$REPO/csrc" "$REPO/scripts/probe/$probe.cu" -o "/tmp/$probe" >> "$OUT/probe.log" 2>&1 \
          && timeout 30 "/tmp/$probe" >> "$OUT/probe.log" 2>&1
        echo "$probe exit $?"
      done
      grep -E "probe|O\(|D\(|^A[1-5]" "$OUT/probe.log" | tail -22 ;;
    env:*)
      assignment=${step#env:}
      if [[ ${assignment#*=} == "" ]]; then unset "${assignment%%=*}"; else export "${assignment?}"; fi
      echo "env: ${assignment}" | tee -a "$LOG" "$OUT/tests.log" ;;
    sanitizer)
      timeout 100 compute-sanitizer --tool memcheck --print-limit 20 "${PYTEST[@]}" -x \
        "$REPO/tests/test_cross_modal_attention.py" "$REPO/tests/test_exact_knn.py" "$REPO/tests/test_graph_ops.py" \
        -k "${SANITIZE_K:-tensor_core}" > "$OUT/sanitizer.log" 2>&1
      echo "sanitizer exit $?"; grep -m8 "ERROR SUMMARY\|Invalid\| passed\| failed" "$OUT/sanitizer.log" ;;
  esac
  echo "[$step: $(( $(date +%s) - t0 )) s]" | tee -a "$LOG"
done
echo "=== targets"; cat "$OUT/targets.md" 2>/dev/null || echo "(no targets step)"
