"""The vocab-blocked fused-linear path for half-precision (bf16/fp16) hidden states on CPU (and any device with
backend="torch"): log-probs and entropies through fp32 BLAS products on vocabulary blocks, without an fp32
copy of the whole weight or an fp32 [V, H] gradient buffer (which `chunked.py` needs for half
precision: ~0.85 x the bf16 logits of extra memory at N = 4096, H = 1024, V = 32000).

Loop over vocab blocks W_k = weight[v0:v1], each upcast once to fp32 (exact for bf16/fp16) and used for every
active row, so the conversion is amortised over all rows: z_k = X @ W_k^T (+ b_k), the hidden rows upcast to
fp32 in row pieces (or once, when all active rows fit the budget). CPU BLAS in torch has no bf16 x bf16 ->
fp32 product, and bf16 logits would lose eager fp32's accuracy, so the products are fp32.

Forward: the row backend's forward on each block gives its per-row (lse_k, h_k) and the label logit from the
block that holds it (local label y - v0 there, column 0 elsewhere); `ops/logprobs/mixture.combine_slices` turns the
stacked [blocks, N] statistics into full-vocabulary log-probs and entropies (the mixture formulas that the
vocab-parallel op uses across ranks). Only O(N) numbers are kept for the backward: the row log-sum-exp L
and the entropy h (fp64).

Backward, per block: z_k recomputed, the row backend's forward run again on it (O(N V_k), cheap beside the
three products) for its state and lse_k, so log w_k = lse_k - L; then the row backend's backward with
a' = a w_k, b' = b w_k and entropy slot h' = log w_k + h, the label column rewritten exactly
(`label_column_grad`), and grad_hidden (an fp32 [N, H] accumulator) += dz_k @ W_k, grad_W[v0:v1] =
dz_k^T @ X written once in the weight's dtype (one rounding, as eager fp32 then cast), grad_b likewise.

Memory: one fp32 [N_active, V_block] logits buffer of `chunk_budget_bytes` (default: 1/64 of the logits in the
inputs' dtype, clamped to [1 MiB, 256 MiB], at least `MIN_DEFAULT_COLUMNS` columns), the fp32 block of W and
of its gradient (8 V_block H bytes), fp32 hidden pieces of half the budget, O(N x blocks) statistics in the
forward and, in the backward, the fp32 grad_hidden accumulator (4 N H bytes, the accuracy's price: one rounding
of a sum over all blocks). Rows whose label is ignore_index are dropped before any product, as in the chunked
path: their outputs and gradients are exact zeros. Every block reads the same rows in a fixed order: the
result is deterministic.

Speed: the products are the chunked path's in other shapes; at N = 4096, V = 32000 (bf16, 2-core VM) the
default was as fast as the chunked path on a quiet machine. Its small blocks make many short parallel
regions (~8k per forward + backward there), and on an oversubscribed machine with OpenMP's default active
waiting each can cost milliseconds (measured 2-3x slower then; OMP_WAIT_POLICY=PASSIVE removed it). A larger
`chunk_budget_bytes` (16 MiB there: 32 blocks, hidden upcast once) trades memory (~0.2 x the logits) for
fewer, larger products.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..logprobs import mixture as M
from .chunked import active_rows

__all__ = ["BlockPlan", "DEFAULT_MIN_BUDGET", "DEFAULT_MAX_BUDGET", "MIN_DEFAULT_COLUMNS", "block_plan",
           "blocked_fwd", "blocked_bwd", "blocked_pack", "blocked_unpack"]

DEFAULT_MIN_BUDGET = 1 << 20
DEFAULT_MAX_BUDGET = 1 << 28
MIN_DEFAULT_COLUMNS = 128
_WORK = torch.float32
# Local label of the row kernels' ignore slot: never a local column (every row passed in is active).
_LOCAL_IGNORE = -1
# fp64 elements per piece of the O(N x blocks) combination (its transients stay small).
_COMBINE_ELEMENTS = 1 << 16


class BlockPlan(NamedTuple):
    """Columns per vocab block and hidden rows upcast per piece (= all active rows: upcast once)."""
    columns: int
    hidden_rows: int

    def blocks(self, vocab: int) -> int:
        return -(-vocab // self.columns)


def block_plan(n_rows: int, n_active: int, vocab: int, hidden: int, dtype: torch.dtype,
               budget: Optional[int] = None) -> BlockPlan:
    """The blocking for `budget` bytes of the fp32 [n_active, columns] logits buffer (None: the default, see
    the module docstring); n_rows (all rows) sizes the default, n_active (rows not ignored) the buffer."""
    floor = 1
    if budget is None:
        element = torch.finfo(dtype).bits // 8
        budget = min(max(n_rows * vocab * element // 64, DEFAULT_MIN_BUDGET), DEFAULT_MAX_BUDGET)
        floor = MIN_DEFAULT_COLUMNS
    rows = max(n_active, 1)
    columns = max(1, min(vocab, max(floor, budget // (4 * rows))))
    # the fp32 hidden pieces get half the budget; all rows at once when they fit it whole (one upcast)
    hidden_rows = rows if 4 * rows * hidden <= budget else max(1, min(rows, budget // (8 * hidden)))
    return BlockPlan(columns, hidden_rows)


class _Rows:
    """The active hidden rows as fp32 pieces of `plan.hidden_rows` rows (upcast once when that is all of them)."""

    def __init__(self, hidden2d: torch.Tensor, index: Optional[torch.Tensor], n_active: int, step: int):
        self.hidden2d, self.index, self.step = hidden2d, index, step
        self.starts = range(0, n_active, step)
        self.whole = self._upcast(0, n_active) if step >= n_active else None
        self.piece = None if self.whole is not None else torch.empty(step, hidden2d.shape[1], dtype=_WORK,
                                                                     device=hidden2d.device)

    def _upcast(self, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = (self.hidden2d[start:stop] if self.index is None
                else self.hidden2d.index_select(0, self.index[start:stop]))
        return rows.to(_WORK) if out is None else out.copy_(rows)

    def pieces(self):
        """(start, stop, fp32 rows) over every active row."""
        if self.whole is not None:
            yield 0, self.whole.shape[0], self.whole
            return
        for start in self.starts:
            stop = min(start + self.step, self.starts.stop)
            yield start, stop, self._upcast(start, stop, self.piece[:stop - start])


def _block_logits(rows: _Rows, w_k: torch.Tensor, b_k: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """out [n, V_k] = X @ W_k^T (+ b_k) in fp32 (the bias inside the product: no extra pass over out)."""
    for start, stop, x in rows.pieces():
        if b_k is None:
            torch.mm(x, w_k.t(), out=out[start:stop])
        else:
            torch.addmm(b_k, x, w_k.t(), out=out[start:stop])
    return out


def _buffers(n_active: int, hidden: int, plan: BlockPlan, device: torch.device):
    """Flat fp32 storage of the logits block and of the weight block (the last block views a prefix of it)."""
    return (torch.empty(n_active * plan.columns, dtype=_WORK, device=device),
            torch.empty(plan.columns * hidden, dtype=_WORK, device=device))


def _view(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return flat[:rows * cols].view(rows, cols)


def _block(weight: torch.Tensor, bias: Optional[torch.Tensor], v0: int, v1: int, z_flat: torch.Tensor,
           w_flat: torch.Tensor, n_active: int):
    """(z buffer view [n, V_k], W_k in fp32, b_k in fp32 | None) of the block [v0, v1)."""
    width, hidden = v1 - v0, weight.shape[1]
    w_k = _view(w_flat, width, hidden).copy_(weight[v0:v1])
    b_k = bias[v0:v1].to(_WORK) if bias is not None else None
    return _view(z_flat, n_active, width), w_k, b_k


def _local_labels(labels: torch.Tensor, v0: int, v1: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(in_block [n], local label [n]: y - v0 in the block, column 0 elsewhere; fixed up afterwards)."""
    in_block = (labels >= v0) & (labels < v1)
    return in_block, torch.where(in_block, labels - v0, 0)


def _slice_stats(row_backend, z: torch.Tensor, local: torch.Tensor, temperature: float, with_entropy: bool):
    """(state [n, 2], lse_k [n] fp64, h_k [n]) of one block from the row backend's forward; without the
    entropy (the backward's recomputation, or with_entropy=False) h_k is zeros and the row kernels skip it."""
    _, h_k, state_k = row_backend.forward(z.unsqueeze(0), local, temperature, _LOCAL_IGNORE,
                                          with_entropy=with_entropy)
    if h_k is None:
        h_k = torch.zeros(state_k.shape[0], dtype=state_k.dtype, device=state_k.device)
    lse_k, h_k = M.empty_slices(z, M.slice_lse(state_k, temperature), h_k)
    return state_k, lse_k, h_k


def blocked_fwd(row_backend, hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor, temperature: float, ignore_index: int, with_entropy: bool,
                budget: Optional[int] = None):
    """hidden2d [N, H], weight [V, H], bias [V] | None (bf16/fp16), labels [N] -> (logprobs [N] fp32,
    entropy [N] fp32 | None, saved) where `saved` is what `blocked_bwd` needs (O(N))."""
    n_rows, hidden = hidden2d.shape
    vocab, device = weight.shape[0], hidden2d.device
    index = active_rows(labels, ignore_index) if n_rows else None
    labels_all = (labels if index is None else labels.index_select(0, index)).long()
    n_active = labels_all.shape[0]
    plan = block_plan(n_rows, n_active, vocab, hidden, hidden2d.dtype, budget)
    logprobs = torch.zeros(n_rows, dtype=_WORK, device=device)
    entropy = torch.zeros_like(logprobs)
    lse_full = entropy64 = None
    if n_active:
        blocks = plan.blocks(vocab)
        lse_k = torch.empty(blocks, n_active, dtype=torch.float64, device=device)
        h_k = torch.empty(blocks, n_active, dtype=_WORK, device=device)
        target = torch.empty(n_active, dtype=_WORK, device=device)   # the label logit z_y, from its block
        rows = _Rows(hidden2d, index, n_active, plan.hidden_rows)
        z_flat, w_flat = _buffers(n_active, hidden, plan, device)
        for k in range(blocks):
            v0, v1 = k * plan.columns, min(vocab, (k + 1) * plan.columns)
            z, w_k, b_k = _block(weight, bias, v0, v1, z_flat, w_flat, n_active)
            _block_logits(rows, w_k, b_k, z)
            in_block, local = _local_labels(labels_all, v0, v1)
            _, lse_k[k], h_k[k] = _slice_stats(row_backend, z, local, temperature, with_entropy)
            target = torch.where(in_block, z.gather(1, local.unsqueeze(1)).squeeze(1), target)
        del rows, z_flat, w_flat
        owner = labels_all // plan.columns
        lp_active, lse_full, entropy64 = _combine(lse_k, target.double() / temperature, h_k, owner)
        logprobs_active, entropy_active = lp_active.to(_WORK), entropy64.to(_WORK)
        if index is None:
            logprobs, entropy = logprobs_active, entropy_active
        else:
            logprobs.index_copy_(0, index, logprobs_active)
            entropy.index_copy_(0, index, entropy_active)
    saved = (index, plan, lse_full, entropy64)
    return logprobs, (entropy if with_entropy else None), saved


def _combine(lse_k: torch.Tensor, target: torch.Tensor, h_k: torch.Tensor, owner: torch.Tensor):
    """(logprobs, L, entropy) [n] in fp64 from the stacked [blocks, n] statistics, in row pieces so that the
    combination's fp64 transients stay O(`_COMBINE_ELEMENTS`)."""
    blocks, n_active = lse_k.shape
    out = torch.empty(3, n_active, dtype=torch.float64, device=lse_k.device)
    step = max(1, _COMBINE_ELEMENTS // blocks)
    block_ids = torch.arange(blocks, device=lse_k.device).unsqueeze(1)
    for start in range(0, n_active, step):
        piece = slice(start, start + step)
        in_slice = block_ids == owner[piece].unsqueeze(0)
        active = torch.ones_like(owner[piece], dtype=torch.bool)
        logprobs, entropy, _, _, _, lse = M.combine_slices(lse_k[:, piece], target[piece], h_k[:, piece],
                                                           in_slice, active, M.stacked_reduce)
        out[0, piece], out[1, piece], out[2, piece] = logprobs, lse, entropy
    return out.unbind(0)


def blocked_pack(saved, n_rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`blocked_fwd`'s backward state as one fp64 tensor [N, 2] (each active row's L and entropy, zeros on
    ignored rows), so that the op can be a torch.library custom op; `blocked_unpack` inverts it."""
    index, _, lse_full, entropy64 = saved
    state = torch.zeros(n_rows, 2, dtype=torch.float64, device=device)
    if lse_full is not None:
        active = torch.stack([lse_full, entropy64], dim=1)
        state = active if index is None else state.index_copy_(0, index, active)
    return state


def blocked_unpack(state: torch.Tensor, entropy: Optional[torch.Tensor], labels: torch.Tensor, ignore_index: int,
                   vocab: int, hidden: int, dtype: torch.dtype, budget: Optional[int]):
    """The `saved` of `blocked_fwd` from `blocked_pack`'s tensor and what the forward's plan was decided from
    (the labels, V, H, the dtype, the budget). The forward's entropy is not needed (it is in the state)."""
    n_rows = state.shape[0]
    index = active_rows(labels, ignore_index) if n_rows else None
    active = state if index is None else state.index_select(0, index)
    n_active = active.shape[0]
    plan = block_plan(n_rows, n_active, vocab, hidden, dtype, budget)
    if not n_active:
        return index, plan, None, None
    return index, plan, active[:, 0].contiguous(), active[:, 1].contiguous()


def blocked_bwd(row_backend, hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor, saved, grad_logprobs: Optional[torch.Tensor],
                grad_entropy: Optional[torch.Tensor], temperature: float, ignore_index: int,
                needs: Tuple[bool, bool, bool]):
    """(grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) in the inputs' dtypes; None where not needed."""
    index, plan, lse_full, entropy64 = saved
    n_rows, hidden = hidden2d.shape
    vocab, device = weight.shape[0], hidden2d.device
    need_dx, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
    pick = (lambda t: t if t is None or index is None else t.index_select(0, index))  # noqa: E731
    labels_all = pick(labels).long()
    n_active = labels_all.shape[0]
    dx = torch.zeros(n_active, hidden, dtype=_WORK, device=device) if need_dx else None
    live = bool(n_active) and (grad_logprobs is not None or grad_entropy is not None)
    # written block by block, each block once (zeros when no row or no upstream gradient reaches them)
    new = torch.empty_like if live else torch.zeros_like
    dw = new(weight) if need_dw else None
    db = new(bias) if need_db else None
    if live and (need_dx or need_dw or need_db):
        glp = pick(grad_logprobs.to(_WORK)) if grad_logprobs is not None else None
        gent = pick(grad_entropy.to(_WORK)) if grad_entropy is not None else None
        a = glp if glp is not None else torch.zeros(n_active, dtype=_WORK, device=device)
        b = gent if gent is not None else torch.zeros(n_active, dtype=_WORK, device=device)
        active = torch.ones(n_active, dtype=torch.bool, device=device)
        rows = _Rows(hidden2d, index, n_active, plan.hidden_rows)
        z_flat, w_flat = _buffers(n_active, hidden, plan, device)
        dw_flat = torch.empty_like(w_flat) if need_dw else None
        for k in range(plan.blocks(vocab)):
            v0, v1 = k * plan.columns, min(vocab, (k + 1) * plan.columns)
            z, w_k, b_k = _block(weight, bias, v0, v1, z_flat, w_flat, n_active)
            _block_logits(rows, w_k, b_k, z)
            in_block, local = _local_labels(labels_all, v0, v1)
            state_k, lse_k, _ = _slice_stats(row_backend, z, local, temperature, False)
            w, log_w, has_mass = M.slice_weights(lse_k, lse_full)
            state_b, h_slot = M.backward_slots(state_k, log_w, entropy64, has_mass, _WORK)
            w = w.to(_WORK)
            column = local.unsqueeze(1)
            x_col = z.gather(1, column).squeeze(1)   # read before the backward overwrites z
            z3 = z.unsqueeze(0)
            row_backend.backward(z3, local, state_b, h_slot, (glp * w) if glp is not None else None,
                                 (gent * w) if gent is not None else None, temperature, _LOCAL_IGNORE, z3)
            col_grad = M.label_column_grad(x_col, state_b, h_slot, a, b, w, in_block, active, temperature)
            z.scatter_(1, column, col_grad.unsqueeze(1))   # z now holds dL/dz_k
            if need_db:
                db[v0:v1] = z.sum(0)
            if need_dx:
                dx.addmm_(z, w_k)
            if need_dw:
                dw[v0:v1] = _weight_block_grad(rows, z, _view(dw_flat, v1 - v0, hidden))
        del rows, z_flat, w_flat, dw_flat
    grad_hidden = None
    if need_dx:
        if index is None:
            grad_hidden = dx.to(hidden2d.dtype)
        else:   # scattered in row pieces: no whole [N_active, H] copy in the inputs' dtype beside dx
            grad_hidden = torch.zeros(n_rows, hidden, dtype=hidden2d.dtype, device=device)
            for start in range(0, n_active, plan.hidden_rows):
                stop = min(start + plan.hidden_rows, n_active)
                grad_hidden.index_copy_(0, index[start:stop], dx[start:stop].to(hidden2d.dtype))
    return grad_hidden, dw, db


def _weight_block_grad(rows: _Rows, dz: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [V_k, H] fp32 = dz^T @ X, accumulated over the row pieces (rounded once by the caller's copy)."""
    for start, stop, x in rows.pieces():
        if start == 0:
            torch.mm(dz[start:stop].t(), x, out=out)
        else:
            out.addmm_(dz[start:stop].t(), x)
    return out
