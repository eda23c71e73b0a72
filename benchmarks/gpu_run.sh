#!/usr/bin/env bash
# One call on the GPU machine: every experiment, side by side with its sequential baselines,
# then the run directories packed into $OUT/runs.tgz. Run from the repository root:
#   PYTHONPATH=src bash benchmarks/gpu_run.sh [experiment ...]
# Data travel in the ignored folder .carry/ (mnist/ IDX files); both MADE checkpoints ship. Each step's failure is logged and the next one still runs.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ffsolve-out}
mkdir -p "$OUT" runs
steps=${*:-"made-mnist made-rgb rnn bench"}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null || true
  date -u
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
DEVICE=${DEVICE:-cuda}
ff() { echo "== ffsolve $*"; python3 -m ffsolve "$@" --device "$DEVICE" --out runs || echo "!! failed: $*"; }
for step in $steps; do
  case $step in
    made-mnist) ff run made-sampling --config configs/made_sampling_mnist.yaml ;;
    made-rgb) ff run made-sampling --config configs/made_sampling_rgb.yaml ;;
    rnn) ff run rnn-backprop --config configs/rnn_backprop.yaml --set data_dir=.carry/mnist ;;
    bench) ff bench breakeven ;;
    *) echo "unknown step $step" ;;
  esac
done 2>&1 | tee "$OUT/log.txt"
tar czf "$OUT/runs.tgz" runs
ls -la "$OUT"
