"""The benchmark cases, one module each. A new case (e.g. the fused linear + log-prob op over hidden states)
is a module with a `Case` subclass and one entry in CASES below; `base.py` documents the interface."""

from typing import List

import torch

from ..implementations import competitor_implementations, our_implementations
from ..lines import Implementation
from .aem_loss import AEMLossForwardBackward, AEMLossModeForwardBackward
from .base import Case, Inputs, Point
from .fused_linear import (FusedLinearForwardBackward, FusedLinearLogprobForwardBackward,
                           FusedLinearLossForwardBackward, hidden_implementations)
from .logprobs_fwd import LogprobsForward
from .loss_modes import LOSS_MODES
from .logprobs_fwd_bwd import LogprobsForwardBackward
from .precision import LogprobsPrecision

# one line per case; a profile with no case list runs those with `default = True`, in this order
CASES = {case.name: case for case in (
    LogprobsForward(),
    LogprobsForwardBackward(),
    AEMLossForwardBackward(),
    LogprobsPrecision(),
    FusedLinearForwardBackward(),
    FusedLinearLogprobForwardBackward(),
    FusedLinearLossForwardBackward(),
    *(AEMLossModeForwardBackward(mode) for mode in LOSS_MODES),   # aem_loss_fwd_bwd[<mode>], one per loss mode
)}
DEFAULT_CASES = [name for name, case in CASES.items() if case.default]
LOSS_MODE_CASES = [f"aem_loss_fwd_bwd[{mode}]" for mode in LOSS_MODES]


def all_implementations(device: torch.device) -> List[Implementation]:
    """Every line of every case on `device`: ours and the competitors over logits (implementations.py), then
    the hidden-state lines of the fused-linear cases."""
    return our_implementations(device) + competitor_implementations(device) + hidden_implementations(device)


__all__ = ["CASES", "DEFAULT_CASES", "LOSS_MODE_CASES", "Case", "Inputs", "Point", "all_implementations"]
