"""The per-token policy-loss terms of AEM_SPEC section 5 in torch, as verl 0.9.1 computes them, and their
derivatives with respect to the token log-prob (the scalars a_t of section 6).

    rho_t = exp(clamp(l_t - l_t^old, -20, 20))
    L_t   = max(-A~_t rho_t, -A~_t clip(rho_t, 1 - eps_low, 1 + eps_high))           (8)
    L_t   = min(L_t, -c A~_t)         when A~_t < 0 and the dual clip c is on
    KL_t  = k1: l - l_ref,  k2: (l - l_ref)^2 / 2,  k3: exp(l_ref - l) - (l_ref - l) - 1

with verl's clamps (`compute_policy_loss_vanilla`, `kl_penalty`: the log-ratio to +-20, k3 to +-10), which the
Triton single-pass kernel (`triton.py`) shares through the constants below.

The other policy-loss modes build on these (`modes.py`), and `modes.token_loss_derivatives` is the one torch
statement of the per-token gradient: autograd over the very functions the loss's value is computed with, on
O(n) vectors, so ties and clamps follow torch's conventions exactly (torch.maximum / torch.minimum split the
gradient in half on a tie; a clamp passes gradient on its closed interval). The fused-linear single pass uses
it; the Triton kernel's hand-written derivative is tested against it.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

__all__ = ["KL_VALUE_CLAMP", "LOG_RATIO_CLAMP", "kl_penalty", "ppo_token_loss"]

# log(pi / pi_old) and the k3 estimator's log-ratio are clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] (eq. 8).
LOG_RATIO_CLAMP = 20.0
# The k3 KL estimate itself is clamped to [-KL_VALUE_CLAMP, KL_VALUE_CLAMP].
KL_VALUE_CLAMP = 10.0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimators (Schulman): k1 = l - l_ref, k2 = (l - l_ref)^2 / 2,
    k3 = exp(l_ref - l) - (l_ref - l) - 1 with verl's clamps (log-ratio to +-20, result to +-10)."""
    if kl_type == "k1":
        return logprobs - ref_logprobs
    if kl_type == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kl_type == "k3":
        log_ratio = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (log_ratio.exp() - log_ratio - 1.0).clamp(-KL_VALUE_CLAMP, KL_VALUE_CLAMP)
    raise ValueError(f"kl_type must be 'k1', 'k2' or 'k3', got {kl_type!r}")


def ppo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   config) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token clipped surrogate L_t of eq. 8 and the per-token clip indicators (float 0/1). `config` is an
    `AEMConfig` (its clip_low, clip_high and dual_clip are read)."""
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    loss = torch.maximum(unclipped, clipped)
    flags = {"clip": (clipped > unclipped).to(loss.dtype), "neg_log_ratio": -log_ratio.detach()}
    if config.dual_clip is not None:
        floor = -advantages * config.dual_clip
        flags["clip_lower"] = ((loss > floor) & (advantages < 0)).to(loss.dtype)
        loss = torch.where(advantages < 0, torch.minimum(floor, loss), loss)
    else:
        flags["clip_lower"] = torch.zeros_like(loss)
    return loss, flags
