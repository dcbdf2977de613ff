"""Case (p), untimed: the error of every line's log-probs and entropies against fp64, on half-precision logits.

The table users ask for before trusting a fused kernel with bf16/fp16 logits: each line runs once on the same
logits and its max absolute error against `log_softmax` in float64 is reported (the records' `check`). Our
backends compute in fp32 whatever the logits' dtype; TRL and verl compute in the logits' dtype (verl's line is
the formula `z[y] - logsumexp(z)`, `logsumexp(z) - sum(softmax(z) z)` evaluated in bf16/fp16, what eager code
gets without an fp32 copy); eager upcasts once. Triton on CPU tensors runs here (in the interpreter: only its
speed is meaningless there). The gate still applies: a line outside its dtype's tolerance is reported as
disagreeing.

Inputs: [1, N, V] logits `randn * LOGIT_STD` drawn on the CPU from `torch.Generator().manual_seed(seed)` and
moved to the device, labels uniform; for each dtype the generator first draws the inputs of the dtypes before
it in DTYPE_ORDER, so every point gets the same numbers whatever the profile's grid, on any device (the
`precision` profile at its default point gives bit for bit the inputs of the table in the README).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..lines import Implementation
from .base import Case, Inputs, Outputs, Point

LOGIT_STD = 4.0
DTYPE_ORDER = ("bfloat16", "float16", "float32")


def fp64_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor, entropy_grad: bool = False):
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


FP64 = Implementation("fp64", "log_softmax(logits.double()) + gather + -(p log p).sum(-1): the truth",
                      fp64_logprobs_entropy)


class LogprobsPrecision(Case):
    name = "logprobs_precision"
    title = "log-prob + entropy, max abs error against fp64 (untimed)"
    backward = False
    timed = False
    default = False
    shared_logits = False

    def traffic_bytes(self, point: Point) -> int:
        return point.logits_bytes

    def extend(self, base: Optional[Inputs], point: Point, device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator().manual_seed(seed)
        for _ in DTYPE_ORDER[:DTYPE_ORDER.index(point.dtype)]:
            self._draw(gen, point)   # the draws of the dtypes before this one, discarded
        logits, labels = self._draw(gen, point)
        return Inputs(logits=logits.to(point.torch_dtype).to(device).unsqueeze(0), labels=labels.to(device)[None])

    @staticmethod
    def _draw(gen: torch.Generator, point: Point):
        logits = torch.randn(point.n, point.v, generator=gen) * LOGIT_STD
        labels = torch.randint(0, point.v, (point.n,), generator=gen)
        return logits, labels

    def reference_for(self, default: Implementation) -> Implementation:
        return FP64

    def call(self, impl: Implementation, inputs: Inputs) -> Outputs:
        with torch.no_grad():
            logprobs, entropy = impl.fn(inputs.logits, inputs.labels, entropy_grad=False)
        return {"logprobs": logprobs, "entropy": entropy}
