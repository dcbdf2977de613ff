"""The chunked fused-linear path (CPU, and any device with backend="torch"): hidden states -> log-probs and
entropies through BLAS matmuls on row chunks and a row backend of `ops.logprobs`, never an N x V buffer.

Forward, per chunk of rows: z = hidden_chunk @ W^T (+ b) into one reused fp32 [rows, V] buffer, then the row
backend's `forward` (log-prob, entropy and its opaque per-row state, kept per chunk). Backward, per chunk:
z is recomputed into the same buffer, the row backend's `backward` overwrites it with dL/dz (section 6,
in place), then grad_hidden_chunk = dz @ W, grad_W += dz^T @ hidden_chunk, grad_b += sum_rows dz. Rows whose
label is ignore_index contribute nothing and are dropped before any matmul (RL batches are full of prompt and
padding tokens): their outputs and gradients are exact zeros.

Working precision: fp32 (fp64 for fp64 inputs, a checking path). fp32 weights are used as they are. A half
precision (bf16/fp16) weight is upcast to fp32 once in the forward and once in the backward (CPU BLAS has no
bf16 x bf16 -> fp32 product, and bf16 chunk logits would lose eager fp32's accuracy; upcasting per chunk or in
vocab blocks was measured 3-5x slower: the conversion costs about half a chunk's matmul), and its gradient
accumulates in an fp32 [V, H] buffer (one rounding at the end instead of one per chunk). So for half-precision
weights the extra memory is the budget plus 4 V H bytes in the forward and 8 V H bytes in the backward.

Memory budget: the chunk buffer holds `rows = budget // (4 V)` rows. The default budget is 1/16 of the
materialised logits in the inputs' dtype, clamped to [16 MiB, 1 GiB], with at least `MIN_DEFAULT_ROWS` = 256
rows (or all of them) per chunk: every chunk reads all of W (and updates all of grad_W), so thin chunks make
the products bound by that traffic (32-row chunks measured 10x slower than torch.compile at V = 151936 on a
2-core VM). Extra peak memory: max(logits / 16, 1 KiB x V) fp32 bytes, ~0.06-0.13 x the logits at N = 4096.
`chunk_budget_bytes` sets the budget exactly (any row count >= 1). The matmuls use torch's BLAS threads.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ...layout import compute_dtype

__all__ = ["DEFAULT_MIN_BUDGET", "DEFAULT_MAX_BUDGET", "MIN_DEFAULT_ROWS", "active_rows", "chunk_logits",
           "chunk_plan", "chunked_bwd", "chunked_fwd", "chunked_pack", "chunked_single_pass", "chunked_unpack",
           "compute_dtype", "in_work_dtype"]

DEFAULT_MIN_BUDGET = 16 << 20
DEFAULT_MAX_BUDGET = 1 << 30
MIN_DEFAULT_ROWS = 256


def chunk_plan(n_rows: int, vocab: int, dtype: torch.dtype, budget: Optional[int] = None) -> int:
    """Rows per chunk for a budget in bytes of the chunk's logits buffer (None: the default, see above)."""
    element = torch.finfo(dtype).bits // 8
    work = torch.finfo(compute_dtype(dtype)).bits // 8
    floor = 1
    if budget is None:
        budget = min(max(n_rows * vocab * element // 16, DEFAULT_MIN_BUDGET), DEFAULT_MAX_BUDGET)
        floor = MIN_DEFAULT_ROWS
    return max(1, min(max(n_rows, 1), max(floor, budget // (work * max(vocab, 1)))))


def active_rows(labels: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """Indices of the rows to compute, or None when every row is active (no copy then). Under torch.compile
    (the vocab-parallel fused op is traced; the fused-linear op is a custom op) every row is computed: the
    row kernels give ignored rows zeros, and the selection would be a data-dependent shape."""
    if torch.compiler.is_compiling():
        return None
    active = labels != ignore_index
    if bool(active.all()):
        return None
    return active.nonzero().squeeze(1)


def _chunk_rows(hidden2d: torch.Tensor, index: Optional[torch.Tensor], start: int, stop: int,
                work: torch.dtype) -> torch.Tensor:
    """Active rows [start, stop) in the working dtype: a slice when every row is active, else a gather of this
    chunk's rows only (no copy of all active rows: O(chunk x H) memory)."""
    rows = hidden2d[start:stop] if index is None else hidden2d.index_select(0, index[start:stop])
    return rows.to(work)


class _GradHidden:
    """grad_hidden [N, H] in the working dtype, zeros on ignored rows, written chunk by chunk: straight into its
    rows when every row is active, else by an index_copy of the chunk's product (no [N_active, H] staging)."""

    def __init__(self, n_rows: int, hidden: int, index: Optional[torch.Tensor], work: torch.dtype,
                 device: torch.device) -> None:
        self.index = index
        self.buffer = torch.zeros(n_rows, hidden, dtype=work, device=device)

    def write(self, start: int, stop: int, dz: torch.Tensor, weight: torch.Tensor) -> None:
        if self.index is None:
            torch.mm(dz, weight, out=self.buffer[start:stop])
        else:
            self.buffer.index_copy_(0, self.index[start:stop], dz @ weight)


def chunk_logits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  out: torch.Tensor) -> torch.Tensor:
    """out [n, V] = x @ W^T + b, all in the working dtype."""
    torch.mm(x, weight.t(), out=out)
    if bias is not None:
        out += bias
    return out


def in_work_dtype(weight: torch.Tensor, bias: Optional[torch.Tensor], work: torch.dtype):
    """The weight and bias in the working dtype: themselves for fp32/fp64, one fp32 copy for half precision."""
    return weight.to(work), (bias.to(work) if bias is not None else None)


def _accumulate(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, start: int, stop: int,
                dx: Optional[_GradHidden], dw: Optional[torch.Tensor], db: Optional[torch.Tensor]) -> None:
    """One chunk's share of the three gradients: grad_hidden rows = dz @ W, grad_W += dz^T x, grad_b += sum dz."""
    if db is not None:
        db += dz.sum(0)
    if dx is not None:
        dx.write(start, stop, dz, weight)
    if dw is not None:
        dw.addmm_(dz.t(), x)


def chunked_fwd(row_backend, hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor, temperature: float, ignore_index: int, with_entropy: bool,
                budget: Optional[int] = None):
    """hidden2d [N, H], weight [V, H], bias [V] | None, labels [N] -> (logprobs [N], entropy [N] | None, saved)
    where `saved` is what `chunked_bwd` needs (the row backend's states, opaque, per chunk)."""
    n_rows, hidden = hidden2d.shape
    vocab = weight.shape[0]
    work = compute_dtype(hidden2d.dtype)
    logprobs = torch.zeros(n_rows, dtype=work, device=hidden2d.device)
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    index = active_rows(labels, ignore_index) if n_rows else None
    labels_all = (labels if index is None else labels.index_select(0, index)).long()
    n_active = labels_all.shape[0]
    rows = chunk_plan(n_rows, vocab, hidden2d.dtype, budget)
    lp_active = torch.empty(n_active, dtype=work, device=hidden2d.device)
    ent_active = torch.empty_like(lp_active) if with_entropy else None   # with_entropy=False: no entropy work
    states: List[object] = []
    if n_active:
        w_work, b_work = in_work_dtype(weight, bias, work)
        buffer = torch.empty(min(rows, n_active), vocab, dtype=work, device=hidden2d.device)
        for start in range(0, n_active, rows):
            x = _chunk_rows(hidden2d, index, start, min(start + rows, n_active), work)
            z = chunk_logits(x, w_work, b_work, buffer[:x.shape[0]])
            lp, ent, state = row_backend.forward(z.unsqueeze(0), labels_all[start:start + rows], temperature,
                                                 ignore_index, with_entropy=with_entropy)
            lp_active[start:start + x.shape[0]] = lp
            if with_entropy:
                ent_active[start:start + x.shape[0]] = ent
            states.append(state)
        del buffer, w_work, b_work
    if index is None:
        logprobs, entropy = lp_active, ent_active
    else:
        logprobs.index_copy_(0, index, lp_active)
        if with_entropy:
            entropy.index_copy_(0, index, ent_active)
    saved = (index, rows, states, ent_active)
    return logprobs, entropy, saved


def chunked_pack(saved, n_rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`chunked_fwd`'s backward state as one tensor [N, 2] in the working dtype (each active row's (m, log d),
    zeros on ignored rows), so that the op can be a torch.library custom op; `chunked_unpack` inverts it."""
    index, _, states, _ = saved
    state = torch.zeros(n_rows, 2, dtype=compute_dtype(dtype), device=device)
    if states:
        active = torch.cat(states)
        state = active if index is None else state.index_copy_(0, index, active)
    return state


def chunked_unpack(state: torch.Tensor, entropy: Optional[torch.Tensor], labels: torch.Tensor, ignore_index: int,
                   vocab: int, dtype: torch.dtype, budget: Optional[int]):
    """The `saved` of `chunked_fwd` from `chunked_pack`'s tensor, the forward's entropy [N] (None without it)
    and what the forward's chunking was decided from (the labels, V, the dtype, the budget)."""
    n_rows = state.shape[0]
    index = active_rows(labels, ignore_index) if n_rows else None
    pick = (lambda t: t if index is None else t.index_select(0, index))  # noqa: E731
    rows = chunk_plan(n_rows, vocab, dtype, budget)
    active = pick(state)
    states = list(active.split(rows)) if active.shape[0] else []
    return index, rows, states, (pick(entropy) if entropy is not None else None)


def chunked_bwd(row_backend, hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor, saved, grad_logprobs: Optional[torch.Tensor],
                grad_entropy: Optional[torch.Tensor], temperature: float, ignore_index: int,
                needs: Tuple[bool, bool, bool]):
    """(grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) in the inputs' dtypes; None where not needed."""
    index, rows, states, ent_active = saved
    n_rows, hidden = hidden2d.shape
    vocab, device = weight.shape[0], hidden2d.device
    work = compute_dtype(hidden2d.dtype)
    need_dx, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
    pick = (lambda t: t if t is None or index is None else t.index_select(0, index))  # noqa: E731
    labels_all = pick(labels).long()
    glp = pick(grad_logprobs.to(work)) if grad_logprobs is not None else None
    gent = pick(grad_entropy.to(work)) if grad_entropy is not None else None
    n_active = labels_all.shape[0]
    if ent_active is None:   # a with_entropy=False forward: nothing can flow into the entropy
        if gent is not None:
            raise ValueError("grad_entropy must be None for a forward run with with_entropy=False")
        # Without grad_entropy no row backward reads h; zeros (not an unwritten buffer) all the same.
        ent_active = torch.zeros(n_active, dtype=work, device=device)
    dx = _GradHidden(n_rows, hidden, index, work, device) if need_dx else None
    # fp32 weights accumulate into their own gradient; half-precision ones into an fp32 buffer (docstring)
    dw = torch.zeros(vocab, hidden, dtype=work, device=device) if need_dw else None
    db = torch.zeros(vocab, dtype=work, device=device) if need_db else None
    if n_active and (glp is not None or gent is not None) and (need_dx or need_dw or need_db):
        w_work, b_work = in_work_dtype(weight, bias, work)
        buffer = torch.empty(min(rows, n_active), vocab, dtype=work, device=device)
        for chunk, start in enumerate(range(0, n_active, rows)):
            stop = min(start + rows, n_active)
            x = _chunk_rows(hidden2d, index, start, stop, work)
            z = chunk_logits(x, w_work, b_work, buffer[:stop - start])
            z3 = z.unsqueeze(0)
            row_backend.backward(z3, labels_all[start:stop], states[chunk], ent_active[start:stop],
                                 glp[start:stop] if glp is not None else None,
                                 gent[start:stop] if gent is not None else None,
                                 temperature, ignore_index, z3)   # dL/dz overwrites z
            _accumulate(z, x, w_work, start, stop, dx, dw, db)
        del buffer, w_work, b_work
    grad_hidden = dx.buffer.to(hidden2d.dtype) if need_dx else None
    return (grad_hidden, dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None)


def chunked_single_pass(row_backend, hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        labels: torch.Tensor, temperature: float, ignore_index: int, token_grads,
                        needs: Tuple[bool, bool, bool], budget: Optional[int] = None):
    """Values and gradients of a scalar loss sum_t f_t(l_t, h_t) in one pass over the chunks (the fused-linear
    twin of the single-pass loss, AEM_SPEC section 6): when the loss's per-token derivatives a_t = df/dl_t,
    b_t = df/dh_t depend only on token t's own values (the AEM loss once its weights w_r are known before the
    forward), each chunk's dL/dz follows right after its statistics, while its logits are still in the buffer,
    so the logits are never recomputed: three matmuls per chunk instead of the two-pass path's four.

    token_grads(index [n] int64 token positions, logprobs [n], entropy [n]) -> (a [n], b [n] | None).
    Returns (logprobs [N], entropy [N], (grad_hidden [N, H] | None, grad_weight [V, H] | None,
    grad_bias [V] | None)) in the working dtype (fp32; fp64 for fp64 inputs), for the caller to scale by the
    loss's upstream gradient and cast."""
    n_rows, hidden = hidden2d.shape
    vocab, device = weight.shape[0], hidden2d.device
    work = compute_dtype(hidden2d.dtype)
    need_dx, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
    index = active_rows(labels, ignore_index) if n_rows else None
    labels_all = (labels if index is None else labels.index_select(0, index)).long()
    positions = index if index is not None else torch.arange(n_rows, device=device)
    n_active = labels_all.shape[0]
    rows = chunk_plan(n_rows, vocab, hidden2d.dtype, budget)
    lp_active = torch.empty(n_active, dtype=work, device=device)
    ent_active = torch.empty_like(lp_active)
    dx = _GradHidden(n_rows, hidden, index, work, device) if need_dx else None
    dw = torch.zeros(vocab, hidden, dtype=work, device=device) if need_dw else None
    db = torch.zeros(vocab, dtype=work, device=device) if need_db else None
    if n_active:
        w_work, b_work = in_work_dtype(weight, bias, work)
        buffer = torch.empty(min(rows, n_active), vocab, dtype=work, device=device)
        for start in range(0, n_active, rows):
            stop = min(start + rows, n_active)
            x = _chunk_rows(hidden2d, index, start, stop, work)
            z = chunk_logits(x, w_work, b_work, buffer[:stop - start])
            z3 = z.unsqueeze(0)
            chunk_labels = labels_all[start:stop]
            lp, ent, state = row_backend.forward(z3, chunk_labels, temperature, ignore_index)
            lp_active[start:stop] = lp
            ent_active[start:stop] = ent
            if not (need_dx or need_dw or need_db):
                continue
            a, b = token_grads(positions[start:stop], lp, ent)
            row_backend.backward(z3, chunk_labels, state, ent, a.to(work).contiguous(),
                                 b.to(work).contiguous() if b is not None else None, temperature, ignore_index,
                                 z3)   # dL/dz overwrites z while it is still in the buffer
            _accumulate(z, x, w_work, start, stop, dx, dw, db)
        del buffer, w_work, b_work
    if index is None:
        logprobs, entropy = lp_active, ent_active
    else:
        logprobs = torch.zeros(n_rows, dtype=work, device=device).index_copy_(0, index, lp_active)
        entropy = torch.zeros(n_rows, dtype=work, device=device).index_copy_(0, index, ent_active)
    return logprobs, entropy, (dx.buffer if need_dx else None, dw, db)
