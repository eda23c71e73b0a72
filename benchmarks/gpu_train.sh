#!/usr/bin/env bash
# One GPU call that trains the shipped models side by side on one H200 (no timing is taken
# here: measurements run in a separate call on a quiet GPU):
#   - PixelCNN++ on MNIST, the paper's 40 filters (configs/pixelcnnpp_mnist.yaml)
#   - PixelCNN++ on the RGB stand-in (configs/pixelcnnpp_rgb.yaml)
#   - DenseNet-BC on Fashion-MNIST (configs/densenet_bc_fmnist.yaml)
# Each is time-boxed (MIN minutes of training) and saved at the end; checkpoints come back
# through $OUT (a file over 15 MiB is split into .part-* pieces: cat them back together).
# Data: .carry/mnist/ (MNIST IDX gz files) and .carry/fashion-mnist/; the RGB photos come from
# scikit-image / scikit-learn / matplotlib on the machine.
# Run from the repository root:  MIN=7.5 bash benchmarks/gpu_train.sh
# CPU proof: DEVICE=cpu TINY=1 bash benchmarks/gpu_train.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ffsolve-out}
DEVICE=${DEVICE:-cuda}
MIN=${MIN:-7.5}
WORK=${WORK:-/tmp/ffsolve-train}
mkdir -p "$OUT" "$WORK/runs" "$WORK/logs"
if [ "${TINY:-0}" = 1 ]; then
  PC=(--set filters=4 --set resnets=1 --set max_train=64 --set max_test=16 --set epochs=1
      --set rgb_train=64 --set rgb_test=16)
  DN=(--set depth=10 --set growth_rate=4 --set max_train=256 --set max_test=64 --set epochs=1)
else
  PC=(--set max_minutes=$MIN)
  DN=(--set max_minutes=$MIN)
fi
LIMIT=$(awk "BEGIN {print int($MIN * 60 + 90)}")
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "commit ${FFSOLVE_COMMIT:-unknown}"; date -u
} > "$WORK/logs/env.txt" 2>&1
cat "$WORK/logs/env.txt"
job() { local name=$1; shift
  timeout "$LIMIT" python3 -m ffsolve "$@" --device "$DEVICE" --out "$WORK/runs" \
    > "$WORK/logs/$name.log" 2>&1 || echo "!! $name failed (rc $?)" >> "$WORK/logs/$name.log"; }
job pixelcnn_mnist train pixelcnnpp --config configs/pixelcnnpp_mnist.yaml \
  --set save_to="$WORK/pixelcnnpp_mnist" --set data_dir=.carry/mnist "${PC[@]}" &
job pixelcnn_rgb train pixelcnnpp --config configs/pixelcnnpp_rgb.yaml \
  --set save_to="$WORK/pixelcnnpp_rgb" "${PC[@]}" &
job densenet train densenet --config configs/densenet_bc_fmnist.yaml \
  --set save_to="$WORK/densenet_bc_fmnist" --set data_dir=.carry/fashion-mnist "${DN[@]}" &
wait
for f in "$WORK"/*.safetensors; do
  [ -e "$f" ] || continue
  if [ "$(stat -c %s "$f")" -gt 15728640 ]; then
    split -b 15M "$f" "$OUT/$(basename "$f").part-"
  else
    cp "$f" "$OUT/"
  fi
done
tar czf "$OUT/train.tgz" -C "$WORK" logs runs $(cd "$WORK" && ls *.json 2>/dev/null)
for n in pixelcnn_mnist pixelcnn_rgb densenet; do echo "== $n"; tail -n 6 "$WORK/logs/$n.log"; done
ls -la "$OUT"
