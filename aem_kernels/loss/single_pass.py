"""The loss's single pass (AEM_SPEC section 6): when the modulation weights w_r are known before the forward
(surprisal_source="old", or beta = 0), every token's derivative scalars a_t = dloss/dl_t and b_t = dloss/dh_t
depend on that token's own l_t, h_t only, so the gradient is finished while each row (or chunk of rows) is
being read: one read and one write of the logits (Triton, `ops/policy_loss/triton.py`), or three matmuls per
chunk instead of four from hidden states (`ops/fused_linear/chunked.py`).

Here the per-token A~_t and c_t are prepared, the kernel or chunk loop runs, and the loss value and metrics
are computed by `terms.loss_from_token_terms` from its l_t and h_t: the same numbers as the two-pass path by
construction. The per-token derivatives come from `ops.policy_loss.token_loss_derivatives` (the one torch
statement of them; the Triton kernel's is tested against it).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..config import AEMConfig
from ..contract import first_order_only
from ..ops.fused_linear import FusedLinearPath
from ..ops.policy_loss import row_local, single_pass_unavailable, token_loss_derivatives
from .inputs import PackedBatch
from .corrections import apply_rollout_corrections
from .terms import (Corrected, LossWeights, loss_from_token_terms, loss_weights, modulated_token_advantages,
                    response_uncertainty, weights_unknown_before_forward)

__all__ = ["FusedLinearLossGradientFunction", "fused_linear_single_pass_loss", "fused_linear_single_pass_unavailable",
           "logits_single_pass_loss", "logits_single_pass_unavailable", "single_pass_token_terms"]

Metrics = Dict[str, torch.Tensor]


def single_pass_token_terms(batch: PackedBatch, config: AEMConfig, dtype: torch.dtype
                            ) -> Tuple[torch.Tensor, LossWeights, Corrected]:
    """(A~_t [N], the terms' aggregation weights, the rollout correction): the modulated advantages, weights and
    corrections, known before the forward (`weights_unknown_before_forward` is None)."""
    corrected = Corrected(*apply_rollout_corrections(batch, config))
    x = response_uncertainty(corrected.batch, None, None, config, dtype)
    token_adv = modulated_token_advantages(corrected.batch, x, config, dtype)[0]
    return token_adv, loss_weights(corrected.batch, config, dtype), corrected


def selections_unknown_before_forward(config: AEMConfig) -> Optional[str]:
    """None when the policy-loss mode and the token selection leave every a_t row-local; else why not."""
    if config.top_entropy_quantile < 1.0:
        return ("top_entropy_quantile < 1 selects tokens by a quantile of this forward's entropies, known only "
                "after every row is reduced")
    return row_local(config)


def logits_single_pass_unavailable(config: AEMConfig, backend_name: str, batch: PackedBatch) -> Optional[str]:
    """Why the single-pass kernel cannot serve this call from logits (None when it can)."""
    reason = (single_pass_unavailable(backend_name, config.loss_mode) or selections_unknown_before_forward(config)
              or weights_unknown_before_forward(config, batch))
    if reason is None and (config.rollout_is is not None or config.vllm_importance_sampling_mode is not None) \
            and (config.kl_coef != 0 or config.entropy_coef != 0):
        # the kernel weighs its three terms alike; IS weights scale the policy term only
        reason = ("the Triton single pass takes rollout IS weights only without a KL or entropy term (kl_coef = "
                  "entropy_coef = 0)")
    return reason


def logits_single_pass_loss(logits: torch.Tensor, batch: PackedBatch, config: AEMConfig,
                            inplace_backward: bool) -> Tuple[torch.Tensor, Metrics]:
    """The Triton single pass for [..., V] logits (the backend resolved to "triton")."""
    from ..ops.policy_loss.triton import FusedGradientFunction, aem_loss_single_pass

    token_adv, token_weights, corrected = single_pass_token_terms(batch, config, torch.float32)
    # the kernel's modes (vanilla, bypass_mode) weigh the three terms alike (`terms.loss_weights`); IS weights
    # (only without KL and entropy terms) fold into the policy term's weights: sum_t c_t w_t L_t
    policy_weights = token_weights.policy
    if corrected.is_weights is not None:
        policy_weights = policy_weights * corrected.is_weights.to(policy_weights.dtype)
    logprobs, entropy, grad = aem_loss_single_pass(
        logits, batch.labels, token_adv, policy_weights, batch.old_logprobs, batch.ref_logprobs,
        temperature=config.temperature, ignore_index=config.ignore_index, clip_low=config.clip_low,
        clip_high=config.clip_high, dual_clip=config.dual_clip, entropy_coef=config.entropy_coef,
        kl_coef=config.kl_coef, kl_type=config.kl_type, inplace_backward=inplace_backward)
    with torch.no_grad():
        loss, metrics = loss_from_token_terms(batch, logprobs, entropy, config, corrected)
    if grad is not None:
        loss = FusedGradientFunction.apply(loss, logits, grad)
    return loss, metrics


class FusedLinearLossGradientFunction(torch.autograd.Function):
    """(loss 0-d, hidden, weight, bias, grads) -> loss, whose backward returns the gradients the single pass
    computed in the forward (in the working dtype) times the upstream gradient, cast to each input's dtype.

    Memory: the gradients are saved tensors, so autograd frees them after the backward (unless retain_graph);
    for the usual upstream gradient 1 in the inputs' dtype they are handed on as they are, and AccumulateGrad
    can take them as `.grad` without a copy (it copies when a retained graph still holds them)."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grads):
        inputs = (hidden, weight, bias)
        shaped = [g.reshape(t.shape) if g is not None and t is not None else None for g, t in zip(grads, inputs)]
        ctx.save_for_backward(*shaped)
        ctx.dtypes = [t.dtype if t is not None else None for t in inputs]
        return loss.detach().clone()

    @staticmethod
    @first_order_only  # not once_differentiable: it returns no graph at all when grad_loss needs none
    def backward(ctx, grad_loss):
        unit = bool(grad_loss == 1)
        out = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            if grad is None or dtype is None:
                out.append(None)
            elif unit:
                out.append(grad.to(dtype))
            else:
                out.append((grad * grad_loss.to(grad.dtype)).to(dtype))
        return (None, *out, None)


def fused_linear_single_pass_unavailable(path: FusedLinearPath, config: AEMConfig, batch: PackedBatch,
                                         dtype: torch.dtype, asked: Optional[bool]) -> Optional[str]:
    """Why the fused-linear loss cannot finish its gradient in the forward (None when it can)."""
    if path.single_pass is None:
        return (f'the "{path.key}" fused-linear path has no single pass (the Triton tile kernels recompute the '
                'logits in the backward)')
    if not asked and dtype not in (torch.float32, torch.float64):
        # half precision: the single pass holds the fp32 weight copy and gradient accumulator from the forward
        # to the backward; taken only when asked for
        return (f"not taken unasked for {dtype} hidden states (it holds the fp32 weight-gradient accumulator, and "
                "on the CPU paths fp32 copies of the weight, from the forward to the backward)")
    if torch.compiler.is_compiling():
        # its data-dependent row selection does not trace; the custom ops of the two passes do
        return "under torch.compile the fused-linear loss takes its two passes (custom ops)"
    return selections_unknown_before_forward(config) or weights_unknown_before_forward(config, batch)


def fused_linear_single_pass_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                  batch: PackedBatch, config: AEMConfig, path: FusedLinearPath,
                                  needs: Tuple[bool, bool, bool], budget: Optional[int]
                                  ) -> Tuple[torch.Tensor, Metrics]:
    """The loss value, metrics and the gradients of hidden, weight and bias from one pass over the logit chunks
    (`chunked.chunked_single_pass`)."""
    work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    token_adv, token_weights, corrected = single_pass_token_terms(batch, config, work)
    old, ref, is_weights = batch.old_logprobs, batch.ref_logprobs, corrected.is_weights
    pick = (lambda values, index: values[index] if values is not None else None)  # noqa: E731

    def token_grads(index: torch.Tensor, logprobs: torch.Tensor, entropy: torch.Tensor):
        return token_loss_derivatives(logprobs, pick(old, index), token_adv[index], token_weights.policy[index],
                                      pick(ref, index), config, kl_weights=token_weights.kl[index],
                                      entropy_weights=token_weights.entropy[index],
                                      is_weights=pick(is_weights, index))

    with torch.no_grad():
        logprobs, entropy, grads = path.single_pass(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                                    batch.labels.reshape(-1), config.temperature,
                                                    config.ignore_index, token_grads, needs, budget=budget)
        loss, metrics = loss_from_token_terms(batch, logprobs, entropy, config, corrected)
    return FusedLinearLossGradientFunction.apply(loss, hidden, weight, bias, grads), metrics
