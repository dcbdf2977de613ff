"""The chunked fused-linear path (CPU, and any device with backend="torch"): hidden states -> log-probs and
entropies through BLAS matmuls on row chunks and a row backend of `ops.logprobs`, never an N x V buffer.

Each pass is the op's one chunk loop over row chunks (`loop.chunk_loop` with `loop.RowChunks`: the active rows'
logits z = hidden_chunk @ W^T (+ b), chunk by chunk, in one reused [rows, V] buffer) with its own step:
  forward   the row backend's `forward` on z (log-prob, entropy and its opaque per-row state, kept per chunk);
  backward  the row backend's `backward` overwrites z with dL/dz (section 6, in place), then
            grad_hidden_chunk = dz @ W, grad_W += dz^T @ hidden_chunk, grad_b += sum_rows dz (`loop.accumulate`);
  single pass (the loss's, when its per-token derivatives are known before the forward) both in one step.
Rows whose label is ignore_index contribute nothing and are dropped before any matmul (RL batches are full of
prompt and padding tokens): their outputs and gradients are exact zeros.

The chunks' products are `products.py`'s: on CUDA with half precision the CUDA plan's ("<row>-chunked-tc",
`plan.py`: half-precision operands on the tensor cores with fp32 output, the weight never copied); otherwise
the working dtype's, as follows.

Working precision: fp32 (fp64 for fp64 inputs, a checking path). fp32 weights are used as they are. A half
precision (bf16/fp16) weight is upcast to fp32 once in the forward and once in the backward (CPU BLAS has no
bf16 x bf16 -> fp32 product, and bf16 chunk logits would lose eager fp32's accuracy; upcasting per chunk or in
vocab blocks was measured 3-5x slower: the conversion costs about half a chunk's matmul), and its gradient
accumulates in an fp32 [V, H] buffer (one rounding at the end instead of one per chunk). So for half-precision
weights the extra memory is the budget plus 4 V H bytes in the forward and 8 V H bytes in the backward.

Memory: the chunk buffer of `chunk_budget_bytes` (`plan.chunk_plan`: rows = budget // (4 V); the default
1/16 of the logits within [16 MiB, 1 GiB], at least 256 rows). Extra peak memory: max(logits / 16, 1 KiB x V)
fp32 bytes, ~0.06-0.13 x the logits at N = 4096. The matmuls use torch's BLAS threads.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ...layout import compute_dtype
from .loop import ActiveRows, GradHidden, RowChunk, RowChunks, accumulate, chunk_loop
from .plan import chunk_plan
from .products import WorkProducts

__all__ = ["chunked_bwd", "chunked_fwd", "chunked_pack", "chunked_single_pass", "chunked_unpack", "compute_dtype"]


def chunked_fwd(row_backend, hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor, temperature: float, ignore_index: int, with_entropy: bool,
                budget: Optional[int] = None, products=None):
    """hidden2d [N, H], weight [V, H], bias [V] | None, labels [N] -> (logprobs [N], entropy [N] | None, saved)
    where `saved` = (active rows, rows per chunk, the row backend's states per chunk (opaque), the active rows'
    entropy | None) is what `chunked_bwd` needs. products: the chunks' (`products.py`; None: the working
    dtype's)."""
    work = compute_dtype(hidden2d.dtype)
    products = products if products is not None else WorkProducts(work)
    rows = ActiveRows(labels, ignore_index)
    labels_active = rows.pick(labels).long()
    per_chunk = chunk_plan(rows.n_rows, weight.shape[0], hidden2d.dtype, budget, products.tensor_cores)
    lp_active = torch.empty(rows.n_active, dtype=work, device=hidden2d.device)
    ent_active = torch.empty_like(lp_active) if with_entropy else None   # with_entropy=False: no entropy work
    states: List[object] = []

    def step(chunk: RowChunk) -> None:
        span = slice(chunk.start, chunk.stop)
        lp, ent, state = row_backend.forward(chunk.z.unsqueeze(0), labels_active[span], temperature, ignore_index,
                                             with_entropy=with_entropy)
        lp_active[span] = lp
        if with_entropy:
            ent_active[span] = ent
        states.append(state)

    chunk_loop(RowChunks(hidden2d, rows, weight, bias, per_chunk, work, products), step)
    entropy = rows.spread(ent_active) if with_entropy else None
    return rows.spread(lp_active), entropy, (rows, per_chunk, states, ent_active)


def chunked_pack(saved, n_rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`chunked_fwd`'s backward state as one tensor [N, 2] in the working dtype (each active row's (m, log d),
    zeros on ignored rows), so that the op can be a torch.library custom op; `chunked_unpack` inverts it."""
    rows, _, states, _ = saved
    if not states:
        return torch.zeros(n_rows, 2, dtype=compute_dtype(dtype), device=device)
    return rows.spread(torch.cat(states))


def chunked_unpack(state: torch.Tensor, entropy: Optional[torch.Tensor], labels: torch.Tensor, ignore_index: int,
                   vocab: int, dtype: torch.dtype, budget: Optional[int], tensor_cores: bool = False):
    """The `saved` of `chunked_fwd` from `chunked_pack`'s tensor, the forward's entropy [N] (None without it)
    and what the forward's plan was decided from (the labels, V, the dtype, the budget, the products)."""
    rows = ActiveRows(labels, ignore_index)
    per_chunk = chunk_plan(rows.n_rows, vocab, dtype, budget, tensor_cores)
    active = rows.pick(state)
    states = list(active.split(per_chunk)) if active.shape[0] else []
    return rows, per_chunk, states, rows.pick(entropy)


def _gradient_buffers(rows: ActiveRows, weight: torch.Tensor, bias: Optional[torch.Tensor], hidden: int,
                      work: torch.dtype, needs: Tuple[bool, bool, bool]):
    """(grad_hidden writer | None, grad_W [V, H] | None, grad_b [V] | None) in the working dtype: fp32 weights
    accumulate into their own gradient, half-precision ones into an fp32 buffer (module docstring)."""
    device = weight.device
    dx = GradHidden(rows, hidden, work, device) if needs[0] else None
    dw = torch.zeros(weight.shape[0], hidden, dtype=work, device=device) if needs[1] else None
    db = torch.zeros(weight.shape[0], dtype=work, device=device) if needs[2] and bias is not None else None
    return dx, dw, db


def chunked_bwd(row_backend, hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor, saved, grad_logprobs: Optional[torch.Tensor],
                grad_entropy: Optional[torch.Tensor], temperature: float, ignore_index: int,
                needs: Tuple[bool, bool, bool], products=None):
    """(grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) in the inputs' dtypes; None where not needed."""
    rows, per_chunk, states, ent_active = saved
    work = compute_dtype(hidden2d.dtype)
    labels_active = rows.pick(labels).long()
    glp = rows.pick(grad_logprobs.to(work)) if grad_logprobs is not None else None
    gent = rows.pick(grad_entropy.to(work)) if grad_entropy is not None else None
    if ent_active is None:   # a with_entropy=False forward: nothing can flow into the entropy
        if gent is not None:
            raise ValueError("grad_entropy must be None for a forward run with with_entropy=False")
        # Without grad_entropy no row backward reads h; zeros (not an unwritten buffer) all the same.
        ent_active = torch.zeros(rows.n_active, dtype=work, device=hidden2d.device)
    dx, dw, db = _gradient_buffers(rows, weight, bias, hidden2d.shape[1], work, needs)

    def step(chunk: RowChunk) -> None:
        span = slice(chunk.start, chunk.stop)
        z3 = chunk.z.unsqueeze(0)
        row_backend.backward(z3, labels_active[span], states[chunk.number], ent_active[span],
                             glp[span] if glp is not None else None, gent[span] if gent is not None else None,
                             temperature, ignore_index, z3)   # dL/dz overwrites z
        accumulate(chunk, dx, dw, db)

    if (glp is not None or gent is not None) and (dx is not None or dw is not None or db is not None):
        chunk_loop(RowChunks(hidden2d, rows, weight, bias, per_chunk, work, products), step)
    return (dx.buffer.to(hidden2d.dtype) if dx is not None else None, dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None)


def chunked_single_pass(row_backend, hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        labels: torch.Tensor, temperature: float, ignore_index: int, token_grads,
                        needs: Tuple[bool, bool, bool], budget: Optional[int] = None, products=None):
    """Values and gradients of a scalar loss sum_t f_t(l_t, h_t) in one pass over the chunks (the fused-linear
    twin of the single-pass loss, AEM_SPEC section 6): when the loss's per-token derivatives a_t = df/dl_t,
    b_t = df/dh_t depend only on token t's own values (the AEM loss once its weights w_r are known before the
    forward), each chunk's dL/dz follows right after its statistics, while its logits are still in the buffer,
    so the logits are never recomputed: three matmuls per chunk instead of the two-pass path's four.

    token_grads(index [n] int64 token positions, logprobs [n], entropy [n]) -> (a [n], b [n] | None).
    Returns (logprobs [N], entropy [N], (grad_hidden [N, H] | None, grad_weight [V, H] | None,
    grad_bias [V] | None)) in the working dtype (fp32; fp64 for fp64 inputs), for the caller to scale by the
    loss's upstream gradient and cast."""
    work = compute_dtype(hidden2d.dtype)
    products = products if products is not None else WorkProducts(work)
    rows = ActiveRows(labels, ignore_index)
    labels_active = rows.pick(labels).long()
    positions = rows.index if rows.index is not None else torch.arange(rows.n_rows, device=hidden2d.device)
    per_chunk = chunk_plan(rows.n_rows, weight.shape[0], hidden2d.dtype, budget, products.tensor_cores)
    lp_active = torch.empty(rows.n_active, dtype=work, device=hidden2d.device)
    ent_active = torch.empty_like(lp_active)
    dx, dw, db = _gradient_buffers(rows, weight, bias, hidden2d.shape[1], work, needs)
    with_grads = dx is not None or dw is not None or db is not None

    def step(chunk: RowChunk) -> None:
        span = slice(chunk.start, chunk.stop)
        z3 = chunk.z.unsqueeze(0)
        lp, ent, state = row_backend.forward(z3, labels_active[span], temperature, ignore_index)
        lp_active[span] = lp
        ent_active[span] = ent
        if with_grads:
            a, b = token_grads(positions[span], lp, ent)
            row_backend.backward(z3, labels_active[span], state, ent, a.to(work).contiguous(),
                                 b.to(work).contiguous() if b is not None else None, temperature, ignore_index,
                                 z3)   # dL/dz overwrites z while it is still in the buffer
            accumulate(chunk, dx, dw, db)

    chunk_loop(RowChunks(hidden2d, rows, weight, bias, per_chunk, work, products), step)
    return rows.spread(lp_active), rows.spread(ent_active), (dx.buffer if dx is not None else None, dw, db)
