"""The fused-linear op's chunk plans, one per path, and its one budget knob.

`chunk_budget_bytes` is the bytes of the ONE logits buffer a path reuses for every chunk, in the working dtype
(fp32; fp64 for fp64 inputs). Its shape is the path's:

    "<row>-chunked"   [rows, V]           a chunk of active rows over the whole vocabulary (fp32/fp64 hidden
                                          states, `chunked.py`): rows = budget // (4 V), or // (8 V) for fp64
    "<row>-blocked"   [N_active, columns] a block of vocabulary columns over every active row (bf16/fp16,
                                          `blocked.py`): columns = budget // (4 N_active); the fp32 hidden
                                          rows are upcast whole when they fit the budget, else in pieces of
                                          half of it
    vocab-parallel    [rows, V_k]         row chunks over this rank's shard of V_k columns (`vocab_parallel.py`)
    "triton"          (none)              the logits live in register tiles: a budget is refused (ValueError)

Every plan keeps at least one row / column per chunk (a budget below one row or column means one) and never more
than there are. None takes the path's default, sized from the materialised logits in the inputs' dtype:

    chunked, vocab-parallel  1/16 of them within [16 MiB, 1 GiB], at least `MIN_DEFAULT_ROWS` rows per chunk:
                             every chunk reads all of W and updates all of grad_W, so thin chunks make the
                             products bound by that traffic (32-row chunks measured 10x slower than
                             torch.compile at V = 151936 on a 2-core VM)
    blocked                  1/64 of them within [1 MiB, 256 MiB], at least `MIN_DEFAULT_COLUMNS` columns: the
                             blocks' fixed cost is small, and the extra memory stays ~0.2 x the logits or less

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
        raise ValueError("chunk_budget_bytes applies to the chunked and vocab-blocked paths (CPU, backend='torch'); "
                         "the Triton path keeps its logits in register tiles and has no buffer to size: pass None")
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
