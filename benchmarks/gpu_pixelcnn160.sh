#!/usr/bin/env bash
# The paper's 32x32 RGB configuration in one GPU call: train a 160-filter PixelCNN++ (53.7M
# parameters, 107 MB in float16: too large to ship or to bring back) for MIN minutes on the RGB
# stand-in, then sample it with every method (batch 4, GS-Jacobi window of 2 rows) on the same
# machine. Only the records, figures and logs come back ($OUT/pixelcnn160.tgz, log).
# Run from the repository root:  MIN=5 bash benchmarks/gpu_pixelcnn160.sh   (about MIN + 3 min)
# CPU proof: DEVICE=cpu TINY=1 bash benchmarks/gpu_pixelcnn160.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ffsolve-out}
DEVICE=${DEVICE:-cuda}
MIN=${MIN:-5}
WORK=${WORK:-/tmp/ffsolve-160}
mkdir -p "$OUT" "$WORK/runs"
if [ "${TINY:-0}" = 1 ]; then
  TRAIN=(--set filters=4 --set resnets=1 --set rgb_train=32 --set rgb_test=8 --set epochs=1)
  SAMPLE=(--set batch=1 --set repeats=1 --set warmup=0 --set methods=[jacobi] --set trace=false)
else
  TRAIN=(--set filters=160 --set max_minutes=$MIN)
  SAMPLE=()
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
  echo "commit ${FFSOLVE_COMMIT:-unknown}"; date -u
  timeout "$(awk "BEGIN {print int($MIN * 60 + 120)}")" python3 -m ffsolve train pixelcnnpp \
    --config configs/pixelcnnpp_rgb.yaml --set save_to="$WORK/pixelcnnpp_rgb160" --force \
    "${TRAIN[@]}" --device "$DEVICE" --out "$WORK/runs" || echo "!! training failed (rc $?)"
  timeout 240 python3 -m ffsolve run pixelcnn-sampling --config configs/pixelcnn_sampling_rgb.yaml \
    --set checkpoint="$WORK/pixelcnnpp_rgb160" "${SAMPLE[@]}" --device "$DEVICE" \
    --out "$WORK/runs" || echo "!! sampling failed (rc $?)"
} 2>&1 | tee "$OUT/log_pixelcnn160.txt"
tar czf "$OUT/pixelcnn160.tgz" -C "$WORK" runs
ls -la "$OUT"
