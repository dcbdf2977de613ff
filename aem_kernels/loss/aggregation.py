"""verl 0.9.1's loss aggregation (`agg_loss`) as per-token weights, and the global batch it normalises over.

Every aggregation mode is linear in the per-token values with weights that depend only on the masks and the
global normalisers, which is what lets a fused kernel fold the aggregation into the per-token gradient
scalars (section 6). With D = dp_size, N_g = batch_num_tokens (default: this batch's trained tokens), R_g =
global_batch_size (default: this batch's non-empty responses R'), L_r the tokens of response r and S =
loss_scale_factor (default: the padded length T; in the packed form the longest response):

    token-mean               c_t = D / N_g
    token-sum                c_t = D
    seq-mean-token-sum       c_t = D / R_g
    seq-mean-token-sum-norm  c_t = D / (R_g S)
    seq-mean-token-mean      c_t = D / (R_g L_r)

Each micro-batch (or rank) given the global N_g / R_g (and a fixed S) gets the share of the whole batch's loss
its tokens carry, times D: summing over micro-batches and averaging over ranks (DDP/FSDP's gradient
all-reduce) gives the whole batch's loss and gradient. Untrained tokens (token_response == -1) get 0; an
empty batch gives all-zero weights (verl's 0 / 0 would be NaN). verl adds 1e-8 to L_r; with the boolean mask
of its actor that sum is an fp32 one and rounds back to L_r for every L_r >= 1, so it is left out.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from .. import collectives as C
from ..config import LOSS_AGG_MODES
from ..ops.segment import segment_count

__all__ = ["GlobalBatch", "aggregate", "aggregation_weights"]


def _positive_number(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{name} must be a positive real number or a one-element tensor, got a tensor of "
                             f"shape {tuple(value.shape)}")
        if value.requires_grad:
            raise TypeError(f"{name} is a normaliser, not a differentiable input: pass a number or a tensor that "
                            "does not require grad")
        value = value.item()  # one host sync; verl itself passes Python numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be None or a positive number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class GlobalBatch(NamedTuple):
    """What a loss call's batch is a part of: verl's global normalisers of `agg_loss` (dp_size, the global
    batch's trained tokens and non-empty responses, the divisor of seq-mean-token-sum-norm; None: from this
    batch) and the data-parallel `process_group` over which the AEM statistics and metrics are taken (None: this
    batch alone). Build it with `GlobalBatch.checked`."""

    dp_size: int = 1
    batch_num_tokens: Optional[float] = None
    global_batch_size: Optional[float] = None
    loss_scale_factor: Optional[float] = None
    process_group: object = None

    # (a NamedTuple rather than a frozen dataclass: torch.compile traces its construction)
    @classmethod
    def checked(cls, mode: str, dp_size: int = 1, batch_num_tokens=None, global_batch_size=None,
                loss_scale_factor=None, process_group=None) -> "GlobalBatch":
        """Validate the normalisers for `mode` (as verl's `agg_loss`: "token-mean" needs batch_num_tokens and
        the seq-mean modes need global_batch_size when dp_size > 1) and the process group."""
        if mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")
        if isinstance(dp_size, bool) or not isinstance(dp_size, numbers.Integral):
            raise TypeError(f"dp_size must be an int >= 1, got {type(dp_size).__name__}")
        if dp_size < 1:
            raise ValueError(f"dp_size must be an int >= 1, got {dp_size}")
        batch = cls(int(dp_size), _positive_number("batch_num_tokens", batch_num_tokens),
                    _positive_number("global_batch_size", global_batch_size),
                    _positive_number("loss_scale_factor", loss_scale_factor),
                    C.resolve_group(process_group, "process_group", none_is_default=False))
        needed = "batch_num_tokens" if mode == "token-mean" else None if mode == "token-sum" else "global_batch_size"
        if dp_size > 1 and needed is not None and getattr(batch, needed) is None:
            what = "trained tokens" if needed == "batch_num_tokens" else "non-empty responses"
            raise ValueError(f"{needed} (the number of {what} of the global batch, over all ranks and "
                             f"micro-batches) is required with loss_agg_mode={mode!r} when dp_size > 1 "
                             f"(dp_size={dp_size})")
        return batch

    def over_ranks(self, token_response: torch.Tensor, num_responses: int, num_groups: int,
                   horizon: Optional[int], infer_dp_size: bool):
        """(this with every normaliser left None filled in over the ranks of `process_group`, G over the
        ranks): one MAX and one SUM all_reduce of two numbers, one host sync."""
        group = self.process_group
        counts = segment_count(token_response, num_responses)
        longest = counts.max() if num_responses else counts.new_zeros(())
        span = longest if horizon is None else counts.new_tensor(horizon)
        maxima = C.all_reduce(torch.stack([counts.new_tensor(num_groups), span]), "max", group)
        sums = C.all_reduce(torch.stack([counts.sum(), (counts > 0).sum()]), "sum", group)
        (groups, span), (tokens, sequences) = maxima.tolist(), sums.tolist()
        # an empty global batch has all-zero token weights; 1 keeps the normalisers valid
        filled = {name: float(max(value, 1)) for name, value in (
            ("batch_num_tokens", tokens), ("global_batch_size", sequences), ("loss_scale_factor", span))
            if getattr(self, name) is None}
        if infer_dp_size:
            filled["dp_size"] = C.group_size(group)
        return self._replace(**filled), groups

    def token_weights(self, token_response: torch.Tensor, num_responses: int, mode: str,
                      horizon: Optional[int] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-token weights c [N] of `mode` (module docstring) under these normalisers."""
        trained = token_response >= 0
        ones = trained.to(dtype)
        if mode == "token-sum":
            return ones * self.dp_size
        if mode == "token-mean":
            tokens = self.batch_num_tokens
            if tokens is None:
                tokens = trained.sum().clamp(min=1).to(dtype)
            return ones * (self.dp_size / tokens)
        counts = segment_count(token_response, num_responses)
        sequences = self.global_batch_size
        if sequences is None:
            sequences = (counts > 0).sum().clamp(min=1).to(dtype)
        if mode == "seq-mean-token-sum":
            return ones * (self.dp_size / sequences)
        if mode == "seq-mean-token-sum-norm":
            scale = self.loss_scale_factor
            if scale is None:
                scale = horizon if horizon is not None else (counts.max().clamp(min=1).to(dtype) if num_responses
                                                             else 1)
            return ones * (self.dp_size / (sequences * scale))
        # untrained tokens read the slot at index R (so that R = 0, a rank holding no response, works)
        slot = torch.where(trained, token_response, num_responses)
        length = torch.cat([counts.clamp(min=1), counts.new_ones(1)]).to(dtype)[slot]
        return ones * (self.dp_size / sequences) / length


def aggregation_weights(token_response: torch.Tensor, num_responses: int, mode: str,
                        horizon: Optional[int] = None, dtype: torch.dtype = torch.float32, *, dp_size: int = 1,
                        batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """Per-token weights c [N] such that verl 0.9.1's `agg_loss(v, mask, mode, dp_size, batch_num_tokens,
    global_batch_size, loss_scale_factor)` of a per-token quantity v is sum_t c_t v_t (module docstring);
    `horizon` is the padded length T (None: the packed form's longest response)."""
    batch = GlobalBatch.checked(mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    return batch.token_weights(token_response, num_responses, mode, horizon, dtype)


def aggregate(values: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """sum_t c_t v_t over trained tokens (c from `aggregation_weights`; untrained values never leak NaN)."""
    return torch.where(token_weights != 0, values * token_weights, 0.0).sum()
