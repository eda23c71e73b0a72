#!/usr/bin/env bash
# Measurements on a quiet GPU (nothing else runs), in parts that each fit one 10-minute call:
#   A: PixelCNN++ sampling (MNIST float32 and bfloat16, RGB) and DenseNet by Jacobi
#      (the trained DenseNet-BC at batch 1 and 64, DenseNet-201 with random weights);
#   B: the fast path (benchmarks/gpu_fast.py) and scan/Newton (benchmarks/gpu_scan.sh);
#   C: the steps that need data (carry .carry/sub: the Fashion-MNIST test images with a stub
#      training split, and the first 20k MNIST training digits): DenseNet-BC by Jacobi, the
#      RNN back-propagation experiment with the scan row, and the MADE batch sweep.
# Run from the repository root:  PART=A bash benchmarks/gpu_measure.sh
# Each step has a hard time limit; a failed step is logged and the next one runs. Run folders
# come back packed in $OUT/measure_<PART>.tgz, the log in $OUT/log_<PART>.txt.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ffsolve-out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
PART=${PART:-A}
RUNS=${RUNS:-runs_measure}
mkdir -p "$OUT" "$RUNS"
source "$(dirname "$0")/lib.sh"
{
  env_lines
  case $PART in
    A)
      ff 110 run pixelcnn-sampling --config configs/pixelcnn_sampling_mnist.yaml ${PC_SET:-}
      ff 60 run pixelcnn-sampling --config configs/pixelcnn_sampling_mnist.yaml \
        --set dtype=bfloat16 --set methods=[jacobi] --set trace=false ${PC_SET:-}
      ff 170 run pixelcnn-sampling --config configs/pixelcnn_sampling_rgb.yaml ${PC_SET:-}
      ff 110 run densenet-jacobi --config configs/densenet_jacobi.yaml ${DN_SET:-}
      ff 100 run densenet-jacobi --config configs/densenet_jacobi.yaml --set checkpoint=null \
        --set arch=densenet201 --set batches=[1,16] --set repeats=3 --set warmup=1 ${D2_SET:-}
      ;;
    B)
      # each script writes several files: they land under $RUNS and come back in one .tgz
      OUT=$RUNS/fast timeout 285 $PY benchmarks/gpu_fast.py --budget-s ${FAST_BUDGET_S:-170} \
        || echo "!! gpu_fast failed (rc $?)"
      OUT=$RUNS/scan RUNS=$RUNS/scan FWD_BUDGET_S=95 T_FWD=165 T_BWD=85 timeout 270 \
        bash benchmarks/gpu_scan.sh || echo "!! gpu_scan failed (rc $?)"
      ;;
    C)  # what needs data: carry .carry/sub (Fashion-MNIST test images; 20k MNIST digits)
      ff 120 run densenet-jacobi --config configs/densenet_jacobi.yaml \
        --set data_dir=.carry/sub/fmnist ${DN_SET:-}
      ff 110 run rnn-backprop --config configs/rnn_backprop.yaml --set data_dir=.carry/sub/mnist \
        --set repeats=1 --set error_sequences=4
      ff 130 bench made-batch breakeven
      ;;
  esac
  echo "== summaries"
  $PY - "$RUNS" <<'PY' || true
import sys, json, pathlib
from ffsolve.experiments import get_experiment, get_trainer
for rec in sorted(pathlib.Path(sys.argv[1]).glob("**/records.json")):
    r = json.loads(rec.read_text())
    try:
        spec = get_experiment(r["experiment"]) if "experiment" in r else get_trainer(r["model"])
        print(f"--- {rec.parent}")
        print(spec.summary(r) if spec.summary else "")
    except Exception as e:  # a summary never stops the packing below
        print(f"--- {rec.parent}: no summary ({e})")
PY
} 2>&1 | tee "$OUT/log_$PART.txt"
tar czf "$OUT/measure_$PART.tgz" "$RUNS"
ls -la "$OUT"
