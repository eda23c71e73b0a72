#!/usr/bin/env bash
# One GPU call for issue 9 (DenseNet by Jacobi over its layers), about 8 minutes on an H200:
#   1. train DenseNet-BC (depth 100, growth 12) on Fashion-MNIST, time-boxed (TRAIN_MIN, 4.5 min);
#   2. reload the saved checkpoint and evaluate it on the 10k test images;
#   3. ffsolve run densenet-jacobi on it (batch 1 and 64);
#   4. ffsolve run densenet-jacobi on DenseNet-201 with RANDOM weights at 224x224 (batch 1, 16).
# Run from the repository root:  bash benchmarks/gpu_densenet.sh
# Data travel in the ignored folder .carry/fashion-mnist/ (the four IDX gz files of the Debian
# package dataset-fashion-mnist: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
# t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz). Returns through $OUT: the checkpoint
# (densenet_bc_fmnist.safetensors + .json), runs.tgz (records, configs, figures), log.txt.
# CPU proof with a tiny setting: DEVICE=cpu TINY=1 bash benchmarks/gpu_densenet.sh
# Each step's failure is logged and the next one still runs.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ffsolve-out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
DATA=${DATA:-.carry/fashion-mnist}
TRAIN_MIN=${TRAIN_MIN:-4.5}
RUNS=runs/gpu-densenet
mkdir -p "$OUT" "$RUNS"
CKPT="$OUT/densenet_bc_fmnist"
if [ "${TINY:-0}" = 1 ]; then
  TRAIN_SET=(--set depth=10 --set growth_rate=4 --set max_train=512 --set max_test=200 --set epochs=1)
  BC_SET=(--set batches=[1,4] --set repeats=1 --set warmup=0)
  D201_SET=(--set image_size=32 --set batches=[1] --set repeats=1 --set warmup=0 --set sweeps=[fused])
else
  TRAIN_SET=(--set max_minutes=$TRAIN_MIN)
  BC_SET=(--set batches=[1,64])
  D201_SET=(--set batches=[1,16] --set repeats=3 --set warmup=1)
fi
STEP_S=${STEP_S:-150}  # hard limit of each densenet-jacobi run, so the call always returns
ff() { local limit=$1; shift; echo "== ffsolve $*"
  timeout "$limit" "$PY" -m ffsolve "$@" --device "$DEVICE" --out "$RUNS" || echo "!! failed (rc $?): $*"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null || true
  date -u
  ls -la "$DATA" || echo "!! no data in $DATA"
  t0=$(date +%s)
  ff "$(awk "BEGIN {print int($TRAIN_MIN * 60 + 60)}")" train densenet --config configs/densenet_bc_fmnist.yaml --set data_dir="$DATA" \
     --set save_to="$CKPT" "${TRAIN_SET[@]}"
  echo "== evaluate the saved checkpoint"
  "$PY" - "$CKPT" "$DATA" "$DEVICE" <<'PY' || echo "!! failed: evaluate"
import sys, torch
from ffsolve.data import load_images
from ffsolve.experiments.densenet_train import accuracy
from ffsolve.models.densenet import load_densenet
path, data_dir, device = sys.argv[1], sys.argv[2], torch.device(sys.argv[3])
model, meta = load_densenet(path, device)
x, y = load_images(meta["data"]["name"], data_dir)["test"]
x = torch.tensor(x).float().div(255).unsqueeze(1)
acc = accuracy(model, x, torch.tensor(y), meta["data"]["mean"], meta["data"]["std"], device)
print(f"reloaded checkpoint: test accuracy {acc:.4f} on {len(y)} {meta['data']['name']} test images")
PY
  echo "== train + evaluate took $(( $(date +%s) - t0 )) s"
  ff "$STEP_S" run densenet-jacobi --config configs/densenet_jacobi.yaml --set checkpoint="$CKPT" \
     --set data_dir="$DATA" "${BC_SET[@]}"
  ff "$STEP_S" run densenet-jacobi --config configs/densenet_jacobi.yaml --set checkpoint=null \
     --set arch=densenet201 "${D201_SET[@]}"
  echo "== total $(( $(date +%s) - t0 )) s"
  echo "== summary"
  "$PY" - "$RUNS" <<'PY' || true
import sys, json, pathlib
from ffsolve.experiments import get_experiment, get_trainer
for rec in sorted(pathlib.Path(sys.argv[1]).glob("*/*/records.json")):
    r = json.loads(rec.read_text())
    spec = get_experiment(r["experiment"]) if "experiment" in r else get_trainer(r["model"])
    print(f"--- {rec.parent}")
    print(spec.summary(r))
PY
} 2>&1 | tee "$OUT/log.txt"
tar czf "$OUT/runs.tgz" "$RUNS"
ls -la "$OUT"
