"""Case (c): the full AEM policy loss (AEM_SPEC.md sections 4-5), forward and backward.

Ours is the public `ak.aem_policy_loss` on each backend. Every other line computes the log-probs (with a
gradient) and the entropies (without: with entropy_coef = 0 they only feed AEM's detached uncertainty) its own
way and then applies the same O(N) AEM tail as the package (modulation, clipped surrogate, aggregation), so
the comparison isolates the N x V work. The batch: four responses per row in groups of 4, the first 1/8 of
every row untrained (prompt), random advantages, the paper's default `AEMConfig`, and the rollout's old
log-probs 0.02 nat (std) away from the current ones: a later PPO epoch, where the ratio is not 1 and the
loss's value (not only its gradient) depends on the log-probs being compared. The offset stays far from the
clip range (|log 1.2| = 0.18): at its edge a bf16 line's rounding (~0.06 nat) would switch whole tokens'
gradients on and off, which says nothing about the implementation.
"""

from __future__ import annotations

from typing import Optional

import torch

import aem_kernels as ak
from aem_kernels.loss import loss_from_token_terms, pack_inputs

from .. import measure
from ..lines import Implementation
from ..roofline import Work, token_op_work
from .base import Case, Inputs, Outputs, Point

RESPONSES_PER_ROW = 4
GROUP_SIZE = 4
OLD_LOGPROB_NOISE = 0.02
CONFIG = ak.AEMConfig()


class AEMLossForwardBackward(Case):
    name = "aem_loss_fwd_bwd"
    title = "aem_policy_loss, forward + backward"
    backward = True

    def work(self, point: Point, phase: Optional[str] = None) -> Optional[Work]:
        # the forward phase reads the logits once, as the forward-only case does
        return token_op_work("forward" if phase == "forward" else "forward+backward", point.n, point.v,
                             point.dtype)

    def extend(self, base: Inputs, point: Point, device: torch.device, seed: int) -> Inputs:
        inputs = super().extend(base, point, device, seed)
        batch, rows = inputs.labels.shape
        position = torch.arange(rows, device=device)
        length = -(-rows // RESPONSES_PER_ROW)
        per_row = -(-rows // length)
        response = torch.arange(batch, device=device)[:, None] * per_row + position[None, :] // length
        prompt = position < rows // 8
        token_response = torch.where(prompt[None, :], -1, response)
        num_responses = batch * per_row
        gen = torch.Generator(device=device).manual_seed(seed + 2)
        with torch.no_grad():
            current = ak.logprobs_from_logits(inputs.logits, inputs.labels, backend="torch")
        noise = torch.randn(current.shape, generator=gen, device=device) * OLD_LOGPROB_NOISE
        inputs.extra["token_response"] = token_response
        inputs.extra["response_group"] = torch.arange(num_responses, device=device) // GROUP_SIZE
        inputs.extra["advantages"] = torch.randn(num_responses, generator=gen, device=device)
        inputs.extra["old_logprobs"] = current + noise
        return inputs

    def _pack(self, inputs: Inputs):
        extra = inputs.extra
        return pack_inputs(inputs.logits, inputs.labels, extra["advantages"], token_response=extra["token_response"],
                           response_group=extra["response_group"], response_mask=None, turn_ids=None,
                           old_logprobs=extra["old_logprobs"], old_entropy=None, ref_logprobs=None,
                           ignore_index=CONFIG.ignore_index, advantage_level="response", num_groups=None)

    def call(self, impl: Implementation, inputs: Inputs) -> Outputs:
        extra = inputs.extra
        outputs: Outputs = {}
        if impl.ours:
            loss, _ = ak.aem_policy_loss(inputs.logits, inputs.labels, extra["advantages"],
                                         token_response=extra["token_response"],
                                         response_group=extra["response_group"],
                                         old_logprobs=extra["old_logprobs"], config=CONFIG,
                                         backend=impl.backend, inplace_backward=impl.inplace)
        else:
            logprobs, entropy = impl.fn(inputs.logits, inputs.labels, entropy_grad=False)
            loss, _ = loss_from_token_terms(self._pack(inputs), logprobs.float().reshape(-1),
                                             entropy.float().reshape(-1), CONFIG)
            outputs["logprobs"] = logprobs.detach()   # not compared; its dtype sets the loss's tolerance
        measure.phase_end("forward")
        (grad,) = torch.autograd.grad(loss, inputs.logits)
        measure.phase_end("backward")
        outputs.update(loss=loss.detach(), grad_logits=grad)
        return outputs
