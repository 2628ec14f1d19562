#!/usr/bin/env bash
# The multi-GPU runs on a machine with 2+ GPUs (device kind nvidia-h100-x2 or larger), one device call:
#   bash scripts/multi_gpu.sh CONFIG [key=value overrides...]   # e.g. tiny-moe, small
#   bash scripts/multi_gpu.sh bytes [fp8_all_gather_bytes.py options]
# CONFIG: one GPU at the 2-GPU global batch (grad_accum_steps=2), DDP, FSDP2 and FSDP2 with
# FP8 all-gather on NPROC GPUs (default 2), each against the one-GPU run with compare.py
# (loss bar 0.25%); a one-GPU run at the per-GPU batch for the tokens/s-per-GPU bar.
# bytes: bytes on the wire and NCCL all-gather time, FSDP2 with and without FP8 all-gather.
# ONLY picks runs (default: "1gpu ddp fsdp2 fsdp2-fp8ag 1gpu-speed"; `small` at 1000 steps
# needs two calls: ~2 min a run, the 1gpu one twice that), RUNS keeps them (default runs).
# Every run has STEP_TIMEOUT seconds (default 600); logs under $LOGS, packed into
# $OUT/logs.tgz after each step. NVLink multicast stays off (the device's rule).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fp8train-out}; LOGS=${LOGS:-/tmp/fp8train-logs}; RUNS=${RUNS:-runs}
NPROC=${NPROC:-2}; limit=${STEP_TIMEOUT:-600}
mkdir -p "$OUT" "$LOGS"
pack() { tar czf "$OUT/logs.tgz.tmp" -C "$LOGS" . && mv "$OUT/logs.tgz.tmp" "$OUT/logs.tgz"; }
what=$1; shift
nvidia-smi --query-gpu=index,name,clocks.sm --format=csv | tee "$LOGS/gpus.txt"
if [ "$what" = bytes ]; then
    timeout "$limit" torchrun --nproc_per_node "$NPROC" scripts/fp8_all_gather_bytes.py "$@" 2>&1 \
        | grep -v "UserWarning\|_register_pre_backward_hook" | tee "$LOGS/all_gather_bytes.log"
    rc=${PIPESTATUS[0]}; pack; exit "$rc"
fi
cfg=$what
status=0
ONLY=" ${ONLY:-1gpu ddp fsdp2 fsdp2-fp8ag 1gpu-speed} "
launch() {  # name, accelerate config, processes, extra overrides...
    local name=$1 acc=$2 procs=$3; shift 3
    [[ "$ONLY" == *" $name "* ]] || return 0
    echo "=== $cfg $name"
    timeout "$limit" accelerate launch --config_file "recipes/accelerate/$acc.yaml" --num_processes "$procs" \
        recipes/pretrain.py --config "recipes/configs/$cfg.yaml" run_name="$cfg-$name" out_dir="$RUNS" \
        progress_bar=false "$@" > "$LOGS/${cfg}_$name.log" 2>&1
    local rc=$?
    tail -3 "$LOGS/${cfg}_$name.log"
    for f in summary.json metrics.jsonl; do
        [ -f "$RUNS/$cfg-$name/$f" ] && cp "$RUNS/$cfg-$name/$f" "$LOGS/${cfg}_${name}_$f"
    done
    status=$((status | rc)); pack
}
launch 1gpu single_gpu 1 grad_accum_steps="$NPROC" "$@"
launch ddp ddp "$NPROC" "$@"
launch fsdp2 fsdp2 "$NPROC" "$@"
launch fsdp2-fp8ag fsdp2 "$NPROC" fp8_all_gather=true "$@"
launch 1gpu-speed single_gpu 1 "$@"
for run in ddp fsdp2 fsdp2-fp8ag; do
    [ -f "$RUNS/$cfg-1gpu/metrics.jsonl" ] && [ -f "$RUNS/$cfg-$run/metrics.jsonl" ] || continue
    # One GPU against several: the process count differs on purpose (listed, not refused).
    python recipes/compare.py "$RUNS/$cfg-1gpu" "$RUNS/$cfg-$run" --max-rel-err 0.0025 --allow-mismatch \
        --out "$LOGS/compare_${cfg}_$run" 2>&1 | tee "$LOGS/compare_${cfg}_$run.log"
    status=$((status | PIPESTATUS[0]))
done
python - "$RUNS" "$cfg" "$NPROC" <<'PY' 2>&1 | tee "$LOGS/speed_${cfg}.log"
import json, sys
runs, cfg, nproc = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    one = json.load(open(f"{runs}/{cfg}-1gpu-speed/summary.json"))["tokens_per_s"]
except FileNotFoundError:
    sys.exit(f"{cfg}: no one-GPU speed run in {runs}")
for run in ("ddp", "fsdp2", "fsdp2-fp8ag"):
    try:
        s = json.load(open(f"{runs}/{cfg}-{run}/summary.json"))
    except FileNotFoundError:
        print(f"{cfg} {run}: no summary (the run failed: see its log)")
        continue
    per_gpu = s["tokens_per_s"] / s["processes"]
    print(f"{cfg} {run}: {per_gpu:,.0f} tokens/s per GPU vs {one:,.0f} on one GPU: "
          f"{per_gpu / one:.3f}x (target >= 0.9)")
PY
pack
exit $status
