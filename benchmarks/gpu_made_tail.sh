#!/usr/bin/env bash
# MADE on the fast path after the captured loop's default chunks became (16, 4): a first
# replay of 16 sweeps, then replays of 4, so batch 100 (33 iterations) runs 36 sweeps, not 48.
# One GPU call of about 3 minutes: ffsolve bench made-mnist made-rgb made-batch (the shipped
# checkpoints; nothing to carry).
# Run from the repository root:  FFSOLVE_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_made_tail.sh
# A CPU smoke run: TINY=1 DEVICE=cpu bash benchmarks/gpu_made_tail.sh
set -u
source "$(dirname "$0")/lib.sh"
setup made_tail
if [ "${TINY:-0}" = 1 ]; then
  ARGS=(--set batch=2 --set "batches=[1, 2]" --set repeats=1 --set warmup=0); L=300
else
  ARGS=(); L=${L:-300}
fi
step bench_made "$L" bench made-mnist made-rgb made-batch "${ARGS[@]}"
tar czf "$OUT/runs_made_tail.tgz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")"
grep -v '^figure:\|^records:' "$OUT/bench_made.log" | tail -n 45
