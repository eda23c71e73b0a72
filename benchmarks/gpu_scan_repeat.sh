#!/usr/bin/env bash
# The scan-vs-autograd ratio at T = 100 is launch-bound and moves between runs: three more
# independent samples (separate processes), `ffsolve bench rnn-backprop` at T = 100 with 15
# repeats each, in one GPU call of about 2 minutes. Every sample is reported, none dropped.
# Run from the repository root:  FFSOLVE_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_scan_repeat.sh
# A CPU smoke run: TINY=1 DEVICE=cpu bash benchmarks/gpu_scan_repeat.sh
set -u
source "$(dirname "$0")/lib.sh"
setup scan_repeat
if [ "${TINY:-0}" = 1 ]; then ARGS=(--set "rnn_lengths=[20]" --set repeats=1 --set warmup=0)
else ARGS=(--set "rnn_lengths=[100]" --set repeats=15); fi
for i in 1 2 3; do
  step "sample$i" 100 bench rnn-backprop "${ARGS[@]}"
  grep "autograd BPTT\|  scan \|scan backward x" "$OUT/sample$i.log"
done
tar czf "$OUT/runs_scan_repeat.tgz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")"
