#!/usr/bin/env bash
# The large over-optimization run (docs/results/): pretrain once, then one process per seed
# (all methods), two clip-sweep processes (seed 0, core methods) and a KL-coefficient
# sweep (flow_grpo_kl at 1.0, seed 0) share the GPU; the
# per-process summaries are merged into $OUT/overopt.json. Plots are drawn afterwards with
# `python -m regclip.demo.plots $OUT`.
#   usage: OUT=/some/dir benchmarks/overopt_gpu.sh [extra regclip demo args, e.g. --device cpu --budget tiny]
set -o pipefail
OUT=${OUT:-runs/overopt_gpu}
WORK=${WORK:-/tmp/overopt_work}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}
BUDGET_S=${BUDGET_S:-360}
KILL_S=${KILL_S:-440}
mkdir -p "$OUT" "$WORK"
COMMON=(--budget gpu --device cuda --no-plots "$@")
CORE=(flow_grpo grpo_guard velocity_guard ratio_norm)
start=$(date +%s)
python -m regclip.cli demo "${COMMON[@]}" --pretrain-only || exit 1
echo "pretraining done after $(( $(date +%s) - start )) s"
pids=()
for seed in 0 1 2; do
  dims=(); [ "$seed" = 0 ] || dims=(--dims)
  timeout "$KILL_S" python -m regclip.cli demo "${COMMON[@]}" --seeds "$seed" "${dims[@]}" \
    --time-budget "$BUDGET_S" --out "$WORK/seed$seed" > "$WORK/seed$seed.log" 2>&1 &
  pids+=($!)
done
for target in 0.05 0.5; do
  timeout "$KILL_S" python -m regclip.cli demo "${COMMON[@]}" --seeds 0 --dims \
    --methods "${CORE[@]}" --clip-target "$target" --time-budget "$BUDGET_S" \
    --out "$WORK/clip$target" > "$WORK/clip$target.log" 2>&1 &
  pids+=($!)
done
timeout "$KILL_S" python -m regclip.cli demo "${COMMON[@]}" --seeds 0 --dims \
  --methods flow_grpo_kl --kl-coef 1.0 --time-budget "$BUDGET_S" \
  --out "$WORK/kl1.0" > "$WORK/kl1.0.log" 2>&1 &
pids+=($!)
for pid in "${pids[@]}"; do wait "$pid" || echo "process $pid exited with $?"; done
echo "runs done after $(( $(date +%s) - start )) s"
python -m regclip.demo.merge "$OUT" "$WORK"/seed0 "$WORK"/seed1 "$WORK"/seed2 \
  --sweep "$WORK"/clip0.05 "$WORK"/clip0.5 "$WORK"/kl1.0
for log in "$WORK"/*.log; do
  echo "== $log"; tr '\r' '\n' < "$log" | grep -v '^GRPO' | tail -40
done
