"""The pieces both vocab-parallel ops share (the token op of `distributed.py` and the fused-linear op of
`distributed_linear.py`): the label localisation and slice-tiling check, the mixture combination of the ranks'
per-row statistics, and the exact gradient of the label column. The math is in `distributed.py`'s docstring.

Each rank's row backend (`dispatch.py`) runs on its own slice with LOCAL labels; its per-row state is
(m, log d), the row max of the raw logits and the log of the shifted exponential sum, so the slice's
log-sum-exp is lse_k = m / tau + log d.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _collectives as C
from . import _validation as V

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


def slice_lse(state: torch.Tensor, temperature: float) -> torch.Tensor:
    """lse_k = m / tau + log d [N] in fp64 from a row backend's state [N, 2] = (m, log d)."""
    return state[:, 0].double() / temperature + state[:, 1].double()


def empty_slices(logits3d: torch.Tensor, lse_k: torch.Tensor, h_k: torch.Tensor):
    """A row whose slice is entirely -inf holds no mass here (lse_k = -inf, h_k = 0) but may be finite on
    other ranks; the backends return NaN for it, as for a NaN logit. Only when some lse_k is NaN (one host
    sync) are the slice's row maxima read to tell the two apart: -inf max is an empty slice, NaN stays NaN."""
    nan_rows = torch.isnan(lse_k)
    if not bool(nan_rows.any()):
        return lse_k, h_k
    empty = nan_rows & (logits3d.amax(dim=-1).reshape(-1) == float("-inf"))
    return torch.where(empty, float("-inf"), lse_k), torch.where(empty, 0.0, h_k)


def combine_shards(lse_k: torch.Tensor, target: torch.Tensor, h_k: torch.Tensor, in_shard: torch.Tensor,
                   active: torch.Tensor, group) -> Tuple[torch.Tensor, ...]:
    """(logprobs, entropy, w_k, log w_k, has_mass) in fp64 from every rank's per-row lse_k, h_k and (owner's)
    label logit s_y: three [N] all_reduces. fp64 for these O(N) numbers keeps l_t = s_y - L within a rounding
    or two of the single-device op when |z| ~ 1e4. Rows that are -inf on every rank (or hold a NaN) come out
    NaN, with NaN w_k."""
    lse_k, target, h_k = lse_k.double(), target.double(), h_k.double()
    row_max = C.all_reduce(lse_k.clone(), "max", group)
    # a row that is -inf on every rank keeps max -inf; shift by 0 there so that L = -inf (then NaN below)
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
    total = C.all_reduce((lse_k - shift).exp(), "sum", group)
    lse = shift + total.log()
    has_mass = torch.isfinite(lse_k)
    log_w = torch.where(has_mass, lse_k - lse, float("-inf"))
    w = log_w.exp()
    parts = torch.stack([
        torch.where(w > 0, w * h_k - w * log_w, 0.0),     # this slice's share of the mixture entropy
        torch.where(in_shard, target - lse, 0.0),         # the owner's l_t = s_y - L
    ])
    entropy, logprobs = C.all_reduce(parts, "sum", group).unbind(0)
    dead = ~torch.isfinite(lse)
    nan = torch.full_like(entropy, float("nan"))
    entropy = torch.where(active, torch.where(dead, nan, entropy), 0.0)
    logprobs = torch.where(active, torch.where(dead, nan, logprobs), 0.0)
    return logprobs, entropy, torch.where(dead, nan, w), log_w, has_mass


def mixture_outputs(lse_k: torch.Tensor, h_k: torch.Tensor, state_k: torch.Tensor, target: torch.Tensor,
                    in_shard: torch.Tensor, active: torch.Tensor, group):
    """(logprobs, entropy, state_b, h_slot, w) [N], in h_k's dtype: the full-vocabulary outputs and the O(N)
    backward state of this slice (its backend state, 0 where the slice is empty: its logits are -inf, p^ = 0;
    the entropy slot h' = log w_k + h_t; the mass w_k)."""
    logprobs, entropy, w, log_w, has_mass = combine_shards(lse_k, target, h_k, in_shard, active, group)
    dtype = h_k.dtype
    state_b = torch.where(has_mass.unsqueeze(1), state_k, 0.0)
    h_slot = torch.where(has_mass, log_w + entropy, 0.0).to(dtype)
    return logprobs.to(dtype), entropy.to(dtype), state_b, h_slot, w.to(dtype)


def label_column_grad(x_col: torch.Tensor, state_b: torch.Tensor, h_slot: torch.Tensor, w: torch.Tensor,
                      a: torch.Tensor, b: torch.Tensor, in_shard: torch.Tensor, active: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """The exact dLoss/dz at each row's local label column (the backend wrote a' there for its onehot):
    [a [y in V_k] - a w p^ - b w p^ (log p^ + h')] / tau, with log p^ = (x - m) / tau - log d as the backends
    compute it, from the raw logit x there (read before an in-place backward overwrites it); 0 on ignored rows."""
    log_p = (x_col - state_b[:, 0]) / temperature - state_b[:, 1]
    p = log_p.exp()
    entropy_term = torch.where(p > 0, p * (log_p + h_slot), 0.0)
    col_grad = (a * in_shard.to(a.dtype) - a * w * p - b * w * entropy_term) / temperature
    return torch.where(active, col_grad, 0.0)
