#!/usr/bin/env bash
# FP8 and BF16 runs of one recipe config, same seed and data, then compare.py (device use):
#   bash scripts/recipe_pair.sh CONFIG [compare.py bar options --] [key=value overrides...]
# e.g. bash scripts/recipe_pair.sh small --window 100 --max-rel-err 0.0025 --
#      bash scripts/recipe_pair.sh 1b --min-speedup 1.3 --max-mem-ratio 1.0 -- max_steps=40
# Each run has STEP_TIMEOUT seconds (default 600). Logs, summaries, metrics and the compare
# report land in $LOGS (default /tmp/fp8train-logs); the runs under $RUNS (default runs).
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
for precision in fp8 bf16; do
    echo "=== recipe $cfg $precision $*"
    timeout "${STEP_TIMEOUT:-600}" python recipes/pretrain.py --config "recipes/configs/$cfg.yaml" \
        --precision "$precision" progress_bar=false out_dir="$RUNS" "$@" > "$LOGS/recipe_${cfg}_$precision.log" 2>&1
    rc=$?
    tail -6 "$LOGS/recipe_${cfg}_$precision.log"
    status=$((status | rc))
    for f in summary.json metrics.jsonl; do
        [ -f "$RUNS/$cfg-$precision/$f" ] && cp "$RUNS/$cfg-$precision/$f" "$LOGS/${cfg}_${precision}_$f"
    done
done
python recipes/compare.py "$RUNS/$cfg-fp8" "$RUNS/$cfg-bf16" ${bars[@]+"${bars[@]}"} --out "$LOGS/compare_$cfg" 2>&1 \
    | tee "$LOGS/compare_$cfg.log"
exit $((status | PIPESTATUS[0]))
