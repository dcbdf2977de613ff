"""What a line of the benchmark is, and why one cannot run here.

A leaf of `bench`: the logits lines (`implementations.py`), the cases with lines of their own (the hidden-state
lines of `cases/fused_linear.py`), the runner and the command line all import it, and it imports none of them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Implementation:
    """One line of every table and plot; `fn`'s signature depends on `input_kind` (implementations.py: logits,
    cases/fused_linear.py: hidden states)."""

    name: str
    description: str
    fn: Optional[Callable[..., object]]
    input_kind: str = "logits"            # "logits" or "hidden" (the fused-linear cases)
    unavailable: Optional[str] = None     # why it cannot run here (None: it can)
    ours: bool = False
    backend: Optional[str] = None         # ours only: the aem_kernels backend name
    path: Optional[str] = None            # ours only, fused linear: the path keyword (None: "auto")
    inplace: bool = False                 # ours only: inplace_backward=True
    mutates_inputs: bool = False          # needs fresh logits for every call (prepared outside the timer)
    backward_only: bool = False           # only differs from another line when a backward runs
    compiled: bool = False                # the first call compiles; its time is reported separately
    not_timed: Optional[str] = None       # it runs, but its speed means nothing here (why): only untimed
                                          # cases (the precision table) run it
    opt_in: Optional[str] = None          # a diagnostic line, left out (why) unless a profile's `lines` or
                                          # --only names it


def import_reason(module: str, extra: str) -> Optional[str]:
    """None when `module` imports, else why not and the extra of the package that installs it."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install that fails while importing
        return (f"{module} cannot be imported ({type(exc).__name__}: {str(exc)[:160]}); pip install "
                f"'aem-kernels[{extra}]', or carry its wheel (bench/README.md, A GPU session)")
    return None


def compile_reason(device: torch.device) -> Optional[str]:
    """None when torch.compile can run on `device`, else why not."""
    if device.type == "cuda" and import_reason("triton", "triton") is not None:
        return "torch.compile on CUDA needs Triton, which is not installed"
    return None
