#!/usr/bin/env bash
# The GEMM kernel measurements in two device calls (each fits the 10-minute limit); logs under $OUT.
#   bash scripts/kernel_bars.sh 1   # GPU tests of the dense and grouped GEMMs, then the small-M
#                                   # sweep (tiles and splits around the heuristic's, DeepGEMM beside)
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
    timeout 300 python scripts/sweep_gemm.py split > "$OUT/split.log" 2>&1 || status=1
    # Per shape: the heuristic's config (first line), the best three, DeepGEMM.
    python - "$OUT/split.log" <<'PY'
import re, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"(1d2d \S+) (.*): +(\d+) TFLOP/s", line)
    if m:
        rows.setdefault(m.group(1), []).append((int(m.group(3)), m.group(2)))
for shape, entries in rows.items():
    ours = [e for e in entries if e[1] != "DeepGEMM"]
    deep = [e for e in entries if e[1] == "DeepGEMM"]
    print(shape, "heuristic", ours[0], "best", sorted(ours, reverse=True)[:3], "DeepGEMM", deep)
PY
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
