"""Corrections around the loss mode: verl's rollout correction, TRL's vLLM importance sampling, and TRL's
high-entropy token selection. All O(N) over tokens or O(R) over responses (segment reductions over
`token_response`), without gradient.

The inference engine samples from pi_rollout, the trainer's old policy is pi_old; with the per-token log-ratio
lr_t = l^old_t - l^rollout_t (of the trained tokens):

verl 0.9.1 (`rollout_corr_helper.compute_rollout_correction_and_rejection_mask`):
    rollout_is="token":     rho_t = exp(clamp(lr_t, -20, 20))
    rollout_is="sequence":  rho_t = exp(clamp(sum_{t' in r} lr_t', -20, 20)) for every token of response r
    threshold "upper" (TIS): rho <- min(rho, upper);  "lower_upper" (IcePop): rho <- 0 outside [lower, upper]
    rollout_is_batch_normalize: rho /= its mean over the batch (tokens, or non-empty responses)
    rollout_rs: k1 = -lr, k2 = lr^2 / 2, k3 = exp(lr) - 1 - lr (lr clamped at +-20) per token, or their sum /
        mean / max per response; a token (or a whole response) outside the threshold is rejected, i.e. removed
        from the response mask, every listed option having to pass.
TRL 1.16 (`GRPOTrainer._generate_and_score_completions`, `vllm_importance_sampling_mode`):
    token_*: rho_t = exp(lr_t);  sequence_*: rho_t = exp(sum_{t' in r} lr_t') (no clamp before exp, as TRL)
    *_truncate: rho <- clamp(rho, clip_min, clip_max);  *_mask: rho <- 0 outside [clip_min, clip_max]

A rejected token leaves the aggregation (it counts in no denominator: token-mean's token count, the seq-mean
modes' non-empty responses) and AEM's x_r (the response's mean entropy/surprisal is over its remaining tokens;
a wholly rejected response has no trained token, so it takes no part in its group's statistics and gets w = 1),
exactly as verl multiplies its response_mask. An IS weight of 0 (IcePop, TRL's *_mask) instead keeps the token
in every denominator with a zero loss, as both frameworks do.

The weights and masks are per token or per response, so they are the same on every data-parallel rank whatever
`process_group` is; the process group enters only the batch-normalisation mean and the metrics (whole-batch
values with a group, this rank's without: verl computes them on its driver over the whole batch).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, Optional, Tuple

import torch

from .. import collectives as C
from ..config import AEMConfig, rollout_is_bounds, rollout_rs_bounds
from ..ops.segment import segment_broadcast, segment_count, segment_sum
from .inputs import PackedBatch, check_correction_inputs, rollout_corrections_on

__all__ = ["apply_rollout_corrections", "entropy_token_mask"]

_SAFETY_BOUND = 20.0   # verl's clamp of log-ratios before exp (exp(20) ~ 4.9e8)
_VERL_EPS = 1e-8       # verl's masked_mean denominator epsilon, kept so that thresholds decide alike


class _Stats:
    """Masked means, maxima and minima over the batch (over every rank of `group`), as 0-d tensors."""

    def __init__(self, group) -> None:
        self.group = group

    def mean(self, values: torch.Tensor, valid: Optional[torch.Tensor] = None, eps: float = 0.0) -> torch.Tensor:
        return C.masked_mean(values, valid, self.group, eps)

    def extreme(self, values: torch.Tensor, valid: Optional[torch.Tensor], reduce: str) -> torch.Tensor:
        fill = float("-inf") if reduce == "max" else float("inf")
        local = torch.cat([(values if valid is None else torch.where(valid, values, fill)).reshape(-1),
                           values.new_full((1,), fill)])   # the fill keeps an empty batch reducible
        local = local.amax() if reduce == "max" else local.amin()
        out = C.all_reduce(local.reshape(1), reduce, self.group)[0]
        return torch.where(torch.isfinite(out), out, 0.0)  # no token anywhere: 0, not an infinity


def _response_max(values: torch.Tensor, token_response: torch.Tensor, num_responses: int) -> torch.Tensor:
    """Per-response max [R]; 0 for a response without tokens (verl's seq_max)."""
    safe = torch.where(token_response >= 0, token_response, num_responses)
    out = values.new_full((num_responses + 1,), float("-inf")).scatter_reduce(0, safe, values, "amax")[:-1]
    return torch.where(torch.isinf(out), 0.0, out)


def _verl_is_weights(lr: torch.Tensor, trained: torch.Tensor, batch: PackedBatch, config: AEMConfig,
                     stats: _Stats, metrics: Dict[str, torch.Tensor]) -> torch.Tensor:
    tr, num_responses = batch.token_response, batch.num_responses
    upper, lower = rollout_is_bounds(config.rollout_is_threshold)
    if config.rollout_is == "token":
        log_w = lr
    else:
        seq_lr = segment_sum(lr, tr, num_responses)
        log_w = segment_broadcast(seq_lr, tr)
    raw = torch.where(trained, log_w.clamp(-_SAFETY_BOUND, _SAFETY_BOUND).exp(), 0.0)
    if lower is None:   # TIS
        weights = raw.clamp(max=upper)
    else:               # IcePop
        weights = torch.where((raw >= lower) & (raw <= upper), raw, 0.0)

    lower_metric = 1.0 / upper if lower is None else lower
    metrics["rollout_is_mean"] = stats.mean(weights, trained)
    if config.rollout_is == "token":
        metrics["rollout_is_max"] = stats.extreme(weights, trained, "max")
        metrics["rollout_is_min"] = stats.extreme(weights, trained, "min")
        metrics["rollout_is_ratio_fraction_high"] = stats.mean((raw > upper).to(lr.dtype), trained)
        metrics["rollout_is_ratio_fraction_low"] = stats.mean((raw < lower_metric).to(lr.dtype), trained)
    else:   # over every response, as verl's rows, from the unclamped log-ratio sums
        metrics["rollout_is_max"] = stats.extreme(seq_lr, None, "max").clamp(max=_SAFETY_BOUND).exp()
        metrics["rollout_is_min"] = stats.extreme(seq_lr, None, "min").exp()
        metrics["rollout_is_ratio_fraction_high"] = stats.mean((seq_lr > math.log(upper)).to(lr.dtype))
        metrics["rollout_is_ratio_fraction_low"] = stats.mean((seq_lr < math.log(lower_metric)).to(lr.dtype))
    if lower is not None:
        metrics["rollout_is_oob_ratio"] = stats.mean(((raw < lower) | (raw > upper)).to(lr.dtype), trained)
    # effective sample size of the truncated weights: 1 / mean((w / mean w)^2)
    clamped = weights.clamp(min=0.0, max=upper)
    normalised = clamped / (stats.mean(clamped, trained) + _VERL_EPS)
    second_moment = stats.mean(normalised.square(), trained)
    # every weight 0 (IcePop) or no token: 0, where verl's 1 / 0.0 would raise
    metrics["rollout_is_eff_sample_size"] = torch.where(second_moment > 0, 1.0 / second_moment, 0.0)

    if config.rollout_is_batch_normalize:
        if config.rollout_is == "token":
            # verl: masked_mean (its + 1e-8 in the denominator) in one process, the exact global mean over ranks
            mean = stats.mean(weights, trained, eps=_VERL_EPS if stats.group is None else 0.0)
        else:
            counts = segment_count(tr, num_responses).to(lr.dtype)
            per_response = segment_sum(weights, tr, num_responses) / (counts + _VERL_EPS)
            mean = stats.mean(per_response, counts > 0)
        usable = mean > _VERL_EPS
        weights = torch.where(usable, weights / torch.where(usable, mean, 1.0), weights)
        metrics["rollout_is_batch_norm_factor"] = torch.where(usable, mean, 1.0)
    return weights


def _verl_rejection(lr: torch.Tensor, trained: torch.Tensor, batch: PackedBatch, config: AEMConfig,
                    stats: _Stats, metrics: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Kept tokens [N] bool after every `rollout_rs` option."""
    tr, num_responses = batch.token_response, batch.num_responses
    safe = lr.clamp(-_SAFETY_BOUND, _SAFETY_BOUND)
    token_stats = {"k1": -safe, "k2": 0.5 * safe ** 2, "k3": safe.exp() - 1.0 - safe}
    counts = segment_count(tr, num_responses).to(lr.dtype)
    keep = torch.ones_like(trained)
    for option, (lower, upper) in rollout_rs_bounds(config.rollout_rs, config.rollout_rs_threshold).items():
        level, estimator = option.rsplit("_", 1)
        stat = torch.where(trained, token_stats[estimator], 0.0)
        if level == "seq_sum":
            stat = segment_sum(stat, tr, num_responses)
        elif level == "seq_mean":
            stat = segment_sum(stat, tr, num_responses) / (counts + _VERL_EPS)
        elif level == "seq_max":
            stat = _response_max(stat, tr, num_responses)
        if estimator == "k1":   # ratio bounds, compared in log space
            passed = (stat >= math.log(lower)) & (stat <= math.log(upper))
        else:
            passed = stat <= upper
        if level != "token":
            passed = segment_broadcast(passed, tr)
        option_keep = passed | ~trained
        keep = keep & option_keep
        metrics[f"rollout_rs_{option}_masked_fraction"] = stats.mean((~option_keep).to(lr.dtype), trained)
    rejected = trained & ~keep
    metrics["rollout_rs_masked_fraction"] = stats.mean(rejected.to(lr.dtype), trained)
    # over every response, as verl's rows (an empty one counts as not masked)
    metrics["rollout_rs_seq_masked_fraction"] = stats.mean(
        (segment_sum(rejected.to(lr.dtype), tr, num_responses) > 0).to(lr.dtype))
    return keep


def _verl_offpolicy_metrics(old: torch.Tensor, rollout: torch.Tensor, lr: torch.Tensor, trained: torch.Tensor,
                            batch: PackedBatch, stats: _Stats, metrics: Dict[str, torch.Tensor]) -> None:
    """verl's `compute_offpolicy_metrics` (the per-row means over every response, as verl's rows)."""
    tr, num_responses = batch.token_response, batch.num_responses
    denominator = segment_count(tr, num_responses).to(lr.dtype) + _VERL_EPS
    mean_old = segment_sum(torch.where(trained, old, 0.0), tr, num_responses) / denominator
    mean_rollout = segment_sum(torch.where(trained, rollout, 0.0), tr, num_responses) / denominator
    log_ppl_diff = mean_rollout - mean_old
    metrics["training_ppl"] = stats.mean((-mean_old).exp())
    metrics["training_log_ppl"] = stats.mean(-mean_old)
    metrics["rollout_ppl"] = stats.mean((-mean_rollout).exp())
    metrics["rollout_log_ppl"] = stats.mean(-mean_rollout)
    metrics["log_ppl_diff"] = stats.mean(log_ppl_diff)
    metrics["log_ppl_abs_diff"] = stats.mean(log_ppl_diff.abs())
    metrics["ppl_ratio"] = stats.mean(log_ppl_diff.exp())
    metrics["kl"] = stats.mean(-lr, trained)
    metrics["k3_kl"] = stats.mean(lr.exp() - lr - 1.0, trained)
    metrics["chi2_token"] = stats.mean((2.0 * lr.clamp(-_SAFETY_BOUND, _SAFETY_BOUND)).exp(), trained) - 1.0
    seq_lr = segment_sum(lr, tr, num_responses).clamp(-_SAFETY_BOUND, _SAFETY_BOUND)
    metrics["chi2_seq"] = stats.mean((2.0 * seq_lr).exp()) - 1.0


def _trl_is_weights(lr: torch.Tensor, trained: torch.Tensor, batch: PackedBatch, config: AEMConfig,
                    stats: _Stats) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    tr, num_responses = batch.token_response, batch.num_responses
    mode = config.vllm_importance_sampling_mode
    low, high = config.vllm_importance_sampling_clip_min, config.vllm_importance_sampling_clip_max
    sequence = mode.startswith("sequence")
    ratio = (segment_sum(lr, tr, num_responses) if sequence else lr).exp()
    if mode.endswith("_truncate"):
        ratio = ratio.clamp(min=low, max=high)
    else:
        outside = (ratio < (-math.inf if low is None else low)) | (ratio > (math.inf if high is None else high))
        ratio = ratio.masked_fill(outside, 0.0)
    valid = None if sequence else trained   # TRL's statistics: every sequence, or the trained tokens
    delta = lr.abs()
    metrics = {
        "sampling/sampling_logp_difference/mean": stats.mean(delta, trained),
        "sampling/sampling_logp_difference/max": stats.extreme(delta, trained, "max"),
        "sampling/importance_sampling_ratio/min": stats.extreme(ratio, valid, "min"),
        "sampling/importance_sampling_ratio/mean": stats.mean(ratio, valid),
        "sampling/importance_sampling_ratio/max": stats.extreme(ratio, valid, "max"),
    }
    weights = segment_broadcast(ratio, tr) if sequence else ratio
    return weights, metrics


def apply_rollout_corrections(batch: PackedBatch, config: AEMConfig
                              ) -> Tuple[PackedBatch, Optional[torch.Tensor], Dict[str, torch.Tensor]]:
    """verl's rollout correction (config.rollout_is, rollout_rs) or TRL's vLLM importance sampling
    (config.vllm_importance_sampling_mode) from `batch.old_logprobs` and `batch.rollout_logprobs`.

    Known before the forward (old and rollout log-probs only), so a single pass can use it. The loss multiplies
    each token's policy-loss term by the weight (verl: pg_losses * rollout_is_weights; TRL: per_token_loss *
    importance_sampling_ratio), and aggregates over the returned batch's trained tokens.

    Args:
        batch: the packed batch (`loss_batch`); old_logprobs and rollout_logprobs [N] are needed when a
            correction is on (ValueError naming the missing one).
        config: `AEMConfig`; rollout_is, rollout_is_threshold, rollout_is_batch_normalize, rollout_rs,
            rollout_rs_threshold, vllm_importance_sampling_mode and its clip bounds are read.

    Returns:
        (batch, weights, metrics): the batch with rejected tokens' token_response set to -1 and their labels to
        ignore_index (a copy when rollout_rs is set, else the input batch); the per-token importance weights [N]
        (fp32 or wider, 0 on untrained and rejected tokens), or None when neither rollout_is nor
        vllm_importance_sampling_mode is set; detached 0-d metrics (no host sync) under verl's names, a subset
        of verl's ("rollout_corr/rollout_is_mean", ".../rollout_rs_masked_fraction", ".../kl", ...), and TRL's
        ("sampling/importance_sampling_ratio/mean", ...). Every correction off: (batch, None, {}).
    """
    if not rollout_corrections_on(config):
        return batch, None, {}
    check_correction_inputs(batch, config)
    with torch.no_grad():
        dtype = torch.promote_types(torch.promote_types(batch.old_logprobs.dtype, batch.rollout_logprobs.dtype),
                                    torch.float32)
        old, rollout = batch.old_logprobs.detach().to(dtype), batch.rollout_logprobs.detach().to(dtype)
        trained = batch.token_response >= 0
        lr = torch.where(trained, old - rollout, 0.0)
        stats = _Stats(batch.process_group)
        verl: Dict[str, torch.Tensor] = {}
        metrics: Dict[str, torch.Tensor] = {}
        weights = None
        if config.rollout_is is not None:
            weights = _verl_is_weights(lr, trained, batch, config, stats, verl)
        elif config.vllm_importance_sampling_mode is not None:
            weights, metrics = _trl_is_weights(lr, trained, batch, config, stats)
        if config.rollout_is is not None or config.rollout_rs is not None:
            _verl_offpolicy_metrics(old, rollout, lr, trained, batch, stats, verl)
        if config.rollout_rs is not None:
            keep = _verl_rejection(lr, trained, batch, config, stats, verl)
            batch = _with_token_response(batch, torch.where(keep, batch.token_response, -1), config.ignore_index)
        if weights is not None:
            weights = torch.where(batch.token_response >= 0, weights, 0.0)
        metrics.update({f"rollout_corr/{name}": value for name, value in verl.items()})
    return batch, weights, metrics


def _with_token_response(batch: PackedBatch, token_response: torch.Tensor, ignore_index: int) -> PackedBatch:
    """A copy of the batch with fewer trained tokens; their labels become ignore_index, as `pack_inputs` makes
    every untrained token's, so that no backend reads their logits rows."""
    labels = torch.where(token_response.reshape(batch.labels.shape) >= 0, batch.labels, ignore_index)
    return replace(batch, token_response=token_response, labels=labels)


def entropy_token_mask(entropy: torch.Tensor, batch: PackedBatch, config: AEMConfig) -> Optional[torch.Tensor]:
    """TRL's `top_entropy_quantile` (`GRPOTrainer.get_high_entropy_mask`): the trained tokens whose entropy is at
    or above the (1 - q) quantile (torch.quantile's linear interpolation, in fp32) of the trained tokens'
    entropies, over every rank of `batch.process_group` (TRL gathers them across processes).

    The loss multiplies the per-token policy-loss term by the mask and keeps the aggregation's denominators (TRL:
    per_token_loss * entropy_mask, then its usual normalisation over the completion mask).

    Args:
        entropy: [N] per-token entropies of this forward (detached here).
        batch: the packed batch (its token_response picks the trained tokens).
        config: `AEMConfig` (top_entropy_quantile q in [0, 1]).

    Returns:
        bool [N] (True: kept; always False on untrained tokens), or None when q == 1 (every token kept).
    """
    quantile = config.top_entropy_quantile
    if quantile >= 1.0:
        return None
    trained = batch.token_response >= 0
    with torch.no_grad():
        values = entropy.detach().reshape(-1).float()
        pool = _gather_trained(values[trained], batch.process_group)
        if pool.numel() == 0:
            return torch.zeros_like(trained)
        threshold = _quantile(pool, 1.0 - quantile)
        return (values >= threshold) & trained


def _gather_trained(values: torch.Tensor, group) -> torch.Tensor:
    """Every rank's trained-token values, concatenated (padded to the longest rank for the all-gather)."""
    if group is None:
        return values
    count = values.new_tensor([values.numel()], dtype=torch.long)
    longest = int(C.all_reduce(count.clone(), "max", group)[0])
    padded = torch.cat([values, values.new_full((longest - values.numel(),), float("nan"))])
    gathered = C.all_gather_rows(padded, group).reshape(-1)
    return gathered[~torch.isnan(gathered)]


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(values, q) (linear interpolation, the rank q * (n - 1) in values' dtype) from two
    kthvalue selections: O(n), and no 16M-element limit."""
    n = values.numel()
    rank = values.new_tensor(q) * (n - 1)
    below, above = int(rank.floor()), int(rank.ceil())
    low = torch.kthvalue(values, below + 1).values
    high = low if above == below else torch.kthvalue(values, above + 1).values
    return torch.lerp(low, high, rank - below)
