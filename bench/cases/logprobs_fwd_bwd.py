"""Case (b): token log-probs and entropies, forward and backward, with a gradient through both.

The upstream gradients a_t = dL/dl_t and b_t = dL/dh_t are fixed random vectors, so the backward is the
general section-6 formula (an entropy bonus or any loss that uses both terms). The least traffic is a read of
the logits in the forward, a read in the backward and a write of their gradient: 3 x N x V elements.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import measure
from ..lines import Implementation
from ..roofline import Work, token_op_work
from .base import Case, Inputs, Outputs, Point


class LogprobsForwardBackward(Case):
    name = "logprobs_fwd_bwd"
    title = "log-prob + entropy, forward + backward"
    backward = True

    def work(self, point: Point, phase: Optional[str] = None) -> Optional[Work]:
        # the forward phase reads the logits once, as the forward-only case does
        return token_op_work("forward" if phase == "forward" else "forward+backward", point.n, point.v,
                             point.dtype)

    def extend(self, base: Inputs, point: Point, device: torch.device, seed: int) -> Inputs:
        inputs = super().extend(base, point, device, seed)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        shape = inputs.labels.shape
        inputs.extra["grad_logprobs"] = torch.randn(shape, generator=gen, device=device)
        inputs.extra["grad_entropy"] = torch.randn(shape, generator=gen, device=device)
        return inputs

    def call(self, impl: Implementation, inputs: Inputs) -> Outputs:
        logprobs, entropy = impl.fn(inputs.logits, inputs.labels, entropy_grad=True)
        measure.phase_end("forward")
        # grad_outputs in each output's own dtype (TRL and verl return bf16 for bf16 logits)
        (grad,) = torch.autograd.grad((logprobs, entropy), inputs.logits,
                                      (inputs.extra["grad_logprobs"].to(logprobs.dtype),
                                       inputs.extra["grad_entropy"].to(entropy.dtype)))
        measure.phase_end("backward")
        return {"logprobs": logprobs.detach(), "entropy": entropy.detach(), "grad_logits": grad}
