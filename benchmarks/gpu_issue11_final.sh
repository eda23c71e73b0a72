#!/usr/bin/env bash
# Issue 11's last measurements, in one GPU call (~7 min):
#   1. ffsolve bench rnn-backprop at T 100 and 1,000 with 9 repeats: the scan backward after
#      its direct solve lost its residual kernels (T = 10,000 is in scan-graph/);
#   2. benchmarks/gpu_profile_scan.py: graph replays checked, profiles at T = 100;
#   3. rnn-forward at T = 1,000,000 (GRU and LSTM, hidden 256, batch 1): cuDNN, Jacobi,
#      quasi-Newton; the sequential loop is the untimed reference;
#   4. rnn-forward at T = 10,000, batch 64 (hidden 256): cuDNN, the CUDA-graph loop, Jacobi,
#      quasi-Newton.
# Run from the repository root:  FFSOLVE_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_issue11_final.sh
# A CPU smoke run with tiny settings: TINY=1 DEVICE=cpu bash benchmarks/gpu_issue11_final.sh
set -u
source "$(dirname "$0")/lib.sh"
setup issue11_final
FWD=(--config configs/rnn_forward.yaml --set "cells=[gru, lstm]" --set repeats=3)
if [ "${TINY:-0}" = 1 ]; then
  BWD=(--set "rnn_lengths=[20]" --set repeats=1 --set warmup=0)
  LONG=(--set "hidden=[4]" --set "lengths=[300]" --set "batches=[1]" --set loop_max_length=100)
  WIDE=(--set "hidden=[4]" --set "lengths=[50]" --set "batches=[3]")
  L1=120; L3=120; L4=120
else
  BWD=(--set "rnn_lengths=[100, 1000]" --set repeats=9)
  LONG=(--set "hidden=[256]" --set "lengths=[1000000]" --set "batches=[1]" --set repeats=2)
  WIDE=(--set "hidden=[256]" --set "lengths=[10000]" --set "batches=[64]")
  L1=${L1:-200}; L3=${L3:-240}; L4=${L4:-90}
fi
start=$(date +%s)
step bench_rnn_backprop "$L1" bench rnn-backprop "${BWD[@]}"
timeout 90 $PY benchmarks/gpu_profile_scan.py "$DEVICE" > "$OUT/profile_scan.log" 2>&1 || echo "!! profile failed"
step rnn_forward_1e6 "$L3" run rnn-forward "${FWD[@]}" "${LONG[@]}" --set "methods=[cudnn, jacobi, quasi_newton]"
step rnn_forward_b64 "$L4" run rnn-forward "${FWD[@]}" "${WIDE[@]}" --set "methods=[cudnn, sequential_graph, jacobi, quasi_newton]"
tar czf "$OUT/runs_issue11_final.tgz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")"
echo "== total $(( $(date +%s) - start )) s"
grep -v '^figure:\|^records:' "$OUT/bench_rnn_backprop.log" | tail -n 30
grep "^== \|^PASS\|^FAIL" "$OUT/profile_scan.log"
for name in rnn_forward_1e6 rnn_forward_b64; do
  echo "-- $name"; grep -v '^figure:\|^records:' "$OUT/$name.log" | tail -n 14
done
