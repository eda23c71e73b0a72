#!/usr/bin/env bash
# What issue 11 still needs measured, in one GPU call of about 6 minutes (no data to carry):
#   1. ffsolve bench rnn-backprop: the scan backward after the closed-form Jacobian fix
#      (T 100, 1,000, 10,000), against autograd's BPTT;
#   2. rnn-forward on GRU/LSTM with the sequential_graph row (the loop in one CUDA graph)
#      beside cuDNN, Jacobi and quasi-Newton (hidden 64 and 256, batch 1 and 16, T 1e3, 1e4);
#   3. ffsolve bench rnn-forward densenet: the map of winners and the DenseNet case.
# Run from the repository root:  FFSOLVE_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_issue11.sh
# A CPU smoke run with tiny settings: TINY=1 DEVICE=cpu bash benchmarks/gpu_issue11.sh
set -u
source "$(dirname "$0")/lib.sh"
setup issue11
if [ "${TINY:-0}" = 1 ]; then
  BWD=(--set "rnn_lengths=[20]" --set repeats=1 --set warmup=0)
  FWD=(--set "hidden=[4]" --set "lengths=[30]" --set "batches=[2]" --set repeats=1 --set warmup=0)
  MAP=(--set "rnnf_hidden=[4]" --set "rnnf_lengths=[30]" --set "rnnf_batches=[2]"
       --set "densenet_batches=[1]" --set repeats=1 --set warmup=0)
  L1=120; L2=120; L3=120
else
  BWD=(--set repeats=5)
  FWD=(--set "hidden=[64, 256]" --set "lengths=[1000, 10000]" --set "batches=[1, 16]"
       --set "methods=[cudnn, sequential, sequential_graph, jacobi, quasi_newton]"
       --set time_budget_s=100)
  MAP=(--set rnnf_budget_s=60)
  L1=${L1:-120}; L2=${L2:-150}; L3=${L3:-150}
fi
start=$(date +%s)
step bench_rnn_backprop "$L1" bench rnn-backprop "${BWD[@]}"
step rnn_forward "$L2" run rnn-forward --config configs/rnn_forward.yaml "${FWD[@]}"
step bench_map "$L3" bench rnn-forward densenet "${MAP[@]}"
tar czf "$OUT/runs_issue11.tgz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")"
echo "== total $(( $(date +%s) - start )) s"
for name in bench_rnn_backprop rnn_forward bench_map; do
  echo "-- $name"; grep -v '^figure:\|^records:' "$OUT/$name.log" | tail -n 40
done
