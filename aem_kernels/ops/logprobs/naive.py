"""The token ops' definition and test oracle: plain-PyTorch formulas of eq. 1-2 and their section-6 gradient,
written for clarity.

Production code never imports this module (a test checks it): the production "torch" backend is `pytorch.py`.
Here everything is the textbook form, computed in the input's compute dtype (fp64 for fp64 logits, the
intended use; fp32 otherwise, where it is eager torch's own arithmetic), without chunking (an oracle may hold
N x V temporaries):

    log p = log_softmax(logits / tau),   l_t = log p[y_t],   h_t = -sum_v p_v log p_v           (1, 2)
    dL/dlogits_t = [ a_t (onehot(y_t) - p_t) - b_t p_t (log p_t + h_t) ] / tau                    (section 6)

for upstream scalars a_t = dL/dl_t and b_t = dL/dh_t. Entries equal to -inf have p_v = 0 and contribute 0
(p log p -> 0). Rows whose label is ignore_index produce 0 (both outputs) and a zero gradient; a row whose
logits are all -inf has no distribution: its outputs are NaN.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...layout import as_rows3d, compute_dtype

__all__ = [
    "logprobs_entropy_fwd_ref",
    "logprobs_entropy_bwd_ref",
    "logprobs_and_entropy_ref",
]


def _log_softmax_rows(logits3d: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(z [N, V], log p [N, V]) in the compute dtype."""
    z = logits3d.reshape(-1, logits3d.shape[-1]).to(compute_dtype(logits3d.dtype)) / temperature
    return z, torch.log_softmax(z, dim=-1)


def _entropy_rows(log_p: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    entropy = -torch.where(p > 0, p * log_p, 0.0).sum(dim=-1)
    return torch.where(log_p[:, 0].isnan(), float("nan"), entropy)  # an all -inf row has no distribution


def logprobs_entropy_fwd_ref(
    logits3d: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Forward over [B, T, V] logits; `labels` is [B*T] or None. Returns (logprobs|None, entropy, lse),
    each [B*T] in fp32 (fp64 for fp64 logits); lse is of logits / temperature (computed on every row)."""
    z, log_p = _log_softmax_rows(logits3d, temperature)
    lse = torch.logsumexp(z, dim=-1)
    entropy = _entropy_rows(log_p)
    if labels is None:
        return None, entropy, lse
    active = labels != ignore_index
    target = log_p.gather(1, torch.where(active, labels, 0).long().unsqueeze(1)).squeeze(1)
    return torch.where(active, target, 0.0), torch.where(active, entropy, 0.0), lse


def logprobs_entropy_bwd_ref(
    logits3d: torch.Tensor,
    labels: Optional[torch.Tensor],
    state: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    grad_out3d: torch.Tensor,
) -> torch.Tensor:
    """Writes dL/dlogits (section 6) into `grad_out3d` ([B, T, V], may alias `logits3d`) and returns it.
    The per-row state (`lse`, `entropy`) is accepted for the backend signature and recomputed from the
    logits, so the oracle does not depend on what a backend saves."""
    _, log_p = _log_softmax_rows(logits3d, temperature)
    p = log_p.exp()
    grad = torch.zeros_like(log_p)
    if grad_entropy is not None:
        h = _entropy_rows(log_p).unsqueeze(1)
        b_t = grad_entropy.reshape(-1, 1).to(log_p.dtype)
        grad = grad - b_t * torch.where(p > 0, p * (log_p + h), 0.0)
    if labels is not None:
        active = labels != ignore_index
        if grad_logprobs is not None:
            a_t = torch.where(active, grad_logprobs.reshape(-1).to(log_p.dtype), 0.0).unsqueeze(1)
            onehot = torch.nn.functional.one_hot(torch.where(active, labels, 0).long(), log_p.shape[-1])
            grad = grad + a_t * (onehot.to(log_p.dtype) - p)
        grad = torch.where(active.unsqueeze(1), grad, 0.0)
    grad_out3d.copy_((grad / temperature).view(logits3d.shape))
    return grad_out3d


def logprobs_and_entropy_ref(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Reference forward on [..., V] logits without autograd; outputs have logits.shape[:-1]."""
    flat_labels = labels.reshape(-1) if labels is not None else None
    logprobs, entropy, _ = logprobs_entropy_fwd_ref(as_rows3d(logits), flat_labels, temperature, ignore_index)
    shape = logits.shape[:-1]
    return (logprobs.view(shape) if logprobs is not None else None), entropy.view(shape)
