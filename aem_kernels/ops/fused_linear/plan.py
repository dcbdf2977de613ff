"""The fused-linear op's plans: which path "auto" takes on which device (the CUDA plan), each path's chunk
plan, and the one budget knob.

The CUDA plan (`auto_kind`, a pure function of the device type, the dtype and whether torch.mm takes
out_dtype there, `capability.half_mm_fp32_out`):

    device  dtype      path kind     products (`products.py`)
    cuda    bf16/fp16  chunked-tc    cuBLAS on the tensor cores: torch.mm(a, b, out_dtype=torch.float32), half
                                     operands, fp32 accumulation and output (torch >= 2.8: the aten::mm.dtype
                                     overload; all supported torches, 2.11 to 2.13, have it)
                       blocked       where torch.mm lacks out_dtype: fp32 cuBLAS products on fp32 vocab blocks
                                     of the weight (no whole fp32 copy; SIMT fp32 speed, ~1/15 of the tensor cores)
    cuda    fp32       chunked       cuBLAS fp32 products on the weight itself, never TF32 (`products.ieee_fp32`)
    cuda    fp64       chunked       the torch row backend in fp64 (a checking path)
    other   bf16/fp16  blocked;  fp32/fp64 chunked  (CPU BLAS has no half x half -> fp32 product)

On every CUDA kind the chunks run the row backend's kernels (Triton's row kernels by default) on each fp32
logits chunk, through the one chunk loop (`loop.py`). The Triton tile kernels (`triton.py`) are path "tiles":
taken only when asked (and, in Triton's CPU interpreter, by backend="triton", their test vehicle).

chunked-tc, step by step for a chunk of n active rows (x: their hidden rows, bf16/fp16 as given):
    forward   z = mm(x, W^T) (+ b in fp32) into the fp32 [n, V] buffer; the row backend's forward on it.
    backward  z recomputed; the row backend's backward overwrites it with dz = dL/dz (fp32);
              db += sum_rows dz (fp32); dz -> two half parts p1 = half(dz), p2 = half(dz - p1) (in place);
              dx rows = mm(p1, W) + mm(p2, W); dW += [p1; p2]^T [x; x] (one product over the stacked parts,
              so dW is read and written once per chunk) into the fp32 [V, H] accumulator (torch.addmm with
              out_dtype in place where torch takes an fp32 `self`, else in vocab pieces through the spent
              chunk buffer, never a [V, H] temporary).
    Memory: no fp32 copy of the weight and no N x V buffer: the fp32 chunk buffer and the parts (8 V bytes a
    row: TENSOR_CORE_ROWS = 1024 rows by default, 1.2 GiB at V = 151936, 0.25 GiB at V = 32000), the fp32
    [V, H] weight-gradient accumulator (as eager fp32 has; one rounding to the weight's dtype at the end) and
    the fp32 [N, H] hidden-gradient buffer.
    Why 1024 rows: every chunk streams W three times (recompute, two dx products: 6 V H bytes) and dW once
    (read + write, 8 V H bytes) for 10 n V H flops, so the chunk is compute-bound on an H200 (790 TFLOP/s
    over ~4.3 TB/s: ~184 flop/byte) from n ~ 260 rows; 1024 leaves a 4x margin for cuBLAS's tile
    quantisation. The elementwise passes over the chunk (~36 bytes per logit: GEMM write, row kernels, split)
    cost less than the 12 H flops per logit of the products at any H >= 256.

Error analysis of chunked-tc (the accuracy rule: |ours - fp64| <= 3 |eager fp32 - fp64| + 1e-5, max abs,
eager fp32 = hidden and weight upcast to fp32, gradients cast back to the leaves' dtype):
  - forward: a bf16 x bf16 (fp16 x fp16) product has 16 (22) significant bits, exact in fp32's 24, and the
    tensor cores accumulate in fp32, so z carries eager fp32's rounding (up to summation order); the rows'
    statistics are the row backend's, as on every path.
  - backward: dz is fp32, its operands half. One rounding (k = 1 part) gives dz a relative error 2^-9 (bf16)
    / 2^-12 (fp16) per element, which cancellation in sum_v dz_v W_v (sum_v dz_v = 0 for a softmax
    gradient) can bring to the result's size; two parts leave 2^-18 / 2^-24 (bf16's 8 bits twice; fp16's 11
    twice, fp32-like), three 2^-27 / 2^-36. Measured on CPU with the exact emulation (7 cases per dtype:
    N 37-128, H 24-256, V 301-3001, logits up to ~1e4, tau 0.3-3, ignored rows; through this package's
    code, 16-row chunks), the worst ratio |ours - fp64| / |eager fp32 - fp64| over dx, dW, db after the cast
    to the leaf's dtype (the forward's log-probs and entropies: at most 1.33x, whatever k):
        bf16:  k = 1: 1.79x  k = 2: 1.00x  k = 3: 1.00x
        fp16:  k = 1: 2.35x  k = 2: 1.00x  k = 3: 1.00x
    (before the cast, in fp32: bf16 k = 1 up to ~3e4x, k = 2 up to ~30x (hidden by the cast's 2^-9),
    k = 3 ~1x; fp16 k = 2 ~1.4x). k = 1 is inside the rule at these sizes but with no margin left for
    larger V; k = 2 (`products.SPLIT_PARTS`) keeps the final rounding to the leaf's dtype the dominant error
    (margin ~2^8 for bf16) for one more tensor-core product per gradient, still ~8x the speed of fp32 SIMT
    products. The Triton tile kernels split the same way.
  - fp16's range (~2^-24 to 2^16) would overflow large dz (a loss scale) and flush small ones: an fp16
    chunk's parts are formed from dz scaled by a power of two that puts max |dz| in [2^13, 2^14) (exact; one
    host sync per chunk), and the products are unscaled by alpha / a multiply, also exact. bf16 has fp32's
    range and needs no scaling.
  - cuBLAS may split K and reduce partial sums in the output type when
    `allow_bf16_reduced_precision_reduction` is on; the output type here is fp32, so the reduction is fp32.


The chunk plans. `chunk_budget_bytes` is the bytes of the ONE logits buffer a path reuses for every chunk, in the
working dtype (fp32; fp64 for fp64 inputs), and on chunked-tc of its half-precision parts too. Its shape is the
path's:

    "<row>-chunked"   [rows, V]           a chunk of active rows over the whole vocabulary (fp32/fp64 hidden
                                          states, `chunked.py`): rows = budget // (4 V), or // (8 V) for fp64
    "<row>-blocked"   [N_active, columns] a block of vocabulary columns over every active row (bf16/fp16,
                                          `blocked.py`): columns = budget // (4 N_active); the fp32 hidden
                                          rows are upcast whole when they fit the budget, else in pieces of
                                          half of it
    "<row>-chunked-tc" [rows, V] + parts  the CUDA plan: rows = budget // (8 V) (fp32 logits, two half parts)
    vocab-parallel    [rows, V_k]         row chunks over this rank's shard of V_k columns (`vocab_parallel.py`;
                                          on CUDA with half precision, chunked-tc's products and plan)
    "triton"          (none)              the logits live in register tiles: a budget is refused (ValueError)

Every plan keeps at least one row / column per chunk (a budget below one row or column means one) and never more
than there are. None takes the path's default, sized from the materialised logits in the inputs' dtype:

    chunked, vocab-parallel  1/16 of them within [16 MiB, 1 GiB], at least `MIN_DEFAULT_ROWS` rows per chunk:
                             every chunk reads all of W and updates all of grad_W, so thin chunks make the
                             products bound by that traffic (32-row chunks measured 10x slower than
                             torch.compile at V = 151936 on a 2-core VM)
    blocked                  1/64 of them within [1 MiB, 256 MiB], at least `MIN_DEFAULT_COLUMNS` columns: the
                             blocks' fixed cost is small, and the extra memory stays ~0.2 x the logits or less
    chunked-tc               `TENSOR_CORE_ROWS` rows (or all): see "Why 1024 rows" above

The plans are pure functions of the shapes, the dtype and the budget: the backward recomputes the forward's
plan from them (its chunks must be the forward's, whose per-row state it reads).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ...layout import compute_dtype
from .products import SPLIT_PARTS

__all__ = ["BlockPlan", "CHUNKED_MIN_BUDGET", "CHUNKED_MAX_BUDGET", "BLOCKED_MIN_BUDGET", "BLOCKED_MAX_BUDGET",
           "HALF_DTYPES", "MIN_DEFAULT_COLUMNS", "MIN_DEFAULT_ROWS", "TENSOR_CORE_ROWS", "auto_kind", "block_plan",
           "check_chunk_budget", "chunk_plan", "chunked_kind", "vocab_parallel_plan"]

CHUNKED_MIN_BUDGET = 16 << 20
CHUNKED_MAX_BUDGET = 1 << 30
MIN_DEFAULT_ROWS = 256
BLOCKED_MIN_BUDGET = 1 << 20
BLOCKED_MAX_BUDGET = 1 << 28
MIN_DEFAULT_COLUMNS = 128
TENSOR_CORE_ROWS = 1024
HALF_DTYPES = (torch.float16, torch.bfloat16)


def chunked_kind(device_type: str, dtype: torch.dtype, half_mm_fp32_out: bool) -> str:
    """The kind of row-chunk path for hidden states of `dtype` on `device_type`: "chunked-tc" (the CUDA plan's
    half-precision products, `products.HalfProducts`) for bf16/fp16 on CUDA where torch.mm takes out_dtype
    (`capability.half_mm_fp32_out`), else "chunked" (products in the working dtype)."""
    if device_type == "cuda" and dtype in HALF_DTYPES and half_mm_fp32_out:
        return "chunked-tc"
    return "chunked"


def auto_kind(device_type: str, dtype: torch.dtype, half_mm_fp32_out: bool) -> str:
    """The path kind that path="auto" takes over a BLAS row backend (a pure function, tested with made-up
    capabilities; the module docstring's table):
        cuda  bf16/fp16  "chunked-tc", or "blocked" where torch.mm lacks out_dtype (fp32 products on fp32
                         vocab blocks of the weight: no whole fp32 copy, SIMT fp32 speed)
        cuda  fp32       "chunked" (cuBLAS fp32 products on the weight itself, never TF32)
        cuda  fp64       "chunked" (the torch row backend: a checking path)
        other bf16/fp16  "blocked"; fp32/fp64 "chunked" (CPU BLAS has no half x half -> fp32 product)"""
    if device_type == "cuda":
        if dtype in HALF_DTYPES:
            return "chunked-tc" if half_mm_fp32_out else "blocked"
        return "chunked"
    return "blocked" if dtype in HALF_DTYPES else "chunked"


def check_chunk_budget(budget: object, path_key: Optional[str] = None) -> Optional[int]:
    """`chunk_budget_bytes` checked: None or a positive int (see the module docstring). The Triton path
    (`path_key` "triton") has no buffer to size, so it refuses a budget rather than ignore it."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"chunk_budget_bytes must be None or a positive int (bytes), got {budget!r}")
    if path_key == "triton":
        raise ValueError("chunk_budget_bytes applies to the row-chunk and vocab-block paths (the CUDA plan, CPU, "
                         "backend='torch'); the Triton tile kernels (path 'tiles') keep their logits in register "
                         "tiles and have no buffer to size: pass None")
    return budget


def _default_budget(n_rows: int, vocab: int, dtype: torch.dtype, share: int, low: int, high: int) -> int:
    """1/share of the materialised [n_rows, vocab] logits in `dtype`, clamped to [low, high] bytes."""
    return min(max(n_rows * vocab * (torch.finfo(dtype).bits // 8) // share, low), high)


def chunk_plan(n_rows: int, vocab: int, dtype: torch.dtype, budget: Optional[int] = None,
               tensor_cores: bool = False) -> int:
    """Rows per chunk of the chunked path: its [rows, vocab] buffer in the working dtype of `dtype`'s inputs
    holds `budget` bytes (None: the default). n_rows (all rows, ignored ones too) sizes the default.
    tensor_cores (the CUDA plan, "chunked-tc"): a row costs its fp32 logits and their SPLIT_PARTS
    half-precision parts, (4 + 2 SPLIT_PARTS) V = 8 V bytes; the default is TENSOR_CORE_ROWS rows."""
    if tensor_cores:
        row_bytes = (4 + 2 * SPLIT_PARTS) * max(vocab, 1)
        rows = TENSOR_CORE_ROWS if budget is None else budget // row_bytes
        return max(1, min(max(n_rows, 1), rows))
    work = torch.finfo(compute_dtype(dtype)).bits // 8
    floor = 1
    if budget is None:
        budget = _default_budget(n_rows, vocab, dtype, 16, CHUNKED_MIN_BUDGET, CHUNKED_MAX_BUDGET)
        floor = MIN_DEFAULT_ROWS
    return max(1, min(max(n_rows, 1), max(floor, budget // (work * max(vocab, 1)))))


def vocab_parallel_plan(n_rows: int, shard_vocab: int, dtype: torch.dtype, budget: Optional[int] = None,
                        tensor_cores: bool = False) -> int:
    """Rows per chunk of the vocab-parallel op: the chunked plan for this rank's shard of V_k columns (its
    buffer is [rows, V_k]; the default is sized from the shard's logits, not the full vocabulary's)."""
    return chunk_plan(n_rows, shard_vocab, dtype, budget, tensor_cores)


class BlockPlan(NamedTuple):
    """Columns per vocab block and hidden rows upcast per piece (= all active rows: upcast once)."""
    columns: int
    hidden_rows: int

    def blocks(self, vocab: int) -> int:
        return -(-vocab // self.columns)


def block_plan(n_rows: int, n_active: int, vocab: int, hidden: int, dtype: torch.dtype,
               budget: Optional[int] = None) -> BlockPlan:
    """The blocked path's plan: its fp32 [n_active, columns] buffer holds `budget` bytes (None: the default);
    n_rows (all rows) sizes the default, n_active (rows not ignored) the buffer."""
    floor = 1
    if budget is None:
        budget = _default_budget(n_rows, vocab, dtype, 64, BLOCKED_MIN_BUDGET, BLOCKED_MAX_BUDGET)
        floor = MIN_DEFAULT_COLUMNS
    rows = max(n_active, 1)
    columns = max(1, min(vocab, max(floor, budget // (4 * rows))))
    # the fp32 hidden pieces get half the budget; all rows at once when they fit it whole (one upcast)
    hidden_rows = rows if 4 * rows * hidden <= budget else max(1, min(rows, budget // (8 * hidden)))
    return BlockPlan(columns, hidden_rows)
