#!/usr/bin/env bash
# One measurement stage on the air-gapped GPU box (see studies/gpu/README.md).
#
#   studies/gpu/run.sh bench|tune|scale [--device cuda|cpu] [--quick]
#
# Results go to ${OUT:-runs/gpu}/STAGE/ as they are made (one log per command, steps.tsv with
# each command's exit status and seconds), then the folder is packed into ${OUT:-runs/gpu}/STAGE.tar.gz.
# Every command runs under `timeout`; the stage stops starting commands when its budget
# (BUDGET_S, default 540 s) is spent. For tune, missing optuna/plotly are installed from .whl/
# (studies/gpu/wheels.sh) into /tmp/site; clean-fid is not needed (the mnist-cnn FID path does not
# import it; Inception FID is left to the CPU machine). Exit 0 when every command did.
set -uo pipefail

die() { echo "error: $*" >&2; exit 2; }

STAGE=${1:-}
[ $# -gt 0 ] && shift
case "$STAGE" in
  bench|tune|scale) ;;
  *) die "STAGE must be bench, tune or scale (usage: studies/gpu/run.sh STAGE [--device cuda|cpu] [--quick]), got '$STAGE'" ;;
esac
DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) [ $# -ge 2 ] || die "--device needs a value (cuda or cpu)"; DEVICE=$2; shift 2 ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    --quick) QUICK=1; shift ;;
    *) die "unknown option '$1' (options: --device cuda|cpu, --quick)" ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) die "--device must be cuda or cpu, got '$DEVICE'" ;; esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ROOT=${OUT:-$REPO/runs/gpu}
mkdir -p "$ROOT" 2>/dev/null || die "cannot create output folder $ROOT"
ROOT=$(cd "$ROOT" && pwd)
DEST=$ROOT/$STAGE
if [ -e "$DEST" ] && [ -n "$(ls -A "$DEST" 2>/dev/null)" ]; then
  die "$DEST already holds results; move it away or set OUT to another folder"
fi
mkdir -p "$DEST" || die "cannot create $DEST"
cd "$REPO"

PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-540}
START=$SECONDS
LOG=$DEST/run.log
FAILED=0
export PYTHONUNBUFFERED=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: run CMD under timeout (capped by the budget left), log to NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then
    say "skip $name: budget of ${BUDGET}s spent"
    printf '%s\tskipped\t0\n' "$name" >> "$DEST/steps.tsv"
    FAILED=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  say "== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$DEST/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$DEST/steps.tsv"
  say "   rc=$rc after $((SECONDS - t0))s"
  if [ "$rc" -ne 0 ]; then
    FAILED=1
    tail -n 3 "$DEST/$name.log" | sed 's/^/   | /' | tee -a "$LOG"
  fi
}

# --- dependencies (tune only: scale and bench need nothing beyond the box's packages) --------
if [ "$STAGE" = tune ] && ! "$PY" -c "import optuna, plotly" 2>/dev/null; then
  SITE=${SITE:-/tmp/site}
  if ls .whl/*.whl > /dev/null 2>&1 \
     && "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >> "$LOG" 2>&1; then
    export PYTHONPATH=$SITE:$PYTHONPATH
    say "installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
  else
    die "optuna/plotly do not import and no usable wheels in .whl/ (run studies/gpu/wheels.sh where PyPI is reachable; see $LOG)"
  fi
fi
{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  stage: $STAGE  device: $DEVICE  quick: $QUICK"
  echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "PYTHONPATH: $PYTHONPATH"
  timeout 60 "$PY" -c "import sys, torch, numpy, scipy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'scipy', scipy.__version__); print('gpu:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" 2>&1
  [ "$STAGE" = tune ] && timeout 60 "$PY" -c "import optuna, plotly; print('optuna', optuna.__version__, 'plotly', plotly.__version__)" 2>&1
  command -v nvidia-smi > /dev/null && timeout 30 nvidia-smi 2>&1
  echo "load: $(cat /proc/loadavg 2>/dev/null)  cpus: $(getconf _NPROCESSORS_ONLN)"
} > "$DEST/env.txt" 2>&1

# --- stages -------------------------------------------------------------------------------
CLI=("$PY" -c "from tuner.cli import app; app()")
QFLAG=()
[ "$QUICK" = 1 ] && QFLAG=(--quick)

case "$STAGE" in
  scale)
    for D in float32 bfloat16; do
      step "scale_$D" 240 "$PY" -m tuner.scale --device "$DEVICE" --dtype "$D" "${QFLAG[@]}" \
        ${SCALE_BATCHES:+--batches "$SCALE_BATCHES"} --out "$DEST/scale_$D.json"
    done
    ;;
  bench)
    P2=(studies/mnist_p2/tune/schedule.json studies/mnist_p2/tune_b1/schedule.json
        studies/mnist_p2/tune/seeds/sejd.json studies/mnist_p2/tune/seeds/paper.json
        frontier:window=64,tol=1e-3)
    # T = 49 on the patch-4 model: the frontier window is the whole sequence
    M4=(studies/mnist/tune/schedule.json studies/mnist/tune/seeds/sejd.json
        studies/mnist/tune/seeds/paper.json frontier:tol=1e-3)
    BATCHES="1 16 64 256"
    EXTRA=()
    if [ "$QUICK" = 1 ]; then BATCHES="1 2"; EXTRA=(--repeats 1 --warmup 0); fi
    for model in mnist_p2 mnist; do
      if [ "$model" = mnist_p2 ]; then SCHED=("${P2[@]}"); else SCHED=("${M4[@]}"); fi
      for B in $BATCHES; do
        for D in float32 bfloat16; do
          step "bench_${model}_b${B}_$D" 120 "${CLI[@]}" bench --checkpoint "studies/$model/model.pth" \
            "${SCHED[@]}" --batch "$B" --dtype "$D" --device "$DEVICE" "${EXTRA[@]}" \
            --out "$DEST/bench_${model}_b${B}_$D.json"
        done
      done
    done
    ;;
  tune)
    # mnist-cnn FID in the loop and at verification: Inception is not on the box (README)
    if [ "$QUICK" = 1 ]; then
      ARGS=(--checkpoint studies/mnist/model.pth --trials 3 --n 16 --batch 8 --verify-n 32)
      NAME=tune_quick
    else
      ARGS=(--checkpoint studies/mnist_p2/model.pth --trials 20 --n 128 --batch 16 --verify-n 256)
      NAME=tune_p2
    fi
    LEFT=$((BUDGET - (SECONDS - START)))
    # the study's own timeout leaves ~2 min for the verification and export after it
    step "$NAME" "$LEFT" "${CLI[@]}" tune "${ARGS[@]}" --objective latency \
      --extractor mnist-cnn --verify-extractor mnist-cnn --timeout $((LEFT > 240 ? LEFT - 120 : LEFT / 2)) \
      --device "$DEVICE" --out "$DEST/$NAME"
    ;;
esac

say "stage $STAGE done in $((SECONDS - START))s; packing $ROOT/$STAGE.tar.gz"
tar -czf "$ROOT/$STAGE.tar.gz" -C "$ROOT" "$STAGE" || die "could not pack $ROOT/$STAGE.tar.gz"
exit $FAILED
