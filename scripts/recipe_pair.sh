#!/usr/bin/env bash
# FP8 and BF16 runs of one recipe config, same seed and data, then compare.py (device use):
#   bash scripts/recipe_pair.sh CONFIG [compare.py bar options --] [key=value overrides...]
# e.g. bash scripts/recipe_pair.sh small --window 100 --max-rel-err 0.0025 --
#      bash scripts/recipe_pair.sh 1b --min-speedup 1.3 --max-mem-ratio 1.0 -- max_steps=40
# Each run has STEP_TIMEOUT seconds (default 600). Logs, summaries, metrics and the compare
# report land in $LOGS (default /tmp/fp8train-logs); the runs under $RUNS (default runs).
# The two run one after the other (the speed bars need the GPU to themselves); for the loss
# bars alone, scripts/recipe_variants.sh trains them at the same time. PRECISIONS="fp8 bf16
# torchao" adds torchao's float8 tensorwise run (dense configs; torchao installed), compared
# with BF16 and with ours (no bars).
set -uo pipefail
if [ -n "${SIDE_BY_SIDE:-}" ]; then
    echo "recipe_pair.sh: SIDE_BY_SIDE is gone; runs side by side: scripts/recipe_variants.sh" >&2
    exit 2
fi
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
# torchao from a carried wheel (the device has none), where its run is asked for.
if [[ " ${PRECISIONS:-} " == *" torchao "* ]] && ls .whl/torchao-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/torchao-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
status=0
train() {
    timeout "${STEP_TIMEOUT:-600}" python recipes/pretrain.py --config "recipes/configs/$cfg.yaml" \
        --precision "$1" progress_bar=false out_dir="$RUNS" "${@:2}" > "$LOGS/recipe_${cfg}_$1.log" 2>&1
}
for precision in ${PRECISIONS:-fp8 bf16}; do
    echo "=== recipe $cfg $precision $*"
    train "$precision" "$@"
    status=$((status | $?))
    tail -6 "$LOGS/recipe_${cfg}_$precision.log"
    for f in summary.json metrics.jsonl; do
        [ -f "$RUNS/$cfg-$precision/$f" ] && cp "$RUNS/$cfg-$precision/$f" "$LOGS/${cfg}_${precision}_$f"
    done
done
python recipes/compare.py "$RUNS/$cfg-fp8" "$RUNS/$cfg-bf16" ${bars[@]+"${bars[@]}"} --out "$LOGS/compare_$cfg" 2>&1 \
    | tee "$LOGS/compare_$cfg.log"
status=$((status | PIPESTATUS[0]))
if [[ " ${PRECISIONS:-} " == *" torchao "* ]]; then
    for pair in "torchao bf16" "fp8 torchao"; do
        set -- $pair
        python recipes/compare.py "$RUNS/$cfg-$1" "$RUNS/$cfg-$2" --out "$LOGS/compare_${cfg}_$1_vs_$2" 2>&1 \
            | tee "$LOGS/compare_${cfg}_$1_vs_$2.log"
    done
fi
exit $status
