"""Every backend decision of the package, made here from the capabilities the backends declare.

Token ops: backend "auto", "triton", "cpu" (the C++ extension) or "torch". Every backend implements the same
two functions on the canonical layout (see `_layout.py`):

    forward(logits3d [B,T,V], labels [B*T] | None, temperature, ignore_index, *, with_entropy=True)
        -> (logprobs [B*T] | None, entropy [B*T] | None, state)     fp32 (fp64 for fp64 logits)
    backward(logits3d, labels | None, state, entropy, grad_logprobs | None, grad_entropy | None,
             temperature, ignore_index, grad_out3d) -> grad_out3d   (grad_out3d may alias logits3d)

`state` is opaque to callers: whatever the backend's own backward needs, and only its own forward's output
may be passed to it. Every backend today returns a [B*T, 2] tensor of (row max of the logits, log d) with
d = sum_v exp((x_v - max) / tau), zero on ignored rows (kept apart rather than folded into one log-sum-exp:
see `_torch.py`).

What each backend serves (declared by the backend modules, read here):
    triton  CUDA tensors (CPU tensors under TRITON_INTERPRET=1); fp16/bf16/fp32 (fp32 math, so not fp64);
            also the single-pass AEM loss (`ops/aem_loss.py`)                       (`ops/__init__.py`)
    cpu     CPU tensors, when the extension is built; every dtype, fp64 computed in fp64        (`_cpu.py`)
    torch   every device and dtype                                                           (`_torch.py`)
"auto" picks Triton for CUDA tensors it serves, the C++ kernels for CPU tensors when built, and the torch
backend otherwise. Where "auto" takes the torch backend because something is missing (extension not built,
Triton not installed) it warns once per reason; fp64 logits on CUDA go to the torch backend by design.
Naming a backend that cannot serve the tensor raises `BackendUnavailableError` with the reason (never a
silent fallback).

Segment sums (the production reductions of `reductions.py`): `resolve_segment_sum(device)` gives the C++
reduction (deterministic, fp64 accumulation) for CPU tensors when built, the deterministic Triton kernel of
`ops/segment.py` for CUDA tensors when Triton is installed, and torch's index_add otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _validation as V
from .errors import BackendUnavailableError

__all__ = ["BACKENDS", "Backend", "BackendUnavailableError", "FusedLinearBackend", "SinglePassLoss",
           "available_backends", "resolve_backend", "resolve_fused_linear_backend", "resolve_segment_sum"]

BACKENDS = ("auto", "triton", "cpu", "torch")


@dataclass(frozen=True)
class SinglePassLoss:
    """A backend's single-pass AEM loss: `terms(...) -> (logprobs, entropy, grad | None)` from one launch
    (see `ops.aem_loss.aem_loss_single_pass`) and `attach_gradient(loss_value, logits, grad) -> loss`."""
    terms: Callable
    attach_gradient: Callable


@dataclass(frozen=True)
class Backend:
    """A token-op backend: `forward` and `backward` as in the module docstring.

    `forward(..., with_entropy=False)` returns None for the entropy (never zeros that could pass for values)
    with the same log-probs and state; the backend may skip the entropy work then (cpu and torch do; triton
    computes it and drops it). Its `backward` does not read the entropy when grad_entropy is None, but still
    takes a [B*T] tensor there (its shape is checked): zeros will do.
    """

    name: str
    forward: Callable
    backward: Callable
    single_pass_loss: Optional[SinglePassLoss] = None


# Looked up once without importing Triton (cheap at import, and a plain constant for torch.compile to trace).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _triton_reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    from . import ops

    if not _TRITON_FOUND:
        return "Triton is not installed (pip install triton, or a CUDA build of torch that ships it)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return (f"the Triton kernels need CUDA tensors; got a tensor on {device}. Set TRITON_INTERPRET=1 "
                "before importing aem_kernels to run them in Triton's (slow) interpreter on CPU tensors")
    if dtype is not None and dtype not in ops.DTYPES:
        return ops.FP64_REASON if dtype == torch.float64 else f"no Triton kernel for {_dtype_name(dtype)} logits"
    return None


def _triton_backend() -> Backend:
    from .ops import aem_loss, logprobs

    return Backend("triton", logprobs.logprobs_entropy_fwd, logprobs.logprobs_entropy_bwd,
                   SinglePassLoss(aem_loss.aem_loss_single_pass, aem_loss.FusedGradientFunction.apply))


def _cpu_reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    from . import _cpu

    if device.type != "cpu":
        return f"the C++ kernels run on CPU tensors; got a tensor on {device}"
    if _cpu.unavailable_reason() is not None:
        return _cpu.unavailable_reason()
    if dtype is not None and dtype not in _cpu.DTYPES:
        return f"no C++ kernel for {_dtype_name(dtype)} logits"
    return None


def _cpu_backend() -> Backend:
    from . import _cpu

    return Backend("cpu", _cpu.logprobs_entropy_fwd, _cpu.logprobs_entropy_bwd)


def _torch_reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    from . import _torch

    if dtype is not None and dtype not in _torch.DTYPES:
        return f"no torch implementation for {_dtype_name(dtype)} logits"
    return None


def _torch_backend() -> Backend:
    from . import _torch

    return Backend("torch", _torch.logprobs_entropy_fwd, _torch.logprobs_entropy_bwd)


_REASONS: Dict[str, Callable[..., Optional[str]]] = {
    "triton": _triton_reason,
    "cpu": _cpu_reason,
    "torch": _torch_reason,
}
_FACTORIES: Dict[str, Callable[[], Backend]] = {
    "triton": _triton_backend,
    "cpu": _cpu_backend,
    "torch": _torch_backend,
}
_CACHE: Dict[str, Backend] = {}
_WARNED: set = set()


def _get(name: str) -> Backend:
    if name not in _CACHE:
        _CACHE[name] = _FACTORIES[name]()
    return _CACHE[name]


def _warn_fallback_once(device: torch.device, reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f'aem_kernels: backend="auto" uses the torch backend for {device.type} tensors: {reason}',
                      RuntimeWarning, stacklevel=4)


def _auto(device: torch.device, dtype: Optional[torch.dtype]) -> Backend:
    if device.type == "cuda":
        from . import ops

        if dtype is not None and dtype not in ops.DTYPES:
            return _get("torch")  # e.g. fp64 logits: a checking path the Triton kernels (fp32 math) do not serve
        preferred = "triton"
    elif device.type == "cpu":
        preferred = "cpu"
    else:
        return _get("torch")  # no other backend runs on this device type
    reason = _REASONS[preferred](device, dtype)
    if reason is None:
        return _get(preferred)
    _warn_fallback_once(device, reason)
    return _get("torch")


def resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Backend:
    """The backend that will run for logits on `device` with `dtype` (None: decide on the device alone).

    Raises:
        ValueError: `backend` is not one of BACKENDS.
        BackendUnavailableError: the named backend cannot serve this device or dtype (with the reason).
    """
    V.check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return _auto(device, dtype)
    reason = _REASONS[backend](device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f'backend="{backend}" is not available: {reason}')
    return _get(backend)


def available_backends(device: torch.device | str = "cpu",
                       dtype: Optional[torch.dtype] = None) -> Dict[str, Optional[str]]:
    """Each named backend mapped to None when it can serve logits on `device` (of `dtype`, when given), else
    to the reason. Never warns."""
    device = torch.device(device)
    return {name: _REASONS[name](device, dtype) for name in ("triton", "cpu", "torch")}


def resolve_segment_sum(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The segment-sum implementation for values on `device`: `fn(values, segment_ids, num_segments) -> [R]`
    (same contract as `reference.segment_sum`, differentiable)."""
    if device.type == "cpu":
        from . import _cpu

        if _cpu.is_available():
            return _cpu.segment_sum
    elif device.type == "cuda" and _TRITON_FOUND:
        from .ops import segment

        return segment.segment_sum
    from . import _torch

    return _torch.segment_sum


@dataclass(frozen=True)
class FusedLinearBackend:
    """The fused linear + log-prob op (`aem_kernels.fused_linear`): `forward(hidden2d, weight, bias, labels,
    temperature, ignore_index, with_entropy) -> (logprobs, entropy | None, saved)` and `backward(hidden2d,
    weight, bias, labels, saved, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, needs,
    deterministic) -> (grad_hidden, grad_weight, grad_bias)`; `single_pass(hidden2d, weight, bias, labels,
    temperature, ignore_index, token_grads, needs, budget) -> (logprobs, entropy, grads)` where the path can
    finish a row-local loss's gradient in the forward (`_chunked_linear.chunked_single_pass`), else None.
    `single_pass_auto_dtypes`: the hidden dtypes for which the loss takes it unasked (those where it costs no
    memory beyond the gradients: fp32/fp64, whose weight needs no fp32 copy)."""

    name: str
    forward: Callable
    backward: Callable
    pack: Callable            # (saved, n_rows, dtype, device) -> state [N, 2] (the op is a custom op)
    unpack: Callable          # (state, entropy, labels, ignore_index, vocab, hidden, dtype, budget) -> saved
    state_dtype: Callable     # hidden dtype -> the packed state's dtype
    single_pass: Optional[Callable] = None
    single_pass_auto_dtypes: Tuple[torch.dtype, ...] = ()


_FUSED_LINEAR_CACHE: Dict[str, FusedLinearBackend] = {}


def resolve_fused_linear_backend(backend: str, device: torch.device, dtype: torch.dtype) -> FusedLinearBackend:
    """The fused-linear path for hidden states of `dtype` on `device`: the token backend's choice (same names,
    same errors), where "triton" means the tiled kernels of `ops/fused_linear.py` and "cpu"/"torch" a BLAS path
    over that row backend: vocab blocks for bf16/fp16 hidden states (`_blocked_linear.py`: no fp32 copy of the
    weight), row chunks otherwise (`_chunked_linear.py`). "auto" with fp64 hidden states (a checking path;
    Triton computes in fp32) takes the chunked torch path."""
    if backend == "auto" and dtype == torch.float64:
        backend = "torch"
    row = resolve_backend(backend, device, dtype)
    if row.name == "triton" and dtype == torch.float64:
        raise BackendUnavailableError('backend="triton" is not available for fp64 hidden states (the fused '
                                      'linear kernels compute in fp32); use backend="torch"')
    path = "blocked" if row.name != "triton" and dtype in (torch.float16, torch.bfloat16) else "chunked"
    key = f"{row.name}-{path}"
    if key not in _FUSED_LINEAR_CACHE:
        if row.name == "triton":
            from .ops import fused_linear as triton_fused

            def triton_forward(*args, budget=None):   # the tile is the working set: no budget to honour
                return triton_fused.fused_linear_fwd(*args)

            impl = FusedLinearBackend(
                "triton", triton_forward, triton_fused.fused_linear_bwd,
                pack=lambda saved, *_: torch.stack(saved, dim=1),                        # (m, log d) per row
                unpack=lambda state, *_: tuple(t.contiguous() for t in state.unbind(1)),
                state_dtype=lambda dtype: torch.float32)
        else:
            from . import _blocked_linear as blocked
            from . import _chunked_linear as chunked

            fwd, bwd = ((blocked.blocked_fwd, blocked.blocked_bwd) if path == "blocked"
                        else (chunked.chunked_fwd, chunked.chunked_bwd))

            def forward(*args, budget=None, _row=row, _fwd=fwd):
                return _fwd(_row, *args, budget=budget)

            def backward(hidden2d, weight, bias, labels, saved, entropy, grad_logprobs, grad_entropy,
                         temperature, ignore_index, needs, deterministic=False, _row=row, _bwd=bwd):
                # always deterministic: fixed chunk / block order, BLAS reductions
                return _bwd(_row, hidden2d, weight, bias, labels, saved, grad_logprobs, grad_entropy,
                            temperature, ignore_index, needs)

            def single_pass(*args, _row=row, **kwargs):   # row chunks for every dtype (see fused_linear.py)
                return chunked.chunked_single_pass(_row, *args, **kwargs)

            if path == "blocked":
                pack, unpack, state_dtype = blocked.blocked_pack, blocked.blocked_unpack, lambda dtype: torch.float64
            else:
                pack, state_dtype = chunked.chunked_pack, chunked.compute_dtype

                def unpack(state, entropy, labels, ignore_index, vocab, hidden, dtype, budget):
                    return chunked.chunked_unpack(state, entropy, labels, ignore_index, vocab, dtype, budget)

            impl = FusedLinearBackend(row.name, forward, backward, pack, unpack, state_dtype, single_pass,
                                      (torch.float32, torch.float64))
        _FUSED_LINEAR_CACHE[key] = impl
    return _FUSED_LINEAR_CACHE[key]
