#!/usr/bin/env bash
# One short GPU call (about 4 minutes): (1) rnn-forward on wide random GRU and LSTM cells
# (hidden 256, batch 1 and 4, T 1e4 and 1e5: where issue 11 looks for 3x over cuDNN);
# (2) `ffsolve bench pixelcnn-mnist` (issue 10's PixelCNN++ bench case, opt-in).
# Logs and run folders come back in $OUT. Run from the repository root.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ffsolve-out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/ffsolve-wide}
rm -rf "$WORK/runs"; mkdir -p "$OUT" "$WORK/runs"
source "$(dirname "$0")/lib.sh"
{
  env_lines
  timeout "${L1:-150}" $PY -m ffsolve run rnn-forward --config configs/rnn_forward.yaml \
    --set "cells=[gru, lstm]" --set "hidden=[${HIDDEN:-256}]" --set "lengths=[${LENGTHS:-10000, 100000}]" \
    --set "batches=[${BATCHES:-1, 4}]" --set "methods=[cudnn, jacobi, quasi_newton]" \
    --set loop_max_length=1 --set time_budget_s=${BUDGET_S:-100} ${EXTRA1:-} \
    --device "$DEVICE" --out "$WORK/runs" || echo "!! rnn-forward failed (rc $?)"
  timeout "${L2:-150}" $PY -m ffsolve bench pixelcnn-mnist ${EXTRA2:-} --device "$DEVICE" \
    --out "$WORK/runs" || echo "!! bench pixelcnn-mnist failed (rc $?)"
  date -u
} 2>&1 | tee "$OUT/log_wide.txt"
tar czf "$OUT/runs_wide.tgz" -C "$WORK" runs
