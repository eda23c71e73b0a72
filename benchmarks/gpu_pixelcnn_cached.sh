#!/usr/bin/env bash
# Issue 8 in one GPU call (about 8 minutes, under 9): PixelCNN++ sampling with the cached
# sequential baseline and the hybrids on their cheap paths, on the shipped checkpoints
# (checkpoints/pixelcnnpp_mnist, checkpoints/pixelcnnpp_rgb: in the repository, no carry).
#   1. MNIST, batch 16: sequential, sequential-cached, jacobi, jacobi_gs (rows, cached row
#      sweeps), gs_jacobi (window of 15 rows, cropped forward);
#   2. RGB stand-in, batch 4: the same five, window of 2 rows;
#   3. MNIST batch sweep 1..64: the faster of jacobi and gs_jacobi against sequential-cached.
# Each step has a hard time limit; a failed step is logged and the next one runs. The run
# folders come back in $OUT/pixelcnn_cached.tgz, the log in $OUT/log_pixelcnn_cached.txt;
# the summary tables are printed last.
# Run from the repository root:  bash benchmarks/gpu_pixelcnn_cached.sh
# CPU proof (tiny random checkpoints, seconds):  DEVICE=cpu TINY=1 bash benchmarks/gpu_pixelcnn_cached.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ffsolve-out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/ffsolve-cached}
rm -rf "$WORK/runs"
mkdir -p "$OUT" "$WORK/runs"
RUNS=$WORK/runs
MNIST=checkpoints/pixelcnnpp_mnist
RGB=checkpoints/pixelcnnpp_rgb
T1=${T1:-140} T2=${T2:-180} T3=${T3:-180}
BATCHES=${BATCHES:-[1, 4, 16, 64]}
if [ "${TINY:-0}" = 1 ]; then
  $PY - "$WORK" <<'EOF'
import sys, torch
from ffsolve.models.pixelcnnpp import PixelCNNpp, PixelCNNppConfig, save_pixelcnnpp
for name, C in [("tiny_mnist", 1), ("tiny_rgb", 3)]:
    torch.manual_seed(0)
    cfg = PixelCNNppConfig(channels=C, height=8, width=8, filters=6, resnets=1, mixtures=3)
    save_pixelcnnpp(f"{sys.argv[1]}/{name}", PixelCNNpp(cfg).eval(), {"data": {"name": "random"}})
EOF
  MNIST=$WORK/tiny_mnist RGB=$WORK/tiny_rgb BATCHES="[1, 3]"
  SMALL=(--set batch=2 --set window_rows=2 --set repeats=1 --set warmup=0
         --set "frames=[0, 1, 2]" --set grid_images=2)
else
  SMALL=()
fi
source "$(dirname "$0")/lib.sh"
{
  env_lines
  ff "$T1" run pixelcnn-sampling --config configs/pixelcnn_sampling_mnist.yaml \
    --set checkpoint="$MNIST" "${SMALL[@]}"
  ff "$T2" run pixelcnn-sampling --config configs/pixelcnn_sampling_rgb.yaml \
    --set checkpoint="$RGB" "${SMALL[@]}"
  ff "$T3" run pixelcnn-sampling --config configs/pixelcnn_sampling_mnist.yaml \
    --set checkpoint="$MNIST" "${SMALL[@]}" --set "methods=[jacobi, gs_jacobi]" --set trace=false \
    --set repeats=1 --set warmup=1 --set "batches=$BATCHES"
  date -u
  echo "== summaries"
  $PY - "$WORK/runs" <<'EOF'
import json, sys
from pathlib import Path
from ffsolve.experiments.pixelcnn_sampling import summary
for rec in sorted(Path(sys.argv[1]).glob("pixelcnn-sampling/*/records.json")):
    r = json.loads(rec.read_text())
    shape = "x".join(map(str, r["image_shape"]))
    print(f"\n-- {rec.parent.name}: {r['data']['name']} {shape}, {r['model']['filters']} filters")
    print(summary(r))
EOF
} 2>&1 | tee "$OUT/log_pixelcnn_cached.txt"
tar czf "$OUT/pixelcnn_cached.tgz" -C "$WORK" runs
ls -la "$OUT"
