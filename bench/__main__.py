"""`python -m bench`: measure speed and peak memory of aem_kernels' ops against what users write instead.

    python -m bench                      # the device's default profile (gpu on CUDA, cpu otherwise)
    python -m bench --profile quick      # smoke run on tiny shapes (seconds)
    python -m bench --summary            # one small point, a short table on stdout (under a minute)
    python -m bench --profile cpu-kernel # the C++ kernels at 4096 x 32000: interleaved rounds, fwd/bwd apart
    python -m bench --profile precision  # error against fp64 on bf16/fp16 logits (untimed; seconds)
    python -m bench --n 1024,4096 --v 151936 --dtype bfloat16 --cases logprobs_fwd_bwd
    python -m bench --roofline           # bytes, FLOPs and the time floor of every GPU case on H100 / H200

Results go to bench/results/<device>/<name>.{json,md} and <name>_*.png, <name> the profile's name unless
--name is given (see bench/README.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

if not torch.cuda.is_available():
    # before aem_kernels imports Triton: on a machine without CUDA the Triton kernels can only run in the
    # interpreter; the precision table runs them there, the timed cases list them as not timed
    os.environ.setdefault("TRITON_INTERPRET", "1")

import aem_kernels as ak  # noqa: E402

from . import report  # noqa: E402
from .cases import CASES, DEFAULT_CASES, all_implementations  # noqa: E402
from .implementations import competitor_versions, reference_implementation  # noqa: E402
from .lines import Implementation  # noqa: E402
from .profiles import GiB, Profile, get_profile, override  # noqa: E402
from .measure import BandwidthRoofline  # noqa: E402
from .runner import BenchContext, run_profile  # noqa: E402
from .roofline import FLOOR_CHOICES, device_for  # noqa: E402
from .session import roofline_rows, roofline_text  # noqa: E402

# environment switches that change what a run measures; recorded with the results
SWITCHES = ("THP_MEM_ALLOC_ENABLE", "TRITON_INTERPRET", "ATEN_CPU_CAPABILITY", "AEM_KERNELS_DISABLE_CPU_EXT",
            "OMP_NUM_THREADS")

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="auto", help="quick, cpu, gpu, gpu-short, cpu-kernel, precision or auto "
                   "(gpu on CUDA, else cpu)")
    p.add_argument("--summary", action="store_true", help="one small point; print a short table, write nothing "
                   "unless --out is given")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<device>)")
    p.add_argument("--name", default=None, help="stem of the output files (default: the profile's name)")
    p.add_argument("--note", default="", help="free text stored with the environment (e.g. the machine's load)")
    p.add_argument("--cases", type=_csv(str), default=None, help=f"subset of {','.join(CASES)} (default: the "
                   f"profile's, else {','.join(DEFAULT_CASES)})")
    p.add_argument("--only", type=_csv(str), default=None, help="run only these lines (the others are recorded "
                   "as skipped)")
    p.add_argument("--exclude", type=_csv(str), default=[], help="lines to leave out (recorded as skipped)")
    p.add_argument("--n", type=_csv(int), default=None, help="replace the sweeps by this N grid")
    p.add_argument("--v", type=_csv(int), default=None, help="... and this V grid")
    p.add_argument("--dtype", type=_csv(str), default=None, help="... and these dtypes (float32,bfloat16,float16)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row of the [B, T, V] logits")
    p.add_argument("--reps", type=int, default=None, help="exactly this many timed calls per line")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls after the checked first call")
    p.add_argument("--max-call-s", type=float, default=None)
    p.add_argument("--mem-limit-gb", type=float, default=None, help="enforced peak-memory limit per line (GiB)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new points after this long")
    p.add_argument("--peak-gbs", type=float, default=None, help="device bandwidth for the roofline (GB/s)")
    p.add_argument("--roofline", action="store_true", help="print the bytes, FLOPs and time floor of every GPU "
                   "case on H100 SXM and H200 (bench/roofline.py) and exit")
    p.add_argument("--floor", choices=sorted(FLOOR_CHOICES), default=None, help="the device whose time floor "
                   "the timed lines are compared with (default: by the GPU's name; none on the CPU)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); on a shared machine "
                   "fewer threads than cores avoids OpenMP stalls when another process holds a core")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": device.type, "device_name": gpu or f"CPU ({_cpu_model()})", "gpu_name": gpu,
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "python": platform.python_version(), "platform": platform.platform(), "aem_kernels": ak.__version__,
        "git_commit": _git_commit(), "competitors": competitor_versions(),
        "backends": {name: reason or "available" for name, reason in ak.available_backends(device).items()},
        "cpu_kernel_isa": _cpu_kernel_isa(), "switches": {name: os.environ.get(name) for name in SWITCHES},
        "loadavg_start": _loadavg(),
    }


def _cpu_kernel_isa() -> Optional[str]:
    from aem_kernels.ops.logprobs import cpu

    return cpu.kernel_isa()


def _loadavg() -> Optional[str]:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


def select_lines(profile: Profile, device: torch.device, only: Optional[List[str]],
                 exclude: List[str]) -> "tuple[List[Implementation], Dict[str, str]]":
    """Every line of this run (implementations.py's and the profile's cases' own) and why each excluded one
    is left out: the profile's exclusions, --exclude, lines outside --only or the profile's `lines`, and the
    opt-in lines nobody asked for."""
    lines = all_implementations(device)
    for name in profile.cases or DEFAULT_CASES:
        lines += CASES[name].lines(device)
    names = [line.name for line in lines]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SystemExit(f"line name(s) {duplicates} defined twice (implementations.py and a case's lines())")
    unknown = (set(exclude) | set(only or [])) - set(names)
    if unknown:
        raise SystemExit(f"unknown line(s) {sorted(unknown)}; the lines are {names}")
    # lines that take another kind of input than every case of this run (hidden states in a logits-only
    # profile) would only fill the report with "not applicable" rows
    kinds = {CASES[name].input_kind for name in profile.cases or DEFAULT_CASES}
    lines = [line for line in lines if line.input_kind in kinds]
    names = [line.name for line in lines]
    excluded = {name: why for name, why in profile.exclude.items() if name in names}
    wanted = set(only or []) | set(profile.lines or [])
    for line in lines:
        if line.opt_in and line.name not in wanted:
            excluded.setdefault(line.name, line.opt_in)
    if profile.lines is not None:
        excluded.update({name: f"not one of the {profile.name} profile's lines" for name in names
                         if name not in profile.lines and not only})
    for name in exclude:
        excluded[name] = "left out by --exclude"
    if only:
        excluded.update({name: "not selected by --only" for name in names if name not in only})
        for name in only:
            if excluded.get(name) and name not in exclude:
                del excluded[name]   # --only overrides the profile's choice
    return lines, excluded


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    if args.roofline:
        print(roofline_text())
        return {"roofline": [row.__dict__ for row in roofline_rows()]}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = get_profile("summary" if args.summary else args.profile, device.type)
    profile = override(profile, ns=args.n, vocabs=args.v, dtypes=args.dtype, reps=args.reps, warmup=args.warmup,
                       seq_len=args.seq_len)
    if args.cases:
        unknown = set(args.cases) - set(CASES)
        if unknown:
            raise SystemExit(f"unknown case(s) {sorted(unknown)}; choose from {list(CASES)}")
        profile.cases = args.cases
    if args.max_call_s is not None:
        profile.max_call_s = args.max_call_s
    if args.budget_s is not None:
        profile.budget_s = args.budget_s if args.budget_s > 0 else None
    if args.mem_limit_gb is not None:
        profile.mem_limit_bytes = int(args.mem_limit_gb * GiB) if args.mem_limit_gb > 0 else None
    lines, excluded = select_lines(profile, device, args.only, args.exclude)

    env = environment(device)
    env["note"] = args.note
    ctx = BenchContext(device=device, profile=profile, lines=lines, reference=reference_implementation(lines),
                       excluded=excluded, seed=args.seed,
                       roofline=BandwidthRoofline(device, args.peak_gbs * 1e9 if args.peak_gbs else None),
                       floor=device_for(env["gpu_name"], args.floor) if device.type == "cuda" or args.floor else None)
    if ctx.floor is not None:
        print(f"time floor: {ctx.floor[1]} (bench/roofline.py); each time is followed by its % of it",
              file=sys.stderr)
    started = time.perf_counter()
    records = run_profile(ctx)
    env["loadavg_end"] = _loadavg()
    timing = profile.timing
    doc = {
        "schema_version": report.SCHEMA_VERSION, "profile": profile.name, "description": profile.description,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started, "environment": env,
        "settings": {"warmup": timing.warmup, "min_reps": timing.min_reps, "max_reps": timing.max_reps,
                     "min_time_s": timing.min_time_s, "interleave": timing.interleave,
                     "seq_len": profile.seq_len, "max_call_s": profile.max_call_s,
                     "mem_limit_gib": profile.mem_limit_bytes / GiB if profile.mem_limit_bytes else None,
                     "budget_s": profile.budget_s, "argv": sys.argv[1:] if argv is None else argv},
        "implementations": [{"name": line.name, "description": line.description, "ours": line.ours,
                             "input_kind": line.input_kind, "unavailable": line.unavailable,
                             "not_timed": line.not_timed, "excluded": excluded.get(line.name)} for line in lines],
        "cases": [{"name": case.name, "title": case.title, "backward": case.backward, "timed": case.timed,
                   "input_kind": case.input_kind} for case in ctx.cases],
        "bandwidth": ctx.roofline.measurements(),
        "results": records,
    }
    if args.summary:
        print(f"aem_kernels benchmark summary on {env['device_name']} "
              f"(N={records[0]['n']}, V={records[0]['v']}, {records[0]['dtype']}; median of "
              f"{profile.timing.min_reps}+ calls; peak memory beyond the inputs)\n")
        print(report.summary_table(doc))
    if args.out is not None or not args.summary:
        out = args.out or RESULTS_DIR / ("cpu" if device.type == "cpu" else report.slug(env["gpu_name"]))
        out.mkdir(parents=True, exist_ok=True)
        name = args.name or profile.name
        report.write_json(doc, out / f"{name}.json")
        (out / f"{name}.md").write_text(report.markdown(doc))
        written = [] if args.no_plots else report.plots(doc, out, name)
        print(f"wrote {out / (name + '.json')}, {name}.md and {len(written)} plot(s) ({doc['wall_s']:.0f} s)",
              file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
