"""The few torch.distributed collectives the package uses, behind one group check.

Only torch.distributed is used for communication (NCCL on GPU, gloo on CPU); nothing here moves data by any
other means. Every helper is a no-op for `group=None` where the caller's convention is "rank-local" (the
modulation and the loss); the vocab-parallel op resolves its own `None` to the default group first.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["resolve_group", "group_size", "group_rank", "all_reduce", "all_gather_rows", "masked_mean", "optional_int_max"]


def _dist():
    import torch.distributed as dist

    return dist


def resolve_group(group: object, name: str, *, none_is_default: bool):
    """The process group to use, or None (rank-local) when `group` is None and `none_is_default` is False.

    Raises ValueError when torch.distributed is unavailable or not initialised, TypeError for a non-group, and
    ValueError when this process is not a member of the group.
    """
    if group is None and not none_is_default:
        return None
    dist = _dist()
    if not dist.is_available():
        raise ValueError(f"{name} needs torch.distributed, which this build of torch does not provide")
    # the type first: a string or an int is a mistake whether or not torch.distributed is initialised
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError(f"{name}: torch.distributed is not initialised; call torch.distributed.init_process_group"
                         "() on every rank first")
    if group is None:
        group = dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member of the group")
    return group


def group_size(group) -> int:
    return 1 if group is None else _dist().get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else _dist().get_rank(group)


def all_reduce(tensor: torch.Tensor, op: str, group) -> torch.Tensor:
    """In-place all_reduce of `tensor` with op "sum", "max" or "min" over `group`; returns it (None: no-op)."""
    if group is not None:
        dist = _dist()
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(tensor, op=reduce_op, group=group)
    return tensor


def masked_mean(values: torch.Tensor, valid: Optional[torch.Tensor], group, eps: float = 0.0) -> torch.Tensor:
    """0-d mean of `values` over its `valid` entries (None: all) on every rank of `group` (one all_reduce of two
    numbers); the count is clamped to 1 (no entry: 0), or, with eps > 0, has eps added (verl's masked_mean)."""
    valid = torch.ones_like(values, dtype=torch.bool) if valid is None else valid
    sums = all_reduce(torch.stack([torch.where(valid, values, 0.0).sum(), valid.sum().to(values.dtype)]), "sum",
                      group)
    return sums[0] / (sums[1] + eps if eps else sums[1].clamp(min=1))


def all_gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """[world, *tensor.shape]: every rank's `tensor` (same shape and dtype on every rank), in group-rank order."""
    world = group_size(group)
    dist = _dist()
    flat = tensor.contiguous().reshape(-1)
    out = flat.new_empty((world * flat.numel(),))  # the concatenated form (gloo accepts no stacked output)
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is its deprecated alias)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, flat, group=group)
    return out.view((world,) + tuple(tensor.shape))


def optional_int_max(value: Optional[int], local: int, device: torch.device, group) -> int:
    """`value` when given, else the maximum of `local` over the group (one O(1) all_reduce and host sync)."""
    if value is not None:
        return value
    if group is None:
        return local
    buf = torch.tensor([local], dtype=torch.int64, device=device)
    return int(all_reduce(buf, "max", group)[0])
