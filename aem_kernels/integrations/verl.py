"""verl 0.9.1 integration: importing this module registers AEM in verl's own registries.

Registered (verl's public `register_adv_est` / `register_policy_loss`):

* advantage estimator "aem": runs a base estimator (`algorithm.aem.base_estimator`, default "grpo") and
  rescales its token advantages by AEM's response weights (AEM_SPEC eq. 7), A~_t = w_r(t) A_t. Groups are
  verl's `uid` index (the `index` argument); each contiguous run of `response_mask` ones is one response, so
  the turns of a multi-turn agent-loop trajectory (tool/observation tokens are 0 in verl's response mask)
  are separate responses of their trajectory's group (`algorithm.aem.turn_level=false`: one per row).
* policy loss "aem": verl's clipped surrogate (eq. 8) from this package's `ppo_token_loss`, aggregated with
  this package's `aggregation_weights` under verl's `config.global_batch_info` normalisers; equal to verl's
  "vanilla" loss in every `loss_agg_mode` (AEM acts on the advantages, so the loss has no beta).

Where verl has the inputs (why the hook looks like this). The estimator runs on the trainer process in
`compute_advantage`, which passes it only token_level_rewards, response_mask, config and index; groups are
lost after that point (mini-batches are shuffled and split over micro-batches and ranks), so eq. 7 must run
here, not in the policy loss. At that moment the batch holds the rollout policy's per-token log-probs
(`old_log_probs`, recomputed by the actor before the advantage step); the actor's entropies of that pass are
dropped before it (v0 pops "entropys"; v1 does not fetch "entropy"). Hence the verl default here is
uncertainty="surprisal" from the old log-probs (AEM_SPEC eq. 3, surprisal_source="old"); "entropy" is used
when the batch carries "entropys"/"entropy" (a custom trainer that keeps them). verl 0.9.1 has no hook that
hands these to an estimator, so the estimator reads them from the `data` DataProto of its caller
`compute_advantage` (read only, and only when that batch's response_mask is the very tensor it was given);
explicit `old_log_probs=` / `entropys=` keyword arguments take precedence (the one-line verl patch in the
README passes them).

Token ops. verl's policy-loss functions receive log-probs, not logits: the logits live in the engine's
forward. With AEM_KERNELS_VERL_TOKEN_OPS=1 set when this module is imported, `patch_token_ops()` routes the
FSDP engine's `logprobs_from_logits` and `entropy_from_logits` through this package's kernels (no fp32 copy
of the logits, section-6 backward); the loss-level fused ops (`aem_policy_loss` from logits, the single-pass
kernel) would need verl's engine to hand the loss the logits, which it does not.
"""

from __future__ import annotations

import inspect
import os
import sys
from functools import lru_cache
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from . import require_framework

require_framework("verl", "verl", "verl==0.9.1")

from verl.trainer.ppo.core_algos import get_adv_estimator_fn, register_adv_est, register_policy_loss  # noqa: E402

from ..config import AEMConfig  # noqa: E402
from ..loss import aggregate, aggregation_weights, modulate_advantages, ppo_token_loss  # noqa: E402
from ..loss import turn_ids_to_token_response  # noqa: E402
from ..ops.logprobs import entropy_from_logits, logprobs_from_logits  # noqa: E402
from ..ops.segment import response_entropy, response_surprisal  # noqa: E402

__all__ = ["ESTIMATOR", "POLICY_LOSS", "aem_settings", "compute_aem_advantage", "compute_policy_loss_aem",
           "last_metrics", "modulate_token_advantages", "patch_token_ops", "response_turn_ids"]

ESTIMATOR = "aem"
POLICY_LOSS = "aem"
TOKEN_OPS_ENV = "AEM_KERNELS_VERL_TOKEN_OPS"

# AEMConfig fields that shape the modulation (eq. 4-7); the surrogate's fields come from verl's actor config.
_MODULATION_FIELDS = ("beta", "phi", "sign", "uncertainty", "surprisal_reduction", "baseline", "zscore",
                      "normalize", "w_min", "w_max")
_EXTRA_FIELDS = ("base_estimator", "turn_level")
# At advantage time verl holds the old log-probs, not the entropies (module docstring).
_VERL_DEFAULTS = {"uncertainty": "surprisal", "surprisal_source": "old"}
# verl's estimator interface returns no metrics: the last call's aem/* values are kept for the caller to log.
_LAST_METRICS: Dict[str, float] = {}


def last_metrics() -> Dict[str, float]:
    """The aem/* metrics (floats) of this process's latest "aem" estimator call ({} before the first)."""
    return dict(_LAST_METRICS)


def aem_settings(config: Any) -> Tuple[AEMConfig, str, bool]:
    """(AEMConfig, base estimator name, turn_level) from verl's algorithm config's `aem` section.

    `config` is verl's algorithm config (DictConfig, AlgoConfig, dict or None); its optional `aem` mapping
    holds AEMConfig's modulation fields (beta, phi, sign, uncertainty, surprisal_reduction, baseline, zscore,
    normalize, w_min, w_max), `base_estimator` (default "grpo") and `turn_level` (default true).
    """
    section = None if config is None else config.get("aem", None)
    if section is None:
        section = {}
    elif not isinstance(section, Mapping):
        try:
            from omegaconf import OmegaConf

            section = OmegaConf.to_container(section, resolve=True)
        except Exception as error:  # noqa: BLE001 - report what the user passed
            raise TypeError(f"algorithm.aem must be a mapping, got {type(section).__name__}") from error
    section = dict(section)
    unknown = sorted(set(section) - set(_MODULATION_FIELDS) - set(_EXTRA_FIELDS))
    if unknown:
        raise ValueError(f"algorithm.aem has unknown keys {unknown}; allowed: "
                         f"{sorted(_MODULATION_FIELDS + _EXTRA_FIELDS)}")
    base = section.pop("base_estimator", "grpo")
    turn_level = section.pop("turn_level", True)
    if not isinstance(base, str) or base == ESTIMATOR:
        raise ValueError(f"algorithm.aem.base_estimator must name another registered estimator, got {base!r}")
    if not isinstance(turn_level, bool):
        raise TypeError(f"algorithm.aem.turn_level must be a bool, got {type(turn_level).__name__}")
    return AEMConfig(**{**_VERL_DEFAULTS, **section}), base, turn_level


def response_turn_ids(response_mask: torch.Tensor, turn_level: bool = True) -> torch.Tensor:
    """[B, T] turn ids from verl's response mask: each contiguous run of ones is turn 0, 1, ... of its row
    (turn_level=False: the whole row is turn 0); -1 where the mask is 0."""
    if not isinstance(response_mask, torch.Tensor) or response_mask.dim() != 2:
        raise ValueError("response_mask must be a [B, T] tensor, got "
                         f"{getattr(response_mask, 'shape', type(response_mask).__name__)}")
    mask = response_mask != 0
    if not turn_level:
        return torch.where(mask, 0, -1)
    previous = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
    turn = torch.cumsum((mask & ~previous).long(), dim=1) - 1
    return torch.where(mask, turn, -1)


def _group_ids(index: Any, rows: int, device: torch.device) -> torch.Tensor:
    if index is None:
        raise ValueError("the AEM estimator needs verl's `index` (the uid of each row's prompt) to form groups")
    index = np.asarray(index)
    if index.shape != (rows,):
        raise ValueError(f"index must hold one uid per row, shape ({rows},), got {index.shape}")
    _, inverse = np.unique(index, return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.int64, device=device)


def modulate_token_advantages(advantages: torch.Tensor, response_mask: torch.Tensor, index: Any,
                              token_values: torch.Tensor, config: AEMConfig, *, turn_level: bool = True
                              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """A~_t = w_r(t) A_t (eq. 7) for verl's [B, T] token advantages.

    Args:
        advantages: [B, T] float token advantages of a base estimator.
        response_mask: [B, T] verl response mask (0/1 or bool); its runs of ones are the responses.
        index: [B] uid per row (numpy array or list); rows with one uid form a group.
        token_values: [B, T] per-token log-probs (config.uncertainty="surprisal") or entropies ("entropy").
        config: `AEMConfig` (its modulation fields are used).
        turn_level: one response per run of ones (True) or per row (False).

    Returns:
        (modulated [B, T], the metrics of `modulate_advantages`); tokens outside the mask are unchanged.
    """
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 2:
        raise ValueError(f"advantages must be a [B, T] tensor, got {getattr(advantages, 'shape', None)}")
    if tuple(response_mask.shape) != tuple(advantages.shape) or tuple(token_values.shape) != tuple(
            advantages.shape):
        raise ValueError(f"response_mask {tuple(response_mask.shape)} and the per-token uncertainty values "
                         f"{tuple(token_values.shape)} must have the advantages' shape {tuple(advantages.shape)}")
    rows = advantages.shape[0]
    token_response, turns_per_row = turn_ids_to_token_response(response_turn_ids(response_mask, turn_level))
    group_of_row = _group_ids(index, rows, advantages.device)
    response_group = torch.repeat_interleave(group_of_row, turns_per_row.to(advantages.device))
    num_responses = response_group.shape[0]
    num_groups = int(group_of_row.max()) + 1 if rows else 0
    if config.uncertainty == "surprisal":
        x = response_surprisal(token_values.detach().float(), token_response, num_responses,
                               reduction=config.surprisal_reduction)
    else:
        x = response_entropy(token_values.detach().float(), token_response, num_responses,
                             reduction=config.surprisal_reduction)
    flat_tr = token_response.reshape(-1)
    trained = flat_tr >= 0
    safe_tr = flat_tr.clamp(min=0)
    # The response's advantage for the metrics: its tokens' mean (GRPO's advantage is constant over a row).
    counts = torch.zeros(num_responses, dtype=torch.float32, device=advantages.device).index_add(
        0, safe_tr[trained], torch.ones(int(trained.sum()), device=advantages.device))
    sums = torch.zeros(num_responses, dtype=torch.float32, device=advantages.device).index_add(
        0, safe_tr[trained], advantages.detach().reshape(-1)[trained].float())
    response_adv = sums / counts.clamp(min=1)
    _, metrics = modulate_advantages(response_adv, x, response_group, config, num_groups=num_groups)
    weights = metrics["aem/weights"].to(advantages.dtype)
    token_weight = torch.where(trained, weights[safe_tr] if num_responses else 1.0, 1.0)
    return advantages * token_weight.view_as(advantages), metrics


def _caller_batch(response_mask: torch.Tensor, depth: int = 4) -> Optional[Any]:
    """The `data.batch` of the verl `compute_advantage` frame that called the estimator, if its response mask
    is the tensor the estimator received (verl passes `data.batch["response_mask"]` itself)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        batch = getattr(frame.f_locals.get("data"), "batch", None)
        try:
            mask = batch["response_mask"] if batch is not None else None
        except KeyError:
            mask = None
        if isinstance(mask, torch.Tensor) and mask.shape == response_mask.shape and \
                mask.data_ptr() == response_mask.data_ptr():
            return batch
        frame = frame.f_back
    return None


def _uncertainty_values(config: AEMConfig, response_mask: torch.Tensor, old_log_probs, entropys) -> torch.Tensor:
    if config.uncertainty == "surprisal" and old_log_probs is not None:
        return old_log_probs
    if config.uncertainty == "entropy" and entropys is not None:
        return entropys
    batch = _caller_batch(response_mask)
    keys = ("old_log_probs",) if config.uncertainty == "surprisal" else ("entropys", "entropy")
    for key in keys:
        if batch is not None and key in batch.keys():
            return batch[key]
    hint = ("verl 0.9.1 drops the actor's entropies before the advantage step; use "
            "+algorithm.aem.uncertainty=surprisal (the old log-probs) or pass `entropys=`"
            if config.uncertainty == "entropy" else "pass `old_log_probs=` or call it from verl's compute_advantage")
    raise ValueError(f"the AEM estimator with uncertainty={config.uncertainty!r} needs per-token "
                     f"{' or '.join(keys)} of shape {tuple(response_mask.shape)}; {hint}")


@register_adv_est(ESTIMATOR)
def compute_aem_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any = None,
                          config: Any = None, *, old_log_probs: Optional[torch.Tensor] = None,
                          entropys: Optional[torch.Tensor] = None, **kwargs: Any
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator "aem": the base estimator's advantages modulated by eq. 7.

    Args (verl's estimator interface): token_level_rewards [B, T], response_mask [B, T], index [B] uids,
    config (the algorithm config, with the `aem` section of `aem_settings`); old_log_probs / entropys [B, T]
    (default: read from the calling `compute_advantage`'s batch); other kwargs go to the base estimator.

    Returns:
        (advantages [B, T] modulated, returns [B, T] of the base estimator, unchanged).
    """
    aem_config, base_name, turn_level = aem_settings(config)
    base_fn = get_adv_estimator_fn(base_name)
    base_kwargs = {"token_level_rewards": token_level_rewards, "response_mask": response_mask, "index": index,
                   "config": config, **kwargs}
    params = inspect.signature(base_fn).parameters
    if "norm_adv_by_std_in_grpo" in params and config is not None:
        base_kwargs["norm_adv_by_std_in_grpo"] = config.get("norm_adv_by_std_in_grpo", True)
    if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        base_kwargs = {k: v for k, v in base_kwargs.items() if k in params}
    advantages, returns = base_fn(**base_kwargs)
    values = _uncertainty_values(aem_config, response_mask, old_log_probs, entropys)
    modulated, metrics = modulate_token_advantages(advantages, response_mask, index, values.to(advantages.device),
                                                   aem_config, turn_level=turn_level)
    _LAST_METRICS.clear()
    _LAST_METRICS.update({name: value.item() for name, value in metrics.items() if value.dim() == 0})
    return modulated, returns


@lru_cache(maxsize=64)
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


def _logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True
                          ) -> torch.Tensor:
    return logprobs_from_logits(logits, labels, inplace_backward=inplace_backward)


def _entropy_from_logits(logits: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    return entropy_from_logits(logits, chunk_size=chunk_size)


def patch_token_ops() -> None:
    """Route verl's FSDP engine's per-token log-probs and entropies through this package's kernels.

    Replaces `verl.workers.engine.fsdp.transformer_impl.logprobs_from_logits` and
    `verl.utils.torch_functional.entropy_from_logits(_with_chunking)`; call it (or set
    AEM_KERNELS_VERL_TOKEN_OPS=1 before this module is imported) before the engine is built, since the
    engine binds its entropy function at construction. Excluded from torch.compile, which verl applies to the
    entropy function by default.
    """
    import verl.utils.torch_functional as verl_F
    import verl.workers.engine.fsdp.transformer_impl as fsdp_engine

    disable = torch.compiler.disable
    fsdp_engine.logprobs_from_logits = disable(_logprobs_from_logits)
    verl_F.entropy_from_logits = disable(_entropy_from_logits)
    verl_F.entropy_from_logits_with_chunking = disable(_entropy_from_logits)


if os.environ.get(TOKEN_OPS_ENV, "0") == "1":
    patch_token_ops()
