#!/usr/bin/env bash
# One script for a short GPU loan (minutes): the GPU tests, then the short GPU benchmark profile.
# Run from the repository root on the GPU machine:  bash bench/gpu_session.sh
# Results land in bench/results/<gpu>/ and, when $OUT is set (the device tool), are copied there too.
set -uo pipefail
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
$PY -m pip install --quiet --no-build-isolation -e ".[test,bench]" 2>&1 | tail -2
$PY -m pip install --quiet liger-kernel 2>&1 | tail -1 || echo "liger-kernel not installed: its line is skipped"
$PY -m pytest python_tests/test_ops_triton_gpu.py python_tests/test_ops_logprobs.py python_tests/test_ops_aem_loss.py \
    -q -x 2>&1 | tail -15
$PY -m bench --profile gpu-short
gpu=$($PY -c "import torch; from bench.report import slug; print(slug(torch.cuda.get_device_name()))" 2>/dev/null || echo gpu)
$PY bench/precision.py --rows 4096 --vocab 151936 --out "bench/results/$gpu/precision.json"
if [ -n "${OUT:-}" ]; then cp -r bench/results "$OUT/"; fi
