"""The AEM policy loss from hidden states and the LM head weight (`fused_linear_aem_policy_loss`): the loss of
`aem_policy_loss` over the logits hidden @ weight.T + bias, which are never built.

The per-token log-probs and entropies come from the fused-linear op (`ops.fused_linear`) and feed the same
loss code (`terms.py`); when the weights w_r are known before the forward, the chunked path finishes each
chunk's gradient in the forward (`single_pass.py`).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import validation as V
from ..config import AEMConfig
from ..ops.fused_linear import (check_budget, check_linear, fused_linear_apply, logits_like,
                                resolve_fused_linear_path)
from .inputs import check_loss_keywords, loss_batch
from .single_pass import fused_linear_single_pass_loss, fused_linear_single_pass_unavailable
from .terms import loss_from_token_terms

__all__ = ["fused_linear_aem_policy_loss"]


def fused_linear_aem_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    config: AEMConfig = AEMConfig(),
    backend: str = "auto",
    inplace_backward: bool = False,
    single_pass: Optional[bool] = None,
    deterministic: bool = False,
    chunk_budget_bytes: Optional[int] = None,
    path: str = "auto",
    **batch_keywords,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """`aem_policy_loss` of the logits hidden @ weight.T + bias, computed without building them.

    Args:
        hidden: [..., H] (packed) or [B, T, H] (padded form), fp32/bf16/fp16/fp64.
        weight: [V, H], bias: [V] or None, of hidden's dtype and device.
        labels, advantages, config, backend: as `aem_policy_loss`.
        batch_keywords: the batch keywords of `aem_policy_loss`, with the same meanings (token_response /
            response_mask / turn_ids, response_group, old_logprobs, old_entropy, ref_logprobs,
            advantage_level, num_groups, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor,
            process_group, rollout_logprobs); any other keyword is a TypeError.
        inplace_backward: accepted for signature compatibility (a bool); it changes nothing, as the chunk
            buffers are always overwritten by their gradient.
        single_pass: None: when the modulation weights are known before the forward (surprisal_source="old",
            or beta = 0), config.loss_mode's per-token derivative is row-local (`ops.policy_loss.row_local`:
            not gspo, geo_mean, vespo, clip_cov, kl_cov, TRL's sequence level, nor top_entropy_quantile < 1),
            and the path is the chunked one (CPU, backend="torch") with fp32/fp64 hidden states,
            every chunk's gradient is finished in the forward while its logits are in the buffer (three matmuls
            instead of four; same loss, metrics and gradients up to fp32 summation order); True: require that
            (bf16/fp16 included, which then holds the fp32 weight copy and gradient accumulator from the
            forward to the backward; ValueError saying why when it cannot apply, e.g. on the Triton path);
            False: always two passes.
        deterministic, chunk_budget_bytes, path: as `fused_linear_logprobs_and_entropy`; the single pass runs
            row chunks, so it is not taken unasked when path="blocked" is named.

    Returns:
        (loss 0-d, metrics) as `aem_policy_loss`; differentiable with respect to hidden, weight and bias.
    """
    config = V.check_config(config)
    hidden, weight, bias = check_linear(hidden, weight, bias)
    V.check_bool("inplace_backward", inplace_backward)
    single_pass = V.check_optional_bool("single_pass", single_pass)
    deterministic = V.check_bool("deterministic", deterministic)
    check_loss_keywords(batch_keywords)
    if "response_group" not in batch_keywords:
        raise TypeError("fused_linear_aem_policy_loss() missing required keyword argument: 'response_group'")
    batch = loss_batch(logits_like(hidden, weight.shape[0]), labels, advantages, config, **batch_keywords)
    chosen = resolve_fused_linear_path(backend, hidden.device, hidden.dtype, path=path)
    budget = check_budget(chunk_budget_bytes, chosen)
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    if single_pass or (single_pass is None and path != "blocked"):
        reason = fused_linear_single_pass_unavailable(chosen, config, batch, hidden.dtype, single_pass)
        if reason is None and any(needs):
            return fused_linear_single_pass_loss(hidden, weight, bias, batch, config, chosen, needs, budget)
        if single_pass and reason is not None:
            raise ValueError(f"single_pass=True cannot apply: {reason}")
    logprobs, entropy = fused_linear_apply(hidden, weight, bias, batch.labels, config.temperature,
                                           config.ignore_index, True, chosen, deterministic, budget)
    return loss_from_token_terms(batch, logprobs.reshape(-1), entropy.reshape(-1), config)
