#!/usr/bin/env bash
# One device call: GPU tests (every native path against the reference), then the benchmark
# tables. Logs land in $OUT (the device tool brings them back). Usage on the device:
#   bash scripts/on_device.sh [bench suite [its options]]...      (default: gemm)
# e.g. bash scripts/on_device.sh gemm "gemm --split-k --shapes 64,2112,7168;128,4096,7168" grouped
#      bash scripts/on_device.sh none      (the GPU tests only)
# Every step has its own time limit (STEP_TIMEOUT seconds, default 600), so one hang costs
# one step, not the call; TESTS=0 skips the GPU tests.
set -uo pipefail
OUT=${OUT:-/tmp/fp8train-out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1 FP8TRAIN_CACHE_DIR=${FP8TRAIN_CACHE_DIR:-/tmp/fp8train-cache}
limit=${STEP_TIMEOUT:-600}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv | tee "$OUT/gpu.txt"
status=0
if [ "${TESTS:-1}" != 0 ]; then
    # One pytest process per test file: a kernel fault (illegal address) poisons the CUDA
    # context of its process, and must not take the other files' verdicts with it.
    : > "$OUT/gpu_tests.log"; : > "$OUT/gpu_tests_summary.txt"
    for file in $(grep -l "pytest.mark.gpu" tests/test_*.py); do
        echo "=== $file" | tee -a "$OUT/gpu_tests.log"
        timeout "$limit" python -m pytest -q -m gpu "$file" -p no:cacheprovider -rf --durations=5 2>&1 \
            | tee -a "$OUT/gpu_tests.log" | tail -15
        rc=${PIPESTATUS[0]}
        echo "$file rc=$rc" >> "$OUT/gpu_tests_summary.txt"
        status=$((status | (rc != 0 && rc != 5)))  # 5: no GPU test collected in the file
    done
    cat "$OUT/gpu_tests_summary.txt"
fi
if [ "${1:-}" = none ]; then suites=(); elif [ $# -eq 0 ]; then suites=(gemm); else suites=("$@"); fi
for spec in ${suites[@]+"${suites[@]}"}; do
    slug=$(echo "$spec" | tr -c 'A-Za-z0-9' '_' | cut -c1-60)
    echo "=== bench $spec"
    # shellcheck disable=SC2086  # the spec is a suite and its options
    timeout "$limit" python -m fp8train.bench $spec --json "$OUT/bench_$slug.json" 2>&1 | tee "$OUT/bench_$slug.log"
    status=$((status | PIPESTATUS[0]))
done
exit $status
