"""Production segment reductions over the token->response map (eq. 3, 3'): per-response sum, count, mean.

`segment_sum` runs on the implementation `dispatch.resolve_segment_sum` picks for the values' device: the C++
reduction for CPU tensors when the extension is built (deterministic, fp64 accumulation), the deterministic
Triton kernel of `ops/segment.py` for CUDA tensors (fixed order, fp32 accumulation), torch's index_add
otherwise. Counts are integer bincounts (exact on every device). All are differentiable where it applies
and need no host sync. Ids of -1 (untrained tokens) are dropped; an empty segment has sum 0 and, by
definition, mean 0. The plain twins the tests compare against are in `reference.py`.
"""

from __future__ import annotations

import torch

from .dispatch import resolve_segment_sum

__all__ = ["segment_sum", "segment_count", "segment_mean"]


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[r] = sum_{t: segment_ids[t] == r} values[t], [num_segments] in values' dtype (ids of -1 dropped)."""
    return resolve_segment_sum(values.device)(values.reshape(-1), segment_ids.reshape(-1), num_segments)


def segment_count(segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Number of tokens per segment (int64 [num_segments]); ids of -1 are dropped."""
    ids = segment_ids.reshape(-1)
    bucket = torch.where(ids >= 0, ids, num_segments)
    return torch.bincount(bucket, minlength=num_segments + 1)[:num_segments]


def segment_mean(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per-segment mean; an empty segment has mean 0 (never NaN)."""
    counts = segment_count(segment_ids, num_segments).clamp(min=1).to(values.dtype)
    return segment_sum(values, segment_ids, num_segments) / counts
