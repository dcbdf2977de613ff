"""The GPU session script's plumbing, proven on the CPU: `bash bench/gpu_session.sh --dry-run` runs every step
(wheels, environment and competitors, GPU tests, token-op and fused-linear benchmarks, precision table) in the
Triton interpreter on tiny shapes, under a hard time limit, and leaves in $OUT the files a real run brings
back (at most 8, the device tool's limit), with the step timings printed. Also the roofline model
(bench/roofline.py) against bytes and FLOPs counted by hand for one small shape."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # bench/ sits next to the package and is not installed with it
    sys.path.insert(0, str(ROOT))

from bench import roofline  # noqa: E402

STEPS = ("setup", "env", "tests", "token-ops", "fused-linear", "precision")
FILES = {"session.log", "steps.tsv", "tests.log", "results.tgz", "gpu-short.md", "fused-linear-gpu.md",
         "precision.md"}
# measured 75 s on the shared 2-core development machine; the limit leaves room for its load
LIMIT_S = 240


def test_token_op_model_by_hand():
    # 3 tokens x 5 logits in bf16 (2 bytes): forward reads 30 bytes; fwd+bwd reads twice, writes once: 90
    assert roofline.token_op_work("forward", 3, 5, "bfloat16").bytes == 30
    work = roofline.token_op_work("forward+backward", 3, 5, "float32")
    assert (work.bytes, work.flops) == (180, 0)
    seconds, bound = work.floor_s(roofline.H100_SXM)
    assert bound == "memory" and seconds == pytest.approx(180 / 3.35e12)


def test_fused_linear_model_by_hand():
    n, v, h = 3, 5, 7                        # hidden 3 x 7, weight 5 x 7, bf16
    forward = roofline.fused_linear_work("forward", n, v, h, "bfloat16")
    assert forward.bytes == (21 + 35) * 2 and forward.flops == 2 * 3 * 5 * 7
    both = roofline.fused_linear_work("forward+backward", n, v, h, "bfloat16")
    assert both.bytes == 4 * 56 * 2 and both.flops == 3 * 210      # 3 products of 2 N V H
    # at the GPU point the products dominate: compute-bound, 6 N V H / 790e12 on the measured H200
    big = roofline.fused_linear_work("forward+backward", 16384, 151936, 4096, "bfloat16")
    seconds, bound = big.floor_s(roofline.H200_MEASURED)
    assert bound == "compute" and seconds == pytest.approx(6 * 16384 * 151936 * 4096 / 790e12)
    with pytest.raises(ValueError, match="kind"):
        roofline.fused_linear_work("backward", n, v, h, "bfloat16")


def test_floor_device_by_name():
    assert roofline.device_for("NVIDIA H200")[0] is roofline.H200_MEASURED
    assert roofline.device_for("NVIDIA H100 80GB HBM3")[0] is roofline.H100_SXM
    device, note = roofline.device_for("NVIDIA A100-SXM4-80GB")
    assert device is roofline.H200_MEASURED and "neither an H100 nor an H200" in note
    assert roofline.device_for(None, "h100")[0] is roofline.H100_SXM


def test_dry_run_runs_every_step_and_returns_its_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), PY=sys.executable, TMPDIR=str(tmp_path))
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=LIMIT_S)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    files = {p.name for p in out.iterdir()}
    assert files == FILES and len(files) <= 8, files
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == list(STEPS)
    for name, seconds, budget, rc in steps:
        assert rc == "0" and 0 <= float(seconds) <= float(budget), (name, seconds, budget, rc)
        assert f"=== step {name}: {seconds} s of {budget} s, exit 0" in log
    assert sum(int(s[2]) for s in steps) <= 480 - 30     # the budgets fit 8 minutes with margin
    session = (out / "session.log").read_text()
    assert "=== session:" in session and "7 files" in session
    assert "time floor: H200 (measured)" in session and "| logprobs_fwd_bwd | 16384 | 151936 |" in session
    assert "skipped" in (out / "tests.log").read_text()      # the GPU tests, collected, skip without CUDA
    with tarfile.open(out / "results.tgz") as tar:
        names = {Path(name).name for name in tar.getnames()}
    assert {f"{stem}.{ext}" for stem in ("gpu-short", "fused-linear-gpu", "precision")
            for ext in ("json", "md")} <= names
    report = (out / "fused-linear-gpu.md").read_text()
    assert "% of floor" in report and "fused[tiles]" in report and "fused[cpu]" in report
    assert "% of floor" in (out / "gpu-short.md").read_text()
