#!/usr/bin/env bash
# One call on the GPU machine: each argument is one command, run in turn from the repository
# root with a time limit; their output goes to $OUT/log.txt and the run folders they write
# come back packed in $OUT/runs.tgz. Nothing is installed: wheels carried in .carry/wheels/
# (e.g. diffusers, gguf) are unpacked into .carry/site/, put on PYTHONPATH.
#
#   bash benchmarks/gpu.sh 'bench made-mnist made-rgb' \
#       'run pixelcnn-sampling --config configs/pixelcnn_sampling_mnist.yaml' \
#       'reproduce --steps breakeven densenet-201' 'pytest -m gpu'
#
# An argument is an ffsolve command line without `ffsolve` (`--device $DEVICE --out $RUNS`
# are added); one starting with `pytest` runs the tests (`pytest -m gpu`: the GPU ones); one
# starting with `python` runs a script (e.g. `python benchmarks/profile_scan.py cuda 100`); one
# starting with `sh` runs the rest as a shell command line (e.g. joining carried file parts). Environment: OUT (default /tmp/ffsolve-out),
# DEVICE (cuda), LIMIT (seconds per command, default 540), RUNS (runs), PY (python3),
# FFSOLVE_COMMIT (the commit recorded in every run's env.json; the device copy's .git may
# name another). A command that fails or times out is logged and the next one still runs.
# CPU proof of a call: DEVICE=cpu bash benchmarks/gpu.sh 'bench breakeven --set repeats=1'
set -u
OUT=${OUT:-/tmp/ffsolve-out}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-540}
RUNS=${RUNS:-runs}
PY=${PY:-python3}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=src PYTHONUNBUFFERED=1
if compgen -G ".carry/wheels/*.whl" > /dev/null; then
  $PY -m pip install --quiet --no-deps --target .carry/site .carry/wheels/*.whl
  export PYTHONPATH=src:.carry/site
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "commit ${FFSOLVE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  date -u
  for cmd in "$@"; do
    echo "== [$(date -u +%T)] $cmd (limit ${LIMIT}s)"
    case $cmd in
      pytest*) timeout "$LIMIT" $PY -m $cmd ;;
      sh\ *) timeout "$LIMIT" bash -c "${cmd#sh }" ;;
      python\ *) timeout "$LIMIT" $PY ${cmd#python } ;;
      *) timeout "$LIMIT" $PY -m ffsolve $cmd --device "$DEVICE" --out "$RUNS" ;;
    esac
    rc=$?
    [ $rc = 0 ] || echo "!! failed or timed out (exit $rc): $cmd"
  done
  date -u
} 2>&1 | tee "$OUT/log.txt"
tar czf "$OUT/runs.tgz" "$RUNS"
ls -la "$OUT"
