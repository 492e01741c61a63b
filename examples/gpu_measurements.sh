#!/usr/bin/env bash
# Every GPU measurement the README and issue 18 ask for, in one run on the project's GPU machine (one call):
# the GPU tests, both AugMix backends against torchvision, training overheads and the corruption benchmarks.
#
#   bash examples/gpu_measurements.sh                 # on the GPU machine, from the repository root
#   bash examples/gpu_measurements.sh augmix training # only those steps (names below), e.g. to finish a run
#   CHECK=1 bash examples/gpu_measurements.sh         # anywhere, no GPU: every command parses its arguments
#
# The GPU machine has torch, torchvision, timm and triton but not fastai: its wheels come with the checkout
# in .whl/ (once: mkdir -p .whl && cp /work/shared/device/wheels/*.whl .whl/ &&
# echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"; then name .whl in the run's carry, and give the
# run a timeout_s of 600). Each step has its own time limit, and all of them together stay within
# BUDGET seconds (default 560, under the machine's 10 minutes a call): a hang costs one step, and the steps
# that did not fit are listed at the end. Logs go to $OUT (default ./gpu_measurements) as <step>.log, with
# summary.txt: each step's exit status and seconds (124: its time limit).
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu_measurements}
BUDGET=${BUDGET:-560}
CHECK=${CHECK:-0}
mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# step name, time limit in seconds, command
STEPS=(
  "tests-triton|150|python3 -m pytest -q -p no:cacheprovider tests/test_triton.py -m 'not slow' -k 'not compile'"
  "tests-cuda|90|python3 -m pytest -q -p no:cacheprovider tests --ignore=tests/test_triton.py -m 'not slow' -k 'cuda or gpu'"
  "augmix|110|python3 examples/benchmark_augmix.py --device cuda"
  "training-resnet50|80|python3 examples/benchmark_training.py --device cuda --arch resnet50 --size 224 --bs 64 --bf16 --channels-last"
  "training-resnet18|50|python3 examples/benchmark_training.py --device cuda --arch resnet18 --size 32 --bs 128 --bf16 --channels-last"
  "corruptions|80|python3 examples/benchmark_corruptions.py --device cuda"
  "evaluate|70|python3 examples/benchmark_corruptions.py --device cuda --evaluate --skip-corruptions"
)
WANTED=" $* "

log() { echo "$*" | tee -a "$SUMMARY"; }

if [ "$CHECK" = 1 ]; then
  # No GPU here: each benchmark must get past its argument parsing to the point where it asks for the GPU,
  # and the test selections must collect. Hiding the GPU makes the check the same on any machine.
  export CUDA_VISIBLE_DEVICES="" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
  failed=0
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit command <<< "$step"
    case "$command" in
      *pytest*) eval "$command --collect-only" > "$OUT/$name.check.log" 2>&1
                status=$?; grep -qE '[0-9]+ (tests? )?collected|selected' "$OUT/$name.check.log" || status=1 ;;
      *) eval "$command" > "$OUT/$name.check.log" 2>&1
         grep -q 'needs a CUDA GPU' "$OUT/$name.check.log"; status=$? ;;
    esac
    log "check $name: $([ $status = 0 ] && echo ok || echo FAILED, see $OUT/$name.check.log)"
    [ $status = 0 ] || failed=1
  done
  exit $failed
fi

log "gpu_measurements $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || { log "installing the fastai wheels from .whl failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  log "no .whl/ wheels: using the installed fastai"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
  2>&1 | tee -a "$SUMMARY"

skipped=()
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit command <<< "$step"
  if [ -n "${*:-}" ] && [[ "$WANTED" != *" $name "* && "$WANTED" != *" ${name%%-*} "* ]]; then
    continue
  fi
  left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    skipped+=("$name")
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  began=$(date +%s)
  echo "== $name (limit ${limit}s): $command" | tee "$OUT/$name.log"
  timeout --signal=TERM --kill-after=10 "$limit" bash -c "$command" >> "$OUT/$name.log" 2>&1
  status=$?
  log "$name: exit $status after $(( $(date +%s) - began ))s (limit ${limit}s)"
  tail -n 40 "$OUT/$name.log"
done
if [ ${#skipped[@]} -gt 0 ]; then
  log "not run (out of time): ${skipped[*]}; run them with: bash examples/gpu_measurements.sh ${skipped[*]}"
fi
log "total $(( $(date +%s) - START ))s"
echo; echo "== summary ($SUMMARY)"; cat "$SUMMARY"
