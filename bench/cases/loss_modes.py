"""The policy-loss modes as each framework's users compute them, for the per-mode AEM loss case (`aem_loss.py`).

A user without this package, who wants mode M with AEM, materialises the log-softmax of the logits, takes the
per-token log-probs (with a gradient) and entropies (without), modulates the response advantages with AEM (the
package's O(R) `ak.modulate_advantages` on the mean token entropy of each response, as the existing loss case's
other lines do), and calls the framework's own loss function on `[B, T]` tensors, one response per row:

    verl 0.9.1 modes  `verl.trainer.ppo.core_algos.get_policy_loss_fn(mode)` with a real `ActorConfig` (and its
                      `PolicyLossConfig`) built from the `AEMConfig`: verl's code, unchanged
    TRL 1.16 types    the per-token loss and the aggregation of `GRPOTrainer._compute_loss` (one process, no
                      gradient accumulation, no KL, no entropy bonus), written below as a plain function: calling
                      TRL's method needs a trainer (a model, a dataset, accelerate), which no user's loss
                      function has. python_tests/loss/test_loss_modes_trl.py checks the package against the real
                      `_compute_loss`; the benchmark's correctness gate checks these functions against the package

The normalisers this package needs to equal them (`our_normalisers`): verl's defaults need none; TRL's dr_grpo
divides by B x max_completion_length (here the row length T), which the package takes as `loss_scale_factor`.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Callable, Dict, Optional

import torch

import aem_kernels as ak
from aem_kernels.config import LOSS_MODES, TRL_LOSS_MODES, VERL_LOSS_MODES

__all__ = ["LOSS_MODES", "framework", "framework_loss", "mode_config", "our_normalisers", "verl_unavailable"]

DRO_BETA = 0.1   # dro has no default (AEMConfig and verl both require it); any positive value exercises it


def mode_config(mode: str) -> ak.AEMConfig:
    """The paper's default `AEMConfig` (AEM on) with loss mode `mode`, as the existing loss case uses it."""
    return ak.AEMConfig(loss_mode=mode, dro_beta=DRO_BETA if mode == "dro" else None)


def framework(mode: str) -> str:
    return "verl" if mode in VERL_LOSS_MODES else "trl"


def our_normalisers(config: ak.AEMConfig, horizon: int) -> Dict[str, float]:
    """The keywords of `ak.aem_policy_loss` that make its aggregation the framework's on these batches."""
    return {"loss_scale_factor": float(horizon)} if config.loss_mode == "dr_grpo" else {}


@functools.lru_cache(maxsize=None)
def verl_unavailable() -> Optional[str]:
    """None when verl's policy losses import (verl/__init__ imports Ray; ~10 s the first time), else why not."""
    try:
        for module in ("verl.trainer.ppo.core_algos", "verl.workers.config"):
            importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install
        return f"verl's policy losses cannot be imported ({type(exc).__name__}: {str(exc)[:160]})"
    return None


def _verl_actor(config: ak.AEMConfig):
    """verl's `ActorConfig` with the config's clip range, dual clip, aggregation and mode hyper-parameters."""
    from verl.workers.config import ActorConfig, PolicyLossConfig

    policy = PolicyLossConfig(loss_mode=config.loss_mode, clip_cov_ratio=config.clip_cov_ratio,
                              clip_cov_lb=config.clip_cov_lb, clip_cov_ub=config.clip_cov_ub,
                              kl_cov_ratio=config.kl_cov_ratio, ppo_kl_coef=config.ppo_kl_coef,
                              dro_beta=config.dro_beta)
    actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=config.clip_low,
                        clip_ratio_low=config.clip_low, clip_ratio_high=config.clip_high,
                        clip_ratio_c=config.dual_clip, loss_agg_mode=config.loss_agg_mode, tau_pos=config.tau_pos,
                        tau_neg=config.tau_neg, policy_loss=policy)
    actor.global_batch_info.update(dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None)
    return actor


def _verl_policy_loss(config: ak.AEMConfig) -> Callable[..., torch.Tensor]:
    """verl's loss function for the mode and its actor config, both built once, as a trainer builds them."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    loss_fn, actor = get_policy_loss_fn(config.loss_mode), _verl_actor(config)

    def policy_loss(logprobs, old_logprobs, token_advantages, mask):
        loss, _metrics = loss_fn(old_logprobs, logprobs, token_advantages, mask, config.loss_agg_mode, actor, None)
        return loss

    return policy_loss


def _vespo_weights(config, log_ratio, advantages, mask):
    """TRL's Gamma weights phi(w) = exp(lam + k log w - lam w), w the response's summed (clamped) log-ratio;
    detached (TRL computes them under no_grad)."""
    floor = math.log(1e-8)
    with torch.no_grad():
        log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True).clamp(floor, 20.0)
        nonneg = advantages >= 0
        k = torch.where(nonneg, config.vespo_k_pos, config.vespo_k_neg)
        lam = torch.where(nonneg, config.vespo_lambda_pos, config.vespo_lambda_neg).clamp(min=1e-4)
        return (lam + k * log_w - lam * log_w.exp()).exp().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _trl_loss(config, logprobs, old_logprobs, advantages, mask):
    """`GRPOTrainer._compute_loss`'s policy term: advantages [B, 1], log-probs and mask [B, T]."""
    mode = config.loss_mode
    log_ratio = logprobs - old_logprobs
    if mode == "luspo":   # the loss type's default importance_sampling_level: the response's mean log-ratio
        log_weights = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    else:
        log_weights = log_ratio
    ratio = log_weights.exp()
    if mode == "vespo":
        per_token = -_vespo_weights(config, log_ratio, advantages, mask) * advantages * logprobs
    else:
        clipped = ratio.clamp(1 - config.clip_low, 1 + config.clip_high)
        per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    masked = per_token * mask
    if mode == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if mode == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if mode == "dr_grpo":   # B x max_completion_length
        return masked.sum() / (mask.shape[0] * mask.shape[1])
    if mode in ("dapo", "vespo"):   # num_items_in_batch: the batch's completion tokens
        return masked.sum() / mask.sum().clamp(min=1.0)
    if mode == "luspo":
        return masked.sum(-1).mean()
    raise ValueError(f"not a TRL loss type of this package: {mode!r}")


def framework_loss(config: ak.AEMConfig) -> Callable[..., torch.Tensor]:
    """fn(logprobs, entropy, old_logprobs, advantages, response_group, mask) -> the framework's loss for
    `config.loss_mode` with AEM, from a line's own log-probs [B, T] (with a gradient) and entropies [B, T]
    (without), one response per row: `mask` [B, T] bool marks the trained tokens, `advantages` and
    `response_group` are [B]. The framework's configuration is built here, once, outside the loss (a compiled
    loss traces only the loss)."""
    trl = config.loss_mode in TRL_LOSS_MODES
    verl_loss = None if trl else _verl_policy_loss(config)

    def loss(logprobs, entropy, old_logprobs, advantages, response_group, mask):
        weights = mask.to(torch.float32)
        uncertainty = (entropy.float() * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)   # x_r: mean entropy
        modulated, _ = ak.modulate_advantages(advantages, uncertainty, response_group, config)
        logprobs = logprobs.float()
        if trl:
            return _trl_loss(config, logprobs, old_logprobs, modulated[:, None], weights)
        return verl_loss(logprobs, old_logprobs, modulated[:, None] * weights, weights)

    return loss


assert set(LOSS_MODES) == set(VERL_LOSS_MODES) | set(TRL_LOSS_MODES)
