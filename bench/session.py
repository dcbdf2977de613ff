"""`python -m bench.session`: what a GPU session (bench/gpu_session.sh) runs on: versions, the device, the
floor its timings are compared with, and every competitor line with why it cannot run here, before any
benchmark step spends time; then the roofline table (`python -m bench --roofline`, built here). Never fails
on a competitor: an import that fails is a reason, printed.

    python -m bench.session [--device cpu|cuda] [--floor h100|h200|h200-nominal]
"""

from __future__ import annotations

import argparse
import os
import platform
from typing import List, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # as bench/__main__.py: before aem_kernels imports Triton

import aem_kernels as ak  # noqa: E402

from .cases import CASES, Point, all_implementations  # noqa: E402
from .cases.fused_linear import hidden_size  # noqa: E402
from .implementations import competitor_versions  # noqa: E402
from .profiles import PROFILES  # noqa: E402
from .roofline import FLOOR_CHOICES, Row, device_for, legend, table  # noqa: E402


# the GPU cases and the profiles whose points are their GPU shapes
GPU_ROOFLINE = (("gpu-short", ("logprobs_fwd", "logprobs_fwd_bwd", "aem_loss_fwd_bwd")),
                ("fused-linear-gpu", ("fused_linear_fwd_bwd", "fused_linear_logprob_fwd_bwd",
                                      "fused_linear_loss_fwd_bwd")))


def roofline_rows() -> List[Row]:
    """One row per GPU case and GPU point (the three fused-linear cases share theirs, and their forward
    phase gets a row of its own), H = the GPU's hidden size."""
    rows = []
    for profile_name, names in GPU_ROOFLINE:
        profile = PROFILES[profile_name]()
        points = sorted({p for sweep in profile.sweeps for p in sweep.points}, key=lambda p: (p[1], p[0]))
        for n, v, dtype in points:
            point = Point(n=n, v=v, dtype=dtype, seq_len=profile.seq_len)
            if CASES[names[0]].input_kind == "hidden":
                h = hidden_size(torch.device("cuda"))
                case = CASES[names[0]]
                rows.append(Row("fused linear, forward phase", n, v, h, case.work(point, "forward", h=h)))
                rows.append(Row("fused_linear_fwd_bwd, _logprob_fwd_bwd, _loss_fwd_bwd", n, v, h,
                                 case.work(point, h=h)))
                continue
            rows += [Row(name, n, v, None, CASES[name].work(point)) for name in names]
    return rows


def roofline_text() -> str:
    return "\n".join(["Time floor of every GPU case (bench/roofline.py states the model):", "",
                      table(roofline_rows()), ""] + legend())


def report(device: torch.device, floor: Optional[str] = None) -> List[str]:
    """The lines printed: versions, device, floor, then `<line>: runs` or `<line>: absent (<why>)`."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    out = [f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton "
           f"{triton_version}, aem_kernels {ak.__version__} from {os.path.dirname(ak.__file__)}",
           f"device: {gpu or 'cpu'}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}",
           "competitor packages: " + ", ".join(f"{name} {version or 'absent'}"
                                               for name, version in competitor_versions().items())]
    if device.type == "cuda" or floor:
        chosen, note = device_for(gpu, floor)
        out.append(f"time floor: {note} ({chosen.bytes_per_s / 1e12:.3g} TB/s, {chosen.flops_per_s / 1e12:.0f} "
                   "TFLOP/s)")
    else:
        out.append("time floor: none on the CPU (pass --floor to name one)")
    out.append("backends: " + ", ".join(f"{name} {'ok' if why is None else 'absent'}"
                                        for name, why in ak.available_backends(device).items()))
    for line in all_implementations(device):
        out.append(f"  {line.name}: " + ("absent (" + line.unavailable + ")" if line.unavailable else
                                         "not timed here (" + line.not_timed + ")" if line.not_timed else "runs"))
    return out


def main(argv: Optional[List[str]] = None) -> List[str]:
    parser = argparse.ArgumentParser(prog="python -m bench.session", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--floor", choices=sorted(FLOOR_CHOICES), default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lines = report(device, args.floor) + ["", roofline_text()]
    print("\n".join(lines), flush=True)
    return lines


if __name__ == "__main__":
    main()
