"""From per-token log-probs and entropies to the AEM loss and its metrics: the one computation that the
two-pass path (logits or hidden states) and every single pass share, so that they agree by construction.

Per trained token t of response r, with modulated advantage A~_t = w_r A_t (eq. 7):

    loss = agg_pg(L) - entropy_coef * agg_h(h) + kl_coef * agg_kl(KL(l, l^ref))                (section 5)

with L_t the per-token loss of `config.loss_mode` (`ops.policy_loss.modes`: it sees the modulated A~, so AEM
composes with every mode), KL_t of `ops.policy_loss` and agg the per-token weights of `aggregation.py`
(`loss_weights`): the policy term aggregates as its mode says (loss_agg_mode for most of verl's modes, sapo's
and geo_mean's own, TRL's loss type's), the entropy and KL terms as verl's actor does (loss_agg_mode), except
under a TRL loss type, where TRL adds the KL (times the importance ratio: use_bias_correction_kl) to the
per-token loss (the policy term's aggregation) and its entropy bonus is the token mean of the call. The
response uncertainty x_r (eq. 3, 3') and the weights w_r are computed without gradient, like advantages.

Around the mode (`corrections.py`): the rollout correction, known before the forward, drops rejected tokens
from the batch (every term and AEM's x_r, as verl's response_mask) and multiplies L_t by its IS weights (verl's
rollout_is_weights, TRL's importance_sampling_ratio); TRL's top_entropy_quantile multiplies L_t by the mask of
this forward's high-entropy tokens, and under a TRL loss type also restricts the entropy bonus to them (TRL's
effective mask).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .. import collectives as C
from ..config import TRL_LOSS_MODES, AEMConfig
from ..ops.policy_loss import Segments, kl_penalty, kl_ratio, mode_aggregation, policy_token_loss
from ..ops.segment import segment_broadcast, segment_count, segment_mean, segment_sum
from .aggregation import GlobalBatch, aggregate
from .corrections import apply_rollout_corrections, entropy_token_mask
from .inputs import PackedBatch
from .modulation import aem_metrics, aem_weights_checked

__all__ = ["Corrected", "LossWeights", "loss_from_token_terms", "loss_weights", "modulated_token_advantages",
           "response_uncertainty", "weights_unknown_before_forward"]


def _global_value(value: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """A loss term's whole-batch value: this rank's share summed over the ranks / dp_size (itself alone)."""
    if batch.process_group is None:
        return value.detach()
    total = C.all_reduce(value.detach().clone().reshape(1), "sum", batch.process_group)[0]
    return total / batch.global_batch.dp_size


def response_uncertainty(batch: PackedBatch, logprobs: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
                         config: AEMConfig, dtype: torch.dtype) -> torch.Tensor:
    """x_r: response entropy (eq. 3') or surprisal (eq. 3) of the current or the old policy, detached (the
    current values may be None when the source is "old", or when beta = 0 makes x unused)."""
    current = entropy if config.uncertainty == "entropy" else (-logprobs if logprobs is not None else None)
    old = batch.old_entropy if config.uncertainty == "entropy" else (
        -batch.old_logprobs if batch.old_logprobs is not None else None)
    source = current if config.surprisal_source == "current" else old
    if source is None:
        if config.surprisal_source == "current":   # beta = 0 before the forward: the weights ignore x
            return torch.zeros(batch.num_responses, dtype=dtype, device=batch.token_response.device)
        needed = "old_entropy" if config.uncertainty == "entropy" else "old_logprobs"
        raise ValueError(f'surprisal_source="old" with uncertainty="{config.uncertainty}" needs `{needed}`')
    reduce = segment_mean if config.surprisal_reduction == "mean" else segment_sum
    return reduce(source.detach().to(dtype), batch.token_response, batch.num_responses)


def weights_unknown_before_forward(config: AEMConfig, batch: PackedBatch) -> Optional[str]:
    """None when the modulation weights w_r (eq. 7) are known before the forward, so that every token's loss
    derivative is row-local (what a single pass needs); else why not."""
    if config.surprisal_source == "current" and config.beta != 0:
        return ("the modulation weights depend on this forward's own entropies/log-probs "
                '(surprisal_source="current" with beta != 0), known only after every row is reduced; use '
                'surprisal_source="old" (with old_entropy or old_logprobs) or beta=0')
    if config.surprisal_source == "old":
        needed = "old_entropy" if config.uncertainty == "entropy" else "old_logprobs"
        if getattr(batch, needed) is None:
            return f'surprisal_source="old" with uncertainty="{config.uncertainty}" needs `{needed}`'
    return None


def modulated_token_advantages(batch: PackedBatch, x: torch.Tensor, config: AEMConfig, dtype: torch.dtype):
    """A~_t = w_r A_t (eq. 7) per token, from the response uncertainty x [R]. Returns (token_adv [N],
    response_adv [R], weights [R], u [R], clipped [R], valid [R])."""
    tr, num_responses = batch.token_response, batch.num_responses
    valid = segment_count(tr, num_responses) > 0
    weights, u, clipped = aem_weights_checked(x, batch.response_group, config, batch.num_groups, valid,
                                              batch.process_group)
    weights = weights.to(dtype)
    if batch.token_level:
        token_adv = batch.advantages.to(dtype) * segment_broadcast(weights, tr)
        response_adv = segment_mean(batch.advantages.to(dtype), tr, num_responses)
    else:
        response_adv = batch.advantages.to(dtype)
        token_adv = segment_broadcast(weights * response_adv, tr)
    token_adv = torch.where(tr >= 0, token_adv, 0.0)
    return token_adv, response_adv, weights, u, clipped, valid


class LossWeights(NamedTuple):
    """The per-token aggregation weights [N] of the policy, KL and entropy terms (module docstring)."""

    policy: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor


def loss_weights(batch: PackedBatch, config: AEMConfig, dtype: torch.dtype) -> LossWeights:
    """The weights of the three terms for `config.loss_mode`; they depend on the masks and normalisers only."""
    plain = batch.token_weights(config.loss_agg_mode, dtype)
    mode, all_rows, local = mode_aggregation(config)
    global_batch = GlobalBatch(process_group=batch.process_group) if local else batch.global_batch
    if all_rows and global_batch.global_batch_size is None and global_batch.dp_size == 1:
        # TRL divides by the rows B (every response, empty ones too), as geo_mean's torch.mean does
        global_batch = global_batch._replace(global_batch_size=float(max(batch.num_responses, 1)))
    needed = {"token-mean": "batch_num_tokens", "token-sum": None}.get(mode, "global_batch_size")
    if global_batch.dp_size > 1 and needed is not None and getattr(global_batch, needed) is None:
        # a rank's own count would silently give each rank another normaliser (verl's agg_loss raises too)
        raise ValueError(f"{needed} is required with loss_mode={config.loss_mode!r} when dp_size > 1: its policy "
                         f"term aggregates as {mode!r} (dp_size={global_batch.dp_size})")
    policy = global_batch.token_weights(batch.token_response, batch.num_responses, mode, batch.horizon, dtype)
    if config.loss_mode in TRL_LOSS_MODES:
        entropy = GlobalBatch().token_weights(batch.token_response, batch.num_responses, "token-mean", None, dtype)
        return LossWeights(policy, policy, entropy)
    return LossWeights(policy, plain, plain)


class Corrected(NamedTuple):
    """`corrections.apply_rollout_corrections`'s result: the batch without its rejected tokens, the per-token
    IS weights [N] (or None) and the correction metrics."""

    batch: PackedBatch
    is_weights: Optional[torch.Tensor]
    metrics: Dict[str, torch.Tensor]


def loss_from_token_terms(batch: PackedBatch, logprobs: torch.Tensor, entropy: torch.Tensor, config: AEMConfig,
                          corrected: Optional[Corrected] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(loss 0-d, metrics) from the batch's per-token log-probs and entropies [N] (differentiable); `corrected`:
    the rollout correction of this batch when the caller already applied it (a single pass)."""
    corrected = Corrected(*apply_rollout_corrections(batch, config)) if corrected is None else corrected
    batch = corrected.batch
    trained = batch.token_response >= 0
    dtype = logprobs.dtype

    x = response_uncertainty(batch, logprobs, entropy, config, dtype)
    token_adv, response_adv, weights, u, clipped, valid = modulated_token_advantages(batch, x, config, dtype)

    old = batch.old_logprobs.to(dtype) if batch.old_logprobs is not None else logprobs.detach()
    is_weights = corrected.is_weights.to(dtype) if corrected.is_weights is not None else None
    segments = Segments(batch.token_response, batch.num_responses)
    pg, flags = policy_token_loss(logprobs, old, token_adv, config, segments, is_weights)
    token_weights = loss_weights(batch, config, dtype)
    kept = entropy_token_mask(entropy, batch, config)
    if kept is not None:  # TRL: per_token_loss * entropy_mask, the denominators unchanged
        pg = pg * kept.to(dtype)
        if config.loss_mode in TRL_LOSS_MODES:
            token_weights = token_weights._replace(entropy=kept.to(dtype) / kept.sum().clamp(min=1).to(dtype))
    pg_loss = aggregate(pg, token_weights.policy)
    loss = pg_loss
    entropy_agg = aggregate(entropy, token_weights.entropy)
    if config.entropy_coef != 0:
        loss = loss - config.entropy_coef * entropy_agg
    group = batch.process_group
    metrics: Dict[str, torch.Tensor] = {
        "actor/pg_loss": _global_value(pg_loss, batch),
        "actor/pg_clipfrac": C.masked_mean(flags["clip"], trained, group),
        "actor/ppo_kl": C.masked_mean(flags["neg_log_ratio"], trained, group),
        "actor/pg_clipfrac_lower": C.masked_mean(flags["clip_lower"], trained, group),
        "actor/entropy": _global_value(entropy_agg, batch),
    }
    if config.kl_coef > 0:
        kl = kl_penalty(logprobs, batch.ref_logprobs.to(dtype), config.kl_type)
        factor = kl_ratio(logprobs, old, config, segments)  # TRL's use_bias_correction_kl
        kl_loss = aggregate(kl * factor if factor is not None else kl, token_weights.kl)
        loss = loss + config.kl_coef * kl_loss
        metrics["actor/kl_loss"] = _global_value(kl_loss, batch)
    metrics.update(aem_metrics(x, u, weights, clipped, response_adv, weights * response_adv, batch.response_group,
                               batch.num_groups, valid, group))
    metrics["aem/weights"] = weights.detach()
    metrics.update(corrected.metrics)
    return loss, metrics
