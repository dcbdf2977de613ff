"""The test oracle: plain-PyTorch formulas of the token ops and the segment reductions, written for clarity.

Production code never imports this module (a test checks it): the "torch" backend is `_torch.py`, the
production segment reductions are `reductions.py`. Here everything is the textbook form, computed in the
input's compute dtype (fp64 for fp64 logits, the intended use; fp32 otherwise, where it is eager torch's
own arithmetic), without chunking (an oracle may hold N x V temporaries):

    log p = log_softmax(logits / tau),   l_t = log p[y_t],   h_t = -sum_v p_v log p_v           (1, 2)
    dL/dlogits_t = [ a_t (onehot(y_t) - p_t) - b_t p_t (log p_t + h_t) ] / tau                    (section 6)

for upstream scalars a_t = dL/dl_t and b_t = dL/dh_t. Entries equal to -inf have p_v = 0 and contribute 0
(p log p -> 0). Rows whose label is ignore_index produce 0 (both outputs) and a zero gradient; a row whose
logits are all -inf has no distribution: its outputs are NaN.

Segment reductions (eq. 3, 3'): per-response sums and means of a per-token quantity over the packed
token->response map (-1: untrained). An empty response (L_r = 0) has sum 0 and, by definition, mean 0;
the modulation excludes such responses from every group statistic (see `modulation.py`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._layout import as_rows3d, compute_dtype

__all__ = [
    "logprobs_entropy_fwd_ref",
    "logprobs_entropy_bwd_ref",
    "logprobs_and_entropy_ref",
    "segment_sum",
    "segment_count",
    "segment_mean",
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


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[r] = sum_{t: segment_ids[t] == r} values[t]; ids of -1 are dropped. Differentiable, no host sync:
    dropped tokens go to an extra bucket that is sliced off."""
    values = values.reshape(-1)
    ids = segment_ids.reshape(-1)
    bucket = torch.where(ids >= 0, ids, num_segments)
    out = torch.zeros(num_segments + 1, dtype=values.dtype, device=values.device)
    return out.index_add(0, bucket, values)[:num_segments]


def segment_count(segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Number of tokens per segment (int64 [num_segments]); ids of -1 are dropped."""
    ids = segment_ids.reshape(-1)
    bucket = torch.where(ids >= 0, ids, num_segments)
    return torch.bincount(bucket, minlength=num_segments + 1)[:num_segments]


def segment_mean(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per-segment mean; an empty segment has mean 0 (never NaN)."""
    counts = segment_count(segment_ids, num_segments).clamp(min=1).to(values.dtype)
    return segment_sum(values, segment_ids, num_segments) / counts
