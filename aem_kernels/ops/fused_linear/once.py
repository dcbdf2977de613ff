"""The autograd contract of the fused-linear op's Functions (`FusedLinearLogprobsEntropyFunction`,
`VocabParallelFusedLinearFunction`): differentiable once, and a double backward is a clear error.

Their backwards compute numbers (custom ops, row kernels that write dL/dz in place over a chunk buffer), not a
graph, so a second derivative through them cannot be right. Torch's `once_differentiable` runs such a backward
without recording a graph, but with create_graph=True it hangs its error node on detached copies of the
gradients, or on nothing at all when no upstream gradient requires grad: a penalty on the gradient then
silently added nothing, and torch.autograd.grad(..., allow_unused=True) silently gave None for a second
derivative. `differentiable_once` hangs the error node on what the gradients depend on instead.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

__all__ = ["differentiable_once"]


class _SecondDerivativeRefused(torch.autograd.Function):
    """(name, k, k gradients, anchors...) -> the k gradients as they are (views, no copy), hung on the anchors
    (what they depend on); differentiating them raises."""

    @staticmethod
    def forward(ctx, name: str, count: int, *tensors: torch.Tensor):
        ctx.name = name
        return tensors[:count]

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise RuntimeError(f"{ctx.name} is differentiable once: its gradient has no second derivative (double "
                           "backward, e.g. a penalty on a gradient taken with create_graph=True, is not supported)")


def differentiable_once(name: str) -> Callable:
    """Decorator for the backward of the autograd Function `name`, as torch's `once_differentiable`: the
    backward runs without recording a graph, and with create_graph=True its gradients get one node, hung on
    everything they depend on (the upstream gradients and the saved inputs that require grad), whose backward
    raises a RuntimeError naming `name` (see the module docstring for why not torch's decorator itself)."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():   # the usual backward, without create_graph
                return grads
            anchors = [t for t in (*grad_outputs, *ctx.saved_tensors)
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            index = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
            if not index or not anchors:
                return grads
            marked = _SecondDerivativeRefused.apply(name, len(index), *(grads[i] for i in index), *anchors)
            out = list(grads)
            for i, g in zip(index, marked):
                out[i] = g
            return tuple(out)

        return wrapper

    return decorate
