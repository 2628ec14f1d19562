#!/usr/bin/env bash
# One device call: GPU tests (every native path against the reference), then the benchmark
# tables. Usage on the device:
#   bash scripts/on_device.sh [bench suite [its options]]...      (default: gemm)
# e.g. bash scripts/on_device.sh gemm "gemm --shapes 64,2112,7168;128,4096,7168" grouped
#      bash scripts/on_device.sh none      (the GPU tests only)
# Every step has its own time limit (STEP_TIMEOUT seconds, default 600), so one hang costs
# one step, not the call; TESTS=0 skips the GPU tests, TEST_FILES picks some.
# Logs are written under $LOGS and packed after every step into $OUT/logs.tgz: the device
# tool brings back at most 8 files, and a call cut short still returns what ran.
set -uo pipefail
OUT=${OUT:-/tmp/fp8train-out}
LOGS=${LOGS:-/tmp/fp8train-logs}
mkdir -p "$OUT" "$LOGS"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1 FP8TRAIN_CACHE_DIR=${FP8TRAIN_CACHE_DIR:-/tmp/fp8train-cache} FP8TRAIN_REQUIRE_GPU=1
limit=${STEP_TIMEOUT:-600}
pack() { tar czf "$OUT/logs.tgz.tmp" -C "$LOGS" . && mv "$OUT/logs.tgz.tmp" "$OUT/logs.tgz"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv | tee "$LOGS/gpu.txt"
status=0
if [ "${TESTS:-1}" != 0 ]; then
    # One pytest process per test file: a kernel fault (illegal address) poisons the CUDA
    # context of its process, and must not take the other files' verdicts with it.
    : > "$LOGS/gpu_tests.log"; : > "$LOGS/gpu_tests_summary.txt"
    for file in ${TEST_FILES:-$(grep -l "pytest.mark.gpu" tests/test_*.py)}; do
        echo "=== $file" | tee -a "$LOGS/gpu_tests.log"
        timeout "$limit" python -m pytest -q -m gpu "$file" -p no:cacheprovider -rf --durations=5 2>&1 \
            | tee -a "$LOGS/gpu_tests.log" | tail -15
        rc=${PIPESTATUS[0]}
        echo "$file rc=$rc" >> "$LOGS/gpu_tests_summary.txt"
        status=$((status | (rc != 0 && rc != 5)))  # 5: no GPU test in the file
        pack
    done
    cat "$LOGS/gpu_tests_summary.txt"
fi
if [ "${1:-}" = none ]; then suites=(); elif [ $# -eq 0 ]; then suites=(gemm); else suites=("$@"); fi
for spec in ${suites[@]+"${suites[@]}"}; do
    slug=$(echo "$spec" | tr -c 'A-Za-z0-9' '_' | cut -c1-60)
    echo "=== bench $spec"
    # shellcheck disable=SC2086  # the spec is a suite and its options
    timeout "$limit" python -m benchmarks $spec --json "$LOGS/bench_$slug.json" 2>&1 | tee "$LOGS/bench_$slug.log"
    status=$((status | PIPESTATUS[0]))
    pack
done
exit $status
