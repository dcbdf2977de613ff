"""Named benchmark profiles: which points are measured, how often, and within which limits.

A profile is a list of sweeps; a sweep is a list of points (N tokens, vocabulary V, logits dtype). Points shared
by two sweeps are measured once. All points run in ascending N x V, so the per-call time and peak memory seen
at small points predict the large ones, and a line whose prediction exceeds `max_call_s` or `mem_limit_bytes`
is recorded as skipped with that reason instead of being run (eager's memory wall shows up this way on the
CPU: the limit applies to the logits plus the line's peak, what a user's process would need); on CUDA an
out-of-memory error is caught and recorded too. `budget_s` is a safety net: once spent, the
remaining points are recorded as skipped ("profile time budget exhausted").

Vocabularies: 32000 (Llama-2, Mistral), 128256 (Llama-3), 151936 (Qwen2/2.5), 256000 (Gemma).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from .cases import DEFAULT_CASES, LOSS_MODE_CASES
from .measure import TimingPolicy

VOCABS = {"32k": 32000, "128k": 128256, "152k": 151936, "256k": 256000}
GiB = 1 << 30


@dataclass(frozen=True)
class Sweep:
    name: str
    points: Tuple[Tuple[int, int, str], ...]   # (N, V, dtype)


@dataclass
class Profile:
    name: str
    description: str
    sweeps: List[Sweep]
    timing: TimingPolicy
    seq_len: int = 256
    cases: Optional[List[str]] = None          # None: every case with `default = True`
    max_call_s: float = 60.0
    mem_limit_bytes: Optional[int] = None      # None: no enforced limit (CUDA: the device's own OOM)
    budget_s: Optional[float] = None
    exclude: Dict[str, str] = field(default_factory=dict)   # line name -> why this profile leaves it out
    lines: Optional[Tuple[str, ...]] = None    # None: every line (but the opt-in ones); else only these
    # case name -> the only points (N, V, dtype) of the sweeps it runs at (a case not named runs at every point);
    # `override` with a new grid drops it, so that --n/--v/--dtype apply to every case
    case_points: Dict[str, Tuple[Tuple[int, int, str], ...]] = field(default_factory=dict)

    def runs_at(self, case: str, point: Tuple[int, int, str]) -> bool:
        return case not in self.case_points or point in self.case_points[case]


def _n_sweep(vocab: int, dtype: str, ns) -> Sweep:
    return Sweep(f"N sweep, V={vocab}, {dtype}", tuple((n, vocab, dtype) for n in ns))


def _v_sweep(n: int, dtype: str, vocabs=tuple(VOCABS.values())) -> Sweep:
    return Sweep(f"V sweep, N={n}, {dtype}", tuple((n, v, dtype) for v in vocabs))


_COMPILE_TOO_SLOW = ("its first call compiles for 20-60 s, beyond this profile's budget; the cpu and gpu "
                     "profiles measure it")


_COMPILE_IN_SESSION = ("torch.compile compiles for 20-60 s per shape and grad mode, more than this short profile "
                       "(one step of an 8-minute GPU session) can spend; the gpu profile measures it")
_TWO_CUDA_PATHS = ("the two CUDA paths raced here are the package's default plan (fused[default]) and the Triton "
                   "tile kernels (fused[tiles])")


# the per-mode loss cases (aem_loss_fwd_bwd[<mode>], 18 of them) run at one point of the cpu profile's V=32000 sweep:
# every mode is an O(N) tail on the same N x V work, and torch.compile compiles the whole user function once per
# mode (10-40 s each on the 2-core VM), so one point keeps them to a few minutes
LOSS_MODE_POINT = (512, 32000, "float32")


def cpu_profile() -> Profile:
    # Sized for a 2-core machine: the torch-based lines take 1-4e-8 s per logit per call there, so they run
    # up to N ~ 1024 at V = 151936 and are then skipped by the 8 s per-call limit, while faster lines (our C++
    # backend, torch.compile) continue; at N = 4096 eager's fp32 copies exceed the 8 GiB limit.
    return Profile(
        name="cpu",
        description="CPU default: N sweeps at Qwen's V=151936 (fp32, bf16) and a V sweep, 3 timed calls per line; "
                    "the 18 loss modes at 512 x 32000 fp32",
        sweeps=[
            _n_sweep(151936, "float32", (128, 256, 512, 2048)),
            _v_sweep(128, "float32"),
            _n_sweep(151936, "bfloat16", (128, 512, 2048, 4096)),
            _n_sweep(32000, "float32", (512, 1024, 4096)),
        ],
        timing=TimingPolicy(warmup=0, min_reps=3, max_reps=10, min_time_s=1.0),
        seq_len=128, max_call_s=8.0, mem_limit_bytes=8 * GiB, budget_s=35 * 60,
        cases=DEFAULT_CASES + LOSS_MODE_CASES, case_points={name: (LOSS_MODE_POINT,) for name in LOSS_MODE_CASES})


def gpu_profile() -> Profile:
    return Profile(
        name="gpu",
        description="H100/H200: N sweeps up to 32k tokens at Qwen's 151936 vocab (bf16 and fp32), a V sweep",
        sweeps=[
            _n_sweep(151936, "bfloat16", (1024, 2048, 4096, 8192, 16384, 32768)),
            _v_sweep(16384, "bfloat16"),
            _n_sweep(151936, "float32", (1024, 4096, 16384)),
            _n_sweep(32000, "bfloat16", (4096, 16384, 65536)),
        ],
        timing=TimingPolicy(warmup=3, min_reps=10, max_reps=100, min_time_s=0.5),
        seq_len=1024, max_call_s=30.0, budget_s=60 * 60)


def gpu_short_profile() -> Profile:
    # For a GPU lent for minutes: the headline point (N=16384, V=151936, bf16) and a short N sweep, few reps.
    return Profile(
        name="gpu-short",
        description="H100/H200 in a few minutes: N sweep to 16k tokens at V=151936 bf16, and 16k x 32000 bf16",
        sweeps=[_n_sweep(151936, "bfloat16", (4096, 16384)), Sweep("32k vocab", ((16384, 32000, "bfloat16"),))],
        timing=TimingPolicy(warmup=2, min_reps=5, max_reps=20, min_time_s=0.2),
        seq_len=1024, max_call_s=10.0, budget_s=5 * 60, exclude={"torch.compile": _COMPILE_IN_SESSION})


def quick_profile() -> Profile:
    return Profile(
        name="quick",
        description="smoke run: tiny shapes, every case, every line but torch.compile, a few calls each",
        sweeps=[_n_sweep(4096, "float32", (32, 128)), Sweep("bf16", ((32, 4096, "bfloat16"),))],
        timing=TimingPolicy(warmup=1, min_reps=3, max_reps=5, min_time_s=0.0),
        seq_len=32, max_call_s=10.0, mem_limit_bytes=2 * GiB, budget_s=5 * 60,
        cases=["logprobs_fwd", "logprobs_fwd_bwd", "aem_loss_fwd_bwd", "fused_linear_fwd_bwd",
               "fused_linear_logprob_fwd_bwd", "fused_linear_loss_fwd_bwd"],
        exclude={"torch.compile": _COMPILE_TOO_SLOW, "torch.compile-linear": _COMPILE_TOO_SLOW,
                 "cce[torch_compile]": _COMPILE_TOO_SLOW})


def summary_profile(device_type: str) -> Profile:
    if device_type == "cuda":
        point, timing = (8192, 151936, "bfloat16"), TimingPolicy(warmup=3, min_reps=10, max_reps=50, min_time_s=0.3)
    else:
        point, timing = (256, 32000, "float32"), TimingPolicy(warmup=0, min_reps=3, max_reps=5, min_time_s=0.0)
    return Profile(
        name="summary", description="one small point for the README's summary table (under a minute)",
        sweeps=[Sweep("summary", (point,))], timing=timing, seq_len=128,
        cases=["logprobs_fwd_bwd", "aem_loss_fwd_bwd"], max_call_s=20.0, budget_s=120,
        exclude={"torch.compile": _COMPILE_TOO_SLOW})


CPU_KERNEL_LINES = ("eager", "torch.compile", "aem_kernels[cpu]", "aem_kernels[cpu]+inplace",
                    "aem_kernels[cpu]+warm-buffer")


def cpu_kernel_profile() -> Profile:
    # The C++ kernels' own speed at one point (README "Results", csrc/README.md): fwd + bwd of 4096 x 32000
    # fp32 logits in 7 interleaved rounds (each line once per round, the memory copy and read with them), the
    # forward and backward phases apart, and the warm-buffer line that shows the kernels without the page
    # faults of a fresh gradient. Two minutes on the 2-core VM (torch.compile compiles for ~40 s of it).
    return Profile(
        name="cpu-kernel",
        description="the C++ kernels at 4096 x 32000 fp32, fwd+bwd: interleaved rounds against eager, "
                    "torch.compile and a memory copy",
        sweeps=[Sweep("cpu kernels", ((4096, 32000, "float32"),))],
        timing=TimingPolicy(warmup=1, min_reps=7, max_reps=7, min_time_s=0.0, interleave=True),
        seq_len=4096, cases=["logprobs_fwd_bwd"], max_call_s=60.0, mem_limit_bytes=8 * GiB, budget_s=15 * 60,
        lines=CPU_KERNEL_LINES)


def precision_profile() -> Profile:
    # README "GPU": the error against fp64 on bf16/fp16 logits; seconds on the CPU (Triton in the interpreter
    # included), `--n 4096 --v 151936` on a GPU.
    return Profile(
        name="precision",
        description="max abs error of log-probs and entropies against fp64 on bf16/fp16 logits of std 4 (untimed)",
        sweeps=[Sweep("half precision", ((257, 3001, "bfloat16"), (257, 3001, "float16")))],
        timing=TimingPolicy(warmup=0, min_reps=1, max_reps=1, min_time_s=0.0),
        seq_len=1 << 20, cases=["logprobs_precision"], max_call_s=600.0, budget_s=10 * 60,
        exclude={"torch.compile": _COMPILE_TOO_SLOW})


def fused_linear_cpu_profile() -> Profile:
    # The CPU points (H = 1024): each fwd+bwd is 6-8 N V H flops (2.7e11-1.3e12 per call at V=32000,
    # 5x that at V=151936), tens of seconds to minutes on a shared 2-core VM, hence one timed call per line
    # after the checked one and a 16 GiB limit (eager at 4096 x 151936 fp32 needs more).
    return Profile(
        name="fused-linear-cpu",
        description="hidden states -> log-probs (+ entropies), fwd+bwd, N=4096, H=1024, V=32000 and 151936",
        sweeps=[Sweep("V=32000", ((4096, 32000, "float32"), (4096, 32000, "bfloat16"))),
                Sweep("V=151936", ((4096, 151936, "float32"), (4096, 151936, "bfloat16")))],
        timing=TimingPolicy(warmup=0, min_reps=1, max_reps=1, min_time_s=0.0),
        seq_len=256, cases=["fused_linear_fwd_bwd", "fused_linear_logprob_fwd_bwd", "fused_linear_loss_fwd_bwd"],
        max_call_s=300.0,
        mem_limit_bytes=16 * GiB, budget_s=100 * 60,
        exclude={"fused[torch]": "the chunked path over the torch row kernels is a checking path on the CPU"})


def fused_linear_gpu_profile() -> Profile:
    # The GPU point (H = 4096 on CUDA): N = 16384, V = 151936 bf16 (eager needs > 10 GB there), with
    # a 4096-token point first so the predictor sees each line's scale. Not run yet (no GPU so far).
    return Profile(
        name="fused-linear-gpu",
        description="H100/H200: hidden states -> log-probs (+ entropies), fwd+bwd, H=4096, V=151936 bf16",
        sweeps=[_n_sweep(151936, "bfloat16", (4096, 16384))],
        timing=TimingPolicy(warmup=2, min_reps=5, max_reps=20, min_time_s=0.2),
        seq_len=1024, cases=["fused_linear_fwd_bwd", "fused_linear_logprob_fwd_bwd", "fused_linear_loss_fwd_bwd"],
        max_call_s=10.0,
        budget_s=4 * 60,
        exclude={"torch.compile-linear": _COMPILE_IN_SESSION, "cce[torch_compile]": _COMPILE_IN_SESSION,
                 "fused[triton]": _TWO_CUDA_PATHS, "fused[torch]": _TWO_CUDA_PATHS})


PROFILES = {"quick": quick_profile, "cpu": cpu_profile, "gpu": gpu_profile, "gpu-short": gpu_short_profile,
            "cpu-kernel": cpu_kernel_profile, "precision": precision_profile,
            "fused-linear-cpu": fused_linear_cpu_profile, "fused-linear-gpu": fused_linear_gpu_profile}


def get_profile(name: str, device_type: str) -> Profile:
    if name == "summary":
        return summary_profile(device_type)
    if name == "auto":
        name = "gpu" if device_type == "cuda" else "cpu"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES) + ['auto', 'summary']}")
    return PROFILES[name]()


def override(profile: Profile, *, ns: Optional[List[int]] = None, vocabs: Optional[List[int]] = None,
             dtypes: Optional[List[str]] = None, reps: Optional[int] = None, warmup: Optional[int] = None,
             seq_len: Optional[int] = None) -> Profile:
    """A copy with the sweeps replaced by the grid ns x vocabs x dtypes (any of them given) and the timing
    changed; what is not given keeps the profile's values."""
    if ns or vocabs or dtypes:
        points = [p for sweep in profile.sweeps for p in sweep.points]
        ns = ns or sorted({p[0] for p in points})
        vocabs = vocabs or sorted({p[1] for p in points})
        dtypes = dtypes or sorted({p[2] for p in points})
        sweeps = [_n_sweep(v, dt, ns) for dt in dtypes for v in vocabs]
        profile = replace(profile, sweeps=sweeps, case_points={})
    if reps is not None or warmup is not None:
        timing = profile.timing
        timing = replace(timing, warmup=timing.warmup if warmup is None else warmup,
                         min_reps=timing.min_reps if reps is None else reps,
                         max_reps=timing.max_reps if reps is None else reps,
                         min_time_s=timing.min_time_s if reps is None else 0.0)
        profile = replace(profile, timing=timing)
    if seq_len is not None:
        profile = replace(profile, seq_len=seq_len)
    return profile
