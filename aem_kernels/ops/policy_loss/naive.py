"""The per-token policy-loss terms' definition and test oracle (AEM_SPEC section 5, eq. 8 and the KL
estimators), one token at a time in Python floats, with every case written out as verl 0.9.1 states it:

    r = clamp(l - l_old, -20, 20),  rho = e^r
    L = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high));  for A < 0 with the dual clip c: L = min(L, -c A)
    k1 = l - l_ref,  k2 = (l - l_ref)^2 / 2,  k3 = clamp(e^s - s - 1, -10, 10) with s = clamp(l_ref - l, -20, 20)

Deliberately slow and plain (no tensors, no shared code with `pytorch.py`); production never imports it.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

__all__ = ["kl_penalty_ref", "ppo_token_loss_ref"]


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
