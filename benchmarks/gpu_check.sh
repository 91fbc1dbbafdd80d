#!/usr/bin/env bash
# The prepared GPU check: install what the GPU machine lacks from the wheels carried in .whl/, run tests/gpu and
# benchmarks/bench_gpu.py, and leave logs and one results JSON in OUTDIR. Every step runs under `timeout`, inside a
# budget for the whole run (GPU_CHECK_BUDGET_S, default 450 s), so a hang costs its own step, never the run.
#
#   bash benchmarks/gpu_check.sh OUTDIR          # on the GPU machine (device tool: carry [".whl"]; docs/gpu.md)
#   bash benchmarks/gpu_check.sh OUTDIR --cpu    # dry run on a CPU machine: the tests skip, the benchmark runs
#                                                # each mode with --device cpu --tiny
#
# OUTDIR receives 7 files (the device tool brings back at most 8): results.json (benchmark, test counts, step
# statuses), summary.md (the same as tables), check.log (this driver), env.log (machine, versions, install),
# tests.log and tests.xml (pytest), bench.log (every benchmark mode). Exit status 0 when every step succeeded.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_WHEELS (default .whl in the repository).
set -u -o pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
OUT_ARG=$1
MODE=gpu
if [[ ${2:-} == --cpu ]]; then MODE=cpu; elif [[ -n ${2:-} ]]; then echo "unknown option ${2}; expected --cpu" >&2; exit 2; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUT_ARG" && OUT=$(cd "$OUT_ARG" && pwd) || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
PARTS=$WORK/parts
STEPS=$WORK/steps.tsv
SITE=$WORK/site
mkdir -p "$PARTS"
: > "$STEPS"
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$ROOT
BENCH_ARGS=()
[[ $MODE == cpu ]] && BENCH_ARGS=(--device cpu --tiny)

log() { echo "[$(date +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$OUT/check.log"; }

# run_step NAME LIMIT RESERVE LOGFILE CMD...: CMD under `timeout`, at most LIMIT seconds and never into the RESERVE
# seconds kept for the steps after it; its output is appended to LOGFILE; NAME, exit status, seconds and the limit
# used go to the step log (124: timed out, 137: killed after the grace period).
run_step() {
  local name=$1 limit=$2 reserve=$3 logfile=$4
  shift 4
  local left=$((BUDGET - (SECONDS - START) - reserve))
  if ((left < 10)); then
    log "skip $name: the budget of ${BUDGET}s is spent"
    printf '%s\tskip\t0\t0\n' "$name" >>"$STEPS"
    return 0
  fi
  ((limit > left)) && limit=$left
  log "start $name (limit ${limit}s)"
  echo "===== $name (limit ${limit}s): $* =====" >>"$logfile"
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" >>"$logfile" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$STEPS"
  log "end $name: exit $rc after $((SECONDS - t0))s"
}

describe_machine() {
  uname -a
  nvidia-smi || echo "(no nvidia-smi)"
  "$PY" - <<'PY'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.machine(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
PY
}

install_wheels() {
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]} == 0)); then
    echo "no wheels in $WHEELS: run benchmarks/gpu_fetch_wheels.sh where PyPI is reachable and carry .whl"
    "$PY" -c "import pydantic" && echo "pydantic is installed here anyway"
    return
  fi
  local tag
  tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  if ! ls "$WHEELS" | grep -q -- "-$tag-"; then
    echo "the carried wheels are not for $tag (this python): not installed (expected on a CPU dry run)"
    return
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
}

export PY WHEELS SITE
export -f describe_machine install_wheels  # `timeout` runs programs, so the functions run in a child bash

log "gpu_check ($MODE) in $ROOT, results to $OUT, budget ${BUDGET}s, python $PY"
run_step environment 30 400 "$OUT/env.log" bash -c describe_machine
run_step install 60 380 "$OUT/env.log" bash -c install_wheels
[[ -d $SITE ]] && export PYTHONPATH=$ROOT:$SITE
run_step imports 60 360 "$OUT/env.log" "$PY" -c \
  "import pydantic, torch, shardwise; print('shardwise', shardwise.__file__, 'pydantic', pydantic.VERSION)"
run_step tests 240 190 "$OUT/tests.log" "$PY" -m pytest tests/gpu -rA -p no:cacheprovider \
  --basetemp="$WORK/pytest" --junitxml="$OUT/tests.xml" -o faulthandler_timeout=150
modes=(plain zero0 zero3 fsdp2 infer)
for i in "${!modes[@]}"; do
  m=${modes[$i]}
  after=$((${#modes[@]} - i - 1))
  run_step "bench_$m" 75 $((20 + 25 * after)) "$OUT/bench.log" \
    "$PY" benchmarks/bench_gpu.py --mode "$m" --out "$PARTS/$m.json" "${BENCH_ARGS[@]}"
done
"$PY" benchmarks/bench_gpu.py --collect "$PARTS" --steps-log "$STEPS" --junit "$OUT/tests.xml" \
  --out "$OUT/results.json" >"$OUT/summary.md" 2>>"$OUT/check.log"
collect_rc=$?
cat "$OUT/summary.md"
failed=$(awk -F'\t' '$2 != "0"' "$STEPS" | cut -f1 | tr '\n' ' ')
log "done in $((SECONDS - START))s; steps not ok: ${failed:-none}; collect exit $collect_rc"
rm -rf "$WORK"
[[ -z $failed && $collect_rc == 0 ]]
