"""The "torch" backend of the token ops: plain PyTorch, every device and dtype.

This is a production path (what "auto" uses where neither Triton nor the C++ extension can serve a tensor, and
the readable baseline of the benchmarks); the test oracle is `naive.py`, which this module does not use.

Token log-prob and entropy (AEM_SPEC.md eq. 1-2) with temperature tau. With m = max_v x_v the row max of
the logits themselves (an exact logit value), s_v = (x_v - m) / tau (x_v - m is exact near the max by
Sterbenz's lemma, so s is accurate to an ulp of s, not of x / tau) and d = sum_v exp(s_v):

    log p_v = s_v - log d,    l_t = s[y_t] - log d,    h_t = log d - (sum_v exp(s_v) s_v) / d        (1, 2)

The per-row epilogue (log d, l_t, h_t) is evaluated in fp64 from the exact logits x_y and m and the exact
tau, so l_t is the correctly rounded fp32 value up to the rounding of d; eager fp32
`log_softmax(x / tau)` instead rounds x_y / tau and m / tau (an ulp of |x| / tau each). The entropy never
subtracts two O(|z|) numbers, so logits of magnitude 1e4 keep full accuracy in fp32. Entries equal to -inf
have p_v = 0 and contribute 0 to the entropy (p log p -> 0).

Per-row state: the forward returns `state` = [B*T, 2] of (m, log d) in the compute dtype, what its own
backward needs. They are kept apart rather than folded into lse = m / tau + log d: near the max, s_v is
exact and log d is small, so log p_v = s_v - log d has an error of an ulp of log p_v, while z_v - lse
would carry the rounding of lse (an ulp of |lse|, 5e-4 at |lse| ~ 1e4) into every p_v.

Gradients (section 6), with p = softmax(z), for upstream scalars a_t = dL/dl_t and b_t = dL/dh_t:

    dL/dlogits_t = [ a_t (onehot(y_t) - p_t) - b_t p_t * (log p_t + h_t) ] / tau

Both directions walk the rows in chunks, so the fp32 working set is a few chunk-sized buffers, never an
fp32 copy of the whole logits. Rows whose label is ignore_index produce 0 (both outputs and the state) and
a zero gradient. A row whose logits are all -inf has no distribution: its outputs are NaN (not silently 0).
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from ...layout import compute_dtype

__all__ = ["DTYPES", "logprobs_entropy_fwd", "logprobs_entropy_bwd"]

# What this backend serves (read by the path decision): every logits dtype, on every device.
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# fp32 working set per chunk: a handful of [rows, V] buffers of this many bytes each.
_CHUNK_BYTES = 1 << 25


def _row_chunks(logits3d: torch.Tensor, chunk_rows: Optional[int]) -> Iterator[Tuple[int, torch.Tensor]]:
    batch, rows, vocab = logits3d.shape
    step = chunk_rows or max(1, _CHUNK_BYTES // (8 * max(vocab, 1)))
    for b in range(batch):
        for start in range(0, rows, step):
            yield b * rows + start, logits3d[b, start:start + step]


def logprobs_entropy_fwd(
    logits3d: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    chunk_rows: Optional[int] = None,
    *,
    with_entropy: bool = True,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """Forward over [B, T, V] logits; `labels` is [B*T] or None. Returns (logprobs|None, entropy|None, state):
    logprobs and entropy [B*T], state [B*T, 2] = (row max of the logits, log d), all fp32 (fp64 for fp64
    logits); see the module docstring. with_entropy=False skips the entropy's [rows, V] products and sum and
    returns None for it (the log-probs and the state are the same values)."""
    batch, rows, _ = logits3d.shape
    n_rows = batch * rows
    dtype = compute_dtype(logits3d.dtype)
    state = torch.empty(n_rows, 2, dtype=dtype, device=logits3d.device)
    entropy = torch.empty(n_rows, dtype=dtype, device=logits3d.device) if with_entropy else None
    logprobs = torch.zeros(n_rows, dtype=dtype, device=logits3d.device) if labels is not None else None
    zero = torch.zeros((), dtype=dtype, device=logits3d.device)
    for start, block in _row_chunks(logits3d, chunk_rows):
        stop = start + block.shape[0]
        x = block.to(dtype)
        row_max = x.amax(dim=-1, keepdim=True)
        shifted = (x - row_max) / temperature
        expv = shifted.exp()
        # The O(rows) epilogue in fp64: log d and h from the fp32 sums, l from the exact x_y, m and tau.
        denom = expv.sum(dim=-1).double()
        log_denom = denom.log()
        state[start:stop, 0] = row_max.squeeze(-1)
        state[start:stop, 1] = log_denom.to(dtype)
        active = None
        if labels is not None:
            rows_labels = labels[start:stop]
            active = rows_labels != ignore_index
            target = block.gather(1, torch.where(active, rows_labels, 0).unsqueeze(1)).squeeze(1).double()
            row_logprob = (target - row_max.squeeze(-1).double()) / temperature - log_denom
            logprobs[start:stop] = torch.where(active, row_logprob, 0.0).to(dtype)
            state[start:stop] = torch.where(active.unsqueeze(1), state[start:stop], zero)
        if with_entropy:
            weighted = torch.where(expv > 0, expv * shifted, zero).sum(dim=-1).double()
            row_entropy = log_denom - weighted / denom
            if active is not None:
                row_entropy = torch.where(active, row_entropy, 0.0)
            entropy[start:stop] = row_entropy.to(dtype)
    return logprobs, entropy, state


def logprobs_entropy_bwd(
    logits3d: torch.Tensor,
    labels: Optional[torch.Tensor],
    state: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    grad_out3d: torch.Tensor,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Writes dL/dlogits (section 6) into `grad_out3d` ([B, T, V], may alias `logits3d`) and returns it.
    `state` is the [B*T, 2] (row max, log d) of `logprobs_entropy_fwd` on the same logits."""
    dtype = compute_dtype(logits3d.dtype)
    batch, rows, _ = logits3d.shape
    zero = torch.zeros((), dtype=dtype, device=logits3d.device)
    for start, block in _row_chunks(logits3d, chunk_rows):
        stop = start + block.shape[0]
        row_state = state[start:stop].to(dtype)
        # log p = s - log d with s = (x - m) / tau as in the forward (exact near the max).
        log_p = (block.to(dtype) - row_state[:, :1]) / temperature - row_state[:, 1:]
        prob = log_p.exp()
        grad = torch.zeros_like(log_p)
        if grad_entropy is not None:
            h = entropy[start:stop].to(dtype).unsqueeze(1)
            b_t = grad_entropy[start:stop].to(dtype).unsqueeze(1)
            # p log p -> 0 where p == 0 (-inf logits); `prob == 0` rather than `prob > 0` so that a NaN row
            # (NaN state) keeps its NaN gradient, as eager autograd gives
            grad = -b_t * torch.where(prob == 0, zero, prob * (log_p + h))
        if labels is not None:
            rows_labels = labels[start:stop]
            active = rows_labels != ignore_index
            if grad_logprobs is not None:
                a_t = torch.where(active, grad_logprobs[start:stop].to(dtype), 0.0)
                grad = grad - a_t.unsqueeze(1) * prob
                grad.scatter_add_(1, torch.where(active, rows_labels, 0).unsqueeze(1), a_t.unsqueeze(1))
            grad = torch.where(active.unsqueeze(1), grad, zero)
        b, row = divmod(start, rows)
        grad_out3d[b, row:row + (stop - start)] = (grad / temperature).to(grad_out3d.dtype)
    return grad_out3d
