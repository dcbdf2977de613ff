"""The verl policy loss "aem": verl's clipped surrogate (AEM_SPEC eq. 8) from this package's
`ppo_token_loss`, aggregated with its `aggregation_weights` under verl's `config.global_batch_info`
normalisers; equal to verl's "vanilla" loss in every `loss_agg_mode` (AEM acts on the advantages, so the loss
has no beta).

verl's other policy losses need no twin here: under this integration AEM modulates the advantages in the
estimator hook, so `actor.policy_loss.loss_mode=gspo` (clip_cov, sapo, ...) already trains verl's own mode on
the modulated advantages. `AEMConfig.loss_mode` selects the same modes for this package's own losses
(`aem_policy_loss`, `fused_linear_aem_policy_loss`), which equal verl's functions (`ops/policy_loss/modes.py`).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

from ...config import AEMConfig
from ...loss import aggregate, aggregation_weights, ppo_token_loss

__all__ = ["POLICY_LOSS", "compute_policy_loss_aem"]

POLICY_LOSS = "aem"


@functools.lru_cache(maxsize=64)
def _surrogate_config(clip_low: float, clip_high: float, dual_clip: float) -> AEMConfig:
    return AEMConfig(beta=0.0, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


@register_policy_loss(POLICY_LOSS)
def compute_policy_loss_aem(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                            response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                            rollout_is_weights: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """verl policy loss "aem" (verl's PolicyLossFn interface; all tensors [B, T]).

    The clipped surrogate of eq. 8 with verl's clip_ratio(_low/_high) and clip_ratio_c, times
    rollout_is_weights when given, aggregated by `loss_agg_mode` with `config.global_batch_info` (dp_size,
    batch_num_tokens, global_batch_size, loss_scale_factor). Returns (pg_loss, verl's pg metrics).
    """
    if config is None:
        raise ValueError("the 'aem' policy loss needs verl's actor config (clip ratios, global_batch_info)")
    clip_ratio = config.clip_ratio
    clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else clip_ratio
    clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else clip_ratio
    surrogate = _surrogate_config(float(clip_low), float(clip_high), float(config.get("clip_ratio_c", 3.0)))
    if log_prob.dim() != 2 or log_prob.shape != old_log_prob.shape or log_prob.shape != advantages.shape or \
            log_prob.shape != response_mask.shape:
        raise ValueError("old_log_prob, log_prob, advantages and response_mask must share one [B, T] shape, got "
                         f"{tuple(old_log_prob.shape)}, {tuple(log_prob.shape)}, {tuple(advantages.shape)}, "
                         f"{tuple(response_mask.shape)}")
    pg, flags = ppo_token_loss(log_prob, old_log_prob, advantages, surrogate)
    if rollout_is_weights is not None:
        pg = pg * rollout_is_weights
    mask = response_mask.bool()
    rows, horizon = mask.shape
    row_ids = torch.arange(rows, device=mask.device).unsqueeze(1)
    token_response = torch.where(mask, row_ids, -1).reshape(-1)
    info = dict(config.get("global_batch_info", None) or {})
    weights = aggregation_weights(token_response, rows, loss_agg_mode, horizon, pg.dtype,
                                  dp_size=int(info.get("dp_size", 1) or 1),
                                  batch_num_tokens=info.get("batch_num_tokens"),
                                  global_batch_size=info.get("global_batch_size"),
                                  loss_scale_factor=info.get("loss_scale_factor"))
    pg_loss = aggregate(pg.reshape(-1), weights)
    metrics = {
        "actor/pg_clipfrac": _masked_mean(flags["clip"], mask).item(),
        "actor/ppo_kl": _masked_mean(flags["neg_log_ratio"], mask).item(),
        "actor/pg_clipfrac_lower": _masked_mean(flags["clip_lower"], mask).item(),
    }
    return pg_loss, metrics
