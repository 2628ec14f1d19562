#!/usr/bin/env bash
# One device call: GPU tests (every native path against the reference), then the benchmark
# tables. Logs land in $OUT (the device tool brings them back). Usage on the device:
#   bash scripts/on_device.sh [bench suites...]      (default: gemm)
set -uo pipefail
OUT=${OUT:-/tmp/fp8train-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FP8TRAIN_CACHE_DIR=${FP8TRAIN_CACHE_DIR:-/tmp/fp8train-cache}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv | tee "$OUT/gpu.txt"
python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
status=${PIPESTATUS[0]}
for suite in "${@:-gemm}"; do
    python -m fp8train.bench "$suite" --json "$OUT/bench_$suite.json" 2>&1 | tee "$OUT/bench_$suite.log"
    status=$((status | PIPESTATUS[0]))
done
exit $status
