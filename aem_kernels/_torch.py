"""The "torch" backend of the token ops and of the segment sum: plain PyTorch, every device and dtype.

This is a production path (what "auto" uses where neither Triton nor the C++ extension can serve a tensor, and
the readable baseline of the benchmarks); the test oracle is `reference.py`, which this module does not use.

Token log-prob and entropy (AEM_SPEC.md eq. 1-2) with temperature tau, in a numerically careful form. With
z = logits / tau, m = max_v z_v, s = z - m (exact near the max by Sterbenz's lemma) and d = sum_v exp(s_v):

    lse = m + log d,    l_t = s[y_t] - log d,    h_t = log d - (sum_v exp(s_v) s_v) / d        (1, 2)

The entropy never subtracts two O(|z|) numbers, so logits of magnitude 1e4 keep full relative accuracy in
fp32. Entries equal to -inf have p_v = 0 and contribute 0 to the entropy (p log p -> 0).

Gradients (section 6), with p = softmax(z), for upstream scalars a_t = dL/dl_t and b_t = dL/dh_t:

    dL/dlogits_t = [ a_t (onehot(y_t) - p_t) - b_t p_t * (log p_t + h_t) ] / tau

Both directions walk the rows in chunks, so the fp32 working set is a few chunk-sized buffers, never an
fp32 copy of the whole logits. Rows whose label is ignore_index produce 0 (both outputs) and a zero
gradient. A row whose logits are all -inf has no distribution: its outputs are NaN (not silently 0).
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from ._layout import compute_dtype

__all__ = ["DTYPES", "logprobs_entropy_fwd", "logprobs_entropy_bwd", "segment_sum"]

# Capability declared to `dispatch.py`: every logits dtype, on every device.
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
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Forward over [B, T, V] logits; `labels` is [B*T] or None. Returns (logprobs|None, entropy, lse),
    each [B*T] in fp32 (fp64 for fp64 logits); lse is of logits / temperature."""
    batch, rows, _ = logits3d.shape
    n_rows = batch * rows
    dtype = compute_dtype(logits3d.dtype)
    lse = torch.empty(n_rows, dtype=dtype, device=logits3d.device)
    entropy = torch.empty_like(lse)
    logprobs = torch.zeros_like(lse) if labels is not None else None
    for start, block in _row_chunks(logits3d, chunk_rows):
        stop = start + block.shape[0]
        z = block.to(dtype) / temperature
        row_max = z.amax(dim=-1, keepdim=True)
        shifted = z - row_max
        expv = shifted.exp()
        denom = expv.sum(dim=-1)
        log_denom = denom.log()
        weighted = torch.where(expv > 0, expv * shifted, torch.zeros((), dtype=dtype, device=z.device))
        lse[start:stop] = row_max.squeeze(-1) + log_denom
        entropy[start:stop] = log_denom - weighted.sum(dim=-1) / denom
        if labels is not None:
            rows_labels = labels[start:stop]
            active = rows_labels != ignore_index
            target = shifted.gather(1, torch.where(active, rows_labels, 0).unsqueeze(1)).squeeze(1)
            logprobs[start:stop] = torch.where(active, target - log_denom, 0.0)
            entropy[start:stop] = torch.where(active, entropy[start:stop], 0.0)
    return logprobs, entropy, lse


def logprobs_entropy_bwd(
    logits3d: torch.Tensor,
    labels: Optional[torch.Tensor],
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    grad_out3d: torch.Tensor,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Writes dL/dlogits (section 6) into `grad_out3d` ([B, T, V], may alias `logits3d`) and returns it."""
    dtype = compute_dtype(logits3d.dtype)
    batch, rows, _ = logits3d.shape
    for start, block in _row_chunks(logits3d, chunk_rows):
        stop = start + block.shape[0]
        z = block.to(dtype) / temperature
        log_p = z - lse[start:stop].to(dtype).unsqueeze(1)
        prob = log_p.exp()
        grad = torch.zeros_like(z)
        if grad_entropy is not None:
            h = entropy[start:stop].to(dtype).unsqueeze(1)
            b_t = grad_entropy[start:stop].to(dtype).unsqueeze(1)
            grad = -b_t * torch.where(prob > 0, prob * (log_p + h), torch.zeros((), dtype=dtype, device=z.device))
        if labels is not None:
            rows_labels = labels[start:stop]
            active = rows_labels != ignore_index
            if grad_logprobs is not None:
                a_t = torch.where(active, grad_logprobs[start:stop].to(dtype), 0.0)
                grad = grad - a_t.unsqueeze(1) * prob
                grad.scatter_add_(1, torch.where(active, rows_labels, 0).unsqueeze(1), a_t.unsqueeze(1))
            grad = torch.where(active.unsqueeze(1), grad, torch.zeros((), dtype=dtype, device=z.device))
        b, row = divmod(start, rows)
        grad_out3d[b, row:row + (stop - start)] = (grad / temperature).to(grad_out3d.dtype)
    return grad_out3d


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[r] = sum_{t: segment_ids[t] == r} values[t]; ids of -1 are dropped. Differentiable, no host sync:
    dropped tokens go to an extra bucket that is sliced off. index_add accumulates in the values' dtype, with
    atomics on CUDA (the last bits may depend on scheduling there)."""
    values = values.reshape(-1)
    ids = segment_ids.reshape(-1)
    bucket = torch.where(ids >= 0, ids, num_segments)
    out = torch.zeros(num_segments + 1, dtype=values.dtype, device=values.device)
    return out.index_add(0, bucket, values)[:num_segments]
