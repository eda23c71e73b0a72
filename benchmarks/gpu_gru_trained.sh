#!/usr/bin/env bash
# rnn-forward on the TRAINED character GRU (checkpoints/gru_char, hidden 64, shipped in the
# repository: nothing to carry) and on random weights of the same size, against cuDNN, in one
# call of at most 9.5 minutes on one GPU:
#   1. trained: T 1e3 / 1e4, batch 4 and 16, cuDNN, sequential, jacobi, quasi_newton (on the
#      CPU the trained cell needed 990 Jacobi sweeps of 1,000: expect about T iterations);
#   2. trained, newton alone (it falls back to Jacobi steps on this cell: slow, own time limit);
#   3. random:  T 1e3 / 1e4 / 1e5 with checkpoint=null (hidden 64, input 2 ~ N(0, 1)).
# Run from the repository root:  PYTHONPATH=src bash benchmarks/gpu_gru_trained.sh
# A CPU smoke run with tiny settings: TINY=1 DEVICE=cpu bash benchmarks/gpu_gru_trained.sh
# Each step's failure or timeout is logged and the next one runs; the run directories are packed
# into $OUT/runs_gru_trained.tgz and the summaries printed last.
set -u
source "$(dirname "$0")/lib.sh"
setup gru_trained

if [ "${TINY:-0}" = 1 ]; then
  TRAINED=(--set "lengths=[50,300]" --set "batches=[2]" --set repeats=1 --set warmup=0)
  RANDOM_=("${TRAINED[@]}")
  NEWTON_T=()
  L1=120; L2=120; L3=120
else
  # no new shape after the budget (shapes run by increasing T; skipped ones are recorded);
  # one repeat after one warm-up call on the trained cell, whose solves take about T sweeps
  TRAINED=(--set "lengths=[1000,10000]" --set "batches=[4,16]" --set repeats=1
           --set time_budget_s=${BUDGET_S:-120})
  RANDOM_=(--set "lengths=[1000,10000,100000]" --set "batches=[4,16]"
           --set time_budget_s=${BUDGET_S:-120})
  NEWTON_T=(--set "lengths=[1000]")  # about T/2 iterations of B T F^2 work: T = 1e4 is too long
  L1=${L1:-200}; L2=${L2:-150}; L3=${L3:-190}
fi

start=$(date +%s)
CFG=configs/rnn_forward_trained.yaml
step fwd_trained "$L1" run rnn-forward --config $CFG "${TRAINED[@]}" \
  --set "methods=[cudnn,sequential,jacobi,quasi_newton]"
step fwd_trained_newton "$L2" run rnn-forward --config $CFG "${TRAINED[@]}" --set "methods=[newton]" \
  "${NEWTON_T[@]}"
step fwd_random "$L3" run rnn-forward --config $CFG "${RANDOM_[@]}" --set checkpoint=null
tar czf "$OUT/runs_gru_trained.tgz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")"
echo "== total $(( $(date +%s) - start )) s; files in $OUT:"
ls -la "$OUT"
echo "== summaries"
for name in fwd_trained fwd_trained_newton fwd_random; do
  echo "-- $name"
  sed -n '/^weights:/,/^figure:/p' "$OUT/$name.log" | grep -v '^figure:' || echo "(no summary)"
done
