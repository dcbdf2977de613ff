"""The canonical row layout every backend works on: logits as a [B, T, V] view with a unit vocab stride.

Users pass [..., V] logits, very often a slice such as `logits[:, :-1]` of a [B, T+1, V] tensor. Such a
slice cannot be flattened to [N, V] without a copy, but row i is still at (i // T) * stride_b +
(i % T) * stride_t, so kernels take (stride_b, stride_t, T) and no N x V copy is ever made.
"""

from __future__ import annotations

import torch


def as_rows3d(logits: torch.Tensor) -> torch.Tensor:
    """A [B, T, V] view of [..., V] logits (rows = B * T), copying only for >3-d non-collapsible inputs."""
    vocab = logits.shape[-1]
    if logits.dim() == 1:
        return logits.view(1, 1, vocab)
    try:
        return logits.view(1, -1, vocab)
    except RuntimeError:
        pass
    if logits.dim() == 3:
        return logits
    try:
        return logits.view(-1, logits.shape[-2], vocab)
    except RuntimeError:
        # Only reachable for >= 4-d logits whose leading dims cannot be merged; rare enough to copy.
        return logits.reshape(-1, logits.shape[-2], vocab)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (for fp64 reference checks); every other dtype is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
