"""Deterministic segment sums of per-token values over the token->response map (eq. 3, 3').

Float atomics make `sum_{t in r} v_t` depend on the order in which rows finish, so two runs differ in the
last bits. The deterministic path fixes the order instead: a stable sort of the token ids (one [N] int64
sort; the permutation of a stable sort is unique) groups each response's tokens in token order,
`searchsorted` finds each response's [start, end) in the sorted list, and one program per response sums its
span in fixed BLOCK_N chunks followed by a fixed-shape `tl.sum`. Every step is deterministic, nothing
depends on scheduling, and there is no host sync (the grid is R, known on the host). Cost: O(N log N) on
the [N] ids plus O(N) loads, negligible next to the N x V read of the logits.

`segment_sum` is the CUDA implementation of the segment sum (chosen in `ops/segment/__init__.py`): one value
per token, accumulated in fp32 (fp64 for fp64 values) and rounded once to the
values' dtype, a `torch.library.custom_op` (traced by torch.compile) whose gradient is the upstream
gradient gathered back to the tokens (0 for dropped ones).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..utils import loop_bound
from .autograd import segment_sum_backward, segment_sum_setup_context

__all__ = ["segment_sums_deterministic", "segment_sum"]

_BLOCK_N = 128


@triton.jit
def _segment_sum_kernel(order_ptr, bounds_ptr, first_ptr, second_ptr, first_out_ptr, second_out_ptr,
                        HAS_SECOND: tl.constexpr, BLOCK_N: tl.constexpr):
    segment = tl.program_id(0)
    start = tl.load(bounds_ptr + segment)
    end = tl.load(bounds_ptr + segment + 1)
    offsets = tl.arange(0, BLOCK_N)
    first_acc = tl.zeros([BLOCK_N], first_out_ptr.dtype.element_ty)
    second_acc = tl.zeros([BLOCK_N], second_out_ptr.dtype.element_ty)
    for chunk in range(loop_bound(start), loop_bound(end), BLOCK_N):
        idx = chunk + offsets
        inside = idx < end
        token = tl.load(order_ptr + idx, mask=inside, other=0)
        first_acc += tl.load(first_ptr + token, mask=inside, other=0.0).to(first_acc.dtype)
        if HAS_SECOND:
            second_acc += tl.load(second_ptr + token, mask=inside, other=0.0).to(second_acc.dtype)
    tl.store(first_out_ptr + segment, tl.sum(first_acc, axis=0))
    if HAS_SECOND:
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
    order, bounds = _sorted_spans(ids, num_segments)
    _segment_sum_kernel[(num_segments,)](order, bounds, first, second, first_out, second_out, HAS_SECOND=True,
                                         BLOCK_N=_BLOCK_N)
    return first_out, second_out


def _sorted_spans(ids: torch.Tensor, num_segments: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(order [N], bounds [R + 1]): the tokens of segment r are order[bounds[r]:bounds[r + 1]], in token order."""
    sorted_ids, order = torch.sort(ids.long(), stable=True)
    targets = torch.arange(num_segments + 1, device=ids.device, dtype=torch.long)
    return order, torch.searchsorted(sorted_ids, targets)  # bounds[r] = first sorted position with id >= r


@torch.library.custom_op("aem_kernels::triton_segment_sum", mutates_args=())
def _segment_sum_op(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    values = values.reshape(-1).contiguous()
    ids = segment_ids.reshape(-1)
    # fp32 accumulation for half-precision values (fp64 for fp64), rounded once at the end
    acc_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    out = torch.zeros(num_segments, dtype=acc_dtype, device=values.device)
    if num_segments and ids.numel():
        order, bounds = _sorted_spans(ids, num_segments)
        _segment_sum_kernel[(num_segments,)](order, bounds, values, values, out, out, HAS_SECOND=False,
                                             BLOCK_N=_BLOCK_N)
    return out.to(values.dtype)


@_segment_sum_op.register_fake
def _(values, segment_ids, num_segments):
    return values.new_empty((num_segments,))


torch.library.register_autograd("aem_kernels::triton_segment_sum", segment_sum_backward,
                                setup_context=segment_sum_setup_context)


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[r] = sum of values[t] over segment_ids[t] == r (negative ids dropped), [R] in values' dtype;
    bit-reproducible run to run, differentiable. Same contract as `naive.segment_sum_ref`."""
    return torch.ops.aem_kernels.triton_segment_sum(values, segment_ids, int(num_segments))
