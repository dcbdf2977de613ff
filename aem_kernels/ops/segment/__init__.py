"""Segment reductions over the token->response map (eq. 3, 3'): per-response sum, count and mean, and the public
response surprisal and response entropy built on them.

The op's one path decision (`resolve_segment_sum`): the C++ reduction for CPU tensors when the extension is
built (`cpu.py`: deterministic, fp64 accumulation), the deterministic Triton kernel for CUDA tensors when Triton
is installed (`triton.py`: fixed order, fp32 accumulation), torch's index_add otherwise (`pytorch.py`). Counts
are integer bincounts (exact on every device). Everything is differentiable where it applies and needs no host
sync. Ids of -1 (untrained tokens) are dropped; an empty segment has sum 0 and, by definition, mean 0. The
definition and test oracle is `naive.py`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ... import validation as V
from ...capability import TRITON_FOUND, cpu_extension

__all__ = ["resolve_segment_sum", "response_entropy", "response_surprisal", "segment_broadcast", "segment_count",
           "segment_mean", "segment_sum"]


def resolve_segment_sum(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The segment-sum implementation for values on `device`: `fn(values, segment_ids, num_segments) -> [R]`."""
    if device.type == "cpu" and cpu_extension() is not None:
        from . import cpu

        return cpu.segment_sum
    if device.type == "cuda" and TRITON_FOUND:
        from . import triton

        return triton.segment_sum
    from . import pytorch as torch_impl

    return torch_impl.segment_sum


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[r] = sum_{t: segment_ids[t] == r} values[t], [num_segments] in values' dtype (ids of -1 dropped)."""
    return resolve_segment_sum(values.device)(values.reshape(-1), segment_ids.reshape(-1), num_segments)


def segment_count(segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Number of tokens per segment (int64 [num_segments]); ids of -1 are dropped."""
    ids = segment_ids.reshape(-1)
    bucket = torch.where(ids >= 0, ids, num_segments)
    return torch.bincount(bucket, minlength=num_segments + 1)[:num_segments]


def segment_broadcast(per_segment: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """The inverse direction: out[t] = per_segment[segment_ids[t]] ([num_segments] -> segment_ids' shape), 0 where
    the id is -1. Ids of -1 read a zero slot at index num_segments, so num_segments = 0 (a data-parallel rank
    holding no response) works too; differentiable in per_segment."""
    slot = torch.where(segment_ids >= 0, segment_ids, per_segment.shape[0])
    return torch.cat([per_segment, per_segment.new_zeros(1)])[slot]


def segment_mean(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per-segment mean; an empty segment has mean 0 (never NaN)."""
    counts = segment_count(segment_ids, num_segments).clamp(min=1).to(values.dtype)
    return segment_sum(values, segment_ids, num_segments) / counts


def _segment_inputs(name: str, values, token_response, num_responses):
    values = V.check_tensor(name, values)
    if not values.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {values.dtype}")
    num_responses = V.check_count("num_responses", num_responses)
    token_response = V.check_index_map("token_response", token_response, values.shape, values.device,
                                       upper=num_responses, allow_untrained=True)
    return values, token_response, num_responses


def _reduce(values, token_response, num_responses, reduction):
    if reduction == "sum":
        return segment_sum(values, token_response, num_responses)
    if reduction == "mean":  # an empty response has mean 0
        return segment_mean(values, token_response, num_responses)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def response_surprisal(token_logprobs: torch.Tensor, token_response: torch.Tensor, num_responses: int, *,
                       reduction: str = "mean") -> torch.Tensor:
    """Response surprisal (eq. 3): S_r = -sum_{t in r} l_t ("sum") or s_r = S_r / L_r ("mean").

    Args:
        token_logprobs: [N] float (any shape; token_response must match it).
        token_response: [N] int, the response of each token, -1 for untrained tokens.
        num_responses: R.
    Returns:
        [R] in token_logprobs' dtype; an empty response (L_r = 0) gives 0. Differentiable.
    """
    values, token_response, num_responses = _segment_inputs("token_logprobs", token_logprobs, token_response,
                                                            num_responses)
    return _reduce(-values, token_response, num_responses, reduction)


def response_entropy(token_entropy: torch.Tensor, token_response: torch.Tensor, num_responses: int, *,
                     reduction: str = "mean") -> torch.Tensor:
    """Response entropy (eq. 3'): H_r = (1/L_r) sum_{t in r} h_t ("mean", the paper's proxy) or the sum.

    Shapes and the empty-response convention as in `response_surprisal`.
    """
    values, token_response, num_responses = _segment_inputs("token_entropy", token_entropy, token_response,
                                                            num_responses)
    return _reduce(values, token_response, num_responses, reduction)
