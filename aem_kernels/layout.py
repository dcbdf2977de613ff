"""The canonical row layout every backend works on: logits as a [B, T, V] view with a unit vocab stride (and
the gradient plumbing every backend shares: the gradient buffer, the segment sum's autograd).

Users pass [..., V] logits, very often a slice such as `logits[:, :-1]` of a [B, T+1, V] tensor. Such a
slice cannot be flattened to [N, V] without a copy, but row i is still at (i // T) * stride_b +
(i % T) * stride_t, so kernels take (stride_b, stride_t, T) and no N x V copy is ever made.
"""

from __future__ import annotations

from typing import Optional

import torch

from .contract import mark_written


def _mergeable(sizes, strides) -> bool:
    """Whether dims with these sizes/strides collapse into one by a view (no copy). Decided from the
    metadata rather than by trying `view` and catching the error, so torch.compile traces it."""
    if any(size == 0 for size in sizes):
        return True
    kept = [(size, stride) for size, stride in zip(sizes, strides) if size != 1]
    return all(outer[1] == inner[1] * inner[0] for outer, inner in zip(kept, kept[1:]))


def rows3d_needs_copy(logits: torch.Tensor) -> bool:
    """Whether `as_rows3d(logits)` must copy: only >= 4-d logits whose leading dims cannot be merged. Decided
    from the metadata (not by comparing storages after the fact), so torch.compile traces it."""
    return (logits.dim() > 3 and not _mergeable(logits.shape[:-1], logits.stride()[:-1])
            and not _mergeable(logits.shape[:-2], logits.stride()[:-2]))


def as_rows3d(logits: torch.Tensor) -> torch.Tensor:
    """A [B, T, V] view of [..., V] logits (rows = B * T), copying only for >3-d non-collapsible inputs."""
    vocab = logits.shape[-1]
    if logits.dim() == 1:
        return logits.view(1, 1, vocab)
    if _mergeable(logits.shape[:-1], logits.stride()[:-1]):
        return logits.view(1, -1, vocab)
    if logits.dim() == 3:
        return logits
    if not rows3d_needs_copy(logits):
        return logits.view(-1, logits.shape[-2], vocab)
    # Only reachable for >= 4-d logits whose leading dims cannot be merged; rare enough to copy.
    return logits.reshape(-1, logits.shape[-2], vocab)


class GradientBuffer:
    """The logits' gradient as autograd receives it (`grad`, logits' shape) and as the kernels write it
    (`rows3d`, the [B, T, V] layout of `as_rows3d`). Use: `buf = gradient_buffer(...)`, let the kernel write
    `buf.rows3d`, then return `buf.finish()`."""

    __slots__ = ("grad", "rows3d", "_copy_back", "_inplace")

    def __init__(self, grad: torch.Tensor, rows3d: torch.Tensor, copy_back: bool, inplace: bool = False) -> None:
        self.grad, self.rows3d, self._copy_back, self._inplace = grad, rows3d, copy_back, inplace

    def finish(self) -> torch.Tensor:
        """`grad`, after copying `rows3d` into it when `rows3d` is a separate copy (see `gradient_buffer`).
        An in-place buffer has its version counter bumped (`contract.mark_written`): kernels that write through
        a raw pointer are invisible to autograd, and a node that saved the target must refuse it now."""
        if self._copy_back:
            self.grad.copy_(self.rows3d.view(self.grad.shape))
        if self._inplace:
            mark_written(self.grad)
        return self.grad


def gradient_buffer(target: torch.Tensor, *, inplace: bool,
                    rows3d: Optional[torch.Tensor] = None) -> GradientBuffer:
    """The buffer a kernel writes the gradient of [..., V] `target` into, in as_rows3d's row layout.

    inplace=True: the gradient goes into `target`'s own storage (the logits for `inplace_backward`, or a
    gradient already written that is to be rescaled in place); `rows3d` is `as_rows3d(target)` (pass it when
    already computed) and `finish()` copies it back in the one case where as_rows3d had to copy, and bumps
    target's version counter (the contract of `aem_kernels.contract`: the caller refuses overlapping targets).
    inplace=False: a fresh uninitialised buffer, allocated in [B, T, V] so that the kernel addresses the logits
    and the gradient with the same row split even when the logits are a non-contiguous slice such as
    logits[:, :-1]; `grad` is a view of it in target's shape and `finish()` copies nothing.
    """
    if rows3d is None:
        rows3d = as_rows3d(target)
    if inplace:
        return GradientBuffer(target, rows3d, rows3d_needs_copy(target), inplace=True)
    fresh = torch.empty(rows3d.shape, dtype=target.dtype, device=target.device)
    return GradientBuffer(fresh.view(target.shape), fresh, False)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (for fp64 reference checks); every other dtype is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
