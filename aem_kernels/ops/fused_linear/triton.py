"""Triton kernels of the fused linear + log-prob/entropy op: hidden states [N, H] and a classifier [V, H] in,
per-token log-probs (eq. 1) and entropies (eq. 2) out, the logits never stored.

Forward: one program per block of BLOCK_N rows walks the vocabulary in BLOCK_V tiles. Each logit tile is
computed on the fly, acc = sum_k x[:, k] w[:, k]^T by tl.dot over BLOCK_K slices of H with fp32
accumulation (bf16/fp16 operands on the tensor cores, fp32 operands with input_precision="ieee", never
tf32, so fp32 inputs keep eager fp32's accuracy), then z = (acc + bias) / tau (divided, as eager divides the
materialised logits). The running statistics per row are the ones of `utils.streaming_softmax_stats`:
m = max z, d = sum exp(z - m), t = sum exp(z - m)(z - m), rescaled by exp(m_old - m_new) when a tile raises
the max; l_t = (z_y - m) - log d and h_t = log d - t / d. The backward state is (m, log d), kept apart rather
than one rounded lse = m + log d: near the max z - m is exact (Sterbenz), so log p = (z - m) - log d keeps
eager's accuracy at logit magnitudes where ulp(lse) alone exceeds eager's error.

Backward: the logit tile is recomputed and turned into dL/dz / tau (AEM_SPEC section 6),
g = [a (onehot(y) - p) - b p (log p + h)] / tau, which feeds dH = g W and dW = g^T X (and db = sum_rows g):
  default        one program per (row block, vocab tile) recomputes the tile once and adds g W and g^T X into
                 fp32 buffers with atomics (the last bits depend on the schedule);
  deterministic  two launches without atomics: dH with one program per (row block, H block) looping over the
                 vocabulary, dW/db with one program per (vocab tile, H block) looping over the rows; each
                 recomputes its logit tiles once per H block (more flops, bit-identical run to run).
Nothing of size N x V is ever allocated: the working set is the [BLOCK_N, BLOCK_V] tile in registers. The tiles
are autotuned (`autotuned`, `gpu_configs`: a few around the compile-checked `block_config`) until a GPU has
measured a table; this is path "tiles", which the GPU script races against the CUDA plan (`plan.py`).
`with_entropy=False` drops t in the forward and the b-term in the backward (constexpr switches).

This module is a leaf: it takes tensors and scalars and imports nothing of the package's loss or path decisions.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..utils import loop_bound, to_storage

__all__ = ["ATOMIC_OUTPUTS", "autotuned", "block_config", "fused_linear_bwd", "fused_linear_fwd", "gpu_configs",
           "interpreter_configs", "prune_tiles"]

# Triton 3.9's interpreter multiplies bf16 tl.dot operands as raw integers; there the (already rounded)
# operands go to tl.dot in fp32, which gives the same products (exact in fp32) as the tensor cores.
_UPCAST_DOT_OPERANDS: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _dot_input(values):
    if _UPCAST_DOT_OPERANDS:
        return values.to(tl.float32)
    else:
        return values


@triton.jit
def _as_operand(values, dtype: tl.constexpr):
    """An fp32 tile rounded (to nearest even) to the other operand's dtype, ready for tl.dot."""
    return _dot_input(to_storage(values, dtype))


@triton.jit
def _grad_dot(g, other, acc, TRANSPOSE_G: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + g @ other (or g^T @ other) for an fp32 gradient tile g and a storage-dtype tile `other`. With
    SPLIT (bf16/fp16 inputs) g = g_hi + g_lo, both rounded to the operand dtype, costs two tensor-core dots
    but keeps ~16 mantissa bits of g: one rounding of g to bf16 alone made the weight gradient up to ~2x
    less accurate than eager fp32's (the accuracy rule allows 3x)."""
    g_hi = _as_operand(g, other.dtype)
    if TRANSPOSE_G:
        acc = tl.dot(tl.trans(g_hi), _dot_input(other), acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(g_hi, _dot_input(other), acc, input_precision=DOT_PRECISION)
    if SPLIT:
        g_lo = _as_operand(g - g_hi.to(tl.float32), other.dtype)
        if TRANSPOSE_G:
            acc = tl.dot(tl.trans(g_lo), _dot_input(other), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(g_lo, _dot_input(other), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _logit_tile(x_ptr, w_ptr, b_ptr, rows, cols, n_rows, vocab, hidden, stride_xn, stride_xh, stride_wv,
                stride_wh, temperature, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = (x[rows] @ w[cols]^T + b[cols]) / tau as an fp32 [BLOCK_N, BLOCK_V] tile; -inf outside the vocab."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    row_ok = rows[:, None] < n_rows
    col_ok = cols[None, :] < vocab
    for k0 in range(0, loop_bound(hidden), BLOCK_K):
        k = k0 + ks
        x = tl.load(x_ptr + rows[:, None] * stride_xn + k[None, :] * stride_xh,
                    mask=row_ok & (k[None, :] < hidden), other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wv + k[:, None] * stride_wh,
                    mask=col_ok & (k[:, None] < hidden), other=0.0)
        acc = tl.dot(_dot_input(x), _dot_input(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < vocab, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok, acc / temperature, float("-inf"))


@triton.jit
def _grad_tile(z, cols, labels, row_max, log_d, entropy, a, b, active, temperature,
               HAS_A: tl.constexpr, HAS_B: tl.constexpr):
    """dL/dlogits of a tile (section 6): [a (onehot - p) - b p (log p + h)] / tau; 0 on inactive rows."""
    log_p = (z - row_max[:, None]) - log_d[:, None]
    p = tl.exp(log_p)
    g = tl.zeros(z.shape, tl.float32)
    if HAS_A:
        g = tl.where(cols[None, :] == labels[:, None], a[:, None], 0.0) - a[:, None] * p
    if HAS_B:
        # p log p -> 0 where p = 0 (-inf logits, padding columns): mask log p before the product
        g -= b[:, None] * p * (tl.where(p > 0, log_p, 0.0) + entropy[:, None])
    return tl.where(active[:, None], g / temperature, 0.0)


@triton.jit
def _row_terms(rows, n_rows, labels_ptr, max_ptr, logd_ptr, entropy_ptr, glp_ptr, gent_ptr, ignore_index,
               HAS_A: tl.constexpr, HAS_B: tl.constexpr):
    """Per-row scalars of the backward: labels, active mask, (m, log d), h, a = dL/dl, b = dL/dh."""
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    active = row_ok & (labels != ignore_index)
    row_max = tl.load(max_ptr + rows, mask=active, other=0.0)
    log_d = tl.load(logd_ptr + rows, mask=active, other=0.0)
    a = tl.zeros(rows.shape, tl.float32)
    b = tl.zeros(rows.shape, tl.float32)
    entropy = tl.zeros(rows.shape, tl.float32)
    if HAS_A:
        a = tl.load(glp_ptr + rows, mask=active, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(gent_ptr + rows, mask=active, other=0.0).to(tl.float32)
        entropy = tl.load(entropy_ptr + rows, mask=active, other=0.0)
    return labels, active, row_max, log_d, entropy, a, b


@triton.jit
def _fused_linear_fwd_kernel(
    x_ptr, w_ptr, b_ptr, labels_ptr, logprobs_ptr, entropy_ptr, max_ptr, logd_ptr,
    n_rows, vocab, hidden, stride_xn, stride_xh, stride_wv, stride_wh, temperature, ignore_index,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    active = row_ok & (labels != ignore_index)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    target = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, loop_bound(vocab), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        z = _logit_tile(x_ptr, w_ptr, b_ptr, rows, cols, n_rows, vocab, hidden, stride_xn, stride_xh, stride_wv,
                        stride_wh, temperature, HAS_BIAS, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf row so far: no inf - inf
        s = z - shift[:, None]
        e = tl.exp(s)
        delta = tl.where(d > 0, m - shift, 0.0)  # d = 0: nothing to rescale (and no -inf * 0)
        alpha = tl.exp(delta)
        if WITH_ENTROPY:
            t = tl.where(d > 0, alpha * (t + delta * d), 0.0) + tl.sum(e * tl.where(e > 0, s, 0.0), axis=1)
        d = alpha * d + tl.sum(e, axis=1)
        m = m_new
    log_d = tl.log(d)
    tl.store(logprobs_ptr + rows, tl.where(active, (target - m) - log_d, 0.0), mask=row_ok)
    tl.store(max_ptr + rows, tl.where(active, m, 0.0), mask=row_ok)
    tl.store(logd_ptr + rows, tl.where(active, log_d, 0.0), mask=row_ok)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(active, log_d - t / d, 0.0), mask=row_ok)


@triton.jit
def _fused_linear_bwd_atomic_kernel(
    x_ptr, w_ptr, b_ptr, labels_ptr, max_ptr, logd_ptr, entropy_ptr, glp_ptr, gent_ptr, dx_ptr, dw_ptr, db_ptr,
    n_rows, vocab, hidden, stride_xn, stride_xh, stride_wv, stride_wh, temperature, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr, SPLIT: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    labels, active, row_max, log_d, entropy, a, b = _row_terms(
        rows, n_rows, labels_ptr, max_ptr, logd_ptr, entropy_ptr, glp_ptr, gent_ptr, ignore_index, HAS_A, HAS_B)
    z = _logit_tile(x_ptr, w_ptr, b_ptr, rows, cols, n_rows, vocab, hidden, stride_xn, stride_xh, stride_wv,
                    stride_wh, temperature, HAS_BIAS, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    g = _grad_tile(z, cols, labels, row_max, log_d, entropy, a, b, active, temperature, HAS_A, HAS_B)
    row_ok = rows[:, None] < n_rows
    col_ok = cols[:, None] < vocab
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=cols < vocab)
    for h0 in range(0, loop_bound(hidden), BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs[None, :] < hidden
        if NEED_DX:
            w = tl.load(w_ptr + cols[:, None] * stride_wv + hs[None, :] * stride_wh, mask=col_ok & h_ok, other=0.0)
            part = _grad_dot(g, w, tl.zeros([BLOCK_N, BLOCK_H], tl.float32), False, SPLIT, DOT_PRECISION)
            tl.atomic_add(dx_ptr + rows[:, None] * hidden + hs[None, :], part, mask=row_ok & h_ok)
        if NEED_DW:
            x = tl.load(x_ptr + rows[:, None] * stride_xn + hs[None, :] * stride_xh, mask=row_ok & h_ok, other=0.0)
            part = _grad_dot(g, x, tl.zeros([BLOCK_V, BLOCK_H], tl.float32), True, SPLIT, DOT_PRECISION)
            tl.atomic_add(dw_ptr + cols[:, None] * hidden + hs[None, :], part, mask=col_ok & h_ok)


@triton.jit
def _fused_linear_bwd_dx_kernel(
    x_ptr, w_ptr, b_ptr, labels_ptr, max_ptr, logd_ptr, entropy_ptr, glp_ptr, gent_ptr, dx_ptr,
    n_rows, vocab, hidden, stride_xn, stride_xh, stride_wv, stride_wh, temperature, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    hs = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    labels, active, row_max, log_d, entropy, a, b = _row_terms(
        rows, n_rows, labels_ptr, max_ptr, logd_ptr, entropy_ptr, glp_ptr, gent_ptr, ignore_index, HAS_A, HAS_B)
    acc = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    for v0 in range(0, loop_bound(vocab), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        z = _logit_tile(x_ptr, w_ptr, b_ptr, rows, cols, n_rows, vocab, hidden, stride_xn, stride_xh, stride_wv,
                        stride_wh, temperature, HAS_BIAS, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        g = _grad_tile(z, cols, labels, row_max, log_d, entropy, a, b, active, temperature, HAS_A, HAS_B)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + hs[None, :] * stride_wh,
                    mask=(cols[:, None] < vocab) & (hs[None, :] < hidden), other=0.0)
        acc = _grad_dot(g, w, acc, False, SPLIT, DOT_PRECISION)
    tl.store(dx_ptr + rows[:, None] * hidden + hs[None, :], acc, mask=(rows[:, None] < n_rows) & (hs[None, :] < hidden))


@triton.jit
def _fused_linear_bwd_dw_kernel(
    x_ptr, w_ptr, b_ptr, labels_ptr, max_ptr, logd_ptr, entropy_ptr, glp_ptr, gent_ptr, dw_ptr, db_ptr,
    n_rows, vocab, hidden, stride_xn, stride_xh, stride_wv, stride_wh, temperature, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr, SPLIT: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    pid_h = tl.program_id(1)
    hs = pid_h.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_V, BLOCK_H], tl.float32)
    acc_b = tl.zeros([BLOCK_V], tl.float32)
    for n0 in range(0, loop_bound(n_rows), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        labels, active, row_max, log_d, entropy, a, b = _row_terms(
            rows, n_rows, labels_ptr, max_ptr, logd_ptr, entropy_ptr, glp_ptr, gent_ptr, ignore_index, HAS_A,
            HAS_B)
        z = _logit_tile(x_ptr, w_ptr, b_ptr, rows, cols, n_rows, vocab, hidden, stride_xn, stride_xh, stride_wv,
                        stride_wh, temperature, HAS_BIAS, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        g = _grad_tile(z, cols, labels, row_max, log_d, entropy, a, b, active, temperature, HAS_A, HAS_B)
        if NEED_DB:
            acc_b += tl.sum(g, axis=0)
        if NEED_DW:
            x = tl.load(x_ptr + rows[:, None] * stride_xn + hs[None, :] * stride_xh,
                        mask=(rows[:, None] < n_rows) & (hs[None, :] < hidden), other=0.0)
            acc = _grad_dot(g, x, acc, True, SPLIT, DOT_PRECISION)
    if NEED_DW:
        tl.store(dw_ptr + cols[:, None] * hidden + hs[None, :], acc,
                 mask=(cols[:, None] < vocab) & (hs[None, :] < hidden))
    if NEED_DB:
        n_store = tl.where(pid_h == 0, vocab, 0)  # one H block stores the bias gradient
        tl.store(db_ptr + cols, acc_b, mask=cols < n_store)


# ---- launchers ---------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_config(dtype: torch.dtype) -> dict:
    """The first of the autotuned tile configurations (`_CONFIGS`) for `dtype`: 64 x 128 logit tiles over
    64-wide K slices (bf16/fp16: 24 KB of operands per K step, tensor-core shaped); fp32 operands halve the K
    slice. Compiled ahead of time for sm_90 (python_tests/sm90_compile_fused_linear.py) ptxas allocates
    206-255 registers per thread without spills, i.e. one 8-warp program per SM. Interpreter: 16-wide tiles
    so that small odd test shapes cross several tiles in every dimension (its only configuration)."""
    if _interpreting():
        return dict(_INTERPRETER_TILES)
    block_k = 32 if dtype == torch.float32 else 64
    return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": block_k, "BLOCK_H": 64, "num_warps": 8}


_INTERPRETER_TILES = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "BLOCK_H": 16, "num_warps": 1}
# (BLOCK_N, BLOCK_V, BLOCK_K, BLOCK_H, num_warps): no tile is known best before a GPU measures them, so the
# kernels are autotuned over a small set around the compile-checked first one (a taller, a narrower and a
# 4-warp tile), each with both K slices; `prune_tiles` keeps the K slice of the operands' dtype (64 for bf16/fp16,
# 32 for fp32). Tuned once per (V, H, dtypes): N changes every RL step and is left out of the key (tiles
# chosen at the first N; a fresh process retunes).
_TILES = [(64, 128, 64, 8), (128, 64, 64, 8), (64, 64, 64, 4)]


def interpreter_configs() -> list:
    """The interpreter's one configuration (the autotuner then never benchmarks: interpreter test time)."""
    tiles = dict(_INTERPRETER_TILES)
    return [triton.Config({k: v for k, v in tiles.items() if k != "num_warps"}, num_warps=tiles["num_warps"])]


def gpu_configs() -> list:
    """The GPU's configurations: each tile of `_TILES` with both K slices (`prune_tiles` keeps one)."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k, "BLOCK_H": h}, num_warps=w)
            for n, v, h, w in _TILES for k in (64, 32)]


def prune_tiles(configs, named_args, **kwargs) -> list:
    """The configurations whose K slice suits the operands (x_ptr's dtype: 32 for fp32, else 64)."""
    block_k = 32 if named_args["x_ptr"].dtype == torch.float32 else 64
    return [c for c in configs if c.kwargs["BLOCK_K"] == block_k] or configs


def autotuned(kernel, configs: list, reset=()):
    """`kernel` autotuned over `configs`, keyed on (V, H) and the tensors' dtypes; `reset` names the outputs
    that every trial (and the chosen configuration's first run) starts from zeroed (atomic accumulators)."""
    return triton.autotune(configs=configs, key=["vocab", "hidden"], reset_to_zero=list(reset),
                           prune_configs_by={"early_config_prune": prune_tiles})(kernel)


_CONFIGS = interpreter_configs() if _interpreting() else gpu_configs()
ATOMIC_OUTPUTS = ("dx_ptr", "dw_ptr", "db_ptr")
# The JIT kernels above stay as they are (the sm_90 compile check builds them with `block_config`'s tiles);
# these autotuned launchers run them.
_fwd = autotuned(_fused_linear_fwd_kernel, _CONFIGS)
_bwd_atomic = autotuned(_fused_linear_bwd_atomic_kernel, _CONFIGS, reset=ATOMIC_OUTPUTS)
_bwd_dx = autotuned(_fused_linear_bwd_dx_kernel, _CONFIGS)
_bwd_dw = autotuned(_fused_linear_bwd_dw_kernel, _CONFIGS)


def _common(hidden2d, weight, bias, temperature, ignore_index):
    args = (hidden2d.shape[0], weight.shape[0], hidden2d.shape[1], hidden2d.stride(0), hidden2d.stride(1),
            weight.stride(0), weight.stride(1), float(temperature), int(ignore_index))
    return args, dict(HAS_BIAS=bias is not None, DOT_PRECISION="ieee")


def fused_linear_fwd(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     labels: torch.Tensor, temperature: float, ignore_index: int, with_entropy: bool
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """hidden2d [N, H], weight [V, H], bias [V] | None, labels [N] -> (logprobs [N], entropy [N] | None,
    state (row max m [N], log d [N])), fp32; rows whose label is ignore_index give 0."""
    n_rows, device = hidden2d.shape[0], hidden2d.device
    logprobs = torch.empty(n_rows, dtype=torch.float32, device=device)
    entropy = torch.empty_like(logprobs) if with_entropy else None
    row_max, log_d = torch.empty_like(logprobs), torch.empty_like(logprobs)
    if n_rows:
        args, meta = _common(hidden2d, weight, bias, temperature, ignore_index)
        _fwd[lambda m: (triton.cdiv(n_rows, m["BLOCK_N"]),)](
            hidden2d, weight, bias if bias is not None else weight, labels, logprobs,
            entropy if with_entropy else logprobs, row_max, log_d, *args, WITH_ENTROPY=with_entropy, **meta)
    return logprobs, entropy, (row_max, log_d)


def fused_linear_bwd(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     labels: torch.Tensor, state: Tuple[torch.Tensor, torch.Tensor], entropy: Optional[torch.Tensor],
                     grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                     temperature: float, ignore_index: int, needs: Tuple[bool, bool, bool],
                     deterministic: bool = False
                     ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) in the inputs' dtypes, each None unless
    `needs` (hidden, weight, bias) asks for it. Accumulated in fp32 (see the module docstring)."""
    n_rows, hidden = hidden2d.shape
    vocab, device = weight.shape[0], hidden2d.device
    need_dx, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
    f32 = dict(dtype=torch.float32, device=device)
    alloc = torch.zeros if not deterministic else torch.empty
    dx = alloc((n_rows, hidden), **f32) if need_dx else None
    dw = alloc((vocab, hidden), **f32) if need_dw else None
    db = alloc((vocab,), **f32) if need_db else None
    has_a = grad_logprobs is not None
    has_b = grad_entropy is not None and entropy is not None
    if n_rows and (has_a or has_b) and (need_dx or need_dw or need_db):
        row_max, log_d = state
        args, meta = _common(hidden2d, weight, bias, temperature, ignore_index)
        dummy = row_max
        per_row = (hidden2d, weight, bias if bias is not None else weight, labels, row_max, log_d,
                   entropy if has_b else dummy, grad_logprobs if has_a else dummy, grad_entropy if has_b else dummy)
        meta.update(HAS_A=has_a, HAS_B=has_b, SPLIT=hidden2d.dtype != torch.float32)
        if not deterministic:
            # the autotuner zeroes the gradient pointers: the unused ones get a spare of their own, never state
            spare = torch.zeros(1, **f32)
            _bwd_atomic[lambda m: (triton.cdiv(n_rows, m["BLOCK_N"]), triton.cdiv(vocab, m["BLOCK_V"]))](
                *per_row, dx if need_dx else spare, dw if need_dw else spare, db if need_db else spare, *args,
                NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db, **meta)
        else:
            if need_dx:
                _bwd_dx[lambda m: (triton.cdiv(n_rows, m["BLOCK_N"]), triton.cdiv(hidden, m["BLOCK_H"]))](
                    *per_row, dx, *args, **meta)
            if need_dw or need_db:
                _bwd_dw[lambda m: (triton.cdiv(vocab, m["BLOCK_V"]),
                                   triton.cdiv(hidden, m["BLOCK_H"]) if need_dw else 1)](
                    *per_row, dw if need_dw else dummy, db if need_db else dummy, *args, NEED_DW=need_dw,
                    NEED_DB=need_db, **meta)
    else:  # no upstream gradient reaches the op: the gradients are exact zeros
        for buf in (dx, dw, db):
            if buf is not None:
                buf.zero_()
    return (dx.to(hidden2d.dtype) if dx is not None else None, dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None)
