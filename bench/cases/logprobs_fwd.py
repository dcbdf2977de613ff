"""Case (a): token log-probs and entropies, forward only (eq. 1-2).

What RL trainers run under torch.no_grad() for the rollout policy's old log-probs and the reference model's
log-probs. The least traffic is one read of the logits.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..lines import Implementation
from ..roofline import Work, token_op_work
from .base import Case, Inputs, Outputs, Point


class LogprobsForward(Case):
    name = "logprobs_fwd"
    title = "log-prob + entropy, forward (no_grad)"
    backward = False

    def work(self, point: Point, phase: Optional[str] = None) -> Optional[Work]:
        return token_op_work("forward", point.n, point.v, point.dtype)

    def call(self, impl: Implementation, inputs: Inputs) -> Outputs:
        with torch.no_grad():
            logprobs, entropy = impl.fn(inputs.logits, inputs.labels, entropy_grad=False)
        return {"logprobs": logprobs, "entropy": entropy}
