"""Shared pieces of the Triton kernels: launch configuration, device checks and the row-level jit helpers.

Launch configuration (H100 / H200). Every kernel here gives one program to one row of logits and walks the
vocabulary in tiles of BLOCK_V columns; the work per byte is a handful of flops and one exp, so the kernels
are bound by HBM bandwidth (3.35 TB/s H100 SXM, 4.8 TB/s H200). What matters is the number of bytes in
flight per SM, which must cover bandwidth x latency (~600 ns): about 15 KB per SM on H100 and 22 KB on H200.
A tile of 16 KB (8192 bf16/fp16 or 4096 fp32 values) over 8 warps gives every thread four 16-byte vector
loads per tile; ptxas (sm_90, Triton 3.9) allocates 58-63 registers for the bf16 forward, so three or four
programs fit on an SM: 48-64 KB in flight, enough on both chips, while a row of 150k columns is still ~19-37 tiles (plenty
of iterations to amortise the per-tile reductions). The backward (and the gradient loop of the fused loss)
keeps more values live per element (z, log p, p, the gradient) and also stores, so it takes 8 KB tiles
(32 registers, eight programs per SM; 16 KB tiles would need 80). Neither spills. The 16-byte vector
accesses need row strides and V divisible by 16 elements (Triton specialises such integer arguments; true
for the 32000 / 128256 / 151936 vocabularies of Llama 2 / Llama 3 / Qwen 2); other sizes fall back to
scalar accesses. Smaller vocabularies use one tile of next_pow2(V) columns and fewer warps. The table is
fixed rather than `triton.autotune`d: autotuning would benchmark the in-place backward on live data
(needing save/restore of an N x V buffer), adds a first-call stall, and the bandwidth-bound optimum is flat.
The exp cost stays below the MUFU budget: one exp per element (2.4e12/s needed at 4.8 TB/s of bf16, about
4e12/s available on 132 SMs), which is why the running max is a per-tile scalar rather than a per-lane vector
(per-lane maxima would need a second exp per element for the rescaling).

Under TRITON_INTERPRET=1 (CPU tensors) blocks are capped at `INTERPRET_MAX_BLOCK_V` so that tests exercise
several tiles per row on small vocabularies and stay fast.
"""

from __future__ import annotations

import os
import struct
from typing import Tuple

import torch
import triton
import triton.language as tl

from ..errors import BackendUnavailableError

__all__ = ["INTERPRET_MAX_BLOCK_V", "FWD_TILE_BYTES", "BWD_TILE_BYTES", "is_interpreting", "check_triton_device",
           "launch_config", "temperature_args", "loop_bound"]

INTERPRET_MAX_BLOCK_V = 128
FWD_TILE_BYTES = 16384
BWD_TILE_BYTES = 8192


def is_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(tensor: torch.Tensor, name: str = "logits") -> None:
    """The Triton kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter only."""
    if tensor.device.type == "cuda":
        return
    if tensor.device.type == "cpu" and is_interpreting():
        return
    raise BackendUnavailableError(
        f"the Triton kernels need CUDA tensors; {name} is on {tensor.device}. Set TRITON_INTERPRET=1 before "
        "importing aem_kernels to run them in Triton's (slow) interpreter on CPU tensors")


def launch_config(vocab: int, element_size: int, tile_bytes: int = FWD_TILE_BYTES) -> Tuple[int, int]:
    """(BLOCK_V, num_warps) for a row-per-program kernel over `vocab` columns of `element_size` bytes, with
    tiles of at most `tile_bytes` (FWD_TILE_BYTES for streaming reductions, BWD_TILE_BYTES for gradients)."""
    full = triton.next_power_of_2(max(vocab, 1))
    if is_interpreting():
        return min(full, INTERPRET_MAX_BLOCK_V), 1
    block = min(full, tile_bytes // element_size)
    # 8 warps for a full tile (see the module docstring); smaller tiles keep >= 16 elements per thread.
    num_warps = max(1, min(8, block // 512))
    return block, num_warps


# Compiled kernels never take the interpreter-only branches below: the PTX is that of the plain code.
_INTERPRETING: tl.constexpr = tl.constexpr(is_interpreting())


@triton.jit
def loop_bound(n):
    """`n` (a runtime scalar) as the bound of a `range` loop, for every supported Triton. Compiled, it is `n`.
    The interpreter keeps a scalar as a one-element array, and Triton 3.6's interpreter turns a loop bound into
    a Python int with int(array), which NumPy >= 2.4 refuses for arrays of one dimension (later Tritons
    squeeze first); .item() takes the value of any one-element array."""
    if _INTERPRETING:
        return n.handle.data.item()
    return n


@triton.jit
def row_offset(row, rows_per_batch, stride_b, stride_t):
    """Element offset of row `row` of a [B, T, V] view: (row // T) * stride_b + (row % T) * stride_t, in int64
    so that N * V > 2^31 elements address correctly."""
    row64 = row.to(tl.int64)
    return (row64 // rows_per_batch) * stride_b + (row64 % rows_per_batch) * stride_t


def temperature_args(temperature: float) -> Tuple[float, float, float]:
    """(1 / tau, tau_hi, tau_lo) for the kernels: the reciprocal scales the per-element shifts; tau is split
    into two fp32-exact parts (tau_hi + tau_lo = tau to ~48 bits) because Triton passes Python floats as
    fp32, and the per-row epilogue (`row_epilogue`) divides by tau in fp64."""
    tau_hi = _to_fp32(temperature)
    return 1.0 / temperature, tau_hi, _to_fp32(temperature - tau_hi)


def _to_fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


@triton.jit
def streaming_softmax_stats(row_ptr, n_cols, vocab, inv_temperature, BLOCK_V: tl.constexpr):
    """One read of a row x: (m, d, t) with m = max x (raw logit units, an exact logit value),
    s = (x - m) / tau, d = sum exp(s), t = sum exp(s) s.

    Online form: when a tile raises the max from m to m' (delta = (m - m') / tau <= 0), the sums over the
    columns seen so far become d' = e^delta d and t' = e^delta (t + delta d), since exp(s + delta)(s + delta)
    = e^delta (e^s s + delta e^s). x - m is exact near the max (Sterbenz) and is scaled after the
    subtraction, so s is accurate to an ulp of s (eager fp32 rounds x / tau and m / tau first: an ulp of
    |x| / tau); the entropy h = log d - t / d never cancels two O(|z|) numbers. The per-element work is
    the same as scaling first (one subtract, one multiply; the sm_90 PTX of the tile loop has as many
    instructions as with z = x * scale, z - m): no division on the hot path. Triton lowers fp32 `/` to the
    approximate div.full.f32 (2 ulp) on NVIDIA; a correctly rounded x / tau would need `tl.math.div_rn`
    (div.rn.f32, a multi-instruction sequence in SASS) per element.
    -inf entries have exp = 0 and add nothing to t (p log p -> 0); a row that is -inf so far keeps
    m = -inf with d = t = 0 (the shift is taken as 0 so no inf - inf appears). `n_cols` is `vocab`, or 0
    to skip the row without touching memory.
    """
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    d = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for start in range(0, loop_bound(n_cols), BLOCK_V):
        idx = start + cols
        x = tl.load(row_ptr + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = (x - shift) * inv_temperature
        e = tl.exp(s)
        delta = (m - shift) * inv_temperature
        alpha = tl.exp(delta)
        # d > 0 implies m finite, so delta is finite where it is used.
        t = tl.where(d > 0, alpha * (t + delta * d), 0.0) + tl.sum(tl.where(e > 0, e * s, 0.0), axis=0)
        d = alpha * d + tl.sum(e, axis=0)
        m = m_new
    return m, d, t


@triton.jit
def row_epilogue(m, d, t, target, tau_hi, tau_lo):
    """Per-row outputs from the streaming stats, in fp64 (a few flops per row, nothing per element):
    (log d, h = log d - t / d, l = (x_y - m) / tau - log d), the last two rounded once to fp32. x_y - m is
    exact in fp64 and tau is the Python float to ~48 bits (tau_hi + tau_lo), so l is the correctly rounded
    fp32 log-prob up to the rounding of d (eager fp32 rounds x_y / tau, m / tau and their difference). log d
    stays fp64 here; the caller stores it as fp32 state."""
    d64 = d.to(tl.float64)
    log_d = tl.log(d64)
    entropy = (log_d - t.to(tl.float64) / d64).to(tl.float32)
    zero64 = tl.zeros([], tl.float64)  # (fp32 kernel arguments on GPU, Python floats in the interpreter)
    tau = (tau_hi + zero64) + (tau_lo + zero64)
    logprob = ((target.to(tl.float64) - m.to(tl.float64)) / tau - log_d).to(tl.float32)
    return log_d, entropy, logprob


@triton.jit
def store_row_grad(in_ptr, out_ptr, vocab, inv_temperature, m, log_d, entropy, a, b, label, active,
                   HAS_A: tl.constexpr, HAS_B: tl.constexpr, BLOCK_V: tl.constexpr):
    """One read and one write of a row: grad = [a (onehot(label) - p) - b p (log p + h)] / tau (section 6),
    with log p = (x - m) / tau - log d from the forward's state (m, log d): exact at the max, where
    p ~ 1 matters most (z - lse would carry the rounding of lse into every p). If the compiler contracts
    the multiply-subtract into an FMA, log p only gets more accurate. An inactive row reads nothing and
    writes zeros. The tile is read before it is written, so `out_ptr` may equal `in_ptr` (in place)."""
    cols = tl.arange(0, BLOCK_V)
    n_read = tl.where(active, vocab, 0)  # (a bound rather than `mask & active`: cheaper, and interpreter-safe)
    for start in range(0, loop_bound(vocab), BLOCK_V):
        idx = start + cols
        in_row = idx < vocab
        x = tl.load(in_ptr + idx, mask=idx < n_read, other=float("-inf")).to(tl.float32)
        log_p = (x - m) * inv_temperature - log_d
        p = tl.exp(log_p)
        grad = tl.zeros([BLOCK_V], tl.float32)
        if HAS_A:
            grad = tl.where(idx == label, a, 0.0) - a * p
        if HAS_B:
            # p log p -> 0 at p == 0 (-inf logits, inactive rows); a NaN p (a NaN in the row) stays NaN, as in eager
            grad -= b * tl.where(p == 0, 0.0, p * (log_p + entropy))
        tl.store(out_ptr + idx, to_storage(grad * inv_temperature, out_ptr.dtype.element_ty), mask=in_row)


# Triton's interpreter truncates fp32 -> bf16 where GPUs round to nearest even; the interpreter emulates the GPU.
_EMULATE_BF16_ROUNDING: tl.constexpr = _INTERPRETING


@triton.jit
def to_storage(values, dtype: tl.constexpr):
    """fp32 -> the storage dtype with round-to-nearest-even (one rounding of the fp32 result)."""
    if dtype == tl.float32:
        return values
    elif _EMULATE_BF16_ROUNDING and dtype == tl.bfloat16:
        bits = values.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return values.to(dtype)
