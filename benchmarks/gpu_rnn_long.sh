#!/usr/bin/env bash
# Issue 11's training-step target, measured with loss curves: the paper's RNN (hidden 128,
# batch 1, SGD) trained on long synthetic sequences by BPTT, autograd, Jacobi and scan
# backward, and the same rows with a Jacobi forward (atol 1e-5), in one GPU call (~5 min):
#   1. T = 10,000 (side 100), 10 steps after one warm-up step per row;
#   2. T = 1,024 (side 32), 30 steps after two warm-up steps;
#   3. benchmarks/gpu_profile_scan.py: a profile of one scan backward at T = 100.
# Every row trains a copy of the same weights on the same sequences; the summary's
# "loss vs bptt" is the largest relative difference of a step's loss from BPTT's.
# Run from the repository root:  FFSOLVE_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_rnn_long.sh
# A CPU smoke run with tiny settings: TINY=1 DEVICE=cpu bash benchmarks/gpu_rnn_long.sh
set -u
source "$(dirname "$0")/lib.sh"
setup rnn_long
COMMON=(--config configs/rnn_backprop.yaml --set data=synthetic --set repeats=1
        --set "budgets=[24]" --set tol_row=false --set "extra_methods=[scan]"
        --set "forward_rows=[scan, jacobi-24]" --set forward_atol=1.0e-5 --set error_sequences=1)
if [ "${TINY:-0}" = 1 ]; then
  LONG=(--set side=6 --set steps=3 --set warmup=1 --set hidden=8)
  MID=("${LONG[@]}")
  L1=120; L2=120
else
  LONG=(--set side=100 --set steps=10 --set warmup=1)
  MID=(--set side=32 --set steps=30 --set warmup=2)
  L1=${L1:-330}; L2=${L2:-150}
fi
start=$(date +%s)
step rnn_long_T10000 "$L1" run rnn-backprop "${COMMON[@]}" "${LONG[@]}"
step rnn_long_T1024 "$L2" run rnn-backprop "${COMMON[@]}" "${MID[@]}"
tar czf "$OUT/runs_rnn_long.tgz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")"
echo "== total $(( $(date +%s) - start )) s"
for name in rnn_long_T10000 rnn_long_T1024; do
  echo "-- $name"; grep -v '^figure:\|^records:' "$OUT/$name.log" | tail -n 16
done
# 3. where a scan backward's time goes at T = 100 (tables only, printed into its log)
timeout 90 $PY benchmarks/gpu_profile_scan.py "$DEVICE" > "$OUT/profile_scan.log" 2>&1 || echo "!! profile failed"
grep "^== " "$OUT/profile_scan.log"
