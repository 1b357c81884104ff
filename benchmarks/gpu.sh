#!/usr/bin/env bash
# The GPU checks, one script for one call on a lent GPU machine (one H100/H200; torch, transformers, peft, triton
# there; no vLLM, Ray or DeepSpeed; no network). Every step has a timeout; the whole stays under BUDGET_S (470 s).
#
#   bash benchmarks/gpu.sh             # on the GPU machine: device run(carry=[".whl"], timeout_s=600,
#                                      #   command="bash benchmarks/gpu.sh")
#   bash benchmarks/gpu.sh --dry-run   # here, on CPU: every step with tiny shapes (minutes), no wheels needed when
#                                      #   DeepSpeed imports (PYTHON=/path/to/venv/python to pick the interpreter)
#
# Before the GPU call, in the checkout the device tool sends: `bash benchmarks/wheels.sh` writes .whl/ (DeepSpeed
# built with DS_BUILD_OPS=0 and the requirements the GPU image lacks, ~10 MiB; .whl/ is in .gitignore, and the
# device tool carries an ignored path when `carry` names it). Here each wheel whose module does not import is
# installed with `pip install --no-index --no-deps --target $SITE` and $SITE goes first on PYTHONPATH; if DeepSpeed
# still does not import, the learner step is not run and the script exits 1 naming the wheel folder.
#
# Steps (tables in $OUT, default /tmp/opsd-gpu-results; at most 8 files come back from a device call: these 7):
#   gpu.txt               the card, driver, package versions
#   loss.md               benchmarks/loss.py: GJS loss alone, naive vs fused vs top-k+tail, bf16, T 2,048 / 8,192,
#                         V 151,936, H 2,048; MFU of its three GEMMs
#   learner_worker.md     benchmarks/learner_worker.py: LearnerWorker (DeepSpeed ZeRO-0 / ZeRO-2, bf16, NCCL, world
#   learner_worker.json     size 1) on the Qwen3-1.7B shape, 8 x (256 + 2,048) tokens, full (teacher context 768 +
#                         2,048) and top-k+tail, micro-batching variants, the plain PyTorch loop and the naive loss as
#                         baselines; tokens/s, peak memory, MFU
#   teacher.md            benchmarks/teacher.py: TeacherScorer vs plain HF full-logits scoring, 8 x (768 + 2,048)
#   gpu.log               every step's output
#   summary.md            each step's status and time, then every table
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run|--cpu) DRY=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $arg (--dry-run)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/opsd-gpu-results}"
WHEELS="${WHEELS:-$REPO/.whl}"
SITE="${SITE:-/tmp/opsd-site}"
BUDGET_S="${BUDGET_S:-470}"
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
: > "$LOG"
START=$(date +%s)
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
  MODEL_DIR="${MODEL_DIR:-/tmp/opsd-bench/tiny}"
else
  MODEL_DIR="${MODEL_DIR:-/tmp/opsd-bench/qwen3-1.7b}"
fi

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu.sh $(elapsed)s] $*" | tee -a "$LOG"; }

# -- environment -----------------------------------------------------------------------------------------------------
{
  if [ "$DRY" = 1 ]; then echo "dry run on CPU: $(nproc) cores"; else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
  fi
} | tee "$OUT/gpu.txt"

# -- wheels: DeepSpeed and what it needs, only what this machine lacks -----------------------------------------------
# A carried wheel is installed when its distribution is not installed here, or (typing_extensions: pydantic needs
# >= 4.16) when the one installed is older. If DeepSpeed still does not import, every carried wheel is installed
# (shadowing this machine's versions) and the check runs again.
DS_OK=1
wheels_to_install() {  # $1: "missing" or "all"
  "$PY" - "$WHEELS" "$1" <<'PYEOF'
import importlib.metadata as md, importlib.util, pathlib, sys
from packaging.version import Version
MODULE = {"py_cpuinfo": "cpuinfo"}  # distribution -> module, where they differ
AT_LEAST = {"typing_extensions"}  # carried for a minimum version
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist, version = whl.name.split("-")[:2]
    try:
        have = md.version(dist)
    except md.PackageNotFoundError:
        have = None
    if (sys.argv[2] == "all" or have is None or importlib.util.find_spec(MODULE.get(dist, dist)) is None
            or (dist in AT_LEAST and Version(have) < Version(version))):
        print(whl)
PYEOF
}
install_wheels() {
  local list
  list="$(wheels_to_install "$1")" || { say "could not read $WHEELS"; return; }
  if [ -z "$list" ]; then say "wheels ($1): nothing to install from $WHEELS"; return; fi
  say "installing into $SITE: $(echo "$list" | xargs -n1 basename | tr '\n' ' ')"
  # shellcheck disable=SC2086
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $list \
       >>"$LOG" 2>&1; then
    case ":$PYTHONPATH:" in *":$SITE:"*) ;; *) export PYTHONPATH="$SITE:$PYTHONPATH" ;; esac
  else
    say "pip install of the wheels failed (see $LOG)"
  fi
}
ds_check() {
  "$PY" -c "import sys, importlib.util as u, torch, transformers, peft
v = lambda m: getattr(__import__(m), '__version__', '?') if u.find_spec(m) else 'missing'
print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__,
      '| peft', peft.__version__, '| triton', v('triton'), end=' | ')
import deepspeed, pydantic, hjson
from deepspeed.accelerator import get_accelerator
print('deepspeed', deepspeed.__version__, '(accelerator', get_accelerator()._name + ')', '| pydantic', pydantic.VERSION)
" 2>>"$LOG"
}
if [ -d "$WHEELS" ]; then install_wheels missing; else say "no wheel folder $WHEELS"; fi
versions="$(ds_check)"; ok=$?
if [ $ok -ne 0 ] && [ -d "$WHEELS" ]; then
  say "DeepSpeed does not import yet: installing every carried wheel"
  install_wheels all
  versions="$(ds_check)"; ok=$?
fi
if [ $ok -eq 0 ]; then
  echo "$versions" | tee -a "$OUT/gpu.txt"
else
  DS_OK=0
  echo "$versions deepspeed: DOES NOT IMPORT" | tee -a "$OUT/gpu.txt"
  say "ERROR: DeepSpeed does not import (see $LOG). The learner benchmark needs it: run 'bash benchmarks/wheels.sh'" \
      "in the checkout the device tool sends and carry the wheel folder (run(carry=[\".whl\"])); looked in $WHEELS:" \
      "$(ls "$WHEELS" 2>/dev/null | tr '\n' ' ' || echo 'no such folder')"
fi

# -- steps -----------------------------------------------------------------------------------------------------------
declare -a STEP_NAMES=() STEP_STATUS=() STEP_SECONDS=()
# step NAME TIMEOUT RESERVE CMD...: runs CMD with a timeout of min(TIMEOUT, what the budget leaves after RESERVE
# seconds kept for the steps after it).
step() {
  local name="$1" limit="$2" reserve="$3"; shift 3
  local left=$(( BUDGET_S - $(elapsed) - reserve ))
  [ "$left" -lt "$limit" ] && limit="$left"
  STEP_NAMES+=("$name")
  if [ "$limit" -lt 10 ]; then
    say "$name: skipped (time budget)"; STEP_STATUS+=("skipped: time budget"); STEP_SECONDS+=(0); return
  fi
  say "$name: start (timeout ${limit}s): $*"
  echo "===== $name: $* =====" >>"$LOG"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  STEP_SECONDS+=($(( $(date +%s) - t0 )))
  if [ $rc -eq 0 ]; then STEP_STATUS+=("ok")
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then STEP_STATUS+=("timed out (${limit}s)")
  else STEP_STATUS+=("failed (exit $rc)"); fi
  say "$name: ${STEP_STATUS[-1]} in ${STEP_SECONDS[-1]}s"
  [ $rc -eq 0 ] || { echo "--- last lines of $name:"; tail -n 25 "$LOG"; }
}
skip() { STEP_NAMES+=("$1"); STEP_STATUS+=("not run: $2"); STEP_SECONDS+=(0); say "$1: not run: $2"; }

if [ "$DRY" = 1 ]; then
  step model 120 200 "$PY" benchmarks/bench_model.py build --shape tiny --device cpu --out "$MODEL_DIR"
  step loss 90 180 "$PY" benchmarks/loss.py --tiny --out "$OUT/loss.md"
  if [ "$DS_OK" = 1 ]; then
    step learner_worker 400 40 "$PY" benchmarks/learner_worker.py --tiny --fresh-processes --model-dir "$MODEL_DIR" \
      --out "$OUT/learner_worker.md" --json "$OUT/learner_worker.json"
  else skip learner_worker "DeepSpeed does not import"; fi
  step teacher 90 0 "$PY" benchmarks/teacher.py --tiny --model-dir "$MODEL_DIR" --out "$OUT/teacher.md"
else
  step model 90 360 "$PY" benchmarks/bench_model.py build --shape qwen3-1.7b --device cuda --out "$MODEL_DIR"
  step loss 60 300 "$PY" benchmarks/loss.py --device cuda --dtype bfloat16 --tokens 2048 8192 --chunk 2048 \
    --repeats 3 --skip-real --out "$OUT/loss.md"
  if [ "$DS_OK" = 1 ]; then
    # learner_worker stops starting configurations 20 s before its own timeout (--budget-s); rows already measured
    # are in its table whatever happens after.
    LW_LIMIT=$(( BUDGET_S - $(elapsed) - 75 )); [ "$LW_LIMIT" -gt 280 ] && LW_LIMIT=280
    step learner_worker 280 75 "$PY" benchmarks/learner_worker.py --model-dir "$MODEL_DIR" \
      --budget-s $(( LW_LIMIT - 20 )) --out "$OUT/learner_worker.md" --json "$OUT/learner_worker.json"
  else skip learner_worker "DeepSpeed does not import"; fi
  step teacher 75 0 "$PY" benchmarks/teacher.py --model-dir "$MODEL_DIR" --rows 8 --response 2048 \
    --teacher-prompt 768 --repeats 3 --bytes-ks 64 --out "$OUT/teacher.md"
fi

# -- summary ---------------------------------------------------------------------------------------------------------
{
  echo "# benchmarks/gpu.sh$([ "$DRY" = 1 ] && echo ' --dry-run (CPU, tiny shapes)'), $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  cat "$OUT/gpu.txt"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---:|"
  for i in "${!STEP_NAMES[@]}"; do echo "| ${STEP_NAMES[$i]} | ${STEP_STATUS[$i]} | ${STEP_SECONDS[$i]} |"; done
  echo "| total | | $(elapsed) |"
  for f in loss learner_worker teacher; do
    echo; echo "## $f"; echo
    if [ -s "$OUT/$f.md" ]; then cat "$OUT/$f.md"; else echo "(no table)"; fi
  done
} > "$OUT/summary.md"
cat "$OUT/summary.md"
failed=0
for s in "${STEP_STATUS[@]}"; do [ "$s" = ok ] || failed=$((failed + 1)); done
say "done: ${#STEP_NAMES[@]} steps, $failed not ok, $(elapsed) s; tables in $OUT"
[ "$failed" -eq 0 ]
