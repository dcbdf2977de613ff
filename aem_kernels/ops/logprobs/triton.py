"""Triton kernels of the token ops: log-probs (eq. 1), entropies (eq. 2) and their section-6 gradient.

Forward: one program per row of a [B, T, V] view (row i at (i // T) * stride_b + (i % T) * stride_t, int64),
one streaming read of the row x in BLOCK_V tiles keeping the running max m of the logits (raw units),
d = sum exp(s) and t = sum exp(s) s with s = (x - m) / tau (see `utils.streaming_softmax_stats`); then, per
row and in fp64 (`utils.row_epilogue`), log d, l_t = (x_y - m) / tau - log d and h_t = log d - t / d. Only
O(N) state is saved for the backward: entropy and state [N, 2] fp32 = (m, log d). A row whose label is
ignore_index reads nothing and outputs 0 (state (0, 0)).
Backward: one read and one write per row, grad = [a_t (onehot - p) - b_t p (log p + h_t)] / tau, with
log p = (x - m) / tau - log d; the output may alias the logits (in-place gradient). Keeping m and log d
apart (rather than lse = m / tau + log d, one fp32 number) is what makes the gradient as accurate as eager
fp32 autograd: near the max, (x - m) / tau is exact to an ulp of itself and log d is O(log V), so p carries
no ulp(|lse|) error (5e-4 at |lse| ~ 1e4). The memory traffic is unchanged by this: per element the same
loads, one subtract and one multiply (formerly a multiply and a subtract); per row 8 bytes of state
instead of 4.

Roofline (for benchmarks; E = bytes per logit, 2 for bf16/fp16, 4 for fp32; N_a active rows of N):
    forward   V * E bytes read per active row (+ ~24 bytes of per-row scalars); ignored rows read nothing
    backward  2 * V * E bytes per active row (one read, one write; in place or not), V * E per ignored row
              (zeros are written, nothing is read)
so achieved GB/s = N_a V E / t_fwd and (2 N_a + (N - N_a)) V E / t_bwd, against 3.35 TB/s (H100 SXM) or
4.8 TB/s (H200). The single-pass loss (`ops/policy_loss/triton.py`) reads each active row twice and writes it once.

fp64 logits are not served here (Triton's exp/log lower to fp32 approximations, so the result would not be
fp64-accurate): the path decision (`ops/logprobs/__init__.py`) sends them to a backend that computes in fp64,
and the launchers refuse them.

Every launcher is a `torch.library.custom_op` with a fake implementation, so `torch.compile` sees an opaque
op with known output shapes instead of a graph break, and nothing on the host reads device memory (no sync:
CUDA-graph safe).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ...capability import TRITON_FP64_REASON
from ...errors import BackendUnavailableError
from ...layout import compute_dtype
from ..utils import (BWD_TILE_BYTES, check_triton_device, launch_config, row_epilogue, row_offset, store_row_grad,
                    streaming_softmax_stats, temperature_args)

__all__ = ["logprobs_entropy_fwd", "logprobs_entropy_bwd"]


@triton.jit
def _logprobs_entropy_fwd_kernel(
    logits_ptr, labels_ptr, logprobs_ptr, entropy_ptr, state_ptr,
    rows_per_batch, stride_b, stride_t, vocab, inv_temperature, tau_hi, tau_lo, ignore_index,
    HAS_LABELS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, rows_per_batch, stride_b, stride_t)
    active = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        active = label != ignore_index
    # An ignored row runs zero loop iterations and loads no target: its logits are never read.
    m, d, t = streaming_softmax_stats(row_ptr, tl.where(active, vocab, 0), vocab, inv_temperature, BLOCK_V)
    target = tl.zeros([], tl.float32)
    if HAS_LABELS:
        target = tl.load(row_ptr + tl.where(active, label, 0), mask=active, other=0.0).to(tl.float32)
    log_d, entropy, logprob = row_epilogue(m, d, t, target, tau_hi, tau_lo)
    tl.store(entropy_ptr + row, tl.where(active, entropy, 0.0))
    tl.store(state_ptr + 2 * row, tl.where(active, m, 0.0))
    tl.store(state_ptr + 2 * row + 1, tl.where(active, log_d.to(tl.float32), 0.0))
    if HAS_LABELS:
        tl.store(logprobs_ptr + row, tl.where(active, logprob, 0.0))


@triton.jit
def _logprobs_entropy_bwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, state_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
    rows_per_batch, stride_b, stride_t, grad_stride_b, grad_stride_t, vocab, inv_temperature, ignore_index,
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
    m = tl.where(active, tl.load(state_ptr + 2 * row), 0.0)
    log_d = tl.where(active, tl.load(state_ptr + 2 * row + 1), 0.0)
    store_row_grad(in_ptr, out_ptr, vocab, inv_temperature, m, log_d, entropy, a, b, label, active,
                   HAS_GRAD_LOGPROBS, HAS_GRAD_ENTROPY, BLOCK_V)


def _launch_fwd(logits3d: torch.Tensor, labels: Optional[torch.Tensor], temperature: float, ignore_index: int):
    batch, rows, vocab = logits3d.shape
    n_rows = batch * rows
    device = logits3d.device
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device)
    state = torch.empty(n_rows, 2, dtype=torch.float32, device=device)
    logprobs = torch.empty(n_rows if labels is not None else 0, dtype=torch.float32, device=device)
    if n_rows:
        block_v, num_warps = launch_config(vocab, logits3d.element_size())
        inv_temperature, tau_hi, tau_lo = temperature_args(temperature)
        _logprobs_entropy_fwd_kernel[(n_rows,)](
            logits3d, labels if labels is not None else entropy, logprobs, entropy, state,
            rows, logits3d.stride(0), logits3d.stride(1), vocab, inv_temperature, tau_hi, tau_lo, ignore_index,
            HAS_LABELS=labels is not None, BLOCK_V=block_v, num_warps=num_warps)
    return logprobs, entropy, state


@torch.library.custom_op("aem_kernels::triton_logprobs_entropy_fwd", mutates_args=())
def _fwd_op(logits3d: torch.Tensor, labels: Optional[torch.Tensor], temperature: float,
            ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_fwd(logits3d, labels, temperature, ignore_index)


@_fwd_op.register_fake
def _(logits3d, labels, temperature, ignore_index):
    n_rows = logits3d.shape[0] * logits3d.shape[1]
    dtype = compute_dtype(logits3d.dtype)
    out = logits3d.new_empty(n_rows, dtype=dtype)
    return (logits3d.new_empty(n_rows if labels is not None else 0, dtype=dtype), out,
            logits3d.new_empty((n_rows, 2), dtype=dtype))


@torch.library.custom_op("aem_kernels::triton_logprobs_entropy_bwd", mutates_args=("grad_out3d",))
def _bwd_op(logits3d: torch.Tensor, labels: Optional[torch.Tensor], state: torch.Tensor, entropy: torch.Tensor,
            grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], temperature: float,
            ignore_index: int, grad_out3d: torch.Tensor) -> None:
    batch, rows, vocab = logits3d.shape
    if batch * rows == 0:
        return
    block_v, num_warps = launch_config(vocab, max(logits3d.element_size(), grad_out3d.element_size()),
                                       BWD_TILE_BYTES)
    dummy = entropy
    _logprobs_entropy_bwd_kernel[(batch * rows,)](
        logits3d, grad_out3d, labels if labels is not None else dummy, state, entropy,
        grad_logprobs if grad_logprobs is not None else dummy, grad_entropy if grad_entropy is not None else dummy,
        rows, logits3d.stride(0), logits3d.stride(1), grad_out3d.stride(0), grad_out3d.stride(1), vocab,
        temperature_args(temperature)[0], ignore_index,
        HAS_LABELS=labels is not None, HAS_GRAD_LOGPROBS=grad_logprobs is not None and labels is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None, BLOCK_V=block_v, num_warps=num_warps)


@_bwd_op.register_fake
def _(logits3d, labels, state, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, grad_out3d):
    return None


def _check_inputs(logits3d: torch.Tensor, **per_row: Optional[torch.Tensor]) -> None:
    """Metadata checks (no sync) that keep every kernel access in bounds, naming the offending argument."""
    check_triton_device(logits3d)
    if logits3d.dtype == torch.float64:
        raise BackendUnavailableError(TRITON_FP64_REASON)
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
                         ignore_index: int, *, with_entropy: bool = True
                         ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """Dispatch forward: [B, T, V] logits, labels [B*T] | None -> (logprobs [B*T] | None, entropy [B*T] | None,
    state [B*T, 2] = (row max, log d)), fp32 (fp64 for fp64 logits); see the module docstring.
    with_entropy=False returns None for the entropy; this kernel still computes it (the row's t-sum rides on
    the same read of the logits, so skipping it would save arithmetic only, not memory traffic)."""
    _check_inputs(logits3d, labels=labels)
    logprobs, entropy, state = torch.ops.aem_kernels.triton_logprobs_entropy_fwd(
        logits3d, _flat(labels), float(temperature), int(ignore_index))
    return (logprobs if labels is not None else None), (entropy if with_entropy else None), state


def logprobs_entropy_bwd(logits3d: torch.Tensor, labels: Optional[torch.Tensor], state: torch.Tensor,
                         entropy: torch.Tensor, grad_logprobs: Optional[torch.Tensor],
                         grad_entropy: Optional[torch.Tensor], temperature: float, ignore_index: int,
                         grad_out3d: torch.Tensor) -> torch.Tensor:
    """Dispatch backward: writes dL/dlogits (section 6) into grad_out3d [B, T, V] (may alias logits3d);
    `state` is what `logprobs_entropy_fwd` returned for these logits."""
    _check_inputs(logits3d, labels=labels, entropy=entropy, grad_logprobs=grad_logprobs,
                  grad_entropy=grad_entropy)
    n_rows = logits3d.shape[0] * logits3d.shape[1]
    if state.device != logits3d.device or tuple(state.shape) != (n_rows, 2):
        raise ValueError(f"state must be the [{n_rows}, 2] tensor the forward returned for these logits (on "
                         f"{logits3d.device}), got shape {tuple(state.shape)} on {state.device}")
    if grad_out3d.device != logits3d.device or tuple(grad_out3d.shape) != tuple(logits3d.shape) or (
            grad_out3d.shape[-1] > 1 and grad_out3d.stride(-1) != 1):
        raise ValueError(f"grad_out3d must have logits3d's shape {tuple(logits3d.shape)}, device and a unit vocab "
                         f"stride, got {tuple(grad_out3d.shape)} strides {grad_out3d.stride()} on {grad_out3d.device}")
    torch.ops.aem_kernels.triton_logprobs_entropy_bwd(
        logits3d, _flat(labels), state.contiguous(), entropy, _flat(grad_logprobs), _flat(grad_entropy),
        float(temperature), int(ignore_index), grad_out3d)
    return grad_out3d
