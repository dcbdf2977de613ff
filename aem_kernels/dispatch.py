"""Backend selection for the token ops: "auto", "triton", "cpu" (the C++ extension) or "torch".

Every backend implements the same two functions on the canonical layout (see `_layout.py`):

    forward(logits3d [B,T,V], labels [B*T] | None, temperature, ignore_index)
        -> (logprobs [B*T] | None, entropy [B*T], lse [B*T])        fp32 (fp64 for fp64 logits)
    backward(logits3d, labels | None, lse, entropy, grad_logprobs | None, grad_entropy | None,
             temperature, ignore_index, grad_out3d) -> grad_out3d   (grad_out3d may alias logits3d)

"auto" picks Triton for CUDA tensors, the C++ kernels for CPU tensors when the extension is built, and the
torch reference otherwise. Naming a backend that cannot serve the tensor raises `BackendUnavailableError`
with the reason (never a silent fallback).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

__all__ = ["BACKENDS", "Backend", "BackendUnavailableError", "FusedLinearBackend", "available_backends",
           "resolve_backend", "resolve_fused_linear_backend"]

BACKENDS = ("auto", "triton", "cpu", "torch")


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend cannot run on this machine or for this tensor."""


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable


def _torch_backend() -> Backend:
    from . import reference

    return Backend("torch", reference.logprobs_entropy_fwd_ref, reference.logprobs_entropy_bwd_ref)


# Looked up once without importing Triton (cheap at import, and a plain constant for torch.compile to trace).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _triton_reason(device: torch.device) -> Optional[str]:
    if not _TRITON_FOUND:
        return "Triton is not installed (pip install triton, or a CUDA build of torch that ships it)"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return (f"the Triton kernels need CUDA tensors; got a tensor on {device}. Set TRITON_INTERPRET=1 "
            "before importing aem_kernels to run them in Triton's (slow) interpreter on CPU tensors")


def _triton_backend() -> Backend:
    from .ops import logprobs as triton_ops

    return Backend("triton", triton_ops.logprobs_entropy_fwd, triton_ops.logprobs_entropy_bwd)


def _cpu_reason(device: torch.device) -> Optional[str]:
    from . import _cpu

    if device.type != "cpu":
        return f"the C++ kernels run on CPU tensors; got a tensor on {device}"
    return _cpu.unavailable_reason()


def _cpu_backend() -> Backend:
    from . import _cpu

    return Backend("cpu", _cpu.logprobs_entropy_fwd, _cpu.logprobs_entropy_bwd)


_REASONS: Dict[str, Callable[[torch.device], Optional[str]]] = {
    "triton": _triton_reason,
    "cpu": _cpu_reason,
    "torch": lambda device: None,
}
_FACTORIES: Dict[str, Callable[[], Backend]] = {
    "triton": _triton_backend,
    "cpu": _cpu_backend,
    "torch": _torch_backend,
}
_CACHE: Dict[str, Backend] = {}


def _get(name: str) -> Backend:
    if name not in _CACHE:
        _CACHE[name] = _FACTORIES[name]()
    return _CACHE[name]


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """The backend that will run for tensors on `device`."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        preferred = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else None
        if preferred is not None and _REASONS[preferred](device) is None:
            return _get(preferred)
        return _get("torch")
    reason = _REASONS[backend](device)
    if reason is not None:
        raise BackendUnavailableError(f'backend="{backend}" is not available: {reason}')
    return _get(backend)


def available_backends(device: torch.device | str = "cpu") -> Dict[str, Optional[str]]:
    """Each named backend mapped to None when it can serve tensors on `device`, else to the reason."""
    device = torch.device(device)
    return {name: _REASONS[name](device) for name in ("triton", "cpu", "torch")}


@dataclass(frozen=True)
class FusedLinearBackend:
    """The fused linear + log-prob op (`aem_kernels.fused_linear`): `forward(hidden2d, weight, bias, labels,
    temperature, ignore_index, with_entropy) -> (logprobs, entropy | None, saved)` and `backward(hidden2d,
    weight, bias, labels, saved, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, needs,
    deterministic) -> (grad_hidden, grad_weight, grad_bias)`."""

    name: str
    forward: Callable
    backward: Callable


_FUSED_LINEAR_CACHE: Dict[str, FusedLinearBackend] = {}


def resolve_fused_linear_backend(backend: str, device: torch.device, dtype: torch.dtype) -> FusedLinearBackend:
    """The fused-linear path for hidden states of `dtype` on `device`: the token backend's choice (same names,
    same errors), where "triton" means the tiled kernels of `ops/fused_linear.py` and "cpu"/"torch" the
    chunked BLAS path over that row backend (`_chunked_linear.py`). "auto" with fp64 hidden states (a checking
    path; Triton computes in fp32) takes the chunked torch path."""
    if backend == "auto" and dtype == torch.float64:
        backend = "torch"
    row = resolve_backend(backend, device)
    if row.name == "triton" and dtype == torch.float64:
        raise BackendUnavailableError('backend="triton" is not available for fp64 hidden states (the fused '
                                      'linear kernels compute in fp32); use backend="torch"')
    if row.name not in _FUSED_LINEAR_CACHE:
        if row.name == "triton":
            from .ops import fused_linear as triton_fused

            def triton_forward(*args, budget=None):   # the tile is the working set: no budget to honour
                return triton_fused.fused_linear_fwd(*args)

            impl = FusedLinearBackend("triton", triton_forward, triton_fused.fused_linear_bwd)
        else:
            from . import _chunked_linear as chunked

            def forward(*args, budget=None, _row=row):
                return chunked.chunked_fwd(_row, *args, budget=budget)

            def backward(hidden2d, weight, bias, labels, saved, entropy, grad_logprobs, grad_entropy,
                         temperature, ignore_index, needs, deterministic=False, _row=row):
                # always deterministic: fixed chunk order, BLAS reductions
                return chunked.chunked_bwd(_row, hidden2d, weight, bias, labels, saved, grad_logprobs,
                                           grad_entropy, temperature, ignore_index, needs)

            impl = FusedLinearBackend(row.name, forward, backward)
        _FUSED_LINEAR_CACHE[row.name] = impl
    return _FUSED_LINEAR_CACHE[row.name]
