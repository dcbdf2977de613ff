"""What a benchmark case is: inputs for one point of a sweep, the call that is timed, what is compared.

The runner builds the logits once per point (`make_logits`) and shares them between cases; a case adds what
else it needs (`extend`), says which lines it can run (`skip_reason`), names the line its outputs are checked
against (`reference_for`), and `call(impl, inputs)` does the timed work and returns the outputs to compare.

Adding a case is one module in `bench/cases/` with a subclass of `Case` and one entry in `bench.cases.CASES`:

    name, title       the key in results and on the command line (--cases), and the heading in reports
    input_kind        "logits" (the shared [B, T, V] logits) or another kind, e.g. "hidden": only lines of the
                      same `input_kind` run in the case, the others are recorded as not applicable
    shared_logits     False: `extend` receives base=None and builds every input itself from the point (a
                      hidden-state case always does; the precision case draws its own logits)
    backward          the call runs a backward (the in-place lines join, the prepared logits require grad)
    timed             False: the lines are run once and checked, never timed (an accuracy table)
    default           False: a profile runs the case only when it names it (`Profile.cases`, --cases)
    traffic_bytes     the least memory traffic of the call (the roofline)
    work              the least bytes and FLOPs of the call or of its forward phase (`bench.roofline`), for
                      the time floor; None where the case has no model (the untimed precision table)
    extend            the case's inputs for a point (runs once per point, outside every timer)
    prepare           one call's inputs (outside the timer; a fresh copy when the line overwrites them)
    reference_for     the line the others are checked against (default: our torch backend)
    tolerance_scale   output name -> a factor on the gate's tolerance, where the case's outputs amplify the
                      per-token rounding of a correct line (the per-mode loss case's vespo)
    lines(device)     lines only this case runs (e.g. the competitors over hidden states); they join the run
                      like the lines of implementations.py, and the other cases list them as not applicable
    call              the timed work; returns the outputs to compare (checks.py: logprobs, entropy and other
                      per-token values elementwise; loss and gradients grad_<input> by their relative L2
                      error). It may mark phases
                      with `measure.phase_end("forward")` (reported next to the total time).

A case over hidden states (the fused linear + log-prob op) sets `input_kind = "hidden"` and
`shared_logits = False`, builds hidden [N, H], the classifier weight [V, H] and the labels in `extend`, brings
its own lines (eager, torch.compile, a chunked loop, ...) from `lines(device)` with `input_kind = "hidden"`
and `fn(hidden, weight, labels) -> (logprobs, entropy)`, names one of them in `reference_for`, and calls them
in `call`; Cut-Cross-Entropy's `cut-cross-entropy` line (implementations.py) already has that input kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..lines import Implementation
from ..roofline import Work

Outputs = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Point:
    """One point of a sweep: N tokens laid out as [N // seq_len, seq_len] rows, vocabulary V, logits dtype."""

    n: int
    v: int
    dtype: str
    seq_len: int

    def __post_init__(self) -> None:
        if self.n < 1 or self.v < 1 or self.seq_len < 1:
            raise ValueError(f"N, V and seq_len must be >= 1, got N={self.n} V={self.v} seq_len={self.seq_len}")
        if self.n > self.seq_len and self.n % self.seq_len:
            raise ValueError(f"N={self.n} must be a multiple of seq_len={self.seq_len} (or at most seq_len)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def batch(self) -> int:
        return max(1, self.n // self.seq_len)

    @property
    def rows(self) -> int:
        return min(self.n, self.seq_len)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def logits_bytes(self) -> int:
        return self.n * self.v * torch.finfo(self.torch_dtype).bits // 8

    def key(self) -> str:
        return f"N={self.n} V={self.v} {self.dtype}"


@dataclass
class Inputs:
    logits: torch.Tensor                     # [B, T, V]
    labels: torch.Tensor                     # [B, T] int64, valid everywhere (TRL and verl cannot skip)
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)


def make_logits(point: Point, device: torch.device, seed: int) -> Inputs:
    """Logits with LLM-like rows: half of them peaked on one token (entropy ~ 1 nat), half flat (~ log V)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    batch, rows, vocab = point.batch, point.rows, point.v
    logits = torch.empty(batch, rows, vocab, dtype=point.torch_dtype, device=device)
    chunk = max(1, (64 << 20) // (4 * vocab))   # fill in 64 MiB pieces: no fp32 copy of the whole tensor
    flat = logits.view(-1, vocab)
    for start in range(0, flat.shape[0], chunk):
        count = min(chunk, flat.shape[0] - start)
        piece = torch.randn(count, vocab, generator=gen, device=device) * 2.0
        peaked = torch.rand(count, generator=gen, device=device) < 0.5
        top = torch.randint(0, vocab, (count,), generator=gen, device=device)
        piece[torch.arange(count, device=device), top] += torch.where(peaked, 14.0, 0.0)
        flat[start:start + count] = piece
    labels = torch.randint(0, vocab, (batch, rows), generator=gen, device=device)
    return Inputs(logits=logits, labels=labels)


class Case:
    """Base class; see the module docstring."""

    name: str = ""
    title: str = ""
    input_kind: str = "logits"
    shared_logits: bool = True
    backward: bool = False
    timed: bool = True
    default: bool = True

    def lines(self, device: torch.device) -> List[Implementation]:
        """Lines only this case runs (none by default)."""
        return []

    def traffic_bytes(self, point: Point) -> int:
        """The least memory traffic any implementation must cause (bytes), for the roofline."""
        work = self.work(point)
        if work is None:
            raise NotImplementedError(f"{self.name} has no roofline model")
        return work.bytes

    def work(self, point: Point, phase: Optional[str] = None) -> Optional[Work]:
        """The least work of one call (`phase="forward"`: of its forward phase; None where the case's
        forward is not a phase of its own) - `bench.roofline` states the model."""
        return None

    def extend(self, base: Optional[Inputs], point: Point, device: torch.device, seed: int) -> Inputs:
        """This case's inputs: the point's logits and labels (shared by all cases) plus its own extras; `base`
        is None when the case does not use the shared logits (`shared_logits = False`)."""
        return Inputs(logits=base.logits, labels=base.labels)

    def reference_for(self, default: Implementation) -> Implementation:
        """The line every other line of this case is checked against (our torch backend by default)."""
        return default

    def prepare(self, impl: Implementation, inputs: Inputs, fresh: bool) -> Inputs:
        """The inputs of one call (outside the timer): a copy of the logits when `fresh` (the call
        overwrites them), with requires_grad set when the case runs a backward."""
        logits = inputs.logits.clone() if fresh else inputs.logits.detach()
        return Inputs(logits=logits.requires_grad_(self.backward), labels=inputs.labels, extra=inputs.extra)

    def tolerance_scale(self, point: Point) -> Dict[str, float]:
        """Output name -> a factor on the correctness gate's tolerance (`checks.py`) where this case's outputs
        amplify the per-token rounding of a correct line (none by default)."""
        return {}

    def skip_reason(self, impl: Implementation) -> Optional[str]:
        if self.timed and impl.not_timed:
            return impl.not_timed
        if impl.input_kind != self.input_kind:
            return (f"takes {impl.input_kind} as input, this case gives {self.input_kind}; it joins the "
                    f"{impl.input_kind}-input cases")
        if impl.backward_only and not self.backward:
            return "in-place backward: identical to the default line when no backward runs"
        return None

    def call(self, impl: Implementation, inputs: Inputs) -> Outputs:
        raise NotImplementedError
