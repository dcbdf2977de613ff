"""Triton kernels of the token ops: log-probs (eq. 1), entropies (eq. 2) and their section-6 gradient.

Forward: one program per row of a [B, T, V] view (row i at (i // T) * stride_b + (i % T) * stride_t, int64),
one streaming read of the row in BLOCK_V tiles keeping the running max m, d = sum exp(s) and
t = sum exp(s) s with s = z - m, z = logits / tau (see `utils.streaming_softmax_stats`); then
lse = m + log d, l_t = (z_y - m) - log d, h_t = log d - t / d. Only O(N) state (lse, entropy) is saved for
the backward. A row whose label is ignore_index reads nothing and outputs 0.
Backward: one read and one write per row, grad = [a_t (onehot - p) - b_t p (log p + h_t)] / tau, with
log p = z - lse; the output may alias the logits (in-place gradient). The saved lse is an fp32 number, so
p carries its rounding as a relative error of at most ulp(lse)/2 (6e-8 for |lse| < 1, 5e-4 at |lse| ~ 1e4),
exactly like the fp32 torch reference, which saves the same lse.

Roofline (for benchmarks; E = bytes per logit, 2 for bf16/fp16, 4 for fp32; N_a active rows of N):
    forward   V * E bytes read per active row (+ ~20 bytes of per-row scalars); ignored rows read nothing
    backward  2 * V * E bytes per active row (one read, one write; in place or not), V * E per ignored row
              (zeros are written, nothing is read)
so achieved GB/s = N_a V E / t_fwd and (2 N_a + (N - N_a)) V E / t_bwd, against 3.35 TB/s (H100 SXM) or
4.8 TB/s (H200). The single-pass loss (`aem_loss.py`) reads each active row twice and writes it once.

Response sums (eq. 3, 3'): `logprobs_entropy_fwd_with_response_sums` also returns sum_{t in r} l_t and
sum_{t in r} h_t over the token->response map, either accumulated by the forward kernel itself with one
fp32 atomic add per token and response (fast, the last bits depend on scheduling), or, with
`deterministic=True`, by the fixed-order reduction of `segment.py` over the per-row outputs (bit-identical
run to run, one extra O(N) pass).

fp64 logits are not served here (Triton's exp/log lower to fp32 approximations, so the result would not be
fp64-accurate): `dispatch.py` sends them to a backend that computes in fp64, and the launchers refuse them.

Every launcher is a `torch.library.custom_op` with a fake implementation, so `torch.compile` sees an opaque
op with known output shapes instead of a graph break, and nothing on the host reads device memory (no sync:
CUDA-graph safe).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._layout import compute_dtype
from ..errors import BackendUnavailableError
from . import FP64_REASON
from .segment import segment_sums_deterministic
from .utils import (BWD_TILE_BYTES, check_triton_device, launch_config, row_offset, store_row_grad,
                    streaming_softmax_stats)

__all__ = ["logprobs_entropy_fwd", "logprobs_entropy_bwd", "logprobs_entropy_fwd_with_response_sums"]


@triton.jit
def _logprobs_entropy_fwd_kernel(
    logits_ptr, labels_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
    token_response_ptr, response_logprob_ptr, response_entropy_ptr,
    rows_per_batch, stride_b, stride_t, vocab, scale, ignore_index,
    HAS_LABELS: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, rows_per_batch, stride_b, stride_t)
    active = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        active = label != ignore_index
    # An ignored row runs zero loop iterations: its logits are never read.
    m, d, t = streaming_softmax_stats(row_ptr, tl.where(active, vocab, 0), vocab, scale, BLOCK_V)
    log_d = tl.log(d)
    entropy = tl.where(active, log_d - t / d, 0.0)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, tl.where(active, m + log_d, 0.0))
    logprob = tl.zeros([], tl.float32)
    if HAS_LABELS:
        target = tl.load(row_ptr + tl.where(active, label, 0)).to(tl.float32) * scale
        logprob = tl.where(active, (target - m) - log_d, 0.0)  # target - m is exact near the max
        tl.store(logprobs_ptr + row, logprob)
    if ACCUMULATE:
        response = tl.load(token_response_ptr + row)
        trained = (response >= 0) & active
        safe = tl.maximum(response, 0)
        tl.atomic_add(response_entropy_ptr + safe, entropy, mask=trained)
        if HAS_LABELS:
            tl.atomic_add(response_logprob_ptr + safe, logprob, mask=trained)


@triton.jit
def _logprobs_entropy_bwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
    rows_per_batch, stride_b, stride_t, grad_stride_b, grad_stride_t, vocab, scale, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_GRAD_LOGPROBS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    in_ptr = logits_ptr + row_offset(row, rows_per_batch, stride_b, stride_t)
    out_ptr = grad_ptr + row_offset(row, rows_per_batch, grad_stride_b, grad_stride_t)
    active = True
    label = -1
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        active = label != ignore_index
    a = tl.zeros([], tl.float32)
    b = tl.zeros([], tl.float32)
    entropy = tl.zeros([], tl.float32)
    if HAS_GRAD_LOGPROBS:
        a = tl.where(active, tl.load(grad_logprobs_ptr + row).to(tl.float32), 0.0)
    if HAS_GRAD_ENTROPY:
        b = tl.where(active, tl.load(grad_entropy_ptr + row).to(tl.float32), 0.0)
        entropy = tl.load(entropy_ptr + row)
    lse = tl.where(active, tl.load(lse_ptr + row), 0.0)
    store_row_grad(in_ptr, out_ptr, vocab, scale, lse, 0.0, entropy, a, b, label, active,
                   HAS_GRAD_LOGPROBS, HAS_GRAD_ENTROPY, BLOCK_V)


def _launch_fwd(logits3d: torch.Tensor, labels: Optional[torch.Tensor], temperature: float, ignore_index: int,
                token_response: Optional[torch.Tensor], num_responses: int):
    batch, rows, vocab = logits3d.shape
    n_rows = batch * rows
    device = logits3d.device
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device)
    lse = torch.empty_like(entropy)
    logprobs = torch.empty(n_rows if labels is not None else 0, dtype=torch.float32, device=device)
    sums_lp = torch.zeros(num_responses, dtype=torch.float32, device=device)
    sums_h = torch.zeros_like(sums_lp)
    if n_rows:
        block_v, num_warps = launch_config(vocab, logits3d.element_size())
        accumulate = token_response is not None
        _logprobs_entropy_fwd_kernel[(n_rows,)](
            logits3d, labels if labels is not None else entropy, logprobs, entropy, lse,
            token_response if accumulate else entropy, sums_lp, sums_h,
            rows, logits3d.stride(0), logits3d.stride(1), vocab, 1.0 / temperature, ignore_index,
            HAS_LABELS=labels is not None, ACCUMULATE=accumulate, BLOCK_V=block_v, num_warps=num_warps)
    return logprobs, entropy, lse, sums_lp, sums_h


@torch.library.custom_op("aem_kernels::triton_logprobs_entropy_fwd", mutates_args=())
def _fwd_op(logits3d: torch.Tensor, labels: Optional[torch.Tensor], temperature: float,
            ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_fwd(logits3d, labels, temperature, ignore_index, None, 0)[:3]


@_fwd_op.register_fake
def _(logits3d, labels, temperature, ignore_index):
    n_rows = logits3d.shape[0] * logits3d.shape[1]
    dtype = compute_dtype(logits3d.dtype)
    out = logits3d.new_empty(n_rows, dtype=dtype)
    return logits3d.new_empty(n_rows if labels is not None else 0, dtype=dtype), out, torch.empty_like(out)


@torch.library.custom_op("aem_kernels::triton_logprobs_entropy_fwd_segmented", mutates_args=())
def _fwd_segmented_op(logits3d: torch.Tensor, labels: Optional[torch.Tensor], temperature: float,
                      ignore_index: int, token_response: torch.Tensor, num_responses: int, deterministic: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    token_response = token_response.reshape(-1).long()
    if deterministic:
        logprobs, entropy, lse = _fwd_op(logits3d, labels, temperature, ignore_index)
        values = logprobs if labels is not None else torch.zeros_like(entropy)
        sums_lp, sums_h = segment_sums_deterministic((values, entropy), token_response, num_responses)
        return logprobs, entropy, lse, sums_lp, sums_h
    return _launch_fwd(logits3d, labels, temperature, ignore_index, token_response, num_responses)


@_fwd_segmented_op.register_fake
def _(logits3d, labels, temperature, ignore_index, token_response, num_responses, deterministic):
    logprobs, entropy, lse = _fwd_op(logits3d, labels, temperature, ignore_index)
    sums = entropy.new_empty(num_responses)
    return logprobs, entropy, lse, sums, torch.empty_like(sums)


@torch.library.custom_op("aem_kernels::triton_logprobs_entropy_bwd", mutates_args=("grad_out3d",))
def _bwd_op(logits3d: torch.Tensor, labels: Optional[torch.Tensor], lse: torch.Tensor, entropy: torch.Tensor,
            grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], temperature: float,
            ignore_index: int, grad_out3d: torch.Tensor) -> None:
    batch, rows, vocab = logits3d.shape
    if batch * rows == 0:
        return
    block_v, num_warps = launch_config(vocab, max(logits3d.element_size(), grad_out3d.element_size()),
                                       BWD_TILE_BYTES)
    dummy = lse
    _logprobs_entropy_bwd_kernel[(batch * rows,)](
        logits3d, grad_out3d, labels if labels is not None else dummy, lse, entropy,
        grad_logprobs if grad_logprobs is not None else dummy, grad_entropy if grad_entropy is not None else dummy,
        rows, logits3d.stride(0), logits3d.stride(1), grad_out3d.stride(0), grad_out3d.stride(1), vocab,
        1.0 / temperature, ignore_index,
        HAS_LABELS=labels is not None, HAS_GRAD_LOGPROBS=grad_logprobs is not None and labels is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None, BLOCK_V=block_v, num_warps=num_warps)


@_bwd_op.register_fake
def _(logits3d, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, grad_out3d):
    return None


def _check_inputs(logits3d: torch.Tensor, **per_row: Optional[torch.Tensor]) -> None:
    """Metadata checks (no sync) that keep every kernel access in bounds, naming the offending argument."""
    check_triton_device(logits3d)
    if logits3d.dtype == torch.float64:
        raise BackendUnavailableError(FP64_REASON)
    if logits3d.dim() != 3 or (logits3d.shape[-1] > 1 and logits3d.stride(-1) != 1):
        raise ValueError(f"logits3d must be a [B, T, V] view with a unit vocab stride, got shape "
                         f"{tuple(logits3d.shape)} strides {logits3d.stride()}")
    n_rows = logits3d.shape[0] * logits3d.shape[1]
    for name, tensor in per_row.items():
        if tensor is None:
            continue
        if tensor.device != logits3d.device:
            raise ValueError(f"{name} is on {tensor.device} but logits3d is on {logits3d.device}")
        if tensor.numel() != n_rows:
            raise ValueError(f"{name} must have {n_rows} entries (one per row of logits3d), got {tensor.numel()}")


def _flat(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return tensor.reshape(-1).contiguous() if tensor is not None else None


def logprobs_entropy_fwd(logits3d: torch.Tensor, labels: Optional[torch.Tensor], temperature: float,
                         ignore_index: int) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Dispatch forward: [B, T, V] logits, labels [B*T] | None -> (logprobs | None, entropy, lse), each [B*T]
    fp32 (fp64 for fp64 logits)."""
    _check_inputs(logits3d, labels=labels)
    logprobs, entropy, lse = torch.ops.aem_kernels.triton_logprobs_entropy_fwd(
        logits3d, _flat(labels), float(temperature), int(ignore_index))
    return (logprobs if labels is not None else None), entropy, lse


def logprobs_entropy_fwd_with_response_sums(
    logits3d: torch.Tensor, labels: Optional[torch.Tensor], temperature: float, ignore_index: int,
    token_response: torch.Tensor, num_responses: int, *, deterministic: bool = False,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward plus the per-response sums of eq. 3 / 3' in the same launch.

    Args:
        logits3d, labels, temperature, ignore_index: as `logprobs_entropy_fwd`.
        token_response: [B*T] int, response of each token, -1 for tokens outside every response.
        num_responses: R.
        deterministic: False: fp32 atomics in the forward kernel (order-dependent last bits); True: per-row
            outputs then the fixed-order reduction of `segment.py` (bit-identical run to run).
    Returns:
        (logprobs | None, entropy, lse, response_logprob_sum [R], response_entropy_sum [R]); rows with
        ignore_index add nothing; response_logprob_sum is 0 without labels. Surprisal S_r = -logprob sum.
    """
    if not isinstance(token_response, torch.Tensor):
        raise TypeError(f"token_response must be a torch.Tensor, got {type(token_response).__name__}")
    _check_inputs(logits3d, labels=labels, token_response=token_response)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    out = torch.ops.aem_kernels.triton_logprobs_entropy_fwd_segmented(
        logits3d, _flat(labels), float(temperature), int(ignore_index), _flat(token_response),
        int(num_responses), deterministic)
    logprobs, entropy, lse, sums_lp, sums_h = out
    return (logprobs if labels is not None else None), entropy, lse, sums_lp, sums_h


def logprobs_entropy_bwd(logits3d: torch.Tensor, labels: Optional[torch.Tensor], lse: torch.Tensor,
                         entropy: torch.Tensor, grad_logprobs: Optional[torch.Tensor],
                         grad_entropy: Optional[torch.Tensor], temperature: float, ignore_index: int,
                         grad_out3d: torch.Tensor) -> torch.Tensor:
    """Dispatch backward: writes dL/dlogits (section 6) into grad_out3d [B, T, V] (may alias logits3d)."""
    _check_inputs(logits3d, labels=labels, lse=lse, entropy=entropy, grad_logprobs=grad_logprobs,
                  grad_entropy=grad_entropy)
    if grad_out3d.device != logits3d.device or tuple(grad_out3d.shape) != tuple(logits3d.shape) or (
            grad_out3d.shape[-1] > 1 and grad_out3d.stride(-1) != 1):
        raise ValueError(f"grad_out3d must have logits3d's shape {tuple(logits3d.shape)}, device and a unit vocab "
                         f"stride, got {tuple(grad_out3d.shape)} strides {grad_out3d.stride()} on {grad_out3d.device}")
    torch.ops.aem_kernels.triton_logprobs_entropy_bwd(
        logits3d, _flat(labels), lse, entropy, _flat(grad_logprobs), _flat(grad_entropy), float(temperature),
        int(ignore_index), grad_out3d)
    return grad_out3d
