"""Vocab-parallel fused linear + log-probs/entropies (eq. 1-2): hidden states and this rank's rows of a
vocabulary-sharded lm_head weight in, full-vocabulary log-probs and entropies out; the [N, V_k] logits of the
slice are never built.

Megatron-style tensor parallelism splits the lm_head by vocabulary (a column-parallel linear without
`gather_output`): rank k holds W_k = W[start_k : start_k + V_k] (and b_k), and every rank of the group holds the
same hidden states X [N, H] (replicated; with sequence parallelism, after the gather). This is the fused-linear
twin of `vocab_parallel_logprobs_and_entropy` (`ops/logprobs/vocab_parallel.py`, whose docstring has the math): the same
mixture combination of the ranks' per-row (lse_k, h_k, s_y), three [N] all_reduces, over slice statistics
that the chunked fused-linear path (`chunked.py`) computes without the logits.

Its path is the op's decision (`resolve_fused_linear_path(..., vocab_parallel=True)`: row chunks over the shard
on the row backend's choice, every dtype; that function says why), its plan `plan.vocab_parallel_plan`, and
both passes are the op's one chunk loop over row chunks (`loop.chunk_loop` with `loop.RowChunks`) with their
own steps. Forward, per row chunk X_c of the active (not ignored) rows: z = X_c W_k^T + b_k in fp32 into one
reused buffer of the chunk budget; the row backend's forward on it with local labels (h_k and its state
(m, log d), hence lse_k); s_y gathered from the buffer where this rank owns the label. Then the combination
(`ops/logprobs/vocab_parallel.py`).
Backward, per chunk: z recomputed; the row backend's backward with a' = a w_k, b' = b w_k, h' = log w_k + h_t
writes dL/dz over it; the label column is rewritten exactly (`label_column_grad`); then
    dX_c = dz W_k,   dW_k += dz^T X_c,   db_k += sum_rows dz.
grad_weight_shard and grad_bias_shard are this slice's exact gradients (no communication). dX = dz W_k is only
this slice's share of dLoss/dX: the true gradient is the sum over the ranks. As in Megatron's column-parallel
layer (whose input goes through `copy_to_tensor_model_parallel_region`, an identity whose backward
all-reduces), the backward all-reduces it over the group (one [N, H] all_reduce, in fp32 before the cast to
hidden's dtype), so grad_hidden is the full gradient, the same on every rank: do not reduce it again. With
sequence parallelism, gather the hidden states with a gather whose backward only splits (Megatron:
`gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)`); one whose backward
reduce-scatters would sum the ranks' identical full gradients once more.

Every rank must run the backward (it holds that collective), as it does when every rank computes the same
loss from the outputs. Memory: the chunk buffer (rows = budget // (4 V_k), the default budget that of the
chunked path for V_k) plus O(N) per-row state; half-precision weights as on the chunked path: on CUDA its CUDA
plan (`plan.py`: the shard W_k itself in tensor-core products with fp32 output, rows = budget // (8 V_k),
1024 by default), elsewhere one fp32 copy of W_k per pass; an fp32 [V_k, H] gradient accumulator either way.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ... import collectives as C
from ...contract import first_order_only
from ...layout import compute_dtype
from ..logprobs import Backend
from ..logprobs import mixture as M
from ..logprobs import vocab_parallel as VP
from . import FusedLinearPath, check_budget, check_linear, resolve_fused_linear_path
from .loop import ActiveRows, GradHidden, RowChunk, RowChunks, accumulate, chunk_loop
from .plan import vocab_parallel_plan

__all__ = ["VocabParallelFusedLinearFunction", "vocab_parallel_fused_linear_logprobs_and_entropy"]


def _slice_statistics(row_backend: Backend, hidden2d: torch.Tensor, rows: ActiveRows, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], labels: torch.Tensor, temperature: float, per_chunk: int,
                      products):
    """Per active row [N_active], chunk by chunk: (lse_k fp64, h_k, state (m, log d), s_y fp64) of this slice;
    `labels` [N_active] local; `products` the path's (`products.py`)."""
    n_active, device = rows.n_active, hidden2d.device
    work = compute_dtype(hidden2d.dtype)
    lse = torch.empty(n_active, dtype=torch.float64, device=device)
    target = torch.empty_like(lse)
    entropy = torch.empty(n_active, dtype=work, device=device)
    state = torch.empty(n_active, 2, dtype=work, device=device)

    def step(chunk: RowChunk) -> None:
        span = slice(chunk.start, chunk.stop)
        z3 = chunk.z.unsqueeze(0)
        _, h_c, state_c = row_backend.forward(z3, labels[span], temperature, VP.LOCAL_IGNORE)
        lse[span], entropy[span] = M.empty_slices(z3, M.slice_lse(state_c, temperature), h_c)
        state[span] = state_c
        # s_y from the chunk buffer, O(rows); used only where this rank owns the label
        # (an ignored row, computed only under torch.compile, reads column 0: unused)
        column = labels[span, None].clamp(min=0)
        target[span] = chunk.z.gather(1, column).squeeze(1).double() / temperature

    chunk_loop(RowChunks(hidden2d, rows, weight, bias, per_chunk, work, products), step)
    return lse, entropy, state, target


class VocabParallelFusedLinearFunction(torch.autograd.Function):
    """(hidden2d [N, H], weight_shard [V_k, H], bias_shard [V_k] | None, local labels [N], in_shard [N]) ->
    full-vocabulary (logprobs, entropy) in labels' shape on the `FusedLinearPath` of
    `resolve_fused_linear_path(..., vocab_parallel=True)` (its row backend); see the module docstring."""

    @staticmethod
    def forward(ctx, hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                local_labels: torch.Tensor, in_shard: torch.Tensor, temperature: float, path: FusedLinearPath,
                group, options):
        budget, shape = options
        # ignored rows cost no matmul (as on the chunked path); the combination runs on all N rows, so that
        # the ranks' all_reduces always have the same size
        rows = ActiveRows(local_labels, VP.LOCAL_IGNORE)
        products = path.products(hidden2d.device, hidden2d.dtype)
        per_chunk = vocab_parallel_plan(rows.n_rows, weight.shape[0], hidden2d.dtype, budget, products.tensor_cores)
        stats = _slice_statistics(path.row, hidden2d, rows, weight, bias, rows.pick(local_labels), temperature,
                                  per_chunk, products)
        lse_k, h_k, state_k, target = (rows.spread(t) for t in stats)
        active = local_labels != VP.LOCAL_IGNORE
        logprobs, entropy, state_b, h_slot, w = VP.mixture_outputs(lse_k, h_k, state_k, target, in_shard, active,
                                                                   group)
        ctx.save_for_backward(hidden2d, weight, bias, local_labels, in_shard, state_b, h_slot, w)
        ctx.rows = rows
        ctx.config = (temperature, path, group, per_chunk)
        ctx.set_materialize_grads(False)
        # O(N) copies in labels' shape, not views: users edit their log-probs in place (masked_fill_)
        return logprobs.reshape(shape).clone(), entropy.reshape(shape).clone()

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        # the row kernels write dL/dz in place and the shard's chunks are not recorded: a double backward
        # raises a clear error (aem_kernels.contract) instead of differentiating a partial graph
        hidden2d, weight, bias, local_labels, in_shard, state_b, h_slot, w = ctx.saved_tensors
        temperature, path, group, per_chunk = ctx.config
        rows = ctx.rows
        none = (None,) * 6
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 3 + none
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        width, vocab, device, work = hidden2d.shape[1], weight.shape[0], hidden2d.device, h_slot.dtype
        upstream = (lambda g: g.reshape(-1).to(work) if g is not None else torch.zeros_like(h_slot))  # noqa: E731
        labels, in_shard, state_b, h_slot, w, a, b = (rows.pick(t) for t in (
            local_labels, in_shard, state_b, h_slot, w, upstream(grad_logprobs), upstream(grad_entropy)))
        a_scaled = (a * w).contiguous() if grad_logprobs is not None else None
        b_scaled = (b * w).contiguous() if grad_entropy is not None else None
        dx = GradHidden(rows, width, work, device) if need_dx else None
        # fp32 accumulators for every dtype, one rounding at the end (as on the chunked path)
        dw = torch.zeros(vocab, width, dtype=work, device=device) if need_dw else None
        db = torch.zeros(vocab, dtype=work, device=device) if need_db else None
        owned = labels != VP.LOCAL_IGNORE   # every picked row, except under torch.compile (all rows picked)

        def step(chunk: RowChunk) -> None:
            span, z = slice(chunk.start, chunk.stop), chunk.z
            column = labels[span, None].clamp(min=0)
            x_col = z.gather(1, column).squeeze(1)   # read before the backward overwrites z with dL/dz
            z3 = z.unsqueeze(0)
            path.row.backward(z3, labels[span], state_b[span], h_slot[span],
                              a_scaled[span] if a_scaled is not None else None,
                              b_scaled[span] if b_scaled is not None else None, temperature, VP.LOCAL_IGNORE, z3)
            col_grad = M.label_column_grad(x_col, state_b[span], h_slot[span], a[span], b[span], w[span],
                                           in_shard[span], owned[span], temperature)
            z.scatter_(1, column, col_grad.unsqueeze(1).to(z.dtype))
            accumulate(chunk, dx, dw, db)

        if need_dx or need_dw or need_db:
            products = path.products(hidden2d.device, hidden2d.dtype)
            chunk_loop(RowChunks(hidden2d, rows, weight, bias, per_chunk, work, products), step)
        grad_hidden = None
        if need_dx:
            # this slice's share of dLoss/dhidden; the sum over the ranks is the gradient (module docstring)
            grad_hidden = C.all_reduce(dx.buffer, "sum", group).to(hidden2d.dtype)
        return (grad_hidden, dw.to(weight.dtype) if dw is not None else None,
                db.to(bias.dtype) if db is not None else None) + none


def vocab_parallel_fused_linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias_shard: Optional[torch.Tensor] = None,
    group=None,
    vocab_start: Optional[int] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_budget_bytes: Optional[int] = None,
    path: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary log-probs (eq. 1) and entropies (eq. 2) of hidden @ W.T + b, where W (and b) are split by
    vocabulary over the ranks of `group`, without building any logits.

    Call it on every rank of `group` with the same hidden states and labels; each rank passes its own rows of
    the lm_head weight (Megatron's vocab-parallel lm_head). Compute the loss from the outputs on every rank
    (they are identical) and run the backward on every rank.

    Args:
        hidden: [..., H] fp32/bf16/fp16 (fp64 for checks), the same on every rank of the group, any strides.
        weight_shard: [V_k, H] this rank's rows start_k .. start_k + V_k - 1 of the lm_head weight, hidden's
            dtype and device. V_k >= 1 may differ between ranks (pass vocab_start then).
        labels: hidden.shape[:-1], integer GLOBAL vocabulary ids in [0, V) or ignore_index, the same on every rank.
        bias_shard: [V_k] (this slice of the bias) or None.
        group: the tensor-parallel ProcessGroup; None: the default (world) group.
        vocab_start: start_k, the first global vocabulary id of this rank's rows; None: group rank * V_k. The
            slices of all ranks must tile [0, V); this is checked with one all_gather of (start, V_k, N) per
            call (a host sync), skipped inside `ak.skip_value_checks()` along with the label range check.
        temperature: tau > 0; the logits are divided by it.
        ignore_index: rows with this label give 0 in both outputs and a zero gradient (and cost no matmul).
        backend: the row backend run on each chunk's logits: "auto", "triton", "cpu" or "torch" (the path:
            `resolve_fused_linear_path(..., vocab_parallel=True)`).
        chunk_budget_bytes: bytes of the one [rows, V_k] fp32 logits buffer of the row chunks (default as
            `fused_linear_logprobs_and_entropy`'s chunked path, for V_k; `ops/fused_linear/plan.py`).
        path: "auto" or "chunked" (the one path of this op: row chunks over the shard); "tiles" and "blocked"
            are a ValueError naming `path`.

    Returns:
        (logprobs, entropy), each labels' shape, fp32 (fp64 for fp64 inputs), identical on every rank.
        Backward: grad_weight_shard / grad_bias_shard are this slice's exact gradients; grad_hidden is the
        full gradient, already all-reduced over the group (the same on every rank; see the module docstring).
    """
    hidden, weight_shard, bias_shard = check_linear(hidden, weight_shard, bias_shard,
                                                     ("weight_shard", "bias_shard"))
    labels, temperature, ignore_index, vocab_start = VP.check_shard_call(
        labels, hidden.shape[:-1], hidden.device, "hidden.shape[:-1]", temperature, ignore_index, vocab_start)
    chosen = resolve_fused_linear_path(backend, hidden.device, hidden.dtype, vocab_parallel=True, path=path)
    budget = check_budget(chunk_budget_bytes, chosen)
    group = C.resolve_group(group, "group", none_is_default=True)
    local_labels, in_shard = VP.localise_labels(labels, group, vocab_start, weight_shard.shape[0], ignore_index,
                                                ("hidden.shape[:-1]", "weight_shard.shape[0]"))
    return VocabParallelFusedLinearFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight_shard, bias_shard,
                                                  local_labels, in_shard, temperature, chosen, group,
                                                  (budget, labels.shape))
