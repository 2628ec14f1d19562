#!/usr/bin/env bash
# The GEMM kernel measurements in one device call (fits the 10-minute limit); logs under $OUT.
#   bash scripts/kernel_bars.sh [shapes]   # GPU tests of the GEMM kernels, the 256-row tile
#                                          # sweep, bench gemm (DeepGEMM beside ours)
# Carry .kcache (FP8TRAIN_CACHE_DIR=.kcache python scripts/prebuild_kernels.py --sweep) and
# .deepgemm (DeepGEMM's tree, docs/kernels.md); without the latter DeepGEMM is not measured.
set -uo pipefail
OUT=${OUT:-/tmp/fp8train-out}
mkdir -p "$OUT"
export PYTHONPATH=.:.deepgemm PYTHONUNBUFFERED=1 FP8TRAIN_CACHE_DIR=${FP8TRAIN_CACHE_DIR:-$PWD/.kcache} FP8TRAIN_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
timeout 200 python -m pytest -q -x tests/test_gemm_native.py > "$OUT/test_gemm_native.log" 2>&1 || status=1
tail -3 "$OUT/test_gemm_native.log"
timeout 200 python scripts/sweep_gemm.py tiles256 > "$OUT/sweep.log" 2>&1 || status=1
cat "$OUT/sweep.log"
timeout 180 python -m benchmarks gemm --shapes "${1:-4096,4096,7168;4096,2112,7168;8192,8192,8192;128,4096,7168}" \
    > "$OUT/bench_gemm.log" 2>&1 || status=1
grep -v "^1d.*GemmConfig" "$OUT/bench_gemm.log" | tail -8
grep -E "^1d" "$OUT/bench_gemm.log" | cut -c1-200
exit $status
