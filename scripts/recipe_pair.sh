#!/usr/bin/env bash
# FP8 and BF16 runs of one recipe config, same seed and data, then compare.py (device use):
#   bash scripts/recipe_pair.sh CONFIG [compare.py bar options --] [key=value overrides...]
# e.g. bash scripts/recipe_pair.sh small --window 100 --max-rel-err 0.0025 --
#      bash scripts/recipe_pair.sh 1b --min-speedup 1.3 --max-mem-ratio 1.0 -- max_steps=40
# Each run has STEP_TIMEOUT seconds (default 600). Logs, summaries, metrics and the compare
# report land in $LOGS (default /tmp/fp8train-logs); the runs under $RUNS (default runs).
# SIDE_BY_SIDE=1 runs the two at the same time on one GPU: for the loss bars only (same
# seed, same batches, same curves); tokens/s of runs sharing a GPU mean nothing.
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
status=0
train() {
    timeout "${STEP_TIMEOUT:-600}" python recipes/pretrain.py --config "recipes/configs/$cfg.yaml" \
        --precision "$1" progress_bar=false out_dir="$RUNS" "${@:2}" > "$LOGS/recipe_${cfg}_$1.log" 2>&1
}
if [ "${SIDE_BY_SIDE:-0}" = 1 ]; then
    train fp8 "$@" & fp8_pid=$!
    train bf16 "$@" & bf16_pid=$!
    wait $fp8_pid; status=$((status | $?))
    wait $bf16_pid; status=$((status | $?))
fi
for precision in fp8 bf16; do
    if [ "${SIDE_BY_SIDE:-0}" != 1 ]; then
        echo "=== recipe $cfg $precision $*"
        train "$precision" "$@"
        status=$((status | $?))
    fi
    tail -6 "$LOGS/recipe_${cfg}_$precision.log"
    for f in summary.json metrics.jsonl; do
        [ -f "$RUNS/$cfg-$precision/$f" ] && cp "$RUNS/$cfg-$precision/$f" "$LOGS/${cfg}_${precision}_$f"
    done
done
python recipes/compare.py "$RUNS/$cfg-fp8" "$RUNS/$cfg-bf16" ${bars[@]+"${bars[@]}"} --out "$LOGS/compare_$cfg" 2>&1 \
    | tee "$LOGS/compare_$cfg.log"
exit $((status | PIPESTATUS[0]))
