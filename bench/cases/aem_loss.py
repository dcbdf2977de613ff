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

`AEMLossModeForwardBackward(mode)`: the same loss with `AEMConfig(loss_mode=mode)` (AEM on, the paper's
defaults), one case per mode of verl 0.9.1 and TRL 1.16 (`aem_loss_fwd_bwd[<mode>]`), against the framework's own
loss function on materialised log-probs (`loss_modes.py`): eager, and the whole user function (log-softmax,
entropy, AEM modulation, the framework's loss) under torch.compile. verl's and TRL's loss functions take
`[B, T]` rows, one response each, so this case lays out one response per row (the first 1/8 of each row
untrained, groups of 4 rows); the logits' shape is the point's, as in the case above.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

import aem_kernels as ak
from aem_kernels.loss import loss_from_token_terms, pack_inputs

from .. import measure
from ..implementations import eager_logprobs_entropy
from ..lines import Implementation
from ..roofline import Work, token_op_work
from .base import Case, Inputs, Outputs, Point
from .loss_modes import framework, framework_loss, mode_config, our_normalisers, verl_unavailable

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


# the per-mode case runs these lines; the others' N x V work does not depend on the mode (aem_loss_fwd_bwd
# measures it), and the mode only changes an O(N) tail
MODE_LINES = ("aem_kernels[torch]", "aem_kernels[cpu]", "aem_kernels[triton]", "eager", "torch.compile")
_MODE_LINES_ONLY = ("the per-mode case times ours (default backward), eager and torch.compile: this line's N x V "
                    "work does not depend on the loss mode and is measured in aem_loss_fwd_bwd")


class AEMLossModeForwardBackward(AEMLossForwardBackward):
    """`ak.aem_policy_loss` with `AEMConfig(loss_mode=mode)` against the framework's loss (module docstring)."""

    default = False

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.config = mode_config(mode)
        self.name = f"aem_loss_fwd_bwd[{mode}]"
        self.title = f"aem_policy_loss, loss_mode={mode!r} ({framework(mode)}), forward + backward"
        self._loss = None        # the framework's loss, built in `extend` (outside the timers; verl imports in ~10 s)
        self._compiled = None

    def tolerance_scale(self, point: Point) -> Dict[str, float]:
        # VESPO's weight phi = exp(lam + k log w - lam w) takes log w = the SUM of a response's L log-ratios, so
        # the per-token fp32 rounding of a line's log-probs adds up over L tokens: ~sqrt(L) times that of a mean
        # (independent roundings). Measured at 512 x 32000 (L = 112): eager fp32 is 1.4e-4 (loss) and 6.4e-5
        # (gradient) away from fp64, ours 1e-6: 1.4x the plain fp32 loss tolerance, well within sqrt(L) = 10.6x
        if self.mode != "vespo":
            return {}
        trained = point.rows - point.rows // 8
        return {"loss": math.sqrt(trained), "grad_logits": math.sqrt(trained)}

    def skip_reason(self, impl: Implementation) -> Optional[str]:
        if impl.name not in MODE_LINES:
            return _MODE_LINES_ONLY
        if not impl.ours and framework(self.mode) == "verl" and verl_unavailable():
            return verl_unavailable()
        return super().skip_reason(impl)

    def extend(self, base: Inputs, point: Point, device: torch.device, seed: int) -> Inputs:
        inputs = Case.extend(self, base, point, device, seed)
        batch, rows = inputs.labels.shape
        mask = (torch.arange(rows, device=device) >= rows // 8)[None, :].expand(batch, rows)
        gen = torch.Generator(device=device).manual_seed(seed + 2)
        with torch.no_grad():
            current = ak.logprobs_from_logits(inputs.logits, inputs.labels, backend="torch")
        noise = torch.randn(current.shape, generator=gen, device=device) * OLD_LOGPROB_NOISE
        inputs.extra["mask"] = mask
        inputs.extra["token_response"] = torch.where(mask, torch.arange(batch, device=device)[:, None], -1)
        inputs.extra["response_group"] = torch.arange(batch, device=device) // GROUP_SIZE
        inputs.extra["advantages"] = torch.randn(batch, generator=gen, device=device)
        inputs.extra["old_logprobs"] = current + noise
        if self._loss is None and not (framework(self.mode) == "verl" and verl_unavailable()):
            self._loss = framework_loss(self.config)
        return inputs

    def _user_loss(self, logits: torch.Tensor, labels: torch.Tensor, extra: dict,
                   logprobs_entropy=eager_logprobs_entropy) -> torch.Tensor:
        """What a framework's user writes: materialised log-probs and entropies, then the framework's loss."""
        logprobs, entropy = logprobs_entropy(logits, labels, entropy_grad=False)
        return self._loss(logprobs, entropy, extra["old_logprobs"], extra["advantages"], extra["response_group"],
                          extra["mask"])

    def call(self, impl: Implementation, inputs: Inputs) -> Outputs:
        extra = inputs.extra
        # clip_cov draws its tokens with torch.randperm on the global CPU generator, in verl and in the package
        # alike: the same seed before every call draws the same tokens
        torch.manual_seed(0)
        if impl.ours:
            loss, _ = ak.aem_policy_loss(inputs.logits, inputs.labels, extra["advantages"],
                                         token_response=extra["token_response"],
                                         response_group=extra["response_group"], old_logprobs=extra["old_logprobs"],
                                         config=self.config, backend=impl.backend, inplace_backward=impl.inplace,
                                         **our_normalisers(self.config, inputs.labels.shape[1]))
        elif impl.compiled:
            if self._compiled is None:   # the whole user function, one compiled wrapper per mode
                self._compiled = torch.compile(self._user_loss)
            loss = self._compiled(inputs.logits, inputs.labels, extra)
        else:
            loss = self._user_loss(inputs.logits, inputs.labels, extra, impl.fn)
        measure.phase_end("forward")
        (grad,) = torch.autograd.grad(loss, inputs.logits)
        measure.phase_end("backward")
        return {"loss": loss.detach(), "grad_logits": grad}
