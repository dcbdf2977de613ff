"""The segment sum's autograd, shared by its C++ (`cpu.py`) and Triton (`triton.py`) custom ops:
d(sum over a segment)/d(value) is 1 for the value's own segment, so the backward gathers the upstream gradient
by segment id (0 for dropped tokens, id -1)."""

from __future__ import annotations

import torch

__all__ = ["segment_sum_setup_context", "segment_sum_backward"]


def segment_sum_setup_context(ctx, inputs, output) -> None:
    """setup_context of a segment-sum custom op (values [N], segment_ids [N] with -1 = none, num_segments)."""
    values, segment_ids, _ = inputs
    ctx.save_for_backward(segment_ids)
    ctx.values_shape = values.shape


def segment_sum_backward(ctx, grad: torch.Tensor):
    """d(sum over a segment)/d(value) is 1 for its own segment: gather grad by id; 0 where the id is -1."""
    (segment_ids,) = ctx.saved_tensors
    ids = segment_ids.reshape(-1).long()
    picked = grad[ids.clamp(min=0)] if grad.numel() else grad.new_zeros(ids.shape)
    grad_values = torch.where(ids >= 0, picked, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return grad_values.view(ctx.values_shape), None, None
