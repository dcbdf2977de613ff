"""K log-probs per position: log softmax(logits / tau)[y_k] for labels of shape logits.shape[:-1] + (K,).

TRL's `selective_log_softmax(logits, index)` accepts an index of shape (..., K) (top-K or candidate tokens);
this is that op over every backend, with the backend contract unchanged (one label per row):

Forward. The backend runs on one "anchor" label per row (of the row's labels that are not ignore_index, the
first of largest logit) and reads the logits once for l_anchor = x_anchor - log sum_v e^{x_v} (eq. 1,
x = z / tau; the backend keeps the row max and log d apart). The K values are O(N K) gathers:
l_k = l_anchor + (x_k - x_anchor), which is exactly l_anchor for y_k = y_anchor,
so K = 1 (and every duplicate of the anchor) gives the backend's own value. The state the backend returns is
saved as it is.

Backward. With a_k = dL/dl_k (0 for ignored entries) and A = sum_k a_k,

    dL/dz = sum_k a_k (onehot(y_k) - p) / tau = (A onehot(y_anchor) - A p) / tau + corrections at the y_k

so the backend's backward with the single coefficient A (labels = anchors) is right everywhere except at the
K label positions, which are then overwritten with their exact value (S_k - A p_k) / tau, where S_k sums a_j
over the j with y_j = y_k (duplicates) and p_k = exp(l_k) comes from the saved [N, K] log-probs (the logits
may already be overwritten by `inplace_backward`). One rounding per entry, an O(N K) scatter, no N x V
temporary beyond the gradient itself. Entries of one token all receive the same value, so the scatter is
deterministic.
"""

from __future__ import annotations

import torch

from ...contract import check_inplace_backward, first_order_only
from ...layout import as_rows3d, compute_dtype, gradient_buffer

__all__ = ["GatheredLogprobsFunction"]


def _duplicate_sums(index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[N, K]: for each entry, the sum of `values` over the entries of its row with the same index (values of
    ignored entries are 0). Sorting each row groups equal indices: O(N K log K), no [N, K, K] temporary."""
    if index.shape[1] == 1:
        return values
    ordered, order = index.sort(dim=1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.to(torch.int64).cumsum(1) - 1
    # fp64 accumulation: the fp32 sum of a group of duplicates does not depend on the order the scatter adds in
    # (CUDA's atomics), unless its coefficients span more than ~2^25 in magnitude
    totals = torch.zeros(values.shape, dtype=torch.float64, device=values.device)
    totals.scatter_add_(1, group, values.gather(1, order).to(torch.float64))
    return torch.empty_like(values).scatter_(1, order, totals.gather(1, group).to(values.dtype))


class GatheredLogprobsFunction(torch.autograd.Function):
    """(logits [..., V], labels [..., K]) -> logprobs [..., K] (fp32; fp64 for fp64 logits); see the module
    docstring. Inputs are validated by the caller (`logprobs_from_logits`); `backend` is a row backend of
    `resolve_backend`."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                backend, inplace_backward: bool):
        inplace_backward = check_inplace_backward(logits, inplace_backward, writes_gradient=False)
        dtype = compute_dtype(logits.dtype)
        logits3d = as_rows3d(logits)
        batch, rows, _ = logits3d.shape
        k = labels.shape[-1]
        index = labels.reshape(-1, k)
        active = index != ignore_index
        safe = torch.where(active, index, 0).long()  # gather/scatter take int64 (int32) indices only
        # Same rounding as eager: the logits' dtype -> fp32 (fp64), then / tau.
        scaled = logits3d.gather(2, safe.view(batch, rows, k)).view(-1, k).to(dtype) / temperature
        # The anchor: the first active entry of largest logit, so that a label at -inf is never the anchor
        # while a finite one exists (l_anchor = -inf would turn every other l_k into NaN).
        key = torch.where(active, scaled, float("-inf"))
        best = active & (key == key.amax(dim=1, keepdim=True))
        best = torch.where(best.any(dim=1, keepdim=True), best, active)  # a NaN logit: the first active entry
        first = best.to(torch.int8).argmax(dim=1, keepdim=True)  # position of the anchor (0 when none active)
        anchor = torch.where(active.any(dim=1), safe.gather(1, first).squeeze(1), ignore_index)
        anchor_logprobs, entropy, state = backend.forward(logits3d, anchor, temperature, ignore_index)
        anchor_scaled = scaled.gather(1, first)
        # x_k == x_anchor (the anchor's own token, or both -inf): exactly l_anchor, never -inf - -inf
        offset = torch.where(scaled == anchor_scaled, 0.0, scaled - anchor_scaled)
        logprobs = torch.where(active, anchor_logprobs.unsqueeze(1) + offset,
                               torch.zeros((), dtype=dtype, device=logits.device))
        ctx.save_for_backward(logits, anchor, state, entropy, safe, first, active, logprobs)
        ctx.config = (temperature, ignore_index, backend, inplace_backward)
        ctx.set_materialize_grads(False)
        return logprobs.view(labels.shape).clone()  # a private copy: users may edit the output in place

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logprobs):
        if grad_logprobs is None:
            return (None,) * 6
        logits, anchor, state, entropy, safe, first, active, logprobs = ctx.saved_tensors
        temperature, ignore_index, backend, inplace_backward = ctx.config
        grads = torch.where(active, grad_logprobs.reshape(safe.shape).to(logprobs.dtype), 0.0)
        total = grads.sum(dim=1)
        check_inplace_backward(logits, inplace_backward, writes_gradient=True)
        logits3d = as_rows3d(logits)
        buffer = gradient_buffer(logits, inplace=inplace_backward, rows3d=logits3d)
        backend.backward(logits3d, anchor, state, entropy, total.contiguous(), None, temperature, ignore_index,
                         buffer.rows3d)
        exact = (_duplicate_sums(safe, grads) - total.unsqueeze(1) * logprobs.exp()) / temperature
        # Ignored entries rewrite the row's anchor position with its own value (a row with no active entry:
        # position 0 with the 0 the backend wrote), so every scatter target receives one value.
        exact = torch.where(active, exact, exact.gather(1, first))
        target = torch.where(active, safe, safe.gather(1, first))
        shape3d = buffer.rows3d.shape[:2] + (safe.shape[1],)
        buffer.rows3d.scatter_(2, target.view(shape3d), exact.to(logits.dtype).view(shape3d))
        return buffer.finish(), None, None, None, None, None
