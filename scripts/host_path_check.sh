#!/usr/bin/env bash
# One device call for the host path: bench hf's llama rows, host time per layer step (the
# previous commit's tree in .baseline/ beside this one, same GPU), a profiled training step of
# each, the no-sync GPU test and the per-layer numerics. Logs under $OUT.
#   bash scripts/host_path_check.sh            (carry .kcache and .baseline)
set -uo pipefail
OUT=${OUT:-/tmp/fp8train-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FP8TRAIN_CACHE_DIR=${FP8TRAIN_CACHE_DIR:-$PWD/.kcache}
new="env PYTHONPATH=. python scripts/profile_step.py"
base="env PYTHONPATH=.baseline python .baseline/profile_step.py"
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
[ "${SKIP_BENCH:-0}" = 1 ] || PYTHONPATH=. timeout 170 python -m benchmarks hf --models llama-1b --eager-only > "$OUT/bench_hf.log" 2>&1
grep -E "^llama|worst layer|more than|tok/s \(|against" "$OUT/bench_hf.log"
{ [ -d .baseline ] && timeout 80 $base layers; echo "--- new"; timeout 80 $new layers; } 2>&1 | grep -v -i warn | tee "$OUT/layers.log"
{ [ -d .baseline ] && timeout 90 $base steps --out /tmp/pb; echo "--- new"; timeout 90 $new steps --out /tmp/pn; } > "$OUT/steps.log" 2>&1
grep -E "tok/s|^--- new" "$OUT/steps.log"
[ "${SKIP_SYNC:-0}" = 1 ] || timeout 100 python -m pytest -q tests/test_sync_free_gpu.py -p no:cacheprovider > "$OUT/sync_test.log" 2>&1; tail -3 "$OUT/sync_test.log"
timeout 100 $new numerics > "$OUT/numerics.log" 2>&1; grep -v -i warn "$OUT/numerics.log" | tail -45
