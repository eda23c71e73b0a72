#!/usr/bin/env bash
# Scan and Newton methods on one GPU, in one call of about 5 minutes:
#   1. rnn-forward: GRU/LSTM hidden states by sequential, jacobi, newton, quasi_newton vs cuDNN
#      (configs/rnn_forward.yaml: hidden 4/64/256, T 1e3/1e4/1e5, batch 16, random weights);
#   2. rnn-backprop with the scan row (the paper's RNN, MNIST 10x10, reduced repeats).
# Run from the repository root (MNIST IDX files in the ignored folder .carry/mnist/):
#   PYTHONPATH=src bash benchmarks/gpu_scan.sh
# A CPU smoke run with tiny settings: TINY=1 DEVICE=cpu bash benchmarks/gpu_scan.sh
# (TINY uses data=synthetic). Each step's failure or timeout is logged and the next one runs;
# the run directories are packed into $OUT/runs_scan.tgz and the summaries printed last.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ffsolve-out}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-runs_scan}
mkdir -p "$OUT" "$RUNS"
PY=${PYTHON:-python3}
source "$(dirname "$0")/lib.sh"
env_header env_scan.txt

if [ "${TINY:-0}" = 1 ]; then
  FWD=(--set "hidden=[4,8]" --set "lengths=[50,300]" --set "batches=[2]" --set loop_max_length=100
       --set repeats=1 --set warmup=0)
  BWD=(--set data=synthetic --set side=4 --set hidden=8 --set steps=4 --set repeats=1
       --set "budgets=[2,5]" --set error_sequences=2 --set warmup=1)
  T_FWD=120; T_BWD=120
else
  # rnn-forward starts no new shape after 110 s (shapes run by increasing T; skipped ones are
  # recorded); the hard limits keep the whole call under 5 minutes
  FWD=(--set time_budget_s=${FWD_BUDGET_S:-110})
  BWD=(--set data_dir=.carry/mnist --set repeats=1 --set error_sequences=4)
  T_FWD=${T_FWD:-190}; T_BWD=${T_BWD:-95}
fi

start=$(date +%s)
step rnn_forward "$T_FWD" run rnn-forward --config configs/rnn_forward.yaml "${FWD[@]}"
step rnn_backprop "$T_BWD" run rnn-backprop --config configs/rnn_backprop.yaml "${BWD[@]}"
tar czf "$OUT/runs_scan.tgz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")"
echo "== total $(( $(date +%s) - start )) s; files in $OUT:"
ls -la "$OUT"
echo "== summaries"
for name in rnn_forward rnn_backprop; do
  echo "-- $name"
  # the summary table: from the line after the run banner to the figure lines
  sed -n '/^cell \|^T=/,/^figure:/p' "$OUT/$name.log" | grep -v '^figure:' || echo "(no summary)"
done
