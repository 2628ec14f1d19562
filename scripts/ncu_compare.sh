#!/usr/bin/env bash
# Nsight Compute on our 1D2D GEMM and DeepGEMM's, same shape, one kernel each; the side-by-
# side table of their metrics (device only; carry .kcache and .deepgemm). Logs under $OUT.
#   bash scripts/ncu_compare.sh [M N K]                (default 4096 4096 7168)
#   bash scripts/ncu_compare.sh grouped G ROWS N K     (m-grouped contiguous, e.g. 8 4096 7168 2048)
#   bash scripts/ncu_compare.sh masked G ROWS N K      (our masked GEMM against our contiguous one on
#                                                       the same rows, e.g. 8 256 7168 2048)
set -uo pipefail
OUT=${OUT:-/tmp/fp8train-out}
mkdir -p "$OUT"
export PYTHONPATH=.:.deepgemm PYTHONUNBUFFERED=1 FP8TRAIN_CACHE_DIR=${FP8TRAIN_CACHE_DIR:-$PWD/.kcache}
# Two runs of scripts/ncu_gemm.py, A and B, their kernels' name patterns and table columns.
A_KERNEL=regex:fp8train_gemm B_KERNEL=regex:fp8_gemm_kernel NAMES=(ours DeepGEMM)
if [ "${1:-}" = grouped ]; then
    A=(run-grouped ours "$2" "$3" "$4" "$5") B=(run-grouped deepgemm "$2" "$3" "$4" "$5")
elif [ "${1:-}" = masked ]; then
    A=(run-masked masked "$2" "$3" "$4" "$5") B=(run-masked contiguous "$2" "$3" "$4" "$5")
    B_KERNEL=regex:fp8train_gemm NAMES=(masked contiguous)
else
    A=(run ours "${1:-4096}" "${2:-4096}" "${3:-7168}") B=(run deepgemm "${1:-4096}" "${2:-4096}" "${3:-7168}")
fi
SECTIONS="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section WarpStateStats --section InstructionStats --section LaunchStats --section Occupancy"
# Warm DeepGEMM's JIT outside the profiler (its nvcc run is slow under ncu).
python scripts/ncu_gemm.py "${B[@]}" > /dev/null 2>&1
status=0
# --clock-control none: leave the clocks as the benches run them.
ncu --clock-control none -k "$A_KERNEL" -c 1 $SECTIONS --csv --page details \
    python scripts/ncu_gemm.py "${A[@]}" > "$OUT/ncu_a.csv" 2> "$OUT/ncu_a.err" || status=1
ncu --clock-control none -k "$B_KERNEL" -c 1 $SECTIONS --csv --page details \
    python scripts/ncu_gemm.py "${B[@]}" > "$OUT/ncu_b.csv" 2> "$OUT/ncu_b.err" || status=1
python scripts/ncu_gemm.py table "$OUT/ncu_a.csv" "$OUT/ncu_b.csv" "${NAMES[@]}" | tee "$OUT/ncu_table.md" || status=1
# Stall reasons (cycles per issued instruction in each), which the sections' CSV leaves out:
# a second pass per kernel, so a metric this ncu lacks costs only this table.
STALLS="regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$"
ncu --clock-control none -k "$A_KERNEL" -c 1 --metrics "$STALLS" --csv --page details \
    python scripts/ncu_gemm.py "${A[@]}" > "$OUT/ncu_stalls_a.csv" 2>> "$OUT/ncu_a.err" &&
ncu --clock-control none -k "$B_KERNEL" -c 1 --metrics "$STALLS" --csv --page details \
    python scripts/ncu_gemm.py "${B[@]}" > "$OUT/ncu_stalls_b.csv" 2>> "$OUT/ncu_b.err" &&
python scripts/ncu_gemm.py table "$OUT/ncu_stalls_a.csv" "$OUT/ncu_stalls_b.csv" "${NAMES[@]}" | tee "$OUT/ncu_stalls.md" ||
    status=1
exit $status
