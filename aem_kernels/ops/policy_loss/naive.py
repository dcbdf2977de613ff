"""The per-token policy-loss terms' definition and test oracle (AEM_SPEC section 5, eq. 8 and the KL
estimators), one token at a time in Python floats, with every case written out as verl 0.9.1 states it:

    r = clamp(l - l_old, -20, 20),  rho = e^r
    L = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high));  for A < 0 with the dual clip c: L = min(L, -c A)
    k1 = l - l_ref,  k2 = (l - l_ref)^2 / 2,  k3 = clamp(e^s - s - 1, -10, 10) with s = clamp(l_ref - l, -20, 20)

`policy_loss_ref` states every policy-loss mode of `modes.py` the same way, response by response.

Deliberately slow and plain (no tensors, no shared code with `pytorch.py`); production never imports it.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

__all__ = ["kl_penalty_ref", "policy_loss_ref", "ppo_token_loss_ref"]


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def ppo_token_loss_ref(logprobs: Sequence[float], old_logprobs: Sequence[float], advantages: Sequence[float],
                       clip_low: float, clip_high: float, dual_clip: Optional[float]) -> List[float]:
    """L_t of eq. 8 for each token."""
    out = []
    for logprob, old, adv in zip(logprobs, old_logprobs, advantages):
        ratio = math.exp(_clamp(logprob - old, -20.0, 20.0))
        loss = max(-adv * ratio, -adv * _clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))
        if dual_clip is not None and adv < 0:
            loss = min(loss, -dual_clip * adv)
        out.append(loss)
    return out


def kl_penalty_ref(logprobs: Sequence[float], ref_logprobs: Sequence[float], kl_type: str) -> List[float]:
    """KL_t of the estimator `kl_type` ("k1", "k2" or "k3") for each token."""
    out = []
    for logprob, ref in zip(logprobs, ref_logprobs):
        if kl_type == "k1":
            out.append(logprob - ref)
        elif kl_type == "k2":
            out.append(0.5 * (logprob - ref) ** 2)
        else:
            log_ratio = _clamp(ref - logprob, -20.0, 20.0)
            out.append(_clamp(math.exp(log_ratio) - log_ratio - 1.0, -10.0, 10.0))
    return out


def _responses(token_response: Sequence[int]) -> dict:
    out: dict = {}
    for t, r in enumerate(token_response):
        if r >= 0:
            out.setdefault(r, []).append(t)
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def policy_loss_ref(mode: str, logprobs: Sequence[float], old_logprobs: Sequence[float],
                    advantages: Sequence[float], token_response: Sequence[int], config,
                    dropped: Sequence[int] = ()) -> List[float]:
    """L_t of the policy-loss mode `mode` for each token (0 on untrained tokens), as `modes.py`'s docstring
    states it; `dropped`: the tokens Clip-Cov's random draw zeroes (the draw itself is verl's RNG call)."""
    lo, hi = config.clip_low, config.clip_high
    n = len(logprobs)
    out = [0.0] * n
    trained = [t for t in range(n) if token_response[t] >= 0]
    responses = _responses(token_response)
    for t in trained:
        lp, old, adv = logprobs[t], old_logprobs[t], advantages[t]
        r = lp - old
        rho = math.exp(_clamp(r, -20.0, 20.0))
        if mode in ("vanilla", "bypass_mode"):
            out[t] = ppo_token_loss_ref([lp], [old], [adv], lo, hi, config.dual_clip)[0]
        elif mode == "sapo":
            tau = config.tau_pos if adv > 0 else config.tau_neg
            out[t] = -adv * 4.0 / tau / (1.0 + math.exp(-tau * (rho - 1.0)))
        elif mode == "gpg":
            out[t] = -adv * lp
        elif mode == "dro":
            out[t] = -(adv * lp - 0.5 * config.dro_beta * r * r)
        elif mode == "cispo":
            out[t] = -_clamp(rho, 1 - lo, 1 + hi) * adv * lp
        elif mode in ("dppo_tv", "dppo_kl"):
            p, q = math.exp(lp), math.exp(old)
            if mode == "dppo_tv":
                valid = (p - q <= hi) if adv > 0 else (p - q >= -lo)
            else:
                kl = q * (old - lp) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))
                valid = (kl <= hi or p <= q) if adv > 0 else (kl <= lo or p >= q)
            cap = config.dual_clip if config.dual_clip is not None else math.inf
            out[t] = -adv * min(rho, cap) * lp if valid else 0.0
        elif mode in ("clip_cov", "kl_cov"):
            rho = math.exp(r)
            out[t] = max(-adv * rho, -adv * _clamp(rho, 1 - lo, 1 + hi)) if mode == "clip_cov" else -adv * rho
    if mode == "clip_cov":
        for t in dropped:
            out[t] = 0.0
    if mode == "kl_cov" and trained:
        mean_a = _mean([advantages[t] for t in trained])
        mean_l = _mean([logprobs[t] for t in trained])
        cov = sorted(trained, key=lambda t: -(advantages[t] - mean_a) * (logprobs[t] - mean_l))
        for t in cov[:max(1, int(len(trained) * config.kl_cov_ratio))]:
            out[t] += config.ppo_kl_coef * abs(logprobs[t] - old_logprobs[t])
    for tokens in responses.values():
        r = [logprobs[t] - old_logprobs[t] for t in tokens]
        if mode == "gspo":
            s = _mean(r)
            for t in tokens:
                ratio = math.exp(min(s, 10.0))
                adv = advantages[t]
                out[t] = max(-adv * ratio, -adv * _clamp(ratio, 1 - lo, 1 + hi))
        elif mode == "geo_mean":
            m = []
            for t, x in zip(tokens, r):
                sign = (advantages[t] > 0) - (advantages[t] < 0)
                m.append(sign * min(sign * x, sign * _clamp(x, -lo, hi)))
            length = len(tokens) + 1e-8  # verl's divisor
            value = -sum(advantages[t] for t in tokens) / length * math.exp(sum(m) / length)
            for t in tokens:
                out[t] = value
        elif mode in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            level = config.importance_sampling_level or ("sequence" if mode == "luspo" else "token")
            for t, x in zip(tokens, r):
                w = math.exp(_mean(r) if level == "sequence" else x)
                capped = min(w, config.delta) if config.delta is not None else w
                adv = advantages[t]
                out[t] = -min(capped * adv, _clamp(w, 1 - lo, 1 + hi) * adv)
        elif mode == "vespo":
            log_w = _clamp(sum(_clamp(x, -20.0, 20.0) for x in r), math.log(1e-8), 20.0)
            for t in tokens:
                adv = advantages[t]
                k = config.vespo_k_pos if adv >= 0 else config.vespo_k_neg
                lam = max(config.vespo_lambda_pos if adv >= 0 else config.vespo_lambda_neg, 1e-4)
                out[t] = -math.exp(lam + k * log_w - lam * math.exp(log_w)) * adv * logprobs[t]
    return out
