"""GRPO advantages and the PPO-style update through `ak.aem_policy_loss` (GRPO = beta 0, GRPO+AEM = beta > 0).

One training step on a batch of trajectories (see `loop.py` for the whole step):

1. outcome advantages, group-normalised as in GRPO:  A_i = (R_i - mean_g R) / (std_g R + 1e-6)
   (unbiased std, as verl's `compute_grpo_outcome_advantage`; a group whose rewards are all equal gets 0);
2. the trajectories are split into minibatches *by group* (AEM's min-max and its weight normalisation are
   taken over a response's group, so a group is never cut in two);
3. old log-probs (and reference log-probs for the KL term) are computed once, before any update;
4. `ppo_epochs` passes over the minibatches, each an `ak.causal_lm_aem_policy_loss` call (the policy's
   hidden states through its LM head by the fused linear op: the logits are never built) with the packed
   token_response / response_group: AEM turns A_r into w_r A_r (AEM_SPEC eq. 7), then the clipped
   surrogate (eq. 8), then Adam with gradient-norm clipping.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

import aem_kernels as ak

from .batching import PolicyBatch

__all__ = ["METHODS", "loss_config", "grpo_advantages", "split_by_group", "policy_terms", "ppo_update"]

METHODS = ("grpo", "aem")


def loss_config(method: str, beta: float, **overrides) -> ak.AEMConfig:
    """The loss configuration of a method: "grpo" is AEMConfig(beta=0) (plain GRPO exactly), "aem" the
    paper's default AEMConfig with the given beta. `overrides` set the remaining fields (clip, KL, ...)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return ak.AEMConfig(beta=0.0 if method == "grpo" else beta, **overrides)


def grpo_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised outcome advantages [B] for rewards [B] and group ids [B] (0..G-1)."""
    num_groups = int(groups.max()) + 1
    ones = torch.ones_like(rewards)
    count = torch.zeros(num_groups).index_add(0, groups, ones)
    mean = torch.zeros(num_groups).index_add(0, groups, rewards) / count
    centred = rewards - mean[groups]
    var = torch.zeros(num_groups).index_add(0, groups, centred ** 2) / (count - 1).clamp(min=1)
    return centred / (var.sqrt()[groups] + eps)


def split_by_group(groups: Sequence[int], num_minibatches: int) -> List[List[int]]:
    """Trajectory indices split into `num_minibatches` lists of whole groups (contiguous group ranges)."""
    order = sorted(set(groups))
    per = -(-len(order) // num_minibatches)
    chunks = [set(order[i:i + per]) for i in range(0, len(order), per)]
    return [[i for i, g in enumerate(groups) if g in chunk] for chunk in chunks]


@torch.no_grad()
def policy_terms(model: torch.nn.Module, batch: PolicyBatch, temperature: float = 1.0
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token (log-prob, entropy) [B, T-1] of the labels under `model`, without gradient."""
    was_training = model.training
    model.eval()
    # labels [B, T-1] = input_ids[:, 1:]: position t predicts token t+1 (no logits are built)
    logprobs, entropy = ak.causal_lm_logprobs_and_entropy(model, batch.input_ids,
                                                          attention_mask=batch.attention_mask,
                                                          labels=batch.labels, temperature=temperature)
    model.train(was_training)
    return logprobs, entropy


def _weight_stats(weights: torch.Tensor, valid: torch.Tensor) -> Dict[str, float]:
    w = weights[valid]
    if w.numel() == 0:
        return {}
    return {"aem/w_min": float(w.min()), "aem/w_max": float(w.max())}


def ppo_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, minibatches: Sequence[PolicyBatch],
               old_logprobs: Sequence[torch.Tensor], config: ak.AEMConfig, *, epochs: int,
               max_grad_norm: float, ref_logprobs: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, float]:
    """`epochs` passes of clipped-surrogate updates; returns metrics averaged over the first epoch's
    minibatches (the on-policy pass: AEM's weights and the predicted drift of the sampled batch) plus the
    last epoch's PPO statistics (clip fraction, approximate KL) under "ppo/last_*"."""
    model.train()
    first: Dict[str, List[float]] = {}
    last: Dict[str, List[float]] = {}
    for epoch in range(epochs):
        for i, batch in enumerate(minibatches):
            loss, metrics = ak.causal_lm_aem_policy_loss(
                model, batch.input_ids, batch.advantages, attention_mask=batch.attention_mask, labels=batch.labels,
                token_response=batch.token_response, response_group=batch.response_group,
                old_logprobs=old_logprobs[i], ref_logprobs=None if ref_logprobs is None else ref_logprobs[i],
                config=config, num_groups=batch.num_groups)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            weights = metrics.pop("aem/weights")
            values = {k: float(v) for k, v in metrics.items()}
            values["actor/grad_norm"] = float(grad_norm)
            if epoch == 0:
                valid = torch.zeros(batch.num_responses, dtype=torch.bool, device=weights.device)
                valid[batch.token_response[batch.token_response >= 0]] = True
                values.update(_weight_stats(weights, valid))
                for k, v in values.items():
                    first.setdefault(k, []).append(v)
            if epoch == epochs - 1:
                for k in ("actor/pg_clipfrac", "actor/ppo_kl"):
                    last.setdefault(k, []).append(values[k])
    out = {k: sum(v) / len(v) for k, v in first.items()}
    for k in ("aem/w_min", "aem/w_max"):  # extremes over the batch, not averages
        if k in first:
            out[k] = (min if k.endswith("min") else max)(first[k])
    out.update({f"ppo/last_{k.split('/')[1]}": sum(v) / len(v) for k, v in last.items()})
    return out
