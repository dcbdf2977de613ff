"""Token log-probs and entropies from logits (eq. 1-2) and their section-6 gradient, on every backend.

The op's one path decision (`resolve_backend`): backend "auto", "triton", "cpu" (the C++ extension) or "torch",
from what `aem_kernels.capability` says this machine has and the dtypes each backend declares. Every backend
implements the same two functions on the canonical [B, T, V] row layout of `aem_kernels.layout`:

    forward(logits3d [B,T,V], labels [B*T] | None, temperature, ignore_index, *, with_entropy=True)
        -> (logprobs [B*T] | None, entropy [B*T] | None, state)     fp32 (fp64 for fp64 logits)
    backward(logits3d, labels | None, state, entropy, grad_logprobs | None, grad_entropy | None,
             temperature, ignore_index, grad_out3d) -> grad_out3d   (grad_out3d may alias logits3d)

`state` is opaque to callers: whatever the backend's own backward needs (today every backend returns a
[B*T, 2] tensor of (row max of the logits, log d), zero on ignored rows; see `pytorch.py`). With
with_entropy=False the forward returns None for the entropy and may skip its work; the backward does not read
the entropy when grad_entropy is None (zeros will do for its checked shape).

    triton  CUDA tensors (CPU tensors under TRITON_INTERPRET=1); fp16/bf16/fp32 (fp32 math, so not fp64)
    cpu     CPU tensors, when the extension is built; every dtype, fp64 computed in fp64
    torch   every device and dtype
"auto" picks Triton for CUDA tensors it serves, the C++ kernels for CPU tensors when built, and the torch
backend otherwise; where it takes the torch backend because something is missing (extension not built, Triton
not installed) it warns once per reason (fp64 logits on CUDA go to the torch backend by design). Naming a
backend that cannot serve the tensor raises `BackendUnavailableError` with the reason, never a silent fallback.

`LogprobsEntropyFunction` computes eq. 1-2 per row and saves only O(N) state (the backend's per-row state,
the entropy) plus a reference to the logits; its backward is the section-6 formula evaluated by the chosen
backend in one read of the logits and one write of the gradient (optionally into the logits' own storage),
never autograd through a softmax copy. The plain definition the tests compare against is `naive.py`.
Every Function of this op keeps the autograd contract of `aem_kernels.contract`: the in-place gradient bumps
the logits' version counter and is refused for overlapping logits, double backward raises a clear error.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ... import validation as V
from ...capability import (TRITON_DTYPES, TRITON_FP64_REASON, cpu_extension_reason, dtype_name,
                           triton_reason)
from ...contract import check_inplace_backward, first_order_only
from ...errors import BackendUnavailableError
from ...layout import as_rows3d, gradient_buffer
from .gathered import GatheredLogprobsFunction

__all__ = [
    "BACKENDS",
    "Backend",
    "LogprobsEntropyFunction",
    "available_backends",
    "entropy_from_logits",
    "load_backend",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "resolve_backend",
    "selective_log_softmax",
]

BACKENDS = ("auto", "triton", "cpu", "torch")


@dataclass(frozen=True)
class Backend:
    """A row backend: `forward` and `backward` as in the module docstring."""

    name: str
    forward: Callable
    backward: Callable


def _triton_reason(device: torch.device, dtype: Optional[torch.dtype]) -> Optional[str]:
    reason = triton_reason(device)
    if reason is None and dtype is not None and dtype not in TRITON_DTYPES:
        return TRITON_FP64_REASON if dtype == torch.float64 else f"no Triton kernel for {dtype_name(dtype)} logits"
    return reason


def _cpu_reason(device: torch.device, dtype: Optional[torch.dtype]) -> Optional[str]:
    reason = cpu_extension_reason(device)
    if reason is None and dtype is not None:
        from . import cpu

        if dtype not in cpu.DTYPES:
            return f"no C++ kernel for {dtype_name(dtype)} logits"
    return reason


def _torch_reason(device: torch.device, dtype: Optional[torch.dtype]) -> Optional[str]:
    from . import pytorch as torch_backend

    if dtype is not None and dtype not in torch_backend.DTYPES:
        return f"no torch implementation for {dtype_name(dtype)} logits"
    return None


def _import(name: str) -> Backend:
    if name == "triton":
        from . import triton as module
    elif name == "cpu":
        from . import cpu as module
    else:
        from . import pytorch as module
    return Backend(name, module.logprobs_entropy_fwd, module.logprobs_entropy_bwd)


_REASONS: Dict[str, Callable[[torch.device, Optional[torch.dtype]], Optional[str]]] = {
    "triton": _triton_reason, "cpu": _cpu_reason, "torch": _torch_reason}
_LOADED: Dict[str, Backend] = {}
_WARNED: set = set()


def load_backend(name: str) -> Backend:
    """The row backend `name` ("triton", "cpu" or "torch"), without checking that it can serve a tensor (for
    paths that name a backend `resolve_backend` chose before)."""
    if name not in _LOADED:
        _LOADED[name] = _import(name)
    return _LOADED[name]


def _auto(device: torch.device, dtype: Optional[torch.dtype]) -> Backend:
    if device.type == "cuda":
        if dtype is not None and dtype not in TRITON_DTYPES:
            # e.g. fp64 logits: a checking path the Triton kernels (fp32 math) do not serve
            return load_backend("torch")
        preferred = "triton"
    elif device.type == "cpu":
        preferred = "cpu"
    else:
        return load_backend("torch")  # no other backend runs on this device type
    reason = _REASONS[preferred](device, dtype)
    if reason is None:
        return load_backend(preferred)
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f'aem_kernels: backend="auto" uses the torch backend for {device.type} tensors: {reason}',
                      RuntimeWarning, stacklevel=4)
    return load_backend("torch")


def resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Backend:
    """The row backend that will run for logits on `device` with `dtype` (None: decide on the device alone).

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
    return load_backend(backend)


def available_backends(device: torch.device | str = "cpu",
                       dtype: Optional[torch.dtype] = None) -> Dict[str, Optional[str]]:
    """Each named backend mapped to None when it can serve logits on `device` (of `dtype`, when given), else
    to the reason. Never warns."""
    device = torch.device(device)
    return {name: _REASONS[name](device, dtype) for name in ("triton", "cpu", "torch")}


class LogprobsEntropyFunction(torch.autograd.Function):
    """(logits [..., V], labels [...] | None) -> (logprobs [...], entropy [...]); see module docstring."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: Optional[torch.Tensor], temperature: float, ignore_index: int,
                backend: Backend, inplace_backward: bool, with_entropy: bool = True):
        inplace_backward = check_inplace_backward(logits, inplace_backward, writes_gradient=False)
        flat_labels = labels.reshape(-1) if labels is not None else None
        # with_entropy=False (log-probs only, with labels): the row kernels skip the entropy's sum; the entropy
        # output is then zeros without a gradient, and the backward gets zeros in its (unread) entropy slot
        with_entropy = with_entropy or labels is None
        logprobs, entropy, state = backend.forward(as_rows3d(logits), flat_labels, temperature, ignore_index,
                                                   with_entropy=with_entropy)
        if entropy is None:
            entropy = torch.zeros(state.shape[0], dtype=state.dtype, device=state.device)
        ctx.save_for_backward(logits, flat_labels, state, entropy)
        ctx.config = (temperature, ignore_index, backend, inplace_backward, with_entropy)
        ctx.n_inputs = len(ctx.needs_input_grad)   # 6 or 7: the backward returns one gradient per input
        ctx.set_materialize_grads(False)
        # The outputs are O(N) private copies, not views: a view made inside a Function cannot be edited in
        # place (users masked_fill_ their log-probs), and an edit must not reach the entropy saved above.
        shape = logits.shape[:-1]
        entropy_out = entropy.reshape(shape).clone()
        if not with_entropy:
            ctx.mark_non_differentiable(entropy_out)
        if logprobs is None:
            logprobs_out = torch.zeros_like(entropy_out)
            ctx.mark_non_differentiable(logprobs_out)
        else:
            logprobs_out = logprobs.reshape(shape).clone()
        return logprobs_out, entropy_out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        logits, labels, state, entropy = ctx.saved_tensors
        temperature, ignore_index, backend, inplace_backward, with_entropy = ctx.config
        rest = (None,) * (ctx.n_inputs - 1)
        if not with_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return (None,) + rest
        if labels is None:
            grad_logprobs = None
        check_inplace_backward(logits, inplace_backward, writes_gradient=True)
        logits3d = as_rows3d(logits)
        buffer = gradient_buffer(logits, inplace=inplace_backward, rows3d=logits3d)
        flat = (lambda g: g.reshape(-1).contiguous() if g is not None else None)
        backend.backward(logits3d, labels, state, entropy, flat(grad_logprobs), flat(grad_entropy), temperature,
                         ignore_index, buffer.rows3d)
        return (buffer.finish(),) + rest


def _prepare(logits, labels, temperature, ignore_index, backend, inplace_backward, allow_k=False,
             labels_name="labels"):
    logits = V.check_logits(logits)
    check_inplace_backward(logits, inplace_backward)
    temperature = V.check_temperature(temperature)
    ignore_index = V.check_ignore_index(ignore_index)
    if labels is not None:
        labels = V.check_labels(labels, logits, ignore_index, labels_name, allow_k=allow_k)
    return logits, labels, temperature, ignore_index, resolve_backend(backend, logits.device, logits.dtype)


def _as(dtype: Optional[torch.dtype], *outputs: torch.Tensor):
    """The outputs in the caller's dtype (None: as computed, fp32, or fp64 for fp64 logits)."""
    converted = tuple(out if dtype is None or out.dtype == dtype else out.to(dtype) for out in outputs)
    return converted if len(converted) > 1 else converted[0]


def logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_backward: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs l_t (eq. 1) and entropies h_t (eq. 2) in one read of the logits.

    Args:
        logits: [..., V] fp32/bf16/fp16/fp64, any strides with a unit vocab stride.
        labels: logits.shape[:-1], integer, values in [0, V) or `ignore_index`.
        temperature: tau > 0; the logits are divided by it.
        ignore_index: positions with this label give 0 in both outputs and a zero gradient.
        backend: "auto", "triton", "cpu" or "torch" (see `resolve_backend`).
        inplace_backward: write the logits' gradient into the logits' own storage (the logits must not be
            needed after the backward); peak memory stays at one N x V buffer. A node that saved the logits
            then raises torch's "modified by an inplace operation" error; overlapping logits (expand) are
            refused (see `aem_kernels.contract`).
        dtype: the outputs' dtype; None (default) keeps the fp32 math's result (fp64 for fp64 logits), also
            for half-precision logits; `dtype=logits.dtype` rounds them to the logits' dtype, as TRL returns.

    Returns:
        (logprobs, entropy), each of labels' shape: ordinary tensors that may be edited in place.
    """
    logits, labels, temperature, ignore_index, be = _prepare(logits, labels, temperature, ignore_index, backend,
                                                             inplace_backward)
    dtype = V.check_output_dtype(dtype)
    if labels is None:
        raise TypeError("labels must be a torch.Tensor, got None (use entropy_from_logits for entropy alone)")
    return _as(dtype, *LogprobsEntropyFunction.apply(logits, labels, temperature, ignore_index, be,
                                                     inplace_backward))


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_backward: bool = False,
    index: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Token log-probs log softmax(logits / tau)[labels] (eq. 1), shape labels.shape, fp32 unless `dtype`.

    labels: logits.shape[:-1] (one label per position), or logits.shape[:-1] + (K,) with K >= 1 (K labels per
    position, like torch.gather: [B, 1] labels of [B, V] logits give [B, 1]); entries equal to ignore_index
    give 0 and no gradient. The K form reads the logits once (see `aem_kernels.gathered`).
    Drop-in for verl's `logprobs_from_logits(logits, labels, inplace_backward=...)` and TRL's
    `selective_log_softmax(logits, index)` (`index=` is accepted as the labels' name). Other arguments as in
    `logprobs_and_entropy`.
    """
    name = "labels"
    if index is not None:
        if labels is not None:
            raise TypeError("pass the labels either as `labels` or as `index`, not both")
        labels, name = index, "index"
    if labels is None:
        raise TypeError("logprobs_from_logits() needs `labels` (or `index`)")
    logits, labels, temperature, ignore_index, be = _prepare(logits, labels, temperature, ignore_index, backend,
                                                             inplace_backward, allow_k=True, labels_name=name)
    dtype = V.check_output_dtype(dtype)
    if labels.dim() == logits.dim():  # K labels per position
        return _as(dtype, GatheredLogprobsFunction.apply(logits, labels, temperature, ignore_index, be,
                                                         inplace_backward))
    return _as(dtype, LogprobsEntropyFunction.apply(logits, labels, temperature, ignore_index, be,
                                                    inplace_backward, False)[0])


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_backward: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """TRL's `selective_log_softmax(logits, index, temperature, row_mask)`: `logprobs_from_logits(logits,
    index)` with index of shape logits.shape[:-1] or logits.shape[:-1] + (K,). row_mask (index's shape):
    entries where it is 0 give 0 and no gradient, as in TRL. Returns fp32 unless `dtype` (TRL returns the
    logits' dtype: pass dtype=logits.dtype for that)."""
    if row_mask is not None:
        index = V.check_tensor("index", index)
        if not (index.is_floating_point() or index.is_complex() or index.dtype == torch.bool):
            index = index.long()  # any integer width; ignore_index must fit (-100 does not fit uint8)
        row_mask = V.check_tensor("row_mask", row_mask)
        if tuple(row_mask.shape) != tuple(index.shape) or row_mask.device != index.device:
            raise ValueError(f"row_mask must have index's shape {tuple(index.shape)} on {index.device}, got "
                             f"{tuple(row_mask.shape)} on {row_mask.device}")
        index = torch.where(row_mask == 0, V.check_ignore_index(ignore_index), index)
    return logprobs_from_logits(logits, index=index, temperature=temperature, ignore_index=ignore_index,
                                backend=backend, inplace_backward=inplace_backward, dtype=dtype)


def entropy_from_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    inplace_backward: bool = False,
    chunk_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Token entropy of softmax(logits / tau) (eq. 2), shape logits.shape[:-1], fp32 unless `dtype`.

    Drop-in for verl's `entropy_from_logits(logits)` and TRL's `entropy_from_logits(logits, chunk_size=...)`;
    `chunk_size` is accepted for compatibility and unused (every backend bounds its own working set).
    """
    if chunk_size is not None:
        V.check_count("chunk_size", chunk_size)
    logits, _, temperature, _, be = _prepare(logits, None, temperature, -100, backend, inplace_backward)
    dtype = V.check_output_dtype(dtype)
    return _as(dtype, LogprobsEntropyFunction.apply(logits, None, temperature, -100, be, inplace_backward)[1])
