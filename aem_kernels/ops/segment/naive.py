"""The segment reductions' definition and test oracle (eq. 3, 3'): per-response sums, counts and means of a
per-token quantity over the packed token->response map (-1: not trained).

Deliberately naive: a dense [N, R] membership matrix, so the definition reads off the page and shares no code
with the production reductions (index_add, the C++ and Triton kernels). An empty response (L_r = 0) has sum 0
and, by definition, mean 0; the modulation excludes such responses from every group statistic.
"""

from __future__ import annotations

import torch

__all__ = ["segment_sum_ref", "segment_count_ref", "segment_mean_ref"]


def _membership(segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """[N, R] bool: token t belongs to response r."""
    ids = segment_ids.reshape(-1, 1)
    return ids == torch.arange(num_segments, device=ids.device).unsqueeze(0)


def segment_sum_ref(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[r] = sum_{t: segment_ids[t] == r} values[t]."""
    member = _membership(segment_ids, num_segments)
    return torch.where(member, values.reshape(-1, 1), 0.0).sum(0)


def segment_count_ref(segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """L_r, the number of tokens of each response (int64)."""
    return _membership(segment_ids, num_segments).sum(0)


def segment_mean_ref(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """sum / L_r, 0 for an empty response."""
    counts = segment_count_ref(segment_ids, num_segments)
    return torch.where(counts > 0, segment_sum_ref(values, segment_ids, num_segments) / counts.clamp(min=1), 0.0)
