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
from aem_kernels.config import LOSS_MODES

from .batching import PolicyBatch

__all__ = ["BASE_METHODS", "METHODS", "METHOD_MODES", "MODE_METHODS", "MODE_SETTINGS", "loss_config", "grpo_advantages", "split_by_group", "policy_terms", "ppo_update",
           "response_entropies", "measured_entropy_change"]

BASE_METHODS = ("grpo", "aem", "entropy", "clip_higher", "entropy_tokens")
# every policy-loss mode of `ak.AEMConfig.loss_mode` but vanilla (= method "grpo") is a method, alone and with
# AEM; TRL's loss type "grpo" is method "trl_grpo" (method "grpo" is verl's vanilla loss at beta 0)
METHOD_MODES = {("trl_grpo" if mode == "grpo" else mode): mode for mode in LOSS_MODES if mode != "vanilla"}
MODE_METHODS = tuple(METHOD_MODES)
METHODS = BASE_METHODS + MODE_METHODS + tuple(f"{method}_aem" for method in MODE_METHODS)

# the settings a mode's method trains with besides loss_mode (its framework's recommendation):
#   gspo: sequence-level ratios clipped to [1 - 3e-4, 1 + 4e-4] and seq-mean-token-mean, as the GSPO paper and
#         verl's GSPO example run it (a token-level clip range of 0.2 leaves a sequence ratio unclipped)
#   dro:  verl has no default for its quadratic penalty (dro_beta must be set); 0.1 here
MODE_SETTINGS = {"gspo": dict(clip_low=3e-4, clip_high=4e-4, loss_agg_mode="seq-mean-token-mean"),
                 "dro": dict(dro_beta=0.1)}


def loss_config(method: str, beta: float, *, entropy_coef: float = 0.0, clip_high: float = 0.2,
                top_entropy_quantile: float = 0.2, **overrides) -> ak.AEMConfig:
    """The loss configuration of a method, every one an `ak.AEMConfig` (so every one goes through
    `ak.aem_policy_loss`):

        "grpo"            AEMConfig(beta=0): plain GRPO exactly
        "aem"             the paper's default AEMConfig with the given beta
        "entropy"         GRPO plus an entropy bonus: AEMConfig(beta=0, entropy_coef=entropy_coef)
        "clip_higher"     GRPO with DAPO's asymmetric ratio clip: AEMConfig(beta=0, clip_high=clip_high)
        "entropy_tokens"  GRPO on the high-entropy tokens only (the "80/20" selection, TRL's
                          top_entropy_quantile): AEMConfig(beta=0, top_entropy_quantile=top_entropy_quantile)
        "<mode>"          a policy-loss mode of `LOSS_MODES` (gspo, clip_cov, ...; TRL's grpo type is "trl_grpo"),
                          beta 0, with `MODE_SETTINGS`
        "<mode>_aem"      the same mode on AEM-modulated advantages (the given beta)

    `beta` is used by "aem" and "*_aem" only, `entropy_coef` by "entropy", `clip_high` by "clip_higher",
    `top_entropy_quantile` by "entropy_tokens"; `overrides` set the remaining fields (KL, temperature, spread
    floors, ...)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    base = method[:-len("_aem")] if method.endswith("_aem") else method
    fields = {"beta": beta if method == "aem" or method.endswith("_aem") else 0.0}
    if method == "entropy":
        fields["entropy_coef"] = entropy_coef
    if method == "clip_higher":
        fields["clip_high"] = clip_high
    if method == "entropy_tokens":
        fields["top_entropy_quantile"] = top_entropy_quantile
    if base in METHOD_MODES:
        mode = METHOD_MODES[base]
        fields.update(loss_mode=mode, **MODE_SETTINGS.get(mode, {}))
    return ak.AEMConfig(**{**fields, **overrides})


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


def response_entropies(batch: PolicyBatch, entropy: torch.Tensor) -> torch.Tensor:
    """Response entropy [R'] (mean token entropy of each response, eq. 3') of the batch's non-empty
    responses, from per-token entropies [B, T-1] (e.g. `policy_terms(...)[1]`)."""
    trained = batch.token_response >= 0
    per_response = ak.response_entropy(entropy, batch.token_response, batch.num_responses)
    nonempty = torch.bincount(batch.token_response[trained], minlength=batch.num_responses) > 0
    return per_response[nonempty]


def measured_entropy_change(minibatches: Sequence[PolicyBatch], before: Sequence[torch.Tensor],
                            after: Sequence[torch.Tensor]) -> Dict[str, float]:
    """The entropy change the predicted drift D (AEM_SPEC eq. 6) predicts, measured: the mean response
    entropy of the same sampled responses under the rollout policy (`before`, per-token entropies of each
    minibatch) and under the updated policy (`after`, one no-grad forward after the optimizer steps)."""
    old = torch.cat([response_entropies(b, e) for b, e in zip(minibatches, before)])
    new = torch.cat([response_entropies(b, e) for b, e in zip(minibatches, after)])
    if old.numel() == 0:
        return {}
    return {"drift/entropy_before": float(old.mean()), "drift/entropy_after": float(new.mean()),
            "drift/measured": float((new - old).mean())}
