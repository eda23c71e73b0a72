#!/usr/bin/env bash
# The scan backward replayed whole from one CUDA graph (backprop_through(graph_backward=True)),
# in one GPU call of about 3 minutes:
#   1. ffsolve bench rnn-backprop at T 100 and 1,000 (9 repeats; its CUDA-only row
#      "scan graph_backward" beside autograd, Jacobi and the ordinary scan);
#   2. benchmarks/gpu_profile_scan.py: the replays checked against autograd on two inputs
#      (PASS lines), then profiles of every scan variant at T = 100.
# Run from the repository root:  FFSOLVE_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_graph_backward.sh
# A CPU smoke run: TINY=1 DEVICE=cpu bash benchmarks/gpu_graph_backward.sh
set -u
source "$(dirname "$0")/lib.sh"
setup graph_backward
if [ "${TINY:-0}" = 1 ]; then ARGS=(--set "rnn_lengths=[20]" --set repeats=1 --set warmup=0)
else ARGS=(--set "rnn_lengths=[100, 1000]" --set repeats=9); fi
step bench_rnn_backprop 150 bench rnn-backprop "${ARGS[@]}"
timeout 100 $PY benchmarks/gpu_profile_scan.py "$DEVICE" > "$OUT/profile_scan.log" 2>&1 || echo "!! profile failed"
tar czf "$OUT/runs_graph_backward.tgz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")"
grep -v '^figure:\|^records:' "$OUT/bench_rnn_backprop.log" | tail -n 32
grep "^== \|^PASS\|^FAIL" "$OUT/profile_scan.log"
