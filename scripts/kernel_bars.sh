#!/usr/bin/env bash
# The GEMM kernel measurements in two device calls (each fits the 10-minute limit); logs under $OUT.
#   bash scripts/kernel_bars.sh 1   # GPU tests of the dense and grouped GEMMs, the grouped GEMMs
#                                   # on 256-row tiles (DeepGEMM's masked beside), fewest CTAs
#   bash scripts/kernel_bars.sh 2   # bench gemm (every shape) and bench grouped, DeepGEMM beside
# Carry .kcache (FP8TRAIN_CACHE_DIR=.kcache python scripts/prebuild_kernels.py --sweep) and
# .deepgemm (DeepGEMM's tree, docs/kernels.md); without the latter DeepGEMM is not measured.
set -uo pipefail
OUT=${OUT:-/tmp/fp8train-out}
mkdir -p "$OUT"
export PYTHONPATH=.:.deepgemm PYTHONUNBUFFERED=1 FP8TRAIN_CACHE_DIR=${FP8TRAIN_CACHE_DIR:-$PWD/.kcache} FP8TRAIN_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
case "${1:-1}" in
1)
    timeout 240 python -m pytest -q -x tests/test_gemm_native.py tests/test_gemm_grouped_native.py \
        > "$OUT/test_gemm.log" 2>&1 || status=1
    tail -3 "$OUT/test_gemm.log"
    timeout 200 python scripts/sweep_gemm.py grouped256 > "$OUT/sweep.log" 2>&1 || status=1
    cat "$OUT/sweep.log"
    timeout 90 python scripts/sweep_gemm.py fewest_ctas > "$OUT/ctas.log" 2>&1 || status=1
    cat "$OUT/ctas.log"
    ;;
2)
    timeout 360 python -m benchmarks gemm --json "$OUT/gemm.json" > "$OUT/bench_gemm.log" 2>&1 || status=1
    grep -E "^1d" "$OUT/bench_gemm.log" | cut -c1-220
    grep -v "^1d.*GemmConfig" "$OUT/bench_gemm.log" | tail -8
    timeout 220 python -m benchmarks grouped --json "$OUT/grouped.json" > "$OUT/bench_grouped.log" 2>&1 || status=1
    tail -40 "$OUT/bench_grouped.log"
    ;;
esac
exit $status
