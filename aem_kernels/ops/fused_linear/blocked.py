"""The vocab-blocked fused-linear path for half-precision (bf16/fp16) hidden states on CPU (and any device with
backend="torch"): log-probs and entropies through fp32 BLAS products on vocabulary blocks, without an fp32
copy of the whole weight or an fp32 [V, H] gradient buffer (which `chunked.py` needs for half
precision: ~0.85 x the bf16 logits of extra memory at N = 4096, H = 1024, V = 32000).

Both passes are the op's one chunk loop over vocab blocks (`loop.chunk_loop` with `loop.VocabBlocks`): blocks
W_k = weight[v0:v1], each upcast once to fp32 (exact for bf16/fp16) and used for every active row, so the
conversion is amortised over all rows: z_k = X @ W_k^T (+ b_k), the hidden rows upcast to fp32 in row pieces
(or once, when all active rows fit the budget); each pass has its own per-block step. CPU BLAS in torch has no
bf16 x bf16 -> fp32 product, and bf16 logits would lose eager fp32's accuracy, so the products are fp32.

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

Memory: one fp32 [N_active, V_block] logits buffer of `chunk_budget_bytes` (`plan.block_plan`; default: 1/64 of
the logits in the inputs' dtype, within [1 MiB, 256 MiB], at least 128 columns), the fp32 block of W and
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

from typing import Optional, Tuple

import torch

from ..logprobs import mixture as M
from .loop import ActiveRows, HiddenPieces, VocabBlock, VocabBlocks, chunk_loop
from .plan import block_plan

__all__ = ["COMBINE_ELEMENTS", "blocked_bwd", "blocked_fwd", "blocked_pack", "blocked_unpack"]

_WORK = torch.float32
# Local label of the row kernels' ignore slot: never a local column (every row passed in is active).
_LOCAL_IGNORE = -1
# fp64 elements per piece of the O(N x blocks) combination (its transients stay small).
COMBINE_ELEMENTS = 1 << 16


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
    entropy [N] fp32 | None, saved) where `saved` = (active rows, plan, L [N_active] fp64 | None, entropy
    [N_active] fp64 | None) is what `blocked_bwd` needs (O(N))."""
    vocab, device = weight.shape[0], hidden2d.device
    rows = ActiveRows(labels, ignore_index)
    labels_active = rows.pick(labels).long()
    n_active = rows.n_active
    plan = block_plan(rows.n_rows, n_active, vocab, hidden2d.shape[1], hidden2d.dtype, budget)
    logprobs = torch.zeros(rows.n_rows, dtype=_WORK, device=device)
    entropy = torch.zeros_like(logprobs)
    lse_full = entropy64 = None
    if n_active:
        blocks = plan.blocks(vocab)
        lse_k = torch.empty(blocks, n_active, dtype=torch.float64, device=device)
        h_k = torch.empty(blocks, n_active, dtype=_WORK, device=device)
        target = torch.empty(n_active, dtype=_WORK, device=device)   # the label logit z_y, from its block

        def step(block: VocabBlock) -> None:
            nonlocal target
            _, lse_k[block.number], h_k[block.number] = _slice_stats(row_backend, block.z, block.local, temperature,
                                                                     with_entropy)
            target = torch.where(block.in_block, block.z.gather(1, block.local.unsqueeze(1)).squeeze(1), target)

        chunk_loop(VocabBlocks(hidden2d, rows, labels_active, weight, bias, plan), step)
        owner = labels_active // plan.columns
        lp_active, lse_full, entropy64 = _combine(lse_k, target.double() / temperature, h_k, owner)
        logprobs, entropy = rows.spread(lp_active.to(_WORK)), rows.spread(entropy64.to(_WORK))
    return logprobs, (entropy if with_entropy else None), (rows, plan, lse_full, entropy64)


def _combine(lse_k: torch.Tensor, target: torch.Tensor, h_k: torch.Tensor, owner: torch.Tensor):
    """(logprobs, L, entropy) [n] in fp64 from the stacked [blocks, n] statistics, in row pieces so that the
    combination's fp64 transients stay O(`COMBINE_ELEMENTS`)."""
    blocks, n_active = lse_k.shape
    out = torch.empty(3, n_active, dtype=torch.float64, device=lse_k.device)
    step = max(1, COMBINE_ELEMENTS // blocks)
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
    rows, _, lse_full, entropy64 = saved
    if lse_full is None:
        return torch.zeros(n_rows, 2, dtype=torch.float64, device=device)
    return rows.spread(torch.stack([lse_full, entropy64], dim=1))


def blocked_unpack(state: torch.Tensor, entropy: Optional[torch.Tensor], labels: torch.Tensor, ignore_index: int,
                   vocab: int, hidden: int, dtype: torch.dtype, budget: Optional[int]):
    """The `saved` of `blocked_fwd` from `blocked_pack`'s tensor and what the forward's plan was decided from
    (the labels, V, H, the dtype, the budget). The forward's entropy is not needed (it is in the state)."""
    rows = ActiveRows(labels, ignore_index)
    active = rows.pick(state)
    plan = block_plan(rows.n_rows, rows.n_active, vocab, hidden, dtype, budget)
    if not rows.n_active:
        return rows, plan, None, None
    return rows, plan, active[:, 0].contiguous(), active[:, 1].contiguous()


def blocked_bwd(row_backend, hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor, saved, grad_logprobs: Optional[torch.Tensor],
                grad_entropy: Optional[torch.Tensor], temperature: float, ignore_index: int,
                needs: Tuple[bool, bool, bool]):
    """(grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) in the inputs' dtypes; None where not needed."""
    rows, plan, lse_full, entropy64 = saved
    n_active, hidden, device = rows.n_active, hidden2d.shape[1], hidden2d.device
    need_dx, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
    labels_active = rows.pick(labels).long()
    dx = torch.zeros(n_active, hidden, dtype=_WORK, device=device) if need_dx else None
    live = bool(n_active) and (grad_logprobs is not None or grad_entropy is not None)
    # written block by block, each block once (zeros when no row or no upstream gradient reaches them)
    new = torch.empty_like if live else torch.zeros_like
    dw = new(weight) if need_dw else None
    db = new(bias) if need_db else None
    if live and (need_dx or need_dw or need_db):
        glp = rows.pick(grad_logprobs.to(_WORK)) if grad_logprobs is not None else None
        gent = rows.pick(grad_entropy.to(_WORK)) if grad_entropy is not None else None
        a = glp if glp is not None else torch.zeros(n_active, dtype=_WORK, device=device)
        b = gent if gent is not None else torch.zeros(n_active, dtype=_WORK, device=device)
        active = torch.ones(n_active, dtype=torch.bool, device=device)
        dw_flat = torch.empty(plan.columns * hidden, dtype=_WORK, device=device) if need_dw else None

        def step(block: VocabBlock) -> None:
            z, v0, v1 = block.z, block.start, block.stop
            state_k, lse_k, _ = _slice_stats(row_backend, z, block.local, temperature, False)
            w, log_w, has_mass = M.slice_weights(lse_k, lse_full)
            state_b, h_slot = M.backward_slots(state_k, log_w, entropy64, has_mass, _WORK)
            w = w.to(_WORK)
            column = block.local.unsqueeze(1)
            x_col = z.gather(1, column).squeeze(1)   # read before the backward overwrites z
            z3 = z.unsqueeze(0)
            row_backend.backward(z3, block.local, state_b, h_slot, (glp * w) if glp is not None else None,
                                 (gent * w) if gent is not None else None, temperature, _LOCAL_IGNORE, z3)
            col_grad = M.label_column_grad(x_col, state_b, h_slot, a, b, w, block.in_block, active, temperature)
            z.scatter_(1, column, col_grad.unsqueeze(1))   # z now holds dL/dz_k
            if need_db:
                db[v0:v1] = z.sum(0)
            if need_dx:
                dx.addmm_(z, block.weight)
            if need_dw:
                out = dw_flat[:(v1 - v0) * hidden].view(v1 - v0, hidden)
                dw[v0:v1] = _weight_block_grad(block.hidden, z, out)

        chunk_loop(VocabBlocks(hidden2d, rows, labels_active, weight, bias, plan), step)
        del dw_flat
    grad_hidden = None
    if need_dx:
        if rows.index is None:
            grad_hidden = dx.to(hidden2d.dtype)
        else:   # scattered in row pieces: no whole [N_active, H] copy in the inputs' dtype beside dx
            grad_hidden = torch.zeros(rows.n_rows, hidden, dtype=hidden2d.dtype, device=device)
            for start in range(0, n_active, plan.hidden_rows):
                stop = min(start + plan.hidden_rows, n_active)
                grad_hidden.index_copy_(0, rows.index[start:stop], dx[start:stop].to(hidden2d.dtype))
    return grad_hidden, dw, db


def _weight_block_grad(pieces: HiddenPieces, dz: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [V_k, H] fp32 = dz^T @ X, accumulated over the row pieces (rounded once by the caller's copy)."""
    for start, stop, x in pieces.pieces():
        if start == 0:
            torch.mm(dz[start:stop].t(), x, out=out)
        else:
            out.addmm_(dz[start:stop].t(), x)
    return out
