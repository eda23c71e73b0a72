# Shared by the benchmarks/gpu_*.sh scripts. Defaults (a script or the caller may set them
# first): OUT=/tmp/ffsolve-out (what comes back), DEVICE=cuda, PY=$PYTHON or python3.
#   setup NAME             PYTHONPATH, RUNS=runs_NAME (unless set), both folders, env_NAME.txt
#   env_lines              GPU, torch and CUDA versions, commit and date, on stdout
#   env_header FILE        the same into $OUT/FILE and on stdout
#   ff SECONDS ARGS        one `ffsolve ARGS` with a time limit, its output on stdout
#   step NAME SECONDS ARGS one `ffsolve ARGS` with a time limit, its output in $OUT/NAME.log
# A failure or timeout of ff or step is logged and the script goes on.

OUT=${OUT:-/tmp/ffsolve-out}
DEVICE=${DEVICE:-cuda}
PY=${PY:-${PYTHON:-python3}}

setup() {
  export PYTHONPATH=src PYTHONUNBUFFERED=1
  RUNS=${RUNS:-runs_$1}
  mkdir -p "$OUT" "$RUNS"
  env_header "env_$1.txt"
}

env_lines() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  # the device copy's .git names the session's base commit: FFSOLVE_COMMIT wins
  echo "commit ${FFSOLVE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  date -u
}

env_header() {
  env_lines > "$OUT/$1" 2>&1
  cat "$OUT/$1"
}

ff() {
  local limit=$1; shift
  echo "== [$(date -u +%T)] ffsolve $*"
  timeout "$limit" $PY -m ffsolve "$@" --device "$DEVICE" --out "$RUNS" || echo "!! failed (rc $?): $*"
}

step() {
  local name=$1 limit=$2; shift 2
  echo "== ffsolve $* (limit ${limit}s)"
  timeout "$limit" $PY -m ffsolve "$@" --device "$DEVICE" --out "$RUNS" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/$name.log"
  [ $rc = 0 ] || echo "!! $name failed or timed out (exit $rc); see $name.log"
}
