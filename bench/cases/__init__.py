"""The benchmark cases, one module each. A new case (e.g. the fused linear + log-prob op over hidden states)
is a module with a `Case` subclass and one entry below; see `base.py`."""

from .aem_loss import AEMLossForwardBackward
from .base import Case, Inputs, Point
from .fused_linear import FusedLinearForwardBackward, FusedLinearLogprobForwardBackward
from .logprobs_fwd import LogprobsForward
from .logprobs_fwd_bwd import LogprobsForwardBackward

CASES = {case.name: case for case in (LogprobsForward(), LogprobsForwardBackward(), AEMLossForwardBackward(),
                                      FusedLinearForwardBackward(), FusedLinearLogprobForwardBackward())}

__all__ = ["CASES", "Case", "Inputs", "Point"]
