"""Input validation shared by every backend: one place that names the argument and what was expected.

Shape, dtype and device checks are free (metadata only) and always run. Value checks (labels in range,
ids in range, NaN in advantages) need one reduction and a host sync; they run by default and are skipped
inside `torch.compile` tracing, during CUDA-graph capture, inside `skip_value_checks()`, or when the
environment variable AEM_KERNELS_CHECK_VALUES=0 (for users who validated upstream and want no syncs).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Iterator, Optional, Sequence

import torch

from .config import AEMConfig

_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_DTYPES = _LOGIT_DTYPES
_state = threading.local()


@contextlib.contextmanager
def skip_value_checks() -> Iterator[None]:
    """Context manager that skips the value checks that need a host sync (shape/dtype checks stay on)."""
    previous = getattr(_state, "skip", False)
    _state.skip = True
    try:
        yield
    finally:
        _state.skip = previous


def value_checks_enabled(*tensors: torch.Tensor) -> bool:
    if getattr(_state, "skip", False) or os.environ.get("AEM_KERNELS_CHECK_VALUES", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_logits(logits: object, name: str = "logits") -> torch.Tensor:
    logits = check_tensor(name, logits)
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have shape [..., V] with at least one dimension, got a 0-d tensor")
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a vocabulary dimension V >= 1, got shape {tuple(logits.shape)}")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride along the vocabulary (last) dimension, got strides "
                         f"{logits.stride()}; call .contiguous() first")
    return logits


def check_integer_tensor(name: str, value: object, shape: Optional[Sequence[int]], device: torch.device,
                         expected: str) -> torch.Tensor:
    value = check_tensor(name, value)
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise TypeError(f"{name} must be an integer tensor ({expected}), got {value.dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({expected}), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, the other inputs on {device}; put them on one device")
    return value


def check_labels(labels: object, logits: torch.Tensor, ignore_index: int, name: str = "labels", *,
                 allow_k: bool = False) -> torch.Tensor:
    """Labels of shape logits.shape[:-1] (or, with allow_k, logits.shape[:-1] + (K,), K >= 1: K labels per
    position, TRL's index form), values in [0, V) or == ignore_index, any integer dtype; returned as int64."""
    vocab = logits.shape[-1]
    expected = f"logits.shape[:-1], values in [0, {vocab}) or ignore_index"
    shape = tuple(logits.shape[:-1])
    if allow_k:
        labels = check_tensor(name, labels)
        expected = (f"logits.shape[:-1] = {shape} or logits.shape[:-1] + (K,) = {shape + ('K',)} with K >= 1, "
                    f"values in [0, {vocab}) or ignore_index")
        if labels.dim() == logits.dim() and tuple(labels.shape[:-1]) == shape and labels.shape[-1] >= 1:
            shape = tuple(labels.shape)
    labels = check_integer_tensor(name, labels, shape, logits.device, expected)
    if labels.numel() and value_checks_enabled(labels):
        bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
        if bool(bad.any()):
            example = int(labels[bad].flatten()[0])
            raise ValueError(f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                             f"found {example} ({int(bad.sum())} bad entries)")
    # int64 once here, so that every backend sees the same labels (torch's gather takes int64/int32 only; a
    # narrow dtype that cannot hold ignore_index simply has no ignored entry). A no-op for int64 labels.
    return labels.long()


def check_output_dtype(dtype: object) -> Optional[torch.dtype]:
    """None (fp32 outputs; fp64 for fp64 logits) or the floating dtype the caller wants the outputs in."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be None or a torch.dtype, got {type(dtype).__name__}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be None, torch.float16, torch.bfloat16, torch.float32 or torch.float64, "
                        f"got {dtype}")
    return dtype


def check_index_map(name: str, ids: object, shape: Optional[Sequence[int]], device: torch.device, *,
                    upper: Optional[int], allow_untrained: bool) -> torch.Tensor:
    """An id map with values in [0, upper) (or -1 when `allow_untrained`); upper=None: no upper bound."""
    low = -1 if allow_untrained else 0
    span = f"values in [{low}, {upper})" if upper is not None else f"values >= {low}"
    ids = check_integer_tensor(name, ids, shape, device, span)
    if ids.numel() and value_checks_enabled(ids):
        bad = ids < low
        if upper is not None:
            bad |= ids >= upper
        if bool(bad.any()):
            raise ValueError(f"{name} must have {span}; found {int(ids[bad].flatten()[0])}")
    return ids.long()


def check_float_tensor(name: str, value: object, shape: Optional[Sequence[int]], device: torch.device,
                       *, allow_nonfinite: bool = False) -> torch.Tensor:
    value = check_tensor(name, value)
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, the other inputs on {device}; put them on one device")
    if not allow_nonfinite and value.numel() and value_checks_enabled(value):
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            raise ValueError(f"{name} contains {int((~finite).sum())} NaN or infinite entries")
    return value


def check_temperature(temperature: object) -> float:
    """tau > 0 as a Python float. A one-element tensor is read once (a host sync), unless it requires grad: no
    op here differentiates with respect to tau, and a tensor that asks for a gradient must not silently get
    none (`aem_kernels.contract`, point 3)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.requires_grad:
            raise TypeError("temperature must be a float (or a tensor that does not require grad): no gradient "
                            "flows to the temperature, got a tensor with requires_grad=True; pass "
                            "temperature.detach() or float(temperature) to treat it as a constant")
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got a tensor of shape {tuple(temperature.shape)}")
        temperature = float(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature}")
    return float(temperature)


def check_ignore_index(ignore_index: object) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def check_count(name: str, value: object) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[object]) -> object:
    """`value` must be one of `choices` (e.g. backend names)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_config(config: object) -> AEMConfig:
    """An `AEMConfig` (every field was validated when it was built)."""
    if not isinstance(config, AEMConfig):
        raise TypeError(f"config must be an AEMConfig, got {type(config).__name__}")
    return config


def check_optional_bool(name: str, value: object) -> Optional[bool]:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None or a bool, got {type(value).__name__}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_mask(name: str, mask: object, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """A bool mask of `shape` on `device`; 0/1 integer or float masks (as verl passes them) become bool."""
    mask = check_tensor(name, mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the logits are on {device}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() and value_checks_enabled(mask) and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} must hold only 0 and 1")
        mask = mask != 0
    return mask


def check_bool_tensor(name: str, value: object, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """A bool tensor of exactly `shape` on `device` (no conversion)."""
    value = check_tensor(name, value)
    if value.dtype != torch.bool or tuple(value.shape) != tuple(shape) or value.device != device:
        raise ValueError(f"{name} must be a bool tensor of shape {tuple(shape)} on {device}, got {value.dtype} "
                         f"{tuple(value.shape)} on {value.device}")
    return value
