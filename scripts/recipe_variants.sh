#!/usr/bin/env bash
# Variants of one recipe config trained at the same time on one GPU, then compared in pairs
# (device use; for the loss curves only: tokens/s of runs sharing a GPU mean nothing):
#   bash scripts/recipe_variants.sh CONFIG NAME=PRECISION[,key=value...]... [-- RUN_A/RUN_B...]
# e.g. COMMON="micro_batch_size=8 grad_accum_steps=4 stop_after_steps=500" \
#      bash scripts/recipe_variants.sh small bf16=bf16 fp8=fp8 fp8-nowgrad=fp8,fp8_wgrad=false \
#          -- fp8/bf16 fp8-nowgrad/bf16
# Every variant gets COMMON's overrides, then its own; run NAME lands in $RUNS/CONFIG-NAME
# (default RUNS=runs). Each run has STEP_TIMEOUT seconds (default 600); its log, metrics and
# summary, and each pair's compare.py report (--window $WINDOW, default 100, then compare.py's
# bar options in BARS, e.g. BARS="--max-rel-err 0.0025"), land in $LOGS.
set -uo pipefail
cfg=$1; shift
variants=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do variants+=("$1"); shift; done
[ $# -gt 0 ] && shift
pairs=("$@")
LOGS=${LOGS:-/tmp/fp8train-logs}
RUNS=${RUNS:-runs}
mkdir -p "$LOGS"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
read -r -a common <<< "${COMMON:-}"
read -r -a bars <<< "${BARS:-}"
status=0
pids=()
for variant in "${variants[@]}"; do
    name=${variant%%=*}
    IFS=, read -r -a spec <<< "${variant#*=}"
    echo "=== $cfg-$name: --precision ${spec[0]} ${common[*]} ${spec[*]:1}"
    timeout "${STEP_TIMEOUT:-600}" python recipes/pretrain.py --config "recipes/configs/$cfg.yaml" \
        --precision "${spec[0]}" progress_bar=false out_dir="$RUNS" run_name="$cfg-$name" \
        ${common[@]+"${common[@]}"} "${spec[@]:1}" > "$LOGS/recipe_${cfg}-$name.log" 2>&1 &
    pids+=($!)
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; rc=$?
    name=${variants[$i]%%=*}
    echo "--- $cfg-$name rc=$rc: $(tail -1 "$LOGS/recipe_${cfg}-$name.log")"
    status=$((status | rc))
    for f in summary.json metrics.jsonl; do
        [ -f "$RUNS/$cfg-$name/$f" ] && cp "$RUNS/$cfg-$name/$f" "$LOGS/${cfg}-${name}_$f"
    done
done
for pair in ${pairs[@]+"${pairs[@]}"}; do
    a=${pair%/*} b=${pair#*/}
    echo "=== compare $cfg-$a vs $cfg-$b"
    # Variants differ on purpose (an init seed, a recipe switch): the mismatch is listed, not refused.
    python recipes/compare.py "$RUNS/$cfg-$a" "$RUNS/$cfg-$b" --window "${WINDOW:-100}" --allow-mismatch \
        ${bars[@]+"${bars[@]}"} --out "$LOGS/compare_${cfg}-$a-vs-$b" 2>&1 | tee "$LOGS/compare_${cfg}-$a-vs-$b.log"
    status=$((status | PIPESTATUS[0]))
done
exit $status
