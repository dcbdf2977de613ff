"""Full-vocabulary log-prob and entropy from per-slice statistics: the vocabulary split into contiguous slices
(the ranks of a vocab-parallel group in `vocab_parallel.py`, the vocab blocks of `ops/fused_linear/blocked.py`),
each row's distribution is a mixture of its slices' distributions.

With s = z / tau, slice k of a row has lse_k = log sum_{v in V_k} e^{s_v}, its own softmax p^_k and entropy
h_k = lse_k - sum p^_k s. With L = log sum_k e^{lse_k} and the slice's mass w_k = e^{lse_k - L}:
    l = s_y - L,    h = sum_k w_k h_k - sum_k w_k log w_k                                           (eq. 1-2)
(both sums are of non-negative terms: no two O(|z|) numbers cancel, so |z| ~ 1e4 keeps full accuracy). The
gradient (section 6) restricted to slice k is the slice's own backend backward run with a' = a w_k, b' = b w_k
and the entropy slot h' = log w_k + h, except at the label column (see `label_column_grad`).

The combination runs in fp64 on O(N x slices) numbers. The reduction over slices is a parameter: an
all_reduce over a process group, or a reduction over a stacked leading slice dimension (`stacked_reduce`).
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch

__all__ = ["slice_lse", "empty_slices", "slice_weights", "combine_slices", "stacked_reduce", "backward_slots",
           "label_column_grad"]

Reduce = Callable[[torch.Tensor, str], torch.Tensor]


def slice_lse(state: torch.Tensor, temperature: float) -> torch.Tensor:
    """lse_k [N] in fp64 from a row backend's state [N, 2] = (row max m of the raw logits, log d)."""
    return state[:, 0].double() / temperature + state[:, 1].double()


def empty_slices(logits: torch.Tensor, lse_k: torch.Tensor, h_k: torch.Tensor):
    """A row whose slice is entirely -inf holds no mass here (lse_k = -inf, h_k = 0) but may be finite in
    other slices; the backends return NaN for it, as for a NaN logit. Only when some lse_k is NaN (one host
    sync) are the slice's row maxima read to tell the two apart: -inf max is an empty slice, NaN stays NaN.
    `logits` is the slice, [..., V_k] with the rows of lse_k in its leading dimensions."""
    nan_rows = torch.isnan(lse_k)
    if not torch.compiler.is_compiling() and not bool(nan_rows.any()):   # (traced: no host sync, one more read)
        return lse_k, h_k
    empty = nan_rows & (logits.amax(dim=-1).reshape(-1) == float("-inf"))
    return torch.where(empty, float("-inf"), lse_k), torch.where(empty, 0.0, h_k)


def slice_weights(lse_k: torch.Tensor, lse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_k, log w_k, has_mass) of slices with log-sum-exp lse_k given the full row's L = lse (broadcast).
    A row without a finite L (-inf everywhere, or a NaN) gets NaN w_k, so its gradient is NaN too."""
    has_mass = torch.isfinite(lse_k)
    log_w = torch.where(has_mass, lse_k - lse, float("-inf"))
    w = torch.where(torch.isfinite(lse), log_w.exp(), float("nan"))
    return w, log_w, has_mass


def stacked_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """The reduction over a stacked leading slice dimension ([K, ...] -> [...])."""
    return tensor.amax(0) if op == "max" else tensor.sum(0)


def combine_slices(lse_k: torch.Tensor, target: torch.Tensor, h_k: torch.Tensor, in_slice: torch.Tensor,
                   active: torch.Tensor, reduce: Reduce) -> Tuple[torch.Tensor, ...]:
    """(logprobs, entropy, w_k, log w_k, has_mass, L), fp64, from the slices' lse_k, h_k and the label logit
    s_y (`target`, used where `in_slice`: the slice that holds the label). `reduce(t, op)` reduces over the
    slices ("max" or "sum"; it may work in place). fp64 for these O(N) numbers keeps l = s_y - L within a
    rounding or two of the single-slice op when |z| ~ 1e4. Rows that are -inf in every slice (or hold a NaN)
    come out NaN, with NaN w_k; inactive rows give 0."""
    lse_k, target, h_k = lse_k.double(), target.double(), h_k.double()
    row_max = reduce(lse_k.clone(), "max")
    # a row that is -inf in every slice keeps max -inf; shift by 0 there so that L = -inf (then NaN below)
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
    lse = shift + reduce((lse_k - shift).exp(), "sum").log()
    w, log_w, has_mass = slice_weights(lse_k, lse)
    parts = torch.stack([
        torch.where(w > 0, w * h_k - w * log_w, 0.0),     # this slice's share of the mixture entropy
        torch.where(in_slice, target - lse, 0.0),         # the owner's l = s_y - L
    ], dim=-1)
    entropy, logprobs = reduce(parts, "sum").unbind(-1)
    dead = ~torch.isfinite(lse)
    nan = torch.full_like(entropy, float("nan"))
    entropy = torch.where(active, torch.where(dead, nan, entropy), 0.0)
    logprobs = torch.where(active, torch.where(dead, nan, logprobs), 0.0)
    return logprobs, entropy, w, log_w, has_mass, lse


def backward_slots(state_k: torch.Tensor, log_w: torch.Tensor, entropy: torch.Tensor, has_mass: torch.Tensor,
                   dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(state, entropy slot h' = log w_k + h) for the slice's backend backward: p^ needs the slice's own
    (m, log d), 0 where the slice is empty (its logits are -inf, p^ = 0)."""
    state_b = torch.where(has_mass.unsqueeze(-1), state_k, 0.0)
    h_slot = torch.where(has_mass, log_w + entropy, 0.0).to(dtype)
    return state_b, h_slot


def label_column_grad(x_col: torch.Tensor, state_b: torch.Tensor, h_slot: torch.Tensor, a: torch.Tensor,
                      b: torch.Tensor, w: torch.Tensor, in_slice: torch.Tensor, active: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """dL/dz at each row's local label column [N], exactly. The backend's backward adds a' = a w_k there for
    its onehot, but the true onehot term is a [y in V_k]; so the column is recomputed from its logit x_col:
    [a [y in V_k] - a w p^ - b w p^ (log p^ + h')] / tau, with log p^ = (x - m) / tau - log d as the backends
    compute it."""
    log_p = (x_col - state_b[:, 0]) / temperature - state_b[:, 1]
    p = log_p.exp()
    entropy_term = torch.where(p > 0, p * (log_p + h_slot), 0.0)
    col_grad = (a * in_slice.to(a.dtype) - a * w * p - b * w * entropy_term) / temperature
    return torch.where(active, col_grad, 0.0)
