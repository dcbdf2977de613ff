"""Single-pass AEM policy loss: the loss terms and the logits' gradient from one launch over the logits.

The kernel takes per-token tensors and scalars only; the loss (`aem_kernels.loss`) prepares them (the
modulated advantages A~_t and the aggregation weights c_t) and computes the loss value and metrics from the
kernel's l_t and h_t. With per-token weights c_t,

    loss = sum_t c_t (L_t - entropy_coef h_t + kl_coef KL_t)                          (sections 5-6)
    dloss/dz_t = a_t (onehot(y_t) - p_t) / tau - b_t p_t (log p_t + h_t) / tau
    a_t = c_t (dL_t/dl_t + kl_coef dKL_t/dl_t),    b_t = -c_t entropy_coef

The scalars need l_t and the modulated advantage A~_t = w_r A_t. When the weights w_r do not depend on this
forward (surprisal_source="old", or beta = 0 where every w_r is a function of the masks only), A~_t is known
before the kernel runs, so one program per row can (1) stream the row once for m, d, t (as the plain
forward), (2) form l_t, h_t and then a_t, b_t in registers, (3) stream the row again to write the gradient.
The second read follows the first within the same program: with ~4 rows in flight per SM (528 on 132 SMs)
the rows in flight occupy 528 V E bytes, which fit the 50 MB L2 of H100/H200 up to V ~ 40k in bf16 (then the
re-read is mostly an L2 hit); at V = 150k they do not, and the kernel moves the same 3 V E bytes per token
(read, read, write) as the two-pass forward + backward. What it always saves is the second launch and the
autograd round trip, and with `inplace_backward` it writes the gradient over the logits during the forward,
so the logits and their gradient never coexist (Liger-Kernel's cross-entropy does the same for CE).

dL_t/dl_t follows `pytorch.token_loss_derivatives` (autograd of `ppo_token_loss`) exactly, ties included (the
tests compare them): the log-ratio clamp to [-20, 20] (the constants of `pytorch.py`) and the ratio clamp pass
gradient on their closed intervals; torch.maximum / torch.minimum split the gradient in half on a tie. With
rho = exp(clamp(l - l_old)), u = -A~ rho, v = -A~ clip(rho):

    dL/drho = -A~ [u > v] + (-A~ [rho in clip range]) [v > u] + tie halves,   dL/dl = dL/drho * rho
    dual clip (A~ < 0, floor = -dual_clip A~): dL/dl *= [L < floor] (+ 1/2 on a tie)
    dKL/dl: k1 -> 1,  k2 -> l - l_ref,  k3 -> -(exp(r) - 1) with r = clamp(l_ref - l) (0 outside the clamps)

The backward multiplies the stored gradient by grad_output in place, and skips even that when
grad_output == 1 (the common `loss.backward()`): the check is made by the kernel on device, so there is no
host sync (for bf16/fp16 gradients a factor != 1 rounds a second time: one ulp instead of half). The
loss value and every metric are computed by the loss itself from this kernel's l_t and h_t, so they are
identical to the two-pass path by construction.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ...contract import check_inplace_backward, first_order_only
from ...layout import as_rows3d, gradient_buffer
from ..utils import (BWD_TILE_BYTES, FWD_TILE_BYTES, check_triton_device, launch_config, loop_bound, row_epilogue,
                    row_offset, store_row_grad, streaming_softmax_stats, temperature_args, to_storage)
from .pytorch import KL_VALUE_CLAMP, LOG_RATIO_CLAMP

__all__ = ["aem_loss_fused_fwd", "aem_loss_single_pass", "FusedGradientFunction"]

_KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
# module-level constexprs: the jit functions read them as compile-time constants
_LOG_RATIO_CLAMP: tl.constexpr = tl.constexpr(LOG_RATIO_CLAMP)
_KL_VALUE_CLAMP: tl.constexpr = tl.constexpr(KL_VALUE_CLAMP)


@triton.jit
def _policy_grad(logprob, old, adv, clip_low, clip_high, dual_clip, DUAL_CLIP: tl.constexpr):
    """dL_t/dl_t of the clipped surrogate (eq. 8), mirroring torch's autograd of `ppo_token_loss`."""
    raw = logprob - old
    log_ratio = tl.minimum(tl.maximum(raw, -_LOG_RATIO_CLAMP), _LOG_RATIO_CLAMP)
    ratio = tl.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    in_range = (ratio >= 1.0 - clip_low) & (ratio <= 1.0 + clip_high)
    share_unclipped = tl.where(unclipped > clipped, 1.0, tl.where(unclipped == clipped, 0.5, 0.0))
    grad_ratio = -adv * share_unclipped + tl.where(in_range, -adv, 0.0) * (1.0 - share_unclipped)
    if DUAL_CLIP:
        surrogate = tl.maximum(unclipped, clipped)
        floor = -adv * dual_clip
        below = tl.where(surrogate < floor, 1.0, tl.where(surrogate == floor, 0.5, 0.0))
        grad_ratio = tl.where(adv < 0, grad_ratio * below, grad_ratio)
    return tl.where((raw >= -_LOG_RATIO_CLAMP) & (raw <= _LOG_RATIO_CLAMP), grad_ratio * ratio, 0.0)


@triton.jit
def _kl_grad(logprob, ref, KL_TYPE: tl.constexpr):
    """dKL_t/dl_t of verl's estimators with their clamps (1: k1, 2: k2, 3: k3)."""
    if KL_TYPE == 1:
        grad = 1.0 + 0.0 * logprob
    elif KL_TYPE == 2:
        grad = logprob - ref
    else:
        raw = ref - logprob
        log_ratio = tl.minimum(tl.maximum(raw, -_LOG_RATIO_CLAMP), _LOG_RATIO_CLAMP)
        value = tl.exp(log_ratio) - log_ratio - 1.0
        passes = (raw >= -_LOG_RATIO_CLAMP) & (raw <= _LOG_RATIO_CLAMP) & (value >= -_KL_VALUE_CLAMP) & \
            (value <= _KL_VALUE_CLAMP)
        grad = tl.where(passes, 1.0 - tl.exp(log_ratio), 0.0)
    return grad


@triton.jit
def _aem_loss_fused_kernel(
    logits_ptr, grad_ptr, labels_ptr, adv_ptr, weight_ptr, old_ptr, ref_ptr, logprobs_ptr, entropy_ptr,
    rows_per_batch, stride_b, stride_t, grad_stride_b, grad_stride_t, vocab, inv_temperature, tau_hi, tau_lo,
    ignore_index, clip_low, clip_high, dual_clip, entropy_coef, kl_coef,
    HAS_OLD: tl.constexpr, DUAL_CLIP: tl.constexpr, KL_TYPE: tl.constexpr, HAS_ENTROPY_BONUS: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, GRAD_BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    in_ptr = logits_ptr + row_offset(row, rows_per_batch, stride_b, stride_t)
    label = tl.load(labels_ptr + row).to(tl.int64)
    active = label != ignore_index
    # The same streaming stats and fp64 row epilogue as the two-pass forward (see ops/logprobs.py), so l_t
    # and h_t are the same numbers; the gradient loop uses (m, log d) kept apart, as the two-pass backward.
    m, d, t = streaming_softmax_stats(in_ptr, tl.where(active, vocab, 0), vocab, inv_temperature, BLOCK_V)
    target = tl.load(in_ptr + tl.where(active, label, 0), mask=active, other=0.0).to(tl.float32)
    log_d, entropy, logprob = row_epilogue(m, d, t, target, tau_hi, tau_lo)
    entropy = tl.where(active, entropy, 0.0)
    logprob = tl.where(active, logprob, 0.0)
    tl.store(entropy_ptr + row, entropy)
    tl.store(logprobs_ptr + row, logprob)
    if WRITE_GRAD:
        weight = tl.where(active, tl.load(weight_ptr + row), 0.0)
        adv = tl.load(adv_ptr + row)
        old = logprob  # on-policy (no old log-probs): l_old = l.detach(), rho = 1
        if HAS_OLD:
            old = tl.load(old_ptr + row).to(tl.float32)
        grad_l = _policy_grad(logprob, old, adv, clip_low, clip_high, dual_clip, DUAL_CLIP)
        if KL_TYPE != 0:
            grad_l += kl_coef * _kl_grad(logprob, tl.load(ref_ptr + row).to(tl.float32), KL_TYPE)
        a = tl.where(weight != 0, weight * grad_l, 0.0)  # `aggregate` drops tokens with c_t = 0
        b = -weight * entropy_coef
        out_ptr = grad_ptr + row_offset(row, rows_per_batch, grad_stride_b, grad_stride_t)
        store_row_grad(in_ptr, out_ptr, vocab, inv_temperature, tl.where(active, m, 0.0),
                       tl.where(active, log_d.to(tl.float32), 0.0), entropy, a, b, label, active, True,
                       HAS_ENTROPY_BONUS, GRAD_BLOCK_V)


@triton.jit
def _scale_rows_kernel(grad_ptr, factor_ptr, rows_per_batch, stride_b, stride_t, vocab, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = grad_ptr + row_offset(row, rows_per_batch, stride_b, stride_t)
    factor = tl.load(factor_ptr).to(tl.float32)
    n_cols = tl.where(factor == 1.0, 0, vocab)  # grad_output == 1: leave the gradient untouched
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, loop_bound(n_cols), BLOCK_V):
        idx = start + cols
        grad = tl.load(row_ptr + idx, mask=idx < vocab, other=0.0).to(tl.float32)
        tl.store(row_ptr + idx, to_storage(grad * factor, grad_ptr.dtype.element_ty), mask=idx < vocab)


@torch.library.custom_op("aem_kernels::triton_aem_loss_fused_fwd", mutates_args=("grad_out3d",))
def aem_loss_fused_fwd(
    logits3d: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor, token_weights: torch.Tensor,
    old_logprobs: Optional[torch.Tensor], ref_logprobs: Optional[torch.Tensor], temperature: float,
    ignore_index: int, clip_low: float, clip_high: float, dual_clip: Optional[float], entropy_coef: float,
    kl_coef: float, kl_type: str, grad_out3d: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token (logprobs [N], entropy [N]) fp32 of [B, T, V] logits, and, when `grad_out3d` is given
    (it may alias logits3d), dloss/dlogits written into it. Per-token inputs are [N] fp32 contiguous:
    advantages A~_t, token_weights c_t, old/ref log-probs (None: on-policy / no KL term)."""
    batch, rows, vocab = logits3d.shape
    n_rows = batch * rows
    logprobs = torch.empty(n_rows, dtype=torch.float32, device=logits3d.device)
    entropy = torch.empty_like(logprobs)
    if n_rows == 0:
        return logprobs, entropy
    write_grad = grad_out3d is not None
    grad = grad_out3d if write_grad else logits3d
    if grad.shape != logits3d.shape or (vocab > 1 and (grad.stride(-1) != 1 or logits3d.stride(-1) != 1)):
        raise ValueError(f"grad_out3d must have the shape {tuple(logits3d.shape)} of logits3d and both a unit "
                         f"vocab stride; got {tuple(grad.shape)} strides {grad.stride()}")
    kl_code = _KL_CODES[kl_type] if (kl_coef != 0 and ref_logprobs is not None) else 0
    # The streaming loop uses the forward's tiles, so l_t and h_t are summed in the same order as by the
    # two-pass forward kernel (same values); the gradient loop uses the backward's smaller tiles (see utils).
    block_v, num_warps = launch_config(vocab, logits3d.element_size(), FWD_TILE_BYTES)
    grad_block_v, _ = launch_config(vocab, max(logits3d.element_size(), grad.element_size()), BWD_TILE_BYTES)
    _aem_loss_fused_kernel[(n_rows,)](
        logits3d, grad, labels, advantages, token_weights,
        old_logprobs if old_logprobs is not None else advantages,
        ref_logprobs if ref_logprobs is not None else advantages, logprobs, entropy,
        rows, logits3d.stride(0), logits3d.stride(1), grad.stride(0), grad.stride(1), vocab,
        *temperature_args(temperature), ignore_index, clip_low, clip_high,
        dual_clip if dual_clip is not None else 0.0, entropy_coef, kl_coef,
        HAS_OLD=old_logprobs is not None, DUAL_CLIP=dual_clip is not None, KL_TYPE=kl_code,
        HAS_ENTROPY_BONUS=entropy_coef != 0, WRITE_GRAD=write_grad, BLOCK_V=block_v,
        GRAD_BLOCK_V=grad_block_v, num_warps=num_warps)
    return logprobs, entropy


@aem_loss_fused_fwd.register_fake
def _(logits3d, labels, advantages, token_weights, old_logprobs, ref_logprobs, temperature, ignore_index,
      clip_low, clip_high, dual_clip, entropy_coef, kl_coef, kl_type, grad_out3d):
    out = logits3d.new_empty(logits3d.shape[0] * logits3d.shape[1], dtype=torch.float32)
    return out, torch.empty_like(out)


@torch.library.custom_op("aem_kernels::triton_scale_rows_", mutates_args=("grad3d",))
def _scale_rows(grad3d: torch.Tensor, factor: torch.Tensor) -> None:
    batch, rows, vocab = grad3d.shape
    if batch * rows:
        block_v, num_warps = launch_config(vocab, grad3d.element_size(), BWD_TILE_BYTES)
        _scale_rows_kernel[(batch * rows,)](grad3d, factor, rows, grad3d.stride(0), grad3d.stride(1), vocab,
                                            BLOCK_V=block_v, num_warps=num_warps)


@_scale_rows.register_fake
def _(grad3d, factor):
    return None


class FusedGradientFunction(torch.autograd.Function):
    """loss_value (computed without autograd) -> the same loss whose gradient w.r.t. `logits` is the buffer the
    fused kernel wrote, scaled by grad_output. Backward may run once (the buffer is scaled in place)."""

    @staticmethod
    def forward(ctx, loss_value: torch.Tensor, logits: torch.Tensor, grad_logits: torch.Tensor):
        # Saved as a tensor (not a ctx attribute that the backward clears): torch.compile traces the backward
        # more than once, and the in-place scaling bumps its version, which flags a second backward.
        ctx.save_for_backward(grad_logits)
        return loss_value.detach().clone()

    @staticmethod
    @first_order_only
    def backward(ctx, grad_output: torch.Tensor):
        try:
            (grad,) = ctx.saved_tensors
        except RuntimeError as error:  # version mismatch: an earlier backward already scaled the buffer
            raise RuntimeError("the single-pass AEM loss gradient was already consumed by an earlier backward; "
                               "retain_graph=True is not supported on this path (use single_pass=False)") from error
        buffer = gradient_buffer(grad, inplace=True)
        torch.ops.aem_kernels.triton_scale_rows_(buffer.rows3d, grad_output.reshape(1).to(torch.float32))
        return None, buffer.finish(), None


def aem_loss_single_pass(
    logits: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor, token_weights: torch.Tensor,
    old_logprobs: Optional[torch.Tensor], ref_logprobs: Optional[torch.Tensor], *, temperature: float,
    ignore_index: int, clip_low: float, clip_high: float, dual_clip: Optional[float], entropy_coef: float,
    kl_coef: float, kl_type: str, inplace_backward: bool,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One launch over [..., V] logits: (logprobs [N] fp32, entropy [N] fp32, grad) where grad is dloss/dlogits
    in the logits' shape (the logits' own storage with `inplace_backward`), or None when no gradient is needed.
    Per-token inputs have N entries: labels, advantages A~_t, token_weights c_t, old/ref log-probs (None:
    on-policy / no KL term). Pass grad to `FusedGradientFunction.apply(loss_value, logits, grad)`."""
    check_triton_device(logits)
    write_grad = torch.is_grad_enabled() and logits.requires_grad
    inplace_backward = check_inplace_backward(logits, inplace_backward, writes_gradient=write_grad)
    logits3d = as_rows3d(logits.detach())
    buffer = gradient_buffer(logits.detach(), inplace=inplace_backward, rows3d=logits3d) if write_grad else None
    per_token = (lambda v: v.reshape(-1).to(torch.float32).contiguous() if v is not None else None)  # noqa: E731
    logprobs, entropy = torch.ops.aem_kernels.triton_aem_loss_fused_fwd(
        logits3d, labels.reshape(-1).contiguous(), per_token(advantages), per_token(token_weights),
        per_token(old_logprobs), per_token(ref_logprobs), float(temperature), int(ignore_index),
        float(clip_low), float(clip_high), float(dual_clip) if dual_clip is not None else None,
        float(entropy_coef), float(kl_coef), kl_type, buffer.rows3d if write_grad else None)
    return logprobs, entropy, (buffer.finish() if write_grad else None)
