#!/usr/bin/env bash
# GPU figures, part 1 (studies/gpu/README.md): one stage per call on an air-gapped GPU machine.
#   studies/gpu/run.sh bench|tune|scale [--device cuda|cpu] [--quick] [--solver NAME] [--out DIR]
# --solver (tune): the transformer step the search times (default auto: graphs on CUDA, eager on a CPU)
# Reaches no package registry: optuna, plotly and clean-fid come from .whl/ (studies/gpu/wheels.sh)
# when the machine lacks them; the project runs from this checkout (its commands find studies/
# beside their source, so it is put on PYTHONPATH rather than copied by pip). Every step runs under
# `timeout` within the stage's budget (GPU_STAGE_BUDGET seconds, default 510), writes its results
# as it goes, and the results folder DIR/STAGE (DIR: runs/gpu) is re-packed after each step into
# $OUT/STAGE.tar.gz when OUT is set, else DIR/STAGE.tar.gz: a stage stopped early keeps what it measured.
set -uo pipefail

usage() { echo "usage: $0 bench|tune|scale [--device cuda|cpu] [--quick] [--solver NAME] [--out DIR]" >&2; exit 2; }
STAGE=${1:-}
case "$STAGE" in bench|tune|scale) shift ;; *) usage ;; esac
DEVICE=cuda QUICK=0 SOLVER=auto
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DIR=$REPO/runs/gpu
while (($#)); do
  case "$1" in
    --device) DEVICE=${2:-}; shift 2 || usage ;;
    --quick) QUICK=1; shift ;;
    --solver) SOLVER=${2:-}; shift 2 || usage ;;
    --out) DIR=${2:-}; shift 2 || usage ;;
    *) usage ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) usage ;; esac

START=$(date +%s)
BUDGET=${GPU_STAGE_BUDGET:-510}
RES=$DIR/$STAGE
ARCHIVE=${OUT:-$DIR}/$STAGE.tar.gz
rm -rf "$RES" && mkdir -p "$RES" "$(dirname "$ARCHIVE")" || exit 2

# --- environment: wheels, the checkout on PYTHONPATH, a `tarflow-tuner` that logs peak GPU memory
SITE=$(mktemp -d)
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[[ $DEVICE == cpu ]] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # small CPU ops: more threads only spin
if ! python3 -c "import optuna, plotly, cleanfid" 2>/dev/null; then
  if ! ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    echo "error: optuna, plotly or clean-fid is missing and .whl/ holds no wheels: run studies/gpu/wheels.sh where a registry is reachable and carry .whl" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$REPO"/.whl/*.whl || exit 2
fi
mkdir -p "$SITE/bin"
cat >"$SITE/bin/tarflow-tuner" <<'EOF'
#!/usr/bin/env python3
import atexit, os, sys

def peak():  # PEAK_TAG names the run in peak_memory.tsv; bench itself records no memory
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        with open(os.environ["PEAK_LOG"], "a") as f:
            f.write(f"{os.environ.get('PEAK_TAG', '')}\t{torch.cuda.max_memory_allocated()}\t{torch.cuda.max_memory_reserved()}\n")

if os.environ.get("PEAK_LOG"):
    atexit.register(peak)
from tuner.cli import app
app(prog_name="tarflow-tuner")
EOF
chmod +x "$SITE/bin/tarflow-tuner"
export PATH=$SITE/bin:$PATH PEAK_LOG=$RES/peak_memory.tsv

pack() { tar -czf "$ARCHIVE.part" -C "$DIR" "$STAGE" && mv -f "$ARCHIVE.part" "$ARCHIVE"; }

step() {  # run one command in the time left; log it; record rc and seconds in steps.tsv; re-pack
  local left=$((START + BUDGET - $(date +%s))) t0 rc=0
  if ((left < 20)); then
    printf 'skipped\t0\t%s\n' "$*" >>"$RES/steps.tsv"
    return 0
  fi
  t0=$(date +%s)
  echo "+ $*" >>"$RES/log.txt"
  timeout -k 5 "$left" "$@" >>"$RES/log.txt" 2>&1 || rc=$?
  printf '%s\t%s\t%s\n' "$rc" "$(($(date +%s) - t0))" "$*" >>"$RES/steps.tsv"
  pack
}

{
  echo "stage $STAGE, device $DEVICE, quick $QUICK, started $(date -u +%FT%TZ)"
  git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "commit unknown (not a git checkout)"
  python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
} >"$RES/env.txt" 2>&1
printf 'rc\tseconds\tcommand\n' >"$RES/steps.tsv"

MODELS="mnist_p2 mnist"  # T = 196 first: the issue's targets are stated for it

# --- bench: every sampler the project has, both models, batch x dtype; priority order first
bench_specs() {  # tuned schedules, the seeds (sequential aside: bench times it), frontier if built in
  local m=$1
  ls "$REPO"/studies/"$m"/tune*/schedule.json "$REPO"/studies/"$m"/tune/seeds/*.json | grep -v '/sequential\.json$'
  tarflow-tuner schedule show frontier --checkpoint "$REPO/studies/$m/model.pth" >/dev/null 2>&1 && echo frontier
}

stage_bench() {
  local batches="16 1 64 256" repeats=3 warmup=1 b m dt ck name
  ((QUICK)) && batches="2 1" repeats=1 warmup=0
  declare -A specs
  for m in $MODELS; do specs[$m]=$(bench_specs "$m" | tr '\n' ' '); done
  echo "schedules: $(declare -p specs)" >>"$RES/env.txt"
  for b in $batches; do
    for m in $MODELS; do
      for dt in float32 bfloat16; do
        ck=$REPO/studies/$m/model.pth name=${m}_${dt}_b$b
        # shellcheck disable=SC2086 # one word per schedule
        # eager and graph-captured rows side by side (on a CPU `graphs` runs the static step)
        PEAK_TAG=$name step tarflow-tuner bench ${specs[$m]} --checkpoint "$ck" --device "$DEVICE" --dtype "$dt" \
          --batch "$b" --repeats "$repeats" --warmup "$warmup" --solver eager,graphs --out "$RES/bench_$name.json"
        # shellcheck disable=SC2086
        step tarflow-tuner scale graphs $(ls "$REPO"/studies/"$m"/tune*/schedule.json) --checkpoint "$ck" \
          --device "$DEVICE" --dtype "$dt" --batch "$b" --repeats "$repeats" --out "$RES/graphs_$name.json"
      done
    done
  done
}

# --- tune: a reduced search per model on this device, mnist-cnn features in the loop and at verification
stage_tune() {
  local trials=20 n=512 verify=1024 batch=16 search=150 drift=2 models=$MODELS m
  ((QUICK)) && trials=2 n=8 verify=16 batch=2 search=30 drift=off models=mnist
  for m in $models; do
    PEAK_TAG=tune_$m step tarflow-tuner tune --checkpoint "$REPO/studies/$m/model.pth" --trials "$trials" \
      --timeout "$search" --device "$DEVICE" --batch "$batch" --n "$n" --verify-n "$verify" \
      --max-drift "$drift" --extractor mnist-cnn --verify-extractor mnist-cnn --solver "$SOLVER" --out "$RES/tune_$m"
  done
}

# --- scale: step costs of an AFHQ-shaped model (tuner/measure/scale.py, `tarflow-tuner scale steps`)
stage_scale() {
  local batches=1,16,64 quick="" dt
  ((QUICK)) && batches=1,2 quick=--quick
  for dt in bfloat16 float32; do
    step tarflow-tuner scale steps --device "$DEVICE" --dtype "$dt" --batch "$batches" $quick --out "$RES/steps_$dt.json"
  done
}

"stage_$STAGE"
pack
echo "$STAGE: $(($(date +%s) - START)) s -> $ARCHIVE"
column -t -s $'\t' "$RES/steps.tsv" 2>/dev/null || cat "$RES/steps.tsv"
