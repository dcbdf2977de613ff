#!/usr/bin/env bash
# One script for a short GPU loan (minutes): the GPU tests, the short GPU benchmark profile (`python -m bench
# --profile gpu-short`) and the precision table (`python -m bench --profile precision` at 4096 x 151936).
# Run from the repository root on the GPU machine:  bash bench/gpu_session.sh
# and, as a second command, STEP=fused-linear bash bench/gpu_session.sh (hidden-state cases; verl as a wheel too)
# Results land in bench/results/<gpu>/; when $OUT is set (the device tool, which returns at most 8 files) they
# come back as one archive, $OUT/gpu_results.tgz (unpack it into bench/results/).
#
# The machine may have no network: nothing is installed from an index. The package runs from the checkout
# (PYTHONPATH; the Triton path needs no build). Optional competitors travel as wheels in ./.whl/ (ignored by
# git), fetched beforehand where pip works:
#   pip download --no-deps --only-binary=:all: -d .whl liger-kernel cut-cross-entropy
set -uo pipefail
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/aem_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/aem_site"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${STEP:-logits}" = fused-linear ]; then
  # second command of a session (each must end inside 10 minutes): the fused linear op from hidden states
  timeout 240 $PY -m pytest python_tests/ops/test_fused_linear.py -q -x 2>&1 | tail -15
  timeout 280 $PY -m bench --profile fused-linear-gpu --no-plots   # vs Liger FLCE, CCE, verl linear_cross_entropy
else
timeout 200 $PY -m pytest python_tests/ops/test_logprobs_triton_gpu.py python_tests/ops/test_logprobs_triton.py \
    python_tests/ops/test_policy_loss_triton.py \
    -q -x 2>&1 | tail -15
timeout 330 $PY -m bench --profile gpu-short   # its own budget is 5 min; the tests above <= 200 s
fi
gpu=$($PY -c "import torch; from bench.report import slug; print(slug(torch.cuda.get_device_name()))" 2>/dev/null || echo gpu)
timeout 60 $PY -m bench --profile precision --n 4096 --v 151936   # error vs fp64, untimed: bench/results/$gpu/precision.*
if [ -n "${OUT:-}" ]; then tar -czf "$OUT/gpu_results.tgz" -C bench/results "$gpu"; fi
