"""The pieces both vocab-parallel ops share (the token op of `distributed.py` and the fused-linear op of
`distributed_linear.py`): the label localisation and slice-tiling check, the mixture combination of the ranks'
per-row statistics (the mixture math of `_vocab_mixture.py` with an all_reduce over the group as the slice
reduction), and the exact gradient of the label column. The math is in `distributed.py`'s docstring.

Each rank's row backend (`dispatch.py`) runs on its own slice with LOCAL labels; its per-row state is
(m, log d), the row max of the raw logits and the log of the shifted exponential sum, so the slice's
log-sum-exp is lse_k = m / tau + log d.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _collectives as C
from . import _validation as V
from . import _vocab_mixture as M
from ._vocab_mixture import empty_slices, slice_lse

__all__ = ["LOCAL_IGNORE", "check_tiling", "localise_labels", "slice_lse", "empty_slices", "combine_shards",
           "mixture_outputs", "label_column_grad"]

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
    label logit s_y: `_vocab_mixture.combine_slices` with three [N] all_reduces over the group."""
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


def label_column_grad(x_col: torch.Tensor, state_b: torch.Tensor, h_slot: torch.Tensor, w: torch.Tensor,
                      a: torch.Tensor, b: torch.Tensor, in_shard: torch.Tensor, active: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """The exact dLoss/dz at each row's local label column: `_vocab_mixture.label_column_grad`."""
    return M.label_column_grad(x_col, state_b, h_slot, a, b, w, in_shard, active, temperature)
