#!/usr/bin/env bash
# `ffsolve reproduce` on one GPU in one call of at most 9.5 minutes (issue 10): MADE MNIST and
# RGB, RNN back-propagation (3 of the paper's 10 repeats, to fit the call), the break-even
# benchmark, DenseNet-BC (trained, Fashion-MNIST) and DenseNet-201 (random weights). The
# PixelCNN++ steps take 6 minutes of their own: run them with gpu_pixelcnn_cached.sh and
# join them with --from (see benchmarks/README.md). Data travel in .carry/sub/ (carry it):
# mnist (20k train / 2k test IDX) and fmnist (the test split and a 100-image stub train).
# The run folders come back in $OUT/runs_reproduce.tgz, the log in $OUT/log_reproduce.txt.
# Run from the repository root:  bash benchmarks/gpu_reproduce.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ffsolve-out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/ffsolve-reproduce}
STEPS=${STEPS:-made-mnist made-rgb breakeven densenet-bc densenet-201 rnn-backprop}
rm -rf "$WORK/runs"
mkdir -p "$OUT" "$WORK/runs"
source "$(dirname "$0")/lib.sh"
{
  env_lines
  # shellcheck disable=SC2086
  timeout "${LIMIT:-560}" $PY -m ffsolve reproduce --device "$DEVICE" --out "$WORK/runs" \
    --steps $STEPS --mnist-dir .carry/sub/mnist --fmnist-dir .carry/sub/fmnist \
    --override rnn-backprop:repeats=3 ${EXTRA:-} || echo "!! reproduce failed or timed out (rc $?)"
  date -u
} 2>&1 | tee "$OUT/log_reproduce.txt"
tar czf "$OUT/runs_reproduce.tgz" -C "$WORK" runs
ls -la "$OUT"
