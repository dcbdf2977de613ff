"""The autograd contract of the package, in one place: every gradient is eager fp64's (within the accuracy rule)
or the call raises a clear error naming what is refused. Never a silently wrong number.

What every autograd Function of the token ops (and the losses built on them) keeps, as PyTorch's own in-place
ops and custom ops keep it:

1. In-place gradients (`inplace_backward=True`) write dL/dlogits into the logits' own storage, so that the
   logits and their gradient never coexist (one N x V buffer at the peak).
   - Whatever writes there bumps the logits' version counter (`mark_written`; `layout.GradientBuffer.finish`
     calls it for every in-place buffer, whichever backend wrote it: the C++ kernels write through a raw
     pointer that autograd cannot see). Another autograd node that saved the logits (`o = (z ** 2).sum()`
     next to the log-probs of `z`) then raises torch's "one of the variables needed for gradient computation
     has been modified by an inplace operation" when it runs after our backward, instead of reading the
     gradient as if it were the logits; when it runs before, it read the true logits and the result is right.
     A second backward through the same graph (retain_graph=True) raises the same way. (The raw C++ op
     `torch.ops.aem_kernels.logprobs_entropy_bwd_` does not bump by itself: its callers here all go through
     the gradient buffer.)
   - Logits whose elements overlap in memory (`b.expand(6, V)`: a stride-0 dimension, or any as_strided
     aliasing) cannot hold one gradient per element: `check_inplace_backward` refuses them with a ValueError
     naming `inplace_backward`, at the call of the public function (and, for code that applies an autograd
     Function directly, in its backward before anything is written). Out of place, such logits are fine: the
     gradient buffer is a fresh [B, T, V] tensor and autograd sums the aliased rows (`layout.gradient_buffer`).
   - The refusal is made only where a gradient will be written (the logits require grad and grad mode is on);
     under no_grad the flag changes nothing and is only type-checked.
   - The forward's outputs are O(N) private copies; the logits are read again by the backward, so they must not
     be edited by the user between the forward and the backward (torch's saved-tensor check says so if they are).
   The single-pass loss (`ops/policy_loss/triton.py`) writes the gradient in the forward: with
   inplace_backward the logits hold the gradient as soon as the loss returns (documented there).

2. Double backward: no backward here is itself differentiable (they run fused kernels, or torch code on
   detached per-row state). With create_graph=True, `first_order_only` returns the first-order gradient (correct)
   attached to a node that raises a clear RuntimeError when anything is differentiated through it (a gradient
   penalty, a Hessian-vector product), or raises at once where it cannot attach one. torch's
   `once_differentiable` is not enough: when no upstream gradient requires grad (the usual
   `loss.backward(create_graph=True)`) it returns a gradient with no graph at all, so a penalty on the gradient
   would silently add nothing, and `torch.autograd.functional.hvp` would return zeros.

3. Arguments that cannot carry a gradient are refused rather than silently treated as constants: a
   `temperature` tensor that requires grad (`validation.check_temperature`); every bool flag is type-checked
   (`validation.check_bool`: `inplace_backward="no"` is a TypeError, not a truthy string).

4. Non-finite logits behave as in eager torch: a NaN anywhere in a row gives NaN outputs and a NaN gradient on the
   whole row on every backend (the entropy term's mask is `p == 0`, not `p > 0`, which a NaN p fails); -inf
   entries have p = 0 and a zero gradient (no NaN).

5. Integer labels of every width (uint8, int16, int32, int64) give identical results on every backend: they are
   converted to int64 once, in `validation.check_labels` (torch's gather takes int64/int32 only).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from . import validation as V

__all__ = ["DOUBLE_BACKWARD_MESSAGE", "check_inplace_backward", "first_order_only", "mark_written",
           "may_overlap"]

DOUBLE_BACKWARD_MESSAGE = (
    "aem_kernels: the gradients of the token log-prob/entropy ops and of the AEM losses are first-order only: "
    "differentiating through them (double backward: a gradient penalty, a Hessian-vector product through "
    "create_graph=True) is not supported. The first-order gradient from create_graph=True is correct; compute "
    "second-order terms with eager torch.log_softmax instead.")


def may_overlap(tensor: torch.Tensor) -> bool:
    """Whether two elements of `tensor` may share memory (stride 0 from `expand`, or overlapping strides).
    Sufficient test from the metadata: with the dims of size > 1 sorted by stride, each stride must exceed the
    largest offset the smaller ones reach. A layout it cannot prove free of overlap counts as overlapping
    (refusing an exotic as_strided layout is safe; writing a gradient twice into one element is not)."""
    reach = 0
    for stride, size in sorted((st, sz) for sz, st in zip(tensor.shape, tensor.stride()) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def check_inplace_backward(logits: torch.Tensor, inplace_backward: object, writes_gradient: Optional[bool] = None,
                           name: str = "logits") -> bool:
    """`inplace_backward` checked as a bool, and refused (ValueError) for logits whose elements overlap when a
    gradient will be written into them. `writes_gradient` None: decided at the call (the logits require grad and
    grad mode is on: the public functions); False: the bool check alone (an autograd Function's forward, where
    grad mode is always off); True: the backward, just before the write (the refusal for callers that apply
    the Function directly)."""
    inplace_backward = V.check_bool("inplace_backward", inplace_backward)
    if writes_gradient is None:
        writes_gradient = torch.is_grad_enabled() and logits.requires_grad
    if inplace_backward and writes_gradient and may_overlap(logits):
        raise ValueError(
            f"inplace_backward=True writes the gradient into the storage of {name}, but {name} (shape "
            f"{tuple(logits.shape)}, strides {logits.stride()}) has elements that share memory (e.g. from "
            f"expand): one storage element cannot hold the gradient of several. Pass inplace_backward=False (the "
            f"gradient is then correct for such logits) or {name}.contiguous()")
    return inplace_backward


def mark_written(tensor: torch.Tensor) -> torch.Tensor:
    """Bump the version counter of `tensor` (shared with its base and views) after a kernel wrote into its
    storage behind autograd's back, so that any node that saved it refuses to use the new contents."""
    torch.autograd.graph.increment_version(tensor)
    return tensor


class _RefuseDoubleBackward(torch.autograd.Function):
    """(grad, *anchors) -> grad, a node whose backward raises: it marks a first-order gradient computed under
    create_graph=True. The anchors (the Function's saved inputs and the upstream gradients that require grad)
    put the node on every path from the gradient to what it depends on, so that `autograd.grad(penalty,
    inputs)` and `backward(inputs=...)` reach it and raise, rather than report the inputs unused (None with
    allow_unused) or leave their gradient without the penalty's part."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, *anchors: torch.Tensor) -> torch.Tensor:
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


def first_order_only(backward: Callable) -> Callable:
    """Decorator for `backward(ctx, *grad_outputs)` of an autograd Function (or of a `torch.library`
    `register_autograd` formula) whose body is not differentiable (module docstring, point 2).

    Grad mode off (the usual backward): the body runs as it is. create_graph=True (grad mode on in the backward):
    the body runs under no_grad and its gradients come back attached to a node that raises
    `DOUBLE_BACKWARD_MESSAGE` when differentiated, anchored to the saved tensors and upstream gradients that
    require grad (see `_RefuseDoubleBackward`). A Function with no such tensor (the losses whose backward only
    hands on gradients computed in the forward, under a plain upstream gradient) has nothing to anchor the
    refusal to, so it raises at once."""

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        if not torch.is_grad_enabled():
            return backward(ctx, *grad_outputs)
        # unpacked before the body runs: an in-place gradient bumps the saved logits' version
        anchors = tuple(t for t in (*ctx.saved_tensors, *grad_outputs)
                        if isinstance(t, torch.Tensor) and t.requires_grad)
        if not anchors:
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE + " (refused at create_graph=True: this backward hands "
                               "on gradients computed in the forward)")
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        refuse = (lambda g: _RefuseDoubleBackward.apply(g, *anchors)  # noqa: E731
                  if isinstance(g, torch.Tensor) else g)
        return tuple(refuse(g) for g in grads) if isinstance(grads, tuple) else refuse(grads)

    return wrapper
