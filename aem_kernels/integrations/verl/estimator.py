"""The verl advantage estimator "aem": a base estimator's [B, T] advantages rescaled by AEM's response
weights, A~_t = w_r(t) A_t (AEM_SPEC eq. 7).

Groups are verl's `uid` index; each contiguous run of `response_mask` ones is one response, so the turns of a
multi-turn agent-loop trajectory (tool/observation tokens are 0 in verl's response mask) are separate responses
of their trajectory's group (`algorithm.aem.turn_level=false`: one per row). The per-token uncertainty values
arrive as the keyword arguments `old_log_probs=` / `entropys=` (the package docstring says who passes them).
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, register_adv_est

from ...config import AEMConfig
from ...loss import modulate_advantages, turn_ids_to_token_response
from ...ops.segment import response_entropy, response_surprisal

__all__ = ["ESTIMATOR", "aem_settings", "compute_aem_advantage", "last_metrics", "modulate_token_advantages",
           "response_turn_ids"]

ESTIMATOR = "aem"

# AEMConfig fields that shape the modulation (eq. 4-7); the surrogate's fields come from verl's actor config.
_MODULATION_FIELDS = ("beta", "phi", "sign", "uncertainty", "surprisal_reduction", "baseline", "zscore",
                      "normalize", "w_min", "w_max")
_EXTRA_FIELDS = ("base_estimator", "turn_level")
# At advantage time verl holds the old log-probs, not the entropies (module docstring).
_VERL_DEFAULTS = {"uncertainty": "surprisal", "surprisal_source": "old"}
# verl's estimator interface returns no metrics: the latest call's aem/* values are kept for the caller to log
# (only those: cleared when a call starts, so a failed call never leaves the previous batch's values).
_LAST_METRICS: Dict[str, float] = {}


def last_metrics() -> Dict[str, float]:
    """A copy of the aem/* metrics (floats) of this process's latest "aem" estimator call; {} before the first
    call and after a call that raised."""
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


def _uncertainty_values(config: AEMConfig, response_mask: torch.Tensor, old_log_probs: Optional[torch.Tensor],
                        entropys: Optional[torch.Tensor]) -> torch.Tensor:
    """The per-token values that `config.uncertainty` reads (eq. 3 or 2), or a ValueError naming the missing one."""
    name, values = (("old_log_probs", old_log_probs) if config.uncertainty == "surprisal"
                    else ("entropys", entropys))
    if values is None:
        how = ("verl 0.9.1 drops the actor's entropies before the advantage step: use "
               "+algorithm.aem.uncertainty=surprisal (the old log-probs) or keep 'entropys' in the batch"
               if name == "entropys" else
               "verl's compute_advantage passes them once aem_kernels.integrations.verl is imported in the "
               "trainer process (VERL_USE_EXTERNAL_MODULES); aem_kernels.integrations.verl.compute_advantage"
               "(data, ...) takes them from data.batch")
        raise ValueError(f"the AEM estimator with uncertainty={config.uncertainty!r} needs `{name}=` (per-token "
                         f"values of shape {tuple(response_mask.shape)}); {how}")
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a [B, T] tensor, got {type(values).__name__}")
    return values


@register_adv_est(ESTIMATOR)
def compute_aem_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any = None,
                          config: Any = None, *, old_log_probs: Optional[torch.Tensor] = None,
                          entropys: Optional[torch.Tensor] = None, **kwargs: Any
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator "aem": the base estimator's advantages modulated by eq. 7.

    Args (verl's estimator interface): token_level_rewards [B, T], response_mask [B, T], index [B] uids,
    config (the algorithm config, with the `aem` section of `aem_settings`); other kwargs go to the base
    estimator. The per-token uncertainty values, as keyword arguments (this module's `compute_advantage`
    passes them from the batch):
        old_log_probs: [B, T] rollout policy's log-probs, read when uncertainty="surprisal" (verl's default here).
        entropys: [B, T] per-token entropies, read when uncertainty="entropy".

    Returns:
        (advantages [B, T] modulated, returns [B, T] of the base estimator, unchanged).

    Raises:
        ValueError naming `old_log_probs=` / `entropys=` when the one the config reads is missing.
    """
    _LAST_METRICS.clear()
    aem_config, base_name, turn_level = aem_settings(config)
    values = _uncertainty_values(aem_config, response_mask, old_log_probs, entropys)
    base_fn = get_adv_estimator_fn(base_name)
    base_kwargs = {"token_level_rewards": token_level_rewards, "response_mask": response_mask, "index": index,
                   "config": config, **kwargs}
    params = inspect.signature(base_fn).parameters
    if "norm_adv_by_std_in_grpo" in params and config is not None:
        base_kwargs["norm_adv_by_std_in_grpo"] = config.get("norm_adv_by_std_in_grpo", True)
    if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        base_kwargs = {k: v for k, v in base_kwargs.items() if k in params}
    advantages, returns = base_fn(**base_kwargs)
    modulated, metrics = modulate_token_advantages(advantages, response_mask, index, values.to(advantages.device),
                                                   aem_config, turn_level=turn_level)
    _LAST_METRICS.update({name: value.item() for name, value in metrics.items() if value.dim() == 0})
    return modulated, returns
