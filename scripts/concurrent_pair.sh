#!/usr/bin/env bash
# The FP8 and BF16 runs of one recipe config at the same time on one GPU (device use), for
# the loss bars only: tokens/s of runs sharing a GPU mean nothing, the loss curves are the
# same as run alone (same seed, same batches). Waits for both, then compare.py.
#   bash scripts/concurrent_pair.sh CONFIG [compare.py bar options --] [key=value overrides...]
# STEP_TIMEOUT (default 600) bounds each run; logs and summaries land in $LOGS.
set -uo pipefail
cfg=$1; shift
bars=()
if [[ " $* " == *" -- "* ]]; then
    while [ "$1" != "--" ]; do bars+=("$1"); shift; done
    shift
fi
LOGS=${LOGS:-/tmp/fp8train-logs}
RUNS=${RUNS:-runs}
mkdir -p "$LOGS"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
for precision in fp8 bf16; do
    timeout "${STEP_TIMEOUT:-600}" python recipes/pretrain.py --config "recipes/configs/$cfg.yaml" \
        --precision "$precision" progress_bar=false out_dir="$RUNS" "$@" > "$LOGS/recipe_${cfg}_$precision.log" 2>&1 &
done
wait
for precision in fp8 bf16; do
    tail -4 "$LOGS/recipe_${cfg}_$precision.log"
    for f in summary.json metrics.jsonl; do
        [ -f "$RUNS/$cfg-$precision/$f" ] && cp "$RUNS/$cfg-$precision/$f" "$LOGS/${cfg}_${precision}_$f"
    done
done
python recipes/compare.py "$RUNS/$cfg-fp8" "$RUNS/$cfg-bf16" ${bars[@]+"${bars[@]}"} --out "$LOGS/compare_$cfg" 2>&1 \
    | tee "$LOGS/compare_$cfg.log"
