"""What a benchmark case is: inputs for one point of a sweep, the call that is timed, what is compared.

The runner builds the logits once per point (`make_logits`) and shares them between cases; a case adds what
else it needs (`extend`), says which lines it can run (`skip_reason`), names the line its outputs are checked
against (`reference_for`), and `call(impl, inputs)` does the timed work and returns the outputs to compare.

Adding a case is one module in `bench/cases/` with a subclass of `Case` and one entry in `bench.cases.CASES`.
A case over hidden states (the fused linear + log-prob op) sets `input_kind = "hidden"`: it then receives
`base=None` in `extend` (no logits are built for it) and creates the hidden states, the classifier weight and
the labels from the point there; only the lines of that input kind (e.g. cut-cross-entropy) run in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from ..implementations import Implementation

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
    backward: bool = False

    def traffic_bytes(self, point: Point) -> int:
        """The least memory traffic any implementation must cause (bytes), for the roofline."""
        raise NotImplementedError

    def extend(self, base: Optional[Inputs], device: torch.device, seed: int) -> Inputs:
        """This case's inputs: the point's logits and labels (shared by all cases) plus its own extras."""
        return Inputs(logits=base.logits, labels=base.labels)

    def reference_for(self, default: Implementation) -> Implementation:
        """The line every other line of this case is checked against (our torch backend by default)."""
        return default

    def prepare(self, impl: Implementation, inputs: Inputs, fresh: bool) -> Inputs:
        """The inputs of one call (outside the timer): a copy of the logits when `fresh` (the call
        overwrites them), with requires_grad set when the case runs a backward."""
        logits = inputs.logits.clone() if fresh else inputs.logits.detach()
        return Inputs(logits=logits.requires_grad_(self.backward), labels=inputs.labels, extra=inputs.extra)

    def skip_reason(self, impl: Implementation) -> Optional[str]:
        if impl.input_kind != self.input_kind:
            return (f"takes {impl.input_kind} as input, this case gives {self.input_kind}; it joins the "
                    f"{impl.input_kind}-input cases")
        if impl.backward_only and not self.backward:
            return "in-place backward: identical to the default line when no backward runs"
        return None

    def call(self, impl: Implementation, inputs: Inputs) -> Outputs:
        raise NotImplementedError
