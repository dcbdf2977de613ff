"""Deterministic segment sums of per-token values over the token->response map (eq. 3, 3').

Float atomics make `sum_{t in r} v_t` depend on the order in which rows finish, so two runs differ in the
last bits. The deterministic path fixes the order instead: a stable sort of the token ids (one [N] int64
sort; the permutation of a stable sort is unique) groups each response's tokens in token order,
`searchsorted` finds each response's [start, end) in the sorted list, and one program per response sums its
span in fixed BLOCK_N chunks followed by a fixed-shape `tl.sum`. Every step is deterministic, nothing
depends on scheduling, and there is no host sync (the grid is R, known on the host). Cost: O(N log N) on
the [N] ids plus O(N) loads, negligible next to the N x V read of the logits.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["segment_sums_deterministic"]

_BLOCK_N = 128


@triton.jit
def _segment_sum_kernel(order_ptr, bounds_ptr, first_ptr, second_ptr, first_out_ptr, second_out_ptr,
                        BLOCK_N: tl.constexpr):
    segment = tl.program_id(0)
    start = tl.load(bounds_ptr + segment)
    end = tl.load(bounds_ptr + segment + 1)
    offsets = tl.arange(0, BLOCK_N)
    first_acc = tl.zeros([BLOCK_N], first_out_ptr.dtype.element_ty)
    second_acc = tl.zeros([BLOCK_N], second_out_ptr.dtype.element_ty)
    for chunk in range(start, end, BLOCK_N):
        idx = chunk + offsets
        inside = idx < end
        token = tl.load(order_ptr + idx, mask=inside, other=0)
        first_acc += tl.load(first_ptr + token, mask=inside, other=0.0).to(first_acc.dtype)
        second_acc += tl.load(second_ptr + token, mask=inside, other=0.0).to(second_acc.dtype)
    tl.store(first_out_ptr + segment, tl.sum(first_acc, axis=0))
    tl.store(second_out_ptr + segment, tl.sum(second_acc, axis=0))


def segment_sums_deterministic(values: Sequence[torch.Tensor], token_response: torch.Tensor,
                               num_segments: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bit-reproducible (sum_{t: id_t = r} first_t, sum_{t: id_t = r} second_t) for r in [0, num_segments).

    Args:
        values: two [N] float tensors (e.g. token log-probs and entropies); sums keep their dtype.
        token_response: [N] int, segment of each token, -1 (or any negative id) for none.
        num_segments: R.
    Returns:
        two [R] tensors; an empty segment sums to 0.
    """
    first, second = (v.reshape(-1).contiguous() for v in values)
    ids = token_response.reshape(-1)
    first_out = torch.zeros(num_segments, dtype=first.dtype, device=first.device)
    second_out = torch.zeros(num_segments, dtype=second.dtype, device=second.device)
    if num_segments == 0 or ids.numel() == 0:
        return first_out, second_out
    sorted_ids, order = torch.sort(ids.long(), stable=True)
    targets = torch.arange(num_segments + 1, device=ids.device, dtype=torch.long)
    bounds = torch.searchsorted(sorted_ids, targets)  # bounds[r] = first sorted position with id >= r
    _segment_sum_kernel[(num_segments,)](order, bounds, first, second, first_out, second_out, BLOCK_N=_BLOCK_N)
    return first_out, second_out
