#!/usr/bin/env bash
# The arms that benchmarks/overopt_gpu.sh ran out of time for (ablations, the KL baseline and
# the Dance-SDE rollouts), at the same GPU configuration and seeds. Pretraining is rerun
# (deterministic from the config); then one process per (seed, pair of methods) shares the
# GPU, the paper's ablations and the KL baseline first in every process so that only
# Dance-SDE runs are dropped when time runs short. Each process writes its JSON after every
# finished run; the per-process summaries are merged into $OUT/overopt.json and packed with
# their logs into $OUT/work.tar.gz. Combine with the earlier run afterwards:
#   python -m regclip.demo.merge docs/results/gpu docs/results/gpu $OUT
# METHOD_GROUPS picks other arms: comma-separated groups, one process per (seed, group), e.g.
#   METHOD_GROUPS="flow_grpo_dance,grpo_guard_dance,velocity_guard_dance" (one arm a process).
#   usage: OUT=/some/dir TOTAL_S=500 benchmarks/overopt_gpu_rest.sh [extra regclip demo args]
set -o pipefail
OUT=${OUT:-runs/overopt_gpu_rest}
WORK=${WORK:-/tmp/overopt_rest_work}
TOTAL_S=${TOTAL_S:-500}  # wall-clock limit of the whole script; late runs are skipped
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT" "$WORK"
COMMON=(--budget gpu --device cuda --no-plots --dims "$@")
METHOD_GROUPS=${METHOD_GROUPS:-"ratio_norm flow_grpo_dance,mean_revised grpo_guard_dance,flow_grpo_kl velocity_guard_dance"}
IFS=, read -r -a PAIRS <<< "$METHOD_GROUPS"
start=$(date +%s)
python -m regclip.cli demo "${COMMON[@]}" --pretrain-only || exit 1
elapsed=$(($(date +%s) - start))
budget=$((TOTAL_S - elapsed - 60)) # no run starts that would end after this
kill_s=$((TOTAL_S - elapsed - 25))  # hard stop, leaving time to merge and pack
echo "pretraining done after $elapsed s; run budget $budget s, hard stop after $kill_s s"
dirs=()
pids=()
for seed in 0 1 2; do
  for pair in "${PAIRS[@]}"; do
    read -r -a methods <<< "$pair"
    name="seed$seed-${methods[0]}"
    timeout "$kill_s" python -m regclip.cli demo "${COMMON[@]}" --seeds "$seed" \
      --methods "${methods[@]}" --time-budget "$budget" --out "$WORK/$name" \
      > "$WORK/$name.log" 2>&1 &
    pids+=($!)
    dirs+=("$WORK/$name")
  done
done
for pid in "${pids[@]}"; do wait "$pid" || echo "process $pid exited with $?"; done
echo "runs done after $(($(date +%s) - start)) s"
python -m regclip.demo.merge "$OUT" "${dirs[@]}"
for log in "$WORK"/*.log; do
  echo "== $log"
  tr '\r' '\n' < "$log" | grep -v '^GRPO' | tail -20
done
tar -czf "$OUT/work.tar.gz" -C "$WORK" .
