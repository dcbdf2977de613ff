"""The torch implementation of the segment sum: every device, no host sync (index_add into R + 1 buckets, the
dropped tokens' bucket sliced off). It accumulates in the values' dtype, with atomics on CUDA (the last bits
may depend on scheduling there); the C++ and Triton implementations are deterministic."""

from __future__ import annotations

import torch

__all__ = ["segment_sum"]


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[r] = sum_{t: segment_ids[t] == r} values[t]; ids of -1 are dropped. Differentiable."""
    values = values.reshape(-1)
    ids = segment_ids.reshape(-1)
    bucket = torch.where(ids >= 0, ids, num_segments)
    out = torch.zeros(num_segments + 1, dtype=values.dtype, device=values.device)
    return out.index_add(0, bucket, values)[:num_segments]
