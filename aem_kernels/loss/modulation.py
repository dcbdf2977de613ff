"""AEM advantage modulation: relative uncertainty (eq. 4-5), weights (eq. 7) and the batch metrics.

Everything here is O(R) over responses, so it is plain PyTorch on every backend: group statistics are
scatter reductions into [G] buckets (no Python loop over groups, no host sync once G is known).

Given the response uncertainty x_r (mean token entropy by default) and the group g(r) of each response:

    u_r = (x_r - min_g x) / (max_g x - min_g x)      ("minmax", the paper; 0 when the spread < floor_g)
    u_r = x_r - mean_g x | x_r - mean_{g, r' != r} x | x_r - mean_all x     ("mean" | "loo" | "batch")
    w_r = clip( phi(-sign * beta * u_r) / mean_{r' in N(r)} phi(-sign * beta * u_r'), w_min, w_max )
    A~_r = w_r * A_r

Spread floors: min-max is scale-free, so in a group whose responses are all about equally uncertain the noise
of x would become full-strength weights. u_r is therefore 0 in a group whose spread max_g x - min_g x is below
floor_g = max(spread_floor, relative_spread_floor * |mean_g x|) (the spec's 1e-8 alone by default). With
zscore, whose divisor is the group (or batch) std, u_r is 0 where that std is below relative_spread_floor *
|mean| (the absolute floor does not apply there: the std keeps its own +1e-6, unchanged). The plain centred
baselines ("mean", "loo", "batch" without zscore) divide by nothing: their u keeps the scale of x, so a group of
near-equal x already gets near-zero u and no floor applies.

Responses with no trained token (`valid` False) take no part in any statistic and get u = 0, w = 1: they
contribute nothing to the loss, and letting their undefined uncertainty move their group's min, max or
mean would change the other responses' weights. w and u are computed without gradient (like advantages).

The predicted entropy drift of eq. 6, reported per batch, is D = (1/R) sum_r A~_r (x_r - mean_g x).

With a `process_group` (data parallelism), each rank passes its own responses with GLOBAL group ids, and every
statistic above (group min/max, sums, counts, squared deviations; batch means; the metrics) is the all_reduce
of the ranks' [G + 1]- or [1]-sized partial reductions, so the weights and metrics equal those of one process
holding the whole batch. `process_group=None` keeps every statistic rank-local.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import collectives as C
from .. import validation as V
from ..config import AEMConfig

__all__ = ["aem_metrics", "aem_weights", "aem_weights_checked", "modulate_advantages", "relative_uncertainty"]

_SPREAD_EPS = 1e-8
_STD_EPS = 1e-6


def _buckets(response_group: torch.Tensor, valid: Optional[torch.Tensor], num_groups: int) -> torch.Tensor:
    """Group id per response, invalid responses sent to an extra bucket `num_groups` that is dropped."""
    if valid is None:
        return response_group
    return torch.where(valid, response_group, num_groups)


def _group_sum(values: torch.Tensor, bucket: torch.Tensor, num_groups: int, group=None) -> torch.Tensor:
    return C.all_reduce(values.new_zeros(num_groups + 1).index_add(0, bucket, values), "sum", group)


def _group_extreme(values: torch.Tensor, bucket: torch.Tensor, num_groups: int, reduce: str,
                   group=None) -> torch.Tensor:
    init = float("inf") if reduce == "amin" else float("-inf")
    local = values.new_full((num_groups + 1,), init).scatter_reduce(0, bucket, values, reduce)
    return C.all_reduce(local, "min" if reduce == "amin" else "max", group)


def _total(value: torch.Tensor, group) -> torch.Tensor:
    """A 0-d sum over the ranks of `group` (itself for None)."""
    return C.all_reduce(value.reshape(1), "sum", group).reshape(())


def _masked_mean_std(values: torch.Tensor, valid: torch.Tensor, group=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std over the valid entries (of every rank of `group`; 0 for none)."""
    count_and_sum = C.all_reduce(torch.stack([valid.sum().to(values.dtype), torch.where(valid, values, 0).sum()]),
                                 "sum", group)
    count = count_and_sum[0].clamp(min=1)
    mean = count_and_sum[1] / count
    var = _total(torch.where(valid, (values - mean) ** 2, 0).sum(), group) / count
    return mean, var.sqrt()


def _check_response_inputs(uncertainty: object, response_group: object, num_groups: object,
                           valid: Optional[object], *, size: Optional[int] = None,
                           device: Optional[torch.device] = None, valid_name: str = "valid", group=None
                           ) -> Tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Checked (uncertainty [R], response_group [R] int64, G, valid [R] bool); num_groups None: max id + 1
    (over every rank of `group`: one all_reduce MAX)."""
    uncertainty = V.check_tensor("uncertainty", uncertainty)
    if size is None:
        if uncertainty.dim() != 1:
            raise ValueError(f"uncertainty must have shape [R], got {tuple(uncertainty.shape)}")
        size = uncertainty.shape[0]
    device = uncertainty.device if device is None else device
    uncertainty = V.check_float_tensor("uncertainty", uncertainty, (size,), device)
    upper = None if num_groups is None else V.check_count("num_groups", num_groups)
    response_group = V.check_index_map("response_group", response_group, (size,), device, upper=upper,
                                       allow_untrained=False)
    local = int(response_group.max()) + 1 if size and upper is None else 0  # host sync
    groups = upper if upper is not None else C.optional_int_max(None, local, device, group)
    if valid is None:
        return uncertainty, response_group, groups, torch.ones(size, dtype=torch.bool, device=device)
    valid = V.check_bool_tensor(valid_name, valid, (size,), device)
    return uncertainty, response_group, groups, valid


def relative_uncertainty(uncertainty: torch.Tensor, response_group: torch.Tensor, num_groups: int, *,
                         baseline: str = "minmax", zscore: bool = False,
                         valid: Optional[torch.Tensor] = None, process_group=None,
                         spread_floor: float = _SPREAD_EPS, relative_spread_floor: float = 0.0) -> torch.Tensor:
    """u_r of eq. 5.

    Args:
        uncertainty: [R] float x_r, finite.
        response_group: [R] int group ids in [0, num_groups).
        num_groups: G.
        baseline: "minmax" (the paper), "mean", "loo" or "batch".
        zscore: divide the centred x by its group (or batch) std.
        valid: optional [R] bool; False responses take no part in any statistic and get u = 0.
        process_group: None (statistics over these responses) or a torch.distributed group whose ranks each
            pass their own responses with global group ids (statistics over all ranks' responses).
        spread_floor, relative_spread_floor: u = 0 in a group whose min-max spread is below
            max(spread_floor, relative_spread_floor * |group mean of x|); with zscore, where the std is below
            relative_spread_floor * |mean| (module docstring). As `AEMConfig`'s fields of these names.

    Returns:
        u [R] in x's dtype, without gradient.
    """
    V.check_choice("baseline", baseline, ("minmax", "mean", "loo", "batch"))
    V.check_bool("zscore", zscore)
    # validated as AEMConfig validates its fields of these names
    floors = AEMConfig(spread_floor=spread_floor, relative_spread_floor=relative_spread_floor)
    group = C.resolve_group(process_group, "process_group", none_is_default=False)
    uncertainty, response_group, num_groups, valid = _check_response_inputs(uncertainty, response_group,
                                                                            num_groups, valid, group=group)
    return _relative_uncertainty(uncertainty, response_group, num_groups, baseline, zscore, valid, group,
                                 floors.spread_floor, floors.relative_spread_floor)


def _relative_uncertainty(uncertainty: torch.Tensor, response_group: torch.Tensor, num_groups: int,
                          baseline: str, zscore: bool, valid: torch.Tensor, group=None,
                          spread_floor: float = _SPREAD_EPS, relative_spread_floor: float = 0.0) -> torch.Tensor:
    x = uncertainty.detach()
    bucket = _buckets(response_group, valid, num_groups)
    ones = torch.ones_like(x)
    group_count = _group_sum(ones, bucket, num_groups, group)
    count = group_count[response_group]
    if baseline == "minmax":
        low = _group_extreme(x, bucket, num_groups, "amin", group)[response_group]
        high = _group_extreme(x, bucket, num_groups, "amax", group)[response_group]
        spread = high - low
        floor = spread_floor
        if relative_spread_floor > 0:  # (the default skips it: one all_reduce fewer, values bitwise unchanged)
            mean = _group_sum(torch.where(valid, x, 0.0), bucket, num_groups, group) / group_count.clamp(min=1)
            floor = (relative_spread_floor * mean[response_group].abs()).clamp(min=spread_floor)
        # spread > 0 keeps 0/0 out when both floors are 0
        wide = valid & (spread >= floor) & (spread > 0)
        return torch.where(wide, (x - low) / torch.where(wide, spread, 1.0), 0.0)
    if baseline == "batch":
        center, _ = _masked_mean_std(x, valid, group)
        centred = x - center
    else:
        total = _group_sum(torch.where(valid, x, 0.0), bucket, num_groups, group)[response_group]
        if baseline == "mean":
            centred = x - total / count.clamp(min=1)
        elif baseline == "loo":
            others = count - 1
            centred = torch.where(others > 0, x - (total - x) / others.clamp(min=1), 0.0)
        else:
            raise ValueError(f"baseline must be 'minmax', 'mean', 'loo' or 'batch', got {baseline!r}")
    centred = torch.where(valid, centred, 0.0)
    if zscore:
        if baseline == "batch":
            n = _total(valid.sum().to(x.dtype), group)
            std = _total((torch.where(valid, centred, 0.0) ** 2).sum(), group).div((n - 1).clamp(min=1)).sqrt()
            mean = center
        else:
            # Unbiased group std (as GRPO's torch.std); a one-response group has std 0.
            mean = _group_sum(torch.where(valid, x, 0.0), bucket, num_groups, group) / group_count.clamp(min=1)
            sq = _group_sum(torch.where(valid, (x - mean[response_group]) ** 2, 0.0), bucket, num_groups, group)
            std = (sq / (group_count - 1).clamp(min=1)).sqrt()[response_group]
            mean = mean[response_group]
        centred = centred / (std + _STD_EPS)
        if relative_spread_floor > 0:
            centred = torch.where(std < relative_spread_floor * mean.abs(), 0.0, centred)
    return centred


def aem_weights(uncertainty: torch.Tensor, response_group: torch.Tensor, config: AEMConfig, *,
                num_groups: int, valid: Optional[torch.Tensor] = None, process_group=None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights w_r of eq. 7.

    Args: as `relative_uncertainty` (process_group included: the normalisation then runs over every rank's
    responses), with `config` (an `AEMConfig`) giving baseline, zscore, beta, phi, sign, normalize, w_min and
    w_max.

    Returns:
        (w [R], u [R], clipped [R] bool), all without gradient; invalid responses get w = 1, u = 0.
    """
    config = V.check_config(config)
    group = C.resolve_group(process_group, "process_group", none_is_default=False)
    uncertainty, response_group, num_groups, valid = _check_response_inputs(uncertainty, response_group,
                                                                            num_groups, valid, group=group)
    return aem_weights_checked(uncertainty, response_group, config, num_groups, valid, group)


def aem_weights_checked(uncertainty: torch.Tensor, response_group: torch.Tensor, config: AEMConfig,
                        num_groups: int, valid: torch.Tensor, group=None
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`aem_weights` on inputs already checked (the loss's own call): (w, u, clipped) [R], without gradient."""
    with torch.no_grad():
        x = uncertainty.detach()
        u = _relative_uncertainty(x, response_group, num_groups, config.baseline, config.zscore, valid, group,
                                  config.spread_floor, config.relative_spread_floor)
        arg = -config.sign * config.beta * u
        # phi = exp is the minimiser of sum w u + KL(w || uniform)/beta under mean(w) = 1 (section 4);
        # the linear variant is clamped at 0 so a weight never flips an advantage's sign.
        raw = arg.exp() if config.phi == "exp" else (1.0 + arg).clamp(min=0.0)
        raw = torch.where(valid, raw, 1.0)
        if config.normalize == "group":
            bucket = _buckets(response_group, valid, num_groups)
            total = _group_sum(raw, bucket, num_groups, group)[response_group]
            count = _group_sum(torch.ones_like(raw), bucket, num_groups, group)[response_group]
            norm = total / count.clamp(min=1)
        elif config.normalize == "batch":
            norm, _ = _masked_mean_std(raw, valid, group)
        else:
            norm = torch.ones_like(raw)
        # A group whose every phi is 0 (linear phi, huge beta) keeps mean(w) = 1 by taking w = 1.
        w = torch.where(norm > 0, raw / torch.where(norm > 0, norm, 1.0), 1.0)
        low = config.w_min if config.w_min is not None else float("-inf")
        high = config.w_max if config.w_max is not None else float("inf")
        clipped = valid & ((w < low) | (w > high))
        w = torch.where(valid, w.clamp(min=low, max=high), 1.0)
    return w, u, clipped


def aem_metrics(x: torch.Tensor, u: torch.Tensor, w: torch.Tensor, clipped: torch.Tensor,
                advantages: torch.Tensor, modulated: torch.Tensor, response_group: torch.Tensor,
                num_groups: int, valid: torch.Tensor, group=None) -> Dict[str, torch.Tensor]:
    """Section-4 batch metrics as detached 0-d tensors (no host sync; call .item() to log); over every rank's
    responses with a process group."""
    with torch.no_grad():
        bucket = _buckets(response_group, valid, num_groups)
        total = _group_sum(torch.where(valid, x, 0.0), bucket, num_groups, group)
        count = _group_sum(torch.ones_like(x), bucket, num_groups, group).clamp(min=1)
        deviation = torch.where(valid, x - (total / count)[response_group], 0.0)
        out = {}
        for name, values in (("x", x), ("u", u), ("w", w)):
            out[f"aem/{name}_mean"], out[f"aem/{name}_std"] = _masked_mean_std(values.to(x.dtype), valid, group)
        sums = C.all_reduce(torch.stack([valid.sum().to(x.dtype), clipped.sum().to(x.dtype),
                                         (modulated.to(x.dtype) * deviation).sum(),
                                         (advantages.to(x.dtype) * deviation).sum()]), "sum", group)
        n_valid = sums[0].clamp(min=1)
        out["aem/clip_frac"] = sums[1] / n_valid
        out["aem/drift"] = sums[2] / n_valid
        out["aem/drift_unmodulated"] = sums[3] / n_valid
    return out


def modulate_advantages(advantages: torch.Tensor, uncertainty: torch.Tensor, response_group: torch.Tensor,
                        config: AEMConfig = AEMConfig(), *, response_valid: Optional[torch.Tensor] = None,
                        num_groups: Optional[int] = None, process_group=None
                        ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """A~_r = w_r A_r (eq. 7) for response-level advantages.

    Args:
        advantages: [R] float, finite.
        uncertainty: [R] float x_r (e.g. `response_entropy(...)`), finite.
        response_group: [R] int64 group id of each response, in [0, num_groups).
        config: `AEMConfig` (beta, phi, sign, baseline, zscore, normalize, w_min, w_max are used).
        response_valid: optional [R] bool, False for responses with no trained token (excluded).
        num_groups: G; default response_group.max() + 1 (one host sync; with a process group the maximum over
            the ranks, one all_reduce). It must be the same on every rank.
        process_group: None: the statistics use these R responses only. A torch.distributed ProcessGroup (e.g.
            the data-parallel group, or torch.distributed.group.WORLD): every rank passes its own responses with
            GLOBAL group ids (the same id for the same prompt on every rank), and the group statistics, the
            weight normalisation and the metrics use every rank's responses (all_reduces of O(G) values), so
            they equal one process's on the concatenated batch. Call it on every rank of the group.

    Returns:
        (modulated advantages [R], metrics dict of 0-d tensors: aem/x_mean, aem/x_std, aem/u_mean, aem/u_std,
        aem/w_mean, aem/w_std, aem/clip_frac, aem/drift, aem/drift_unmodulated, and "aem/weights" [R], this
        rank's weights).
    """
    config = V.check_config(config)
    advantages = V.check_tensor("advantages", advantages)
    if advantages.dim() != 1:
        raise ValueError(f"advantages must have shape [R], got {tuple(advantages.shape)}")
    advantages = V.check_float_tensor("advantages", advantages, (advantages.shape[0],), advantages.device)
    group = C.resolve_group(process_group, "process_group", none_is_default=False)
    uncertainty, response_group, groups, valid = _check_response_inputs(
        uncertainty, response_group, num_groups, response_valid, size=advantages.shape[0],
        device=advantages.device, valid_name="response_valid", group=group)
    w, u, clipped = aem_weights_checked(uncertainty, response_group, config, groups, valid, group)
    modulated = w.to(advantages.dtype) * advantages
    metrics = aem_metrics(uncertainty.detach(), u, w, clipped, advantages, modulated, response_group, groups, valid,
                          group)
    metrics["aem/weights"] = w
    return modulated, metrics
