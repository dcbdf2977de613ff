"""Argument checks of the fused-linear ops (shared with the vocab-parallel op and the loss): hidden states, the
LM head weight and bias, and a stand-in with the logits' shape for the label checks."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ... import validation as V

__all__ = ["check_linear", "logits_like"]

_HIDDEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_linear(hidden: object, weight: object, bias: object, names: Tuple[str, str] = ("weight", "bias")
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """hidden [..., H], weight [V, H], bias [V] | None of one floating dtype on one device; `names` spell the
    weight and bias arguments in the messages."""
    wn, bn = names
    hidden = V.check_tensor("hidden", hidden)
    weight = V.check_tensor(wn, weight)
    if hidden.dtype not in _HIDDEN_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    width = hidden.shape[-1]
    if weight.dim() != 2:
        raise ValueError(f"{wn} must have shape [V, H] = [V, {width}] (the LM head's weight), got "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != width:
        raise ValueError(f"{wn} must have shape [V, H] with H = hidden.shape[-1] = {width}, got "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{wn} must have a vocabulary dimension V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{wn} must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{wn} is on {weight.device} but hidden is on {hidden.device}; put them on one device")
    if bias is not None:
        bias = V.check_tensor(bn, bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bn} must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{bn} must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"{bn} is on {bias.device} but hidden is on {hidden.device}; put them on one device")
    return hidden, weight, bias


def logits_like(hidden: torch.Tensor, vocab: int) -> torch.Tensor:
    """A zero-stride stand-in with the logits' shape [..., V] and device, for the shape and label checks
    that the logits-based functions share (one element of memory, never read)."""
    return hidden.new_zeros(()).expand(*hidden.shape[:-1], vocab)
