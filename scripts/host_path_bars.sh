#!/usr/bin/env bash
# The host-path bars in two device calls (each fits the 10-minute limit); logs under $OUT.
#   bash scripts/host_path_bars.sh 1   # GPU tests (REQUIRE_GPU), auto vs cuBLAS direct, bench hf llama-1b
#   bash scripts/host_path_bars.sh 2   # bench hf qwen3-moe-1b (eager and compiled), layer host times
# Carry .kcache (FP8TRAIN_CACHE_DIR=.kcache python scripts/prebuild_kernels.py).
set -uo pipefail
OUT=${OUT:-/tmp/fp8train-out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 FP8TRAIN_CACHE_DIR=${FP8TRAIN_CACHE_DIR:-$PWD/.kcache} FP8TRAIN_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
case "${1:-1}" in
1)
    timeout 200 python -m pytest -q -m gpu tests/test_sync_free_gpu.py tests/test_hf_models.py tests/test_nn_gpu.py \
        -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1 || status=1
    tail -4 "$OUT/gpu_tests.log"
    timeout 120 python -m benchmarks gemm --shapes "4096,32768,512;128,32768,512;4096,7168,2048;8192,8192,8192;4096,4096,7168" \
        > "$OUT/bench_gemm.log" 2>&1 || status=1
    grep -E "auto|1d2d:" "$OUT/bench_gemm.log" | tail -8
    timeout 260 python -m benchmarks hf --models llama-1b > "$OUT/bench_hf_llama.log" 2>&1 || status=1
    grep -E "^llama|worst layer|tok/s \(|against|more than" "$OUT/bench_hf_llama.log"
    ;;
2)
    timeout 330 python -m benchmarks hf --models qwen3-moe-1b > "$OUT/bench_hf_moe.log" 2>&1 || status=1
    grep -E "^qwen|worst layer|tok/s \(|against|more than" "$OUT/bench_hf_moe.log"
    timeout 120 python scripts/profile_step.py layers 2>&1 | grep -v -i warn | tee "$OUT/layers.log"
    ;;
esac
exit $status
