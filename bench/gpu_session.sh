#!/usr/bin/env bash
# One command for a short GPU loan: the GPU tests, the token-op benchmark (`gpu-short`), the fused-linear
# benchmark (`fused-linear-gpu`: the package's default CUDA plan raced against the Triton tile kernels, Liger,
# Cut-Cross-Entropy, TRL's and verl's kernels) and the precision table, inside 8 minutes on one H200 (first
# compiles included): every step runs under `timeout` with the budget below, and prints how long it took.
#
#   bash bench/gpu_session.sh             # on the GPU machine, from anywhere in the checkout
#   bash bench/gpu_session.sh --dry-run   # the same steps on the CPU: Triton interpreter, tiny shapes (CI)
#
# Step budgets (seconds; 445 in all, 35 s short of 8 minutes for the packing and a slow start):
#   setup 20 (carried wheels), env 30 (versions, competitors, roofline), tests 90, token-ops 120 (the profile
#   stops starting lines after 80 s), fused-linear 140 (after 95 s), precision 45.
# A step that fails or times out is reported with its exit code (124: timed out) and the next step runs.
#
# Nothing is installed from an index (the lent machine has no network). The package runs from the checkout.
# Competitors travel as wheels in ./.whl/ (ignored by git; the device tool's `carry: [".whl"]`), fetched
# beforehand where pip works, for the machine's Python 3.12 (4.4 MB in all):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 verl==0.9.1 datasets==5.2.0 dill==0.4.1 \
#     multiprocess==0.70.19
# (datasets, dill and multiprocess: TRL's fused kernel imports trl.trainer.utils in its backward, which needs
# datasets; the image has every other dependency of these imports.) A competitor whose import fails is listed
# as absent with the reason, in the env step and in the results; it never stops the script.
#
# What comes back (7 files, at most 8 allowed) in $OUT, or in the folder printed at the end when $OUT is unset:
#   session.log         everything printed, step timings included
#   steps.tsv           step, seconds, budget, exit code
#   tests.log           the pytest run
#   results.tgz         results/<device>/: gpu-short, fused-linear-gpu, precision (.json and .md each)
#   gpu-short.md, fused-linear-gpu.md, precision.md   the three reports, readable without unpacking
# Without $OUT a real run keeps its results in bench/results/<gpu>/ (a dry run in a temporary folder).
set -uo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_session.sh [--dry-run]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.." || exit 2
PY=${PY:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/aem_session.XXXXXX")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DEVICE_ARGS=(--device cpu --floor h200)                    # the floor plumbing runs; its numbers mean nothing
  TOKEN_ARGS=(--n 32 --v 384 --seq-len 16 --reps 1 --warmup 0)
  FUSED_ARGS=(--n 32 --v 384 --seq-len 16 --reps 1 --warmup 0)
  PRECISION_ARGS=(--n 16 --v 384)
  TEST_ARGS=(-m gpu)                                         # collected and skipped: no CUDA device
  WHEEL_ARGS=(--python-version 3.12 --only-binary=:all:)     # the wheels are the lent image's (Python 3.12)
  RESULTS=${RESULTS:-$WORK/results}
else
  DEVICE_ARGS=()
  TOKEN_ARGS=(--budget-s 80)
  FUSED_ARGS=(--n 16384 --reps 5 --warmup 1 --budget-s 95)   # the headline point only: 16384 x 151936 bf16
  PRECISION_ARGS=(--n 4096 --v 151936)
  TEST_ARGS=()
  WHEEL_ARGS=()
  RESULTS=${RESULTS:-bench/results}
fi

now() { date +%s.%N; }

# step NAME BUDGET_S COMMAND...: runs COMMAND under `timeout`, its output shown and kept in $WORK/NAME.log
step() {
  local name=$1 budget=$2; shift 2
  local began rc seconds
  began=$(now)
  echo "=== step $name (budget ${budget} s): $*"
  if declare -F "$1" > /dev/null; then   # a function of this script: its own shell, with what it reads
    set -- bash -c "$(declare -p DRY WORK PY DEVICE_ARGS WHEEL_ARGS); $(declare -f "$1"); $1"
  fi
  timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  seconds=$(awk -v a="$began" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$seconds" "$budget" "$rc" >> "$WORK/steps.tsv"
  echo "=== step $name: ${seconds} s of ${budget} s, exit $rc$([ "$rc" = 124 ] && echo ' (timed out)')"
}

setup() {
  if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo "no wheels in .whl/: the competitors that are not installed here are reported absent"
    return 0
  fi
  local site=$WORK/site
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "${WHEEL_ARGS[@]}" .whl/*.whl; then
    echo "installing the wheels together failed; one at a time (a wheel for another Python is left out):"
    for wheel in .whl/*.whl; do
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "${WHEEL_ARGS[@]}" "$wheel" || echo "  left out: $wheel"
    done
  fi
  ls "$site" | grep dist-info
}

environment() {
  if [ "$DRY" = 0 ]; then nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv; fi
  "$PY" -m bench.session "${DEVICE_ARGS[@]}"   # versions, competitors (absent: why), the roofline table
}

run_session() {
  echo "aem_kernels GPU session$([ "$DRY" = 1 ] && echo ' (dry run on the CPU)'): $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null)"
  step setup 20 setup
  if [ -d "$WORK/site" ]; then export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH#"$PWD"}"; fi
  step env 30 environment
  step tests 90 "$PY" -m pytest -q -p no:cacheprovider --maxfail=5 --durations=8 "${TEST_ARGS[@]}" \
    python_tests/ops/test_logprobs_triton_gpu.py python_tests/ops/test_fused_linear.py \
    python_tests/ops/test_logprobs_triton.py python_tests/ops/test_policy_loss_triton.py
  local out="$RESULTS/$slug"
  step token-ops 120 "$PY" -m bench --profile gpu-short --out "$out" --no-plots "${DEVICE_ARGS[@]}" "${TOKEN_ARGS[@]}"
  step fused-linear 140 "$PY" -m bench --profile fused-linear-gpu --out "$out" --no-plots "${DEVICE_ARGS[@]}" \
    "${FUSED_ARGS[@]}"
  step precision 45 "$PY" -m bench --profile precision --out "$out" --no-plots "${DEVICE_ARGS[@]}" \
    "${PRECISION_ARGS[@]}"
  echo "=== steps (name, seconds, budget, exit code):"
  cat "$WORK/steps.tsv"
}

started=$(now)
if [ "$DRY" = 1 ]; then
  slug=dry-run-cpu
else
  slug=$(timeout 60 "$PY" -c "import torch; from bench.report import slug; print(slug(torch.cuda.get_device_name()))" \
         2>/dev/null || echo gpu)
  case "$slug" in ""|*[!a-z0-9-]*) slug=gpu ;; esac
fi
run_session 2>&1 | tee "$WORK/session.log"
dest=${OUT:-$WORK/out}
mkdir -p "$dest"
tar -czf "$dest/results.tgz" -C "$RESULTS" "$slug" 2>/dev/null || echo "no results to pack in $RESULTS/$slug"
for name in gpu-short fused-linear-gpu precision; do
  if [ -f "$RESULTS/$slug/$name.md" ]; then cp "$RESULTS/$slug/$name.md" "$dest/"; fi
done
cp "$WORK/steps.tsv" "$dest/steps.tsv"
if [ -f "$WORK/tests.log" ]; then cp "$WORK/tests.log" "$dest/tests.log"; fi
cp "$WORK/session.log" "$dest/session.log"   # counted below; copied again with the last line
total=$(awk -v a="$started" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
echo "=== session: ${total} s in all; $(ls "$dest" | wc -l) files in $dest: $(ls "$dest" | tr '\n' ' ')" \
  | tee -a "$WORK/session.log"
cp "$WORK/session.log" "$dest/session.log"
