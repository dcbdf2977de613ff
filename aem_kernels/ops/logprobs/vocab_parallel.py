"""Vocab-parallel token log-probs and entropies (eq. 1-2) over a tensor-parallel group of torch.distributed.

Megatron-style setups split the lm_head by vocabulary: rank k of the group holds the logits of a contiguous
slice V_k = [start_k, start_k + V_local_k) of the vocabulary for every token. This module gives every rank the
full-vocabulary log-prob and entropy of each token, and each rank the gradient of its own slice, with O(N)
collectives only (three all_reduces of [N]-sized vectors); the vocabulary is never gathered.

Math. With s = z / tau, rank k's backend computes on its slice (one read of the shard, the fused kernels)
    lse_k = log sum_{v in V_k} e^{s_v},  p^_k = softmax(s restricted to V_k),  h_k = lse_k - sum p^_k s,
    l^ = s_y - lse_k for a label y in V_k.
The full-vocabulary quantities follow from O(N) numbers per rank (w_k is the probability mass of slice k):
    L = log sum_k e^{lse_k}          (all_reduce MAX, then SUM of e^{lse_k - max})
    log w_k = lse_k - L,             p_v = w_k p^_v  for v in V_k
    l_t = s_y - L = l^_{k(y)} + log w_{k(y)}                                      (1; owner's value, SUM)
    h_t = -sum_v p_v log p_v = sum_k w_k h_k - sum_k w_k log w_k                  (2; SUM)
The entropy is the entropy of a mixture: both sums are of non-negative terms, so no two O(|z|) numbers cancel
and logits of magnitude 1e4 keep the accuracy of the single-device op.

Gradient. For upstream a = dLoss/dl_t and b = dLoss/dh_t, section 6 on the full row, restricted to V_k, with
p_v = w_k p^_v and log p_v = log p^_v + log w_k:
    dLoss/dz_v = [ a delta_{v y} - a p_v - b p_v (log p_v + h_t) ] / tau
               = [ a delta_{v y} - (a w_k) p^_v - (b w_k) p^_v (log p^_v + (log w_k + h_t)) ] / tau.
That is rank k's own backend backward on its slice with the per-row scalars a' = a w_k, b' = b w_k and the
entropy slot h' = log w_k + h_t (the slice's saved state gives p^), run with a local label y^ (y - start_k when y is in
V_k, any column, here 0, otherwise), except at the one column y^ of each row, where the backend adds a' for its
onehot and the true value has a [y in V_k]. That column is recomputed exactly from the logit there and written
over (an O(N) gather and scatter). No collective runs in the backward: like Megatron's vocab-parallel cross
entropy, every rank of the group computes the same loss from the same full-vocabulary outputs, so a and b are
the same on every rank.

The O(N) combination runs in fp64 and l_t is taken as s_y - L from the owner's label logit (an O(N) gather), so
the result stays within a rounding or two of the single-device op at |z| ~ 1e4. Rows whose label is
`ignore_index` give 0 and a zero gradient; a row that is -inf on every rank gives NaN (as the single-device op);
a slice that is entirely -inf for a row has w_k = 0 and a zero gradient there. Besides the three all_reduces, a
call makes one all_gather of three numbers per rank to check the slices (unless value checks are skipped), and
one host sync to tell empty slices from NaN logits.

The pieces here (the label localisation and slice-tiling check, the mixture combination with an all_reduce over
the group as the slice reduction, the exact label-column gradient; the mixture math itself is `mixture.py`)
serve the fused-linear twin too (`ops/fused_linear/vocab_parallel.py`), which takes the hidden states and this
rank's rows of the lm_head weight instead of the logits slice. Each rank's row backend runs on its own slice
with LOCAL labels; its per-row state (m, log d) gives the slice's log-sum-exp lse_k = m / tau + log d.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ... import collectives as C
from ... import validation as V
from ...contract import check_inplace_backward, first_order_only
from ...layout import as_rows3d, gradient_buffer
from . import mixture as M
from . import resolve_backend

__all__ = ["LOCAL_IGNORE", "VocabParallelLogprobsEntropyFunction", "check_shard_call", "check_tiling",
           "combine_shards", "localise_labels", "mixture_outputs", "vocab_parallel_logprobs_and_entropy"]

# Local label of an ignored row: never a valid local column id (the user's ignore_index may be one).
LOCAL_IGNORE = -1


def check_tiling(group, vocab_start: Optional[int], local_vocab: int, rows: int, device: torch.device,
                 names: Tuple[str, str]) -> Tuple[int, int]:
    """(this rank's vocab_start, V_global) after checking with one all_gather of (start, V_local, N) per rank
    that the ranks' slices tile [0, V_global) and that every rank holds the same N tokens. `names` are how the
    caller's arguments spell the token dims and the slice width (e.g. "logits_shard.shape[:-1]",
    "logits_shard.shape[-1]")."""
    tokens, width = names
    rank, world = C.group_rank(group), C.group_size(group)
    start = rank * local_vocab if vocab_start is None else vocab_start
    table = C.all_gather_rows(torch.tensor([start, local_vocab, rows], dtype=torch.int64, device=device), group)
    table = table.cpu()
    starts, widths, counts = table[:, 0].tolist(), table[:, 1].tolist(), table[:, 2].tolist()
    if len(set(counts)) != 1:
        raise ValueError(f"{tokens.split('.')[0]} must hold the same tokens on every rank of the group; the ranks "
                         f"hold {counts} rows ({tokens} must agree)")
    order = sorted(range(world), key=lambda r: starts[r])
    expected = 0
    for r in order:
        if starts[r] != expected:
            raise ValueError(
                f"the vocabulary slices (vocab_start, {width}) of the ranks must tile [0, V) without "
                f"gap or overlap; got (start, width) per group rank {list(zip(starts, widths))}: rank {r} starts "
                f"at {starts[r]}, expected {expected}" + ("" if vocab_start is not None else
                                                          " (vocab_start=None means rank * V_local; pass it)"))
        expected += widths[r]
    return start, expected


def check_shard_call(labels: object, token_shape, device: torch.device, token_dims: str, temperature: object,
                     ignore_index: object, vocab_start: object):
    """The checks both vocab-parallel ops make of their shared arguments: (labels, temperature, ignore_index,
    vocab_start) with GLOBAL integer labels of `token_shape` (spelled `token_dims` in the message). The group is
    resolved by the caller, after its own argument checks (a bad argument is reported even without
    torch.distributed initialised)."""
    temperature = V.check_temperature(temperature)
    ignore_index = V.check_ignore_index(ignore_index)
    labels = V.check_integer_tensor("labels", labels, token_shape, device,
                                    f"{token_dims}, global vocabulary ids or ignore_index")
    if vocab_start is not None:
        vocab_start = V.check_count("vocab_start", vocab_start)
    return labels, temperature, ignore_index, vocab_start


def localise_labels(labels: torch.Tensor, group, vocab_start: Optional[int], local_vocab: int, ignore_index: int,
                    names: Tuple[str, str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(local labels [N], in_shard [N] bool) from GLOBAL labels: y - start where y is in this slice, 0 (any
    column) where it is another rank's, LOCAL_IGNORE where ignored. Unless value checks are skipped, checks the
    tiling (`check_tiling`) and that the labels lie in [0, V_global) or equal ignore_index."""
    flat = labels.reshape(-1).long()
    if V.value_checks_enabled(flat):
        start, vocab = check_tiling(group, vocab_start, local_vocab, flat.shape[0], labels.device, names)
        bad = ((flat < 0) | (flat >= vocab)) & (flat != ignore_index)
        if flat.numel() and bool(bad.any()):
            raise ValueError(f"labels must be global vocabulary ids in [0, {vocab}) or ignore_index={ignore_index}; "
                             f"found {int(flat[bad][0])} ({int(bad.sum())} bad entries)")
    else:
        start = C.group_rank(group) * local_vocab if vocab_start is None else vocab_start
    active = flat != ignore_index
    local = flat - start
    in_shard = active & (local >= 0) & (local < local_vocab)
    return torch.where(in_shard, local, torch.where(active, 0, LOCAL_IGNORE)), in_shard


def combine_shards(lse_k: torch.Tensor, target: torch.Tensor, h_k: torch.Tensor, in_shard: torch.Tensor,
                   active: torch.Tensor, group) -> Tuple[torch.Tensor, ...]:
    """(logprobs, entropy, w_k, log w_k, has_mass) in fp64 from every rank's per-row lse_k, h_k and (owner's)
    label logit s_y: `mixture.combine_slices` with three [N] all_reduces over the group."""
    return M.combine_slices(lse_k, target, h_k, in_shard, active, lambda t, op: C.all_reduce(t, op, group))[:5]


def mixture_outputs(lse_k: torch.Tensor, h_k: torch.Tensor, state_k: torch.Tensor, target: torch.Tensor,
                    in_shard: torch.Tensor, active: torch.Tensor, group):
    """(logprobs, entropy, state_b, h_slot, w) [N], in h_k's dtype: the full-vocabulary outputs and the O(N)
    backward state of this slice (its backend state, 0 where the slice is empty: its logits are -inf, p^ = 0;
    the entropy slot h' = log w_k + h_t; the mass w_k)."""
    logprobs, entropy, w, log_w, has_mass = combine_shards(lse_k, target, h_k, in_shard, active, group)
    dtype = h_k.dtype
    state_b, h_slot = M.backward_slots(state_k, log_w, entropy, has_mass, dtype)
    return logprobs.to(dtype), entropy.to(dtype), state_b, h_slot, w.to(dtype)


class VocabParallelLogprobsEntropyFunction(torch.autograd.Function):
    """(logits_shard [..., V_local], local labels [N]) -> full-vocabulary (logprobs, entropy); see module doc."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, local_labels: torch.Tensor, in_shard: torch.Tensor,
                temperature: float, backend, group, inplace_backward: bool):
        inplace_backward = check_inplace_backward(logits, inplace_backward, writes_gradient=False)
        logits3d = as_rows3d(logits)
        _, h_k, state_k = backend.forward(logits3d, local_labels, temperature, LOCAL_IGNORE)
        lse_k, h_k = M.empty_slices(logits3d, M.slice_lse(state_k, temperature), h_k)
        active = local_labels != LOCAL_IGNORE
        column = torch.where(active, local_labels, 0).view(logits3d.shape[:-1] + (1,))
        target = logits3d.gather(2, column).reshape(-1).double() / temperature  # O(N) read of the label logits
        logprobs, entropy, state_b, h_slot, w = mixture_outputs(lse_k, h_k, state_k, target, in_shard, active,
                                                                   group)
        ctx.save_for_backward(logits, local_labels, in_shard, state_b, h_slot, w)
        ctx.config = (temperature, backend, inplace_backward)
        ctx.set_materialize_grads(False)
        shape = logits.shape[:-1]
        # O(N) copies, not views: a view returned by a multi-output Function cannot be edited in place, and
        # users masked_fill_ their log-probs
        return logprobs.reshape(shape).clone(), entropy.reshape(shape).clone()

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        logits, local_labels, in_shard, state_b, h_slot, w = ctx.saved_tensors
        temperature, backend, inplace_backward = ctx.config
        none = (None,) * 6
        if grad_logprobs is None and grad_entropy is None:
            return (None,) + none
        dtype = h_slot.dtype
        active = local_labels != LOCAL_IGNORE
        a = grad_logprobs.reshape(-1).to(dtype) if grad_logprobs is not None else torch.zeros_like(h_slot)
        b = grad_entropy.reshape(-1).to(dtype) if grad_entropy is not None else torch.zeros_like(h_slot)
        logits3d = as_rows3d(logits)
        column = torch.where(active, local_labels, 0).view(logits3d.shape[:-1] + (1,))
        # read the label column before an in-place backward overwrites the logits
        x_col = logits3d.gather(2, column).reshape(-1).to(dtype)
        check_inplace_backward(logits, inplace_backward, writes_gradient=True, name="logits_shard")
        buffer = gradient_buffer(logits, inplace=inplace_backward, rows3d=logits3d)
        scaled = (lambda g, present: (g * w).contiguous() if present else None)  # noqa: E731
        out3d = backend.backward(logits3d, local_labels, state_b, h_slot, scaled(a, grad_logprobs is not None),
                                 scaled(b, grad_entropy is not None), temperature, LOCAL_IGNORE, buffer.rows3d)
        col_grad = M.label_column_grad(x_col, state_b, h_slot, a, b, w, in_shard, active, temperature)
        out3d.scatter_(2, column, col_grad.view(column.shape).to(out3d.dtype))
        grad = buffer.finish()
        return (grad,) + none


def vocab_parallel_logprobs_and_entropy(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary log-probs (eq. 1) and entropies (eq. 2) from vocabulary-sharded logits.

    Call it on every rank of `group` with the same tokens and labels (tensor parallelism); each rank passes its
    own slice of the logits. The loss computed from the outputs must be the same on every rank (it is, when
    computed from these outputs alone); each rank's backward then gives the gradient of its own slice.

    Args:
        logits_shard: [..., V_local] this rank's vocabulary slice of the logits, fp32/bf16/fp16/fp64, unit vocab
            stride. V_local may differ between ranks (pass vocab_start then).
        labels: logits_shard.shape[:-1], integer GLOBAL vocabulary ids in [0, V) or ignore_index, the same on
            every rank.
        group: the tensor-parallel ProcessGroup; None: the default (world) group.
        vocab_start: first global vocabulary id of this rank's slice; None: group rank * V_local. The slices of
            all ranks must tile [0, V); this is checked with one all_gather of (start, V_local, N) per call
            (a host sync), skipped inside `ak.skip_value_checks()` along with the label range check.
        temperature: tau > 0.
        ignore_index: rows with this label give 0 in both outputs and a zero gradient.
        backend: the backend of the local O(N V_local) work: "auto", "triton", "cpu" or "torch".
        inplace_backward: write the slice's gradient into logits_shard's own storage.

    Returns:
        (logprobs, entropy), each labels' shape, fp32 (fp64 for fp64 logits), identical on every rank.
    """
    logits_shard = V.check_logits(logits_shard, "logits_shard")
    labels, temperature, ignore_index, vocab_start = check_shard_call(
        labels, logits_shard.shape[:-1], logits_shard.device, "logits_shard.shape[:-1]", temperature, ignore_index,
        vocab_start)
    check_inplace_backward(logits_shard, inplace_backward, name="logits_shard")
    group = C.resolve_group(group, "group", none_is_default=True)
    be = resolve_backend(backend, logits_shard.device, logits_shard.dtype)
    local_labels, in_shard = localise_labels(labels, group, vocab_start, logits_shard.shape[-1], ignore_index,
                                             ("logits_shard.shape[:-1]", "logits_shard.shape[-1]"))
    return VocabParallelLogprobsEntropyFunction.apply(logits_shard, local_labels, in_shard, temperature, be, group,
                                                      inplace_backward)
