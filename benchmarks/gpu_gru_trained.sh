#!/usr/bin/env bash
# rnn-forward on the TRAINED character GRU (checkpoints/gru_char, hidden 64, shipped in the
# repository: nothing to carry) and on random weights of the same size, against cuDNN, in one
# call of about 8 minutes on one GPU:
#   1. trained: T 1e3 / 1e4 / 1e5, batch 4 and 16, every method and cuDNN;
#   2. random:  the same grid with checkpoint=null (hidden 64, input 2 ~ N(0, 1)).
# Run from the repository root:  PYTHONPATH=src bash benchmarks/gpu_gru_trained.sh
# A CPU smoke run with tiny settings: TINY=1 DEVICE=cpu bash benchmarks/gpu_gru_trained.sh
# Each step's failure or timeout is logged and the next one runs; the run directories are packed
# into $OUT/runs_gru_trained.tgz and the summaries printed last.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ffsolve-out}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-runs_gru_trained}
mkdir -p "$OUT" "$RUNS"
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null || true
  date -u
} > "$OUT/env_gru_trained.txt" 2>&1
cat "$OUT/env_gru_trained.txt"

if [ "${TINY:-0}" = 1 ]; then
  GRID=(--set "lengths=[50,300]" --set "batches=[2]" --set repeats=1 --set warmup=0)
  LIMIT=120
else
  # no new shape after 150 s (shapes run by increasing T; skipped ones are recorded)
  GRID=(--set "lengths=[1000,10000,100000]" --set "batches=[4,16]"
        --set time_budget_s=${BUDGET_S:-150})
  LIMIT=${LIMIT_S:-230}
fi

step() {  # step NAME SECONDS ARGS...: one experiment with a time limit, failures logged
  local name=$1 limit=$2; shift 2
  echo "== ffsolve $* (limit ${limit}s)"
  timeout "$limit" $PY -m ffsolve "$@" --device "$DEVICE" --out "$RUNS" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/$name.log"
  [ $rc = 0 ] || echo "!! $name failed or timed out (exit $rc); see $name.log"
}
start=$(date +%s)
step fwd_trained "$LIMIT" run rnn-forward --config configs/rnn_forward_trained.yaml "${GRID[@]}"
step fwd_random "$LIMIT" run rnn-forward --config configs/rnn_forward_trained.yaml "${GRID[@]}" \
  --set checkpoint=null
tar czf "$OUT/runs_gru_trained.tgz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")"
echo "== total $(( $(date +%s) - start )) s; files in $OUT:"
ls -la "$OUT"
echo "== summaries"
for name in fwd_trained fwd_random; do
  echo "-- $name"
  sed -n '/^weights:/,/^figure:/p' "$OUT/$name.log" | grep -v '^figure:' || echo "(no summary)"
done
