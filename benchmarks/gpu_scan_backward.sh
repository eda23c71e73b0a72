#!/usr/bin/env bash
# The scan backward after its chunks replay cached CUDA graphs, in one GPU call (~5 min):
#   1. ffsolve bench rnn-backprop (T 100, 1,000, 10,000; scan, Jacobi, autograd; 5 repeats);
#   2. benchmarks/gpu_profile_scan.py: graph replays checked against the loop and autograd,
#      then profiles of autograd, scan and scan without graphs at T = 100.
# Run from the repository root:  FFSOLVE_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_scan_backward.sh
# A CPU smoke run with tiny settings: TINY=1 DEVICE=cpu bash benchmarks/gpu_scan_backward.sh
set -u
source "$(dirname "$0")/lib.sh"
setup scan_backward
if [ "${TINY:-0}" = 1 ]; then
  BWD=(--set "rnn_lengths=[20]" --set repeats=1 --set warmup=0); L1=120
else
  BWD=(--set repeats=5); L1=${L1:-330}
fi
step bench_rnn_backprop "$L1" bench rnn-backprop "${BWD[@]}"
timeout 150 $PY benchmarks/gpu_profile_scan.py "$DEVICE" > "$OUT/profile_scan.log" 2>&1 || echo "!! profile failed"
tar czf "$OUT/runs_scan_backward.tgz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")"
grep -v '^figure:\|^records:' "$OUT/bench_rnn_backprop.log" | tail -n 40
grep "^== \|^PASS\|^FAIL" "$OUT/profile_scan.log"
