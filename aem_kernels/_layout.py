"""The canonical row layout every backend works on: logits as a [B, T, V] view with a unit vocab stride.

Users pass [..., V] logits, very often a slice such as `logits[:, :-1]` of a [B, T+1, V] tensor. Such a
slice cannot be flattened to [N, V] without a copy, but row i is still at (i // T) * stride_b +
(i % T) * stride_t, so kernels take (stride_b, stride_t, T) and no N x V copy is ever made.
"""

from __future__ import annotations

import torch


def _mergeable(sizes, strides) -> bool:
    """Whether dims with these sizes/strides collapse into one by a view (no copy). Decided from the
    metadata rather than by trying `view` and catching the error, so torch.compile traces it."""
    if any(size == 0 for size in sizes):
        return True
    kept = [(size, stride) for size, stride in zip(sizes, strides) if size != 1]
    return all(outer[1] == inner[1] * inner[0] for outer, inner in zip(kept, kept[1:]))


def as_rows3d(logits: torch.Tensor) -> torch.Tensor:
    """A [B, T, V] view of [..., V] logits (rows = B * T), copying only for >3-d non-collapsible inputs."""
    vocab = logits.shape[-1]
    if logits.dim() == 1:
        return logits.view(1, 1, vocab)
    if _mergeable(logits.shape[:-1], logits.stride()[:-1]):
        return logits.view(1, -1, vocab)
    if logits.dim() == 3:
        return logits
    if _mergeable(logits.shape[:-2], logits.stride()[:-2]):
        return logits.view(-1, logits.shape[-2], vocab)
    # Only reachable for >= 4-d logits whose leading dims cannot be merged; rare enough to copy.
    return logits.reshape(-1, logits.shape[-2], vocab)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (for fp64 reference checks); every other dtype is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
