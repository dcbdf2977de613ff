"""The policy-loss modes (`AEMConfig.loss_mode`): verl 0.9.1's registered policy losses and TRL 1.16's loss types,
per token, as each framework computes them, and their derivatives with respect to the token log-prob.

With r_t = l_t - l_t^old, rho_t = exp(r_t), A_t the (AEM-modulated) advantage, eps = clip_low / clip_high and
clip(rho) = clamp(rho, 1 - eps_low, 1 + eps_high), the per-token loss L_t of each mode is:

    vanilla, bypass_mode  eq. 8 with r clamped to +-20 and the dual clip c = dual_clip (`pytorch.ppo_token_loss`)
    gspo       s_t = exp(min(l_t - sg(l_t) + sg(mean_{r(t)} r), 10)): max(-A s, -A clip(s))       (sequence ratio)
    sapo       -A f(rho),  f(x) = sigmoid(tau (x - 1)) 4 / tau,  tau = tau_pos if A > 0 else tau_neg
    gpg        -A l
    clip_cov   max(-A rho, -A clip(rho)), times 0 on min(max(1, int(ratio N)), K) tokens drawn at random
               (torch.randperm) among the K trained tokens not clipped with cov in (lb, ub), where
               cov_t = (A_t - mean A)(l_t - mean l) over this call's trained tokens
    kl_cov     -A rho, plus ppo_kl_coef |r| on the max(1, int(ratio N)) trained tokens of largest cov (topk)
    geo_mean   per response: -mean(A) exp(mean m),  m_t = sign(A) min(sign(A) r, sign(A) clamp(r, -eps_low,
               eps_high)); mean over the call's responses (verl's torch.mean; no global normaliser)
    dppo_tv/kl -A sg(min(rho, c)) l 1[valid], valid: the probability change (tv) or binary KL (kl) within eps
    dro        -(A l - dro_beta r^2 / 2)
    cispo      -sg(clip(rho)) A l                                                (r clamped to +-20: verl's)
    grpo, bnpo, dr_grpo, dapo, luspo (TRL)  -min(min(w, delta) A, clip(w) A) with w = rho ("token") or
               exp(mean_{r(t)} r) ("sequence", differentiated through the mean); no clamp, no dual clip
    vespo (TRL) -phi A l,  phi = sg(exp(lam + k log w - lam w)),  log w = clamp(sum_{r(t)} clamp(r, +-20),
               log 1e-8, 20), (k, lam) = (vespo_k_pos, vespo_lambda_pos) if A >= 0 else the _neg pair

TRL's "cispo" and "sapo" are verl's modes of those names. TRL's sapo is verl's (the same gate) without verl's
+-20 clamp of r; TRL's cispo is sg(min(rho, epsilon_high)) A l: verl's with clip_high = epsilon_high - 1 when
no ratio falls below 1 - clip_low. Both aggregate as TRL's grpo (sapo) and dapo (cispo), which verl's
seq-mean-token-mean and token-mean give with the normalisers of `mode_aggregation`.

Which modes take one pass. A single pass needs every token's derivative a_t = dL/dl_t from that token's own
l_t and values known before the forward. gspo, geo_mean, vespo and TRL's "sequence" level reduce r over each
response of this forward (a sequence ratio); clip_cov and kl_cov select tokens by a covariance with this
forward's batch means (clip_cov at random among the eligible, kl_cov by topk): they take two passes (the O(N)
per-token terms first, the derivatives after the reduction). Every other mode is token-local (`ROW_LOCAL`).

Under a TRL loss type the KL term of each token is multiplied by w (TRL's use_bias_correction_kl, `kl_ratio`).
Rollout IS weights multiply L_t (verl's `rollout_is_weights`); geo_mean takes their per-response geometric
mean, as verl does, and vespo folds their log into log w, as TRL does with its importance_sampling_ratio.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from ...config import DUAL_CLIP_MODES, TRL_AGGREGATION, TRUNCATION_MODES
from ..segment import segment_broadcast, segment_count, segment_mean, segment_sum
from .pytorch import LOG_RATIO_CLAMP, kl_penalty, ppo_token_loss

__all__ = ["ROW_LOCAL", "Segments", "kl_ratio", "mode_aggregation", "policy_token_loss", "row_local",
           "token_loss_derivatives"]

Flags = Dict[str, torch.Tensor]


class Segments(NamedTuple):
    """The token->response map of the call ([N] int64, -1: untrained) and R, for the modes that reduce over it."""

    token_response: torch.Tensor
    num_responses: int

    def per_token(self, per_response: torch.Tensor) -> torch.Tensor:
        """[R] -> [N] (0 on untrained tokens; differentiable)."""
        return segment_broadcast(per_response, self.token_response)

    @property
    def trained(self) -> torch.Tensor:
        return self.token_response >= 0


def _flags(like: torch.Tensor, neg_log_ratio: torch.Tensor, clip=None, clip_lower=None) -> Flags:
    zero = torch.zeros_like(like)
    as_float = (lambda f: f.to(like.dtype).detach() if f is not None else zero)  # noqa: E731
    return {"clip": as_float(clip), "clip_lower": as_float(clip_lower), "neg_log_ratio": neg_log_ratio.detach()}


def _clamped_ratio(lp, old):
    log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_ratio, log_ratio.exp()


def _clip(values, config):
    return values.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)


def _masked_mean(values, trained):
    # verl_F.masked_mean: sum over the mask / (count + 1e-8)
    return torch.where(trained, values, 0.0).sum() / (trained.sum() + 1e-8)


def _vanilla(lp, old, adv, config, seg) -> Tuple[torch.Tensor, Flags]:
    return ppo_token_loss(lp, old, adv, config)


def _gspo(lp, old, adv, config, seg):
    log_ratio = lp - old
    seq = seg.per_token(segment_mean(log_ratio.detach(), seg.token_response, seg.num_responses))
    ratio = (lp - lp.detach() + seq).clamp(max=10.0).exp()  # sg(s_r) * rho_t / sg(rho_t), verl's clamp at 10
    unclipped, clipped = -adv * ratio, -adv * _clip(ratio, config)
    return torch.maximum(unclipped, clipped), _flags(lp, -log_ratio, clipped > unclipped)


def _sapo(lp, old, adv, config, seg):
    log_ratio, ratio = _clamped_ratio(lp, old)
    tau_pos, tau_neg = (torch.as_tensor(t, dtype=adv.dtype, device=adv.device) for t in (config.tau_pos,
                                                                                           config.tau_neg))
    taus = torch.where(adv > 0, tau_pos, tau_neg)
    gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
    return -gates * adv, _flags(lp, -log_ratio)


def _gpg(lp, old, adv, config, seg):
    return -lp * adv, _flags(lp, -(lp - old))


def _clip_cov(lp, old, adv, config, seg):
    log_ratio = lp - old
    ratio = log_ratio.exp()
    unclipped, clipped = -adv * ratio, -adv * _clip(ratio, config)
    trained = seg.trained
    lp_d = lp.detach()
    cov = (adv - _masked_mean(adv, trained)) * (lp_d - _masked_mean(lp_d, trained))
    eligible = trained & ~(clipped > unclipped) & (cov < config.clip_cov_ub) & (cov > config.clip_cov_lb)
    candidates = torch.nonzero(eligible).reshape(-1)  # in token order: verl's row-major [B, T] order
    keep = torch.ones_like(lp)
    if candidates.numel() > 0:
        count = max(int(config.clip_cov_ratio * int(trained.sum().item())), 1)
        # the same call on the same (CPU) generator as verl: a seeded run draws the same tokens
        chosen = candidates[torch.randperm(candidates.numel())[:count].to(candidates.device)]
        keep[chosen] = 0.0
    return torch.maximum(unclipped, clipped) * keep, _flags(lp, -log_ratio, keep == 0)


def _kl_cov(lp, old, adv, config, seg):
    log_ratio = lp - old
    abs_kl = log_ratio.abs()
    plain = -adv * log_ratio.exp()
    trained = seg.trained
    index = torch.nonzero(trained).reshape(-1)
    penalised = torch.zeros_like(trained)
    if index.numel() > 0:
        a, l_ = adv.detach()[index], lp.detach()[index]
        cov = (a - a.mean()) * (l_ - l_.mean())
        count = max(1, int(index.numel() * config.kl_cov_ratio))
        penalised[index[torch.topk(cov, count, largest=True).indices]] = True
    loss = torch.where(penalised, plain + config.ppo_kl_coef * abs_kl, plain)
    return loss, _flags(lp, abs_kl)  # verl's ppo_kl metric for kl_cov is the mean |r|


def _geo_mean(lp, old, adv, config, seg, is_weights=None):
    log_ratio = lp - old
    sign = torch.sign(adv)
    bounded = log_ratio.clamp(-config.clip_low, config.clip_high)
    m = sign * torch.minimum(sign * log_ratio, sign * bounded)
    tr, num = seg.token_response, seg.num_responses
    length = segment_count(tr, num).to(lp.dtype) + 1e-8
    loss = -(segment_sum(adv, tr, num) / length) * (segment_sum(m, tr, num) / length).exp()
    if is_weights is not None:  # verl: the per-response geometric mean of the IS weights
        loss = loss * (segment_sum((is_weights + 1e-10).log(), tr, num) / length).exp()
    clipped = log_ratio != bounded
    return seg.per_token(loss), _flags(lp, -log_ratio, clipped & (adv > 0), clipped & (adv < 0))


def _dppo_valid(lp, old, adv, config, binary_kl: bool):
    prob, old_prob = lp.exp(), old.exp()
    if binary_kl:
        kl = old_prob * (old - lp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        positive = (kl <= config.clip_high) | (prob <= old_prob)
        negative = (kl <= config.clip_low) | (prob >= old_prob)
    else:
        positive = (prob - old_prob) <= config.clip_high
        negative = (prob - old_prob) >= -config.clip_low
    return torch.where(adv > 0, positive, negative).detach().to(lp.dtype)


def _dppo(binary_kl: bool):
    def loss_fn(lp, old, adv, config, seg):
        log_ratio, ratio = _clamped_ratio(lp, old)
        cap = config.dual_clip if config.dual_clip is not None else math.inf  # verl's clip_ratio_c: a TIS cap
        valid = _dppo_valid(lp, old, adv, config, binary_kl)
        loss = -adv * ratio.clamp(max=cap).detach() * lp * valid
        return loss, _flags(lp, -log_ratio, 1.0 - valid, (ratio > cap).to(lp.dtype) * valid)
    return loss_fn


def _dro(lp, old, adv, config, seg):
    log_ratio = lp - old
    return -(lp * adv - 0.5 * config.dro_beta * log_ratio.square()), _flags(lp, -log_ratio)


def _cispo(lp, old, adv, config, seg):
    log_ratio, ratio = _clamped_ratio(lp, old)
    clipped = _clip(ratio, config)
    return -clipped.detach() * adv * lp, _flags(lp, -log_ratio, ratio != clipped)


def importance_sampling_level(config) -> str:
    """TRL's ratio level of the GRPO-family modes ("sequence" for luspo unless set, "token" otherwise)."""
    if config.importance_sampling_level is not None:
        return config.importance_sampling_level
    return "sequence" if config.loss_mode == "luspo" else "token"


def _trl_clipped(lp, old, adv, config, seg):
    log_ratio = lp - old
    if importance_sampling_level(config) == "sequence":
        weight = seg.per_token(segment_mean(log_ratio, seg.token_response, seg.num_responses)).exp()
    else:
        weight = log_ratio.exp()
    clipped = _clip(weight, config)
    capped = weight.clamp(max=config.delta) if config.delta is not None else weight  # TRL's two-sided clip
    loss = -torch.minimum(capped * adv, clipped * adv)
    low = (weight < 1 - config.clip_low) & (adv < 0)
    high = (weight > 1 + config.clip_high) & (adv > 0)
    return loss, _flags(lp, -log_ratio, low | high, low)


def _vespo(lp, old, adv, config, seg, is_weights=None):
    floor = math.log(1e-8)
    log_ratio = lp - old
    per_token = log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if is_weights is not None:  # TRL folds the sampler correction into w: log w += sum log(IS ratio)
        per_token = per_token + is_weights.detach().log().clamp(floor, LOG_RATIO_CLAMP)
    log_w = seg.per_token(segment_sum(per_token, seg.token_response, seg.num_responses)).clamp(floor, 20.0)
    nonneg = adv >= 0
    pick = (lambda pos, neg: torch.where(nonneg, torch.as_tensor(pos, dtype=lp.dtype, device=lp.device),  # noqa
                                         torch.as_tensor(neg, dtype=lp.dtype, device=lp.device)))
    k, lam = pick(config.vespo_k_pos, config.vespo_k_neg), pick(config.vespo_lambda_pos, config.vespo_lambda_neg)
    lam = lam.clamp(min=1e-4)
    phi = (lam + k * log_w - lam * log_w.exp()).exp().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).detach()
    return -phi * adv * lp, _flags(lp, -log_ratio)


_LOSSES: Dict[str, Callable] = {
    "vanilla": _vanilla, "bypass_mode": _vanilla, "gspo": _gspo, "sapo": _sapo, "gpg": _gpg, "clip_cov": _clip_cov,
    "kl_cov": _kl_cov, "geo_mean": _geo_mean, "dppo_tv": _dppo(False), "dppo_kl": _dppo(True), "dro": _dro,
    "cispo": _cispo, "grpo": _trl_clipped, "bnpo": _trl_clipped, "dr_grpo": _trl_clipped, "dapo": _trl_clipped,
    "luspo": _trl_clipped, "vespo": _vespo,
}
# the modes that apply rollout IS weights themselves (rather than as a factor of L_t)
_OWN_IS_WEIGHTS = ("geo_mean", "vespo")
ROW_LOCAL = ("vanilla", "bypass_mode", "sapo", "gpg", "dppo_tv", "dppo_kl", "dro", "cispo", "grpo", "bnpo",
             "dr_grpo", "dapo", "luspo")
assert set(DUAL_CLIP_MODES + TRUNCATION_MODES) <= set(_LOSSES)


def row_local(config) -> Optional[str]:
    """None when the mode's a_t depends on the token's own l_t only (a single pass can serve it); else why not."""
    mode = config.loss_mode
    if mode not in ROW_LOCAL:
        return (f"loss_mode={mode!r} reduces over this forward's log-probs (a sequence ratio, or a covariance "
                "selection over the batch) before any token's derivative is known")
    if mode in TRL_AGGREGATION and importance_sampling_level(config) == "sequence":
        return f"loss_mode={mode!r} with importance_sampling_level='sequence' needs each response's mean log-ratio"
    return None


def mode_aggregation(config) -> Tuple[str, bool, bool]:
    """(the aggregation of the policy term, whether its sequence count defaults to every response R (TRL's B,
    verl geo_mean's torch.mean) rather than the non-empty ones, whether it ignores the global normalisers)."""
    mode = config.loss_mode
    if mode in TRL_AGGREGATION:
        return TRL_AGGREGATION[mode], True, False
    if mode == "sapo":  # verl's sapo aggregates seq-mean-token-mean whatever loss_agg_mode says
        return "seq-mean-token-mean", False, False
    if mode == "geo_mean":  # verl: torch.mean over the micro-batch's rows, global_batch_info unused
        return "seq-mean-token-mean", True, True
    return config.loss_agg_mode, False, False


def policy_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, config,
                      segments: Optional[Segments] = None, is_weights: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, Flags]:
    """Per-token loss L_t [N] of `config.loss_mode` (module docstring; geo_mean's per-response loss on each of
    its tokens) times the rollout IS weights [N] when given, and the per-token flags clip, clip_lower (float 0/1)
    and neg_log_ratio. `segments` is required by the modes that are not `ROW_LOCAL`."""
    mode = config.loss_mode
    if segments is None and row_local(config) is not None:
        raise ValueError(f"policy_token_loss: {row_local(config)}; pass the token->response `segments`")
    if mode in _OWN_IS_WEIGHTS:
        return _LOSSES[mode](logprobs, old_logprobs, advantages, config, segments, is_weights=is_weights)
    loss, flags = _LOSSES[mode](logprobs, old_logprobs, advantages, config, segments)
    if is_weights is not None:
        loss = loss * is_weights
    return loss, flags


def kl_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, config, segments: Optional[Segments] = None
             ) -> Optional[torch.Tensor]:
    """TRL's use_bias_correction_kl: under a TRL loss type, the factor [N] of each token's KL term, its importance
    ratio at the loss type's level (exp of r, or of its response mean; differentiable, unclamped, as TRL);
    None otherwise."""
    if config.loss_mode not in TRL_AGGREGATION or not config.use_bias_correction_kl:
        return None
    log_ratio = logprobs - old_logprobs
    if importance_sampling_level(config) == "sequence":
        return segments.per_token(segment_mean(log_ratio, segments.token_response, segments.num_responses)).exp()
    return log_ratio.exp()


def token_loss_derivatives(logprobs: torch.Tensor, old_logprobs: Optional[torch.Tensor], advantages: torch.Tensor,
                           token_weights: torch.Tensor, ref_logprobs: Optional[torch.Tensor], config, *,
                           kl_weights: Optional[torch.Tensor] = None, entropy_weights: Optional[torch.Tensor] = None,
                           is_weights: Optional[torch.Tensor] = None,
                           ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(a_t = dL/dl_t, b_t = dL/dh_t | None) of L = sum_t c_t L_t + kl_coef sum_t k_t KL_t - entropy_coef
    sum_t e_t h_t for [n] per-token log-probs of a row-local mode (`row_local`), with advantages A~_t,
    policy-term weights c_t (`token_weights`; an entropy mask folded in), KL and entropy weights k_t, e_t
    (default c_t) and rollout IS weights (default none). Tokens with a zero weight are left out, as the
    aggregation leaves them out; old_logprobs None is on-policy (rho = 1). b_t is None without an entropy bonus.
    The one torch statement of the per-token gradient: autograd over the very functions the loss's value is
    computed with, on O(n) vectors, so ties and clamps follow torch's conventions exactly."""
    reason = row_local(config)
    if reason is not None:
        raise ValueError(f"token_loss_derivatives: {reason}")
    with torch.enable_grad():
        lp = logprobs.detach().requires_grad_()
        adv = advantages.to(lp.dtype)
        old = old_logprobs.to(lp.dtype) if old_logprobs is not None else lp.detach()
        weighted_sum = (lambda values, w: torch.where(w != 0, values * w, 0.0).sum())  # noqa: E731
        weights = token_weights.to(lp.dtype)
        iw = is_weights.to(lp.dtype) if is_weights is not None else None
        total = weighted_sum(policy_token_loss(lp, old, adv, config, is_weights=iw)[0], weights)
        if config.kl_coef > 0:
            kw = kl_weights.to(lp.dtype) if kl_weights is not None else weights
            kl = kl_penalty(lp, ref_logprobs.to(lp.dtype), config.kl_type)
            factor = kl_ratio(lp, old, config)
            total = total + config.kl_coef * weighted_sum(kl * factor if factor is not None else kl, kw)
        (grad_lp,) = torch.autograd.grad(total, [lp])
    if config.entropy_coef == 0:
        return grad_lp, None
    ew = entropy_weights if entropy_weights is not None else token_weights
    return grad_lp, -config.entropy_coef * ew.to(lp.dtype)
