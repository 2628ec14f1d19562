#!/usr/bin/env bash
# The host-path bars in two device calls (each fits the 10-minute limit); logs under $OUT.
#   bash scripts/host_path_bars.sh 1   # every GPU test file (REQUIRE_GPU), one process per file
#   bash scripts/host_path_bars.sh 2   # the HF GPU tests, bench hf (both models, eager and compiled), host time per
#                                      # layer step with its Python profile, auto vs cuBLAS direct
#   bash scripts/host_path_bars.sh 3   # the cast GPU tests and the one-Function SwiGLU MLP's,
#                                      # bench quant (every cast, the SwiGLU-fused ones included,
#                                      # against the copy), bench mlp
#   bash scripts/host_path_bars.sh 4   # the MoE side: the HF GPU tests, bench moe (the experts as
#                                      # one Function and as two), the compiled qwen3-moe-1b
#                                      # step's host/GPU time and profiler tables
# Carry .kcache (FP8TRAIN_CACHE_DIR=.kcache python scripts/prebuild_kernels.py), and .whl with
# a torchao wheel for its bench hf row (docs/hf.md).
set -uo pipefail
OUT=${OUT:-/tmp/fp8train-out}
mkdir -p "$OUT"
# torchao (its row in bench hf) from a carried wheel, where there is one in .whl/.
if ls .whl/torchao-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/torchao-*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 FP8TRAIN_CACHE_DIR=${FP8TRAIN_CACHE_DIR:-$PWD/.kcache} FP8TRAIN_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
case "${1:-1}" in
1)
    STEP_TIMEOUT=150 bash scripts/on_device.sh none || status=1
    ;;
2)
    timeout 100 python -m pytest -q -x tests/test_hf_models.py > "$OUT/test_hf.log" 2>&1 || status=1
    tail -1 "$OUT/test_hf.log"
    timeout 320 python -m benchmarks hf --models llama-1b,qwen3-moe-1b > "$OUT/bench_hf.log" 2>&1 || status=1
    grep -E "^llama|^qwen|worst layer|tok/s \(|against|more than|torchao" "$OUT/bench_hf.log"
    timeout 120 python scripts/profile_step.py layers --cprofile --out "$OUT/prof" 2>&1 | grep -v -i warn \
        > "$OUT/layers.log" || status=1
    grep -E " host " "$OUT/layers.log"
    timeout 130 python -m benchmarks gemm --shapes "4096,32768,512;128,32768,512;4096,7168,2048;8192,8192,8192;4096,4096,7168" \
        > "$OUT/bench_gemm.log" 2>&1 || status=1
    grep -E "auto" "$OUT/bench_gemm.log" | tail -8
    ;;
3)
    timeout 180 python -m pytest -q -x tests/test_cast_native.py tests/test_nn_gpu.py \
        > "$OUT/test_cast.log" 2>&1 || status=1
    tail -3 "$OUT/test_cast.log"
    timeout 300 python -m benchmarks quant --json "$OUT/quant.json" > "$OUT/bench_quant.log" 2>&1 || status=1
    grep -v -i warn "$OUT/bench_quant.log" | tail -45
    timeout 150 python -m benchmarks mlp --json "$OUT/mlp.json" > "$OUT/bench_mlp.log" 2>&1 || status=1
    grep -E "^mlp" "$OUT/bench_mlp.log"
    ;;
4)
    timeout 120 python -m pytest -q tests/test_hf_models.py > "$OUT/test_hf.log" 2>&1 || status=1
    tail -1 "$OUT/test_hf.log"
    timeout 180 python -m benchmarks moe > "$OUT/bench_moe.log" 2>&1 || status=1
    grep -v -i warn "$OUT/bench_moe.log" | tail -20
    timeout 240 python scripts/profile_step.py steps --model qwen3-moe-1b --compiled --out "$OUT/prof" \
        > "$OUT/steps_qwen.log" 2>&1 || status=1
    grep -v -i warn "$OUT/steps_qwen.log" | head -40
    ;;
esac
# The device tool brings back a handful of files per call: the profiles travel as one archive.
if [ -d "$OUT/prof" ]; then tar czf "$OUT/prof.tgz" -C "$OUT" prof && rm -rf "$OUT/prof"; fi
exit $status
