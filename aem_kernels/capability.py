"""What this machine has, in one leaf that every op's path decision reads (as fla's `ops/backends` and Liger's
`backends/capability.py` do): whether Triton is importable and may run on the tensor's device, and whether the
C++ extension `aem_kernels._C` (built by setup.py from csrc/) is loaded, each with the reason when it is not.

It also says what the fused linear's CUDA plan reads of torch (`ops/fused_linear/plan.py`): whether torch.mm
takes `out_dtype` (half-precision operands, fp32 output) on a device type, and whether torch.addmm then
accumulates into an fp32 matrix. It imports nothing of the package, compiles nothing and never warns. The
extension is loaded here, once, at import (AEM_KERNELS_DISABLE_CPU_EXT=1 leaves it unloaded); `ops/logprobs/cpu.py` and `ops/segment/cpu.py` add
the Python parts of its ops (fake implementations, autograd formulas). What each backend serves of dtypes is
declared by the backend modules themselves (their `DTYPES`).
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Optional

import torch

__all__ = ["TRITON_DTYPES", "TRITON_FOUND", "TRITON_FP64_REASON", "cpu_extension", "cpu_extension_reason",
           "dtype_name", "half_addmm_accumulates_fp32", "half_mm_fp32_out", "triton_interpreting",
           "triton_reason"]

# Looked up once without importing Triton (cheap at import, and a plain constant for torch.compile to trace).
TRITON_FOUND = importlib.util.find_spec("triton") is not None
# What the Triton kernels serve, declared here because their modules cannot be imported without Triton.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_FP64_REASON = ('the Triton kernels compute in fp32, so they do not serve fp64 logits; use backend="auto" '
                      '(the C++ kernels on CPU tensors, the torch backend elsewhere, both computing in fp64) or '
                      'backend="torch"')


def triton_interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1: CPU tensors, slow and exact)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on tensors of `device` (None when they can)."""
    if not TRITON_FOUND:
        return "Triton is not installed (pip install triton, or a CUDA build of torch that ships it)"
    if device.type != "cuda" and not triton_interpreting():
        return (f"the Triton kernels need CUDA tensors; got a tensor on {device}. Set TRITON_INTERPRET=1 "
                "before importing aem_kernels to run them in Triton's (slow) interpreter on CPU tensors")
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _load_extension():
    if os.environ.get("AEM_KERNELS_DISABLE_CPU_EXT", "0") == "1":
        return None, "disabled by AEM_KERNELS_DISABLE_CPU_EXT=1"
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        if importlib.util.find_spec(__name__.rsplit(".", 1)[0] + "._C") is None:  # never built
            return None, ("the C++ extension aem_kernels._C is not built (installed without a C++ compiler or "
                          "with AEM_KERNELS_NO_EXTENSION=1); reinstall with `pip install --no-build-isolation "
                          "-e .` where torch and a C++ compiler are present")
        return None, f"the C++ extension aem_kernels._C failed to load ({exc}); rebuild it for this torch"
    return _C, None


_EXTENSION, _EXTENSION_REASON = _load_extension()


def cpu_extension() -> Optional[ModuleType]:
    """The loaded extension module, or None."""
    return _EXTENSION


def cpu_extension_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why the C++ kernels cannot run (on tensors of `device`, when given); None when they can."""
    if device is not None and device.type != "cpu":
        return f"the C++ kernels run on CPU tensors; got a tensor on {device}"
    return _EXTENSION_REASON


def _has_kernel(op: str, dispatch_key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key))
    except (AttributeError, RuntimeError):   # an older torch without the overload or the lookup
        return False


# Looked up once at import (a registry lookup, no kernel run; a plain constant for torch.compile to trace).
_HALF_MM_FP32_OUT = {"cuda": _has_kernel("aten::mm.dtype", "CUDA"), "cpu": _has_kernel("aten::mm.dtype", "CPU")}


def half_mm_fp32_out(device_type: str) -> bool:
    """Whether torch.mm(a, b, out_dtype=torch.float32) runs for fp16/bf16 a, b on `device_type` ("cuda", "cpu"):
    the `aten::mm.dtype` overload with a kernel for that device (CUDA only, from torch 2.8 on: cuBLAS with
    fp32 output and fp32 accumulation)."""
    return _HALF_MM_FP32_OUT.get(device_type, False)


_ADDMM_FP32: dict = {}


def half_addmm_accumulates_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.addmm(c, a, b, out_dtype=torch.float32, out=c) adds half-precision products into an fp32
    matrix c on `device` (newer torch: `self` may have out_dtype; older: `self` must have the operands'
    dtype). Probed once per device type and dtype on 1 x 1 tensors, then cached."""
    key = (device.type, dtype)
    if key not in _ADDMM_FP32:
        ok = False
        if half_mm_fp32_out(device.type):
            try:
                c = torch.ones(1, 1, dtype=torch.float32, device=device)
                one = torch.ones(1, 1, dtype=dtype, device=device)
                torch.addmm(c, one, one, out_dtype=torch.float32, out=c)
                ok = float(c[0, 0]) == 2.0
            except (RuntimeError, TypeError):
                ok = False
        _ADDMM_FP32[key] = ok
    return _ADDMM_FP32[key]
