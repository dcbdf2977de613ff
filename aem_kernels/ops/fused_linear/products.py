"""The matrix products of the fused linear's row chunks, one object per way of computing them (`plan.py`
decides which, and says why and how accurate each is):

    WorkProducts     the inputs in the working dtype (fp32; fp64 for fp64 inputs): a half-precision weight is
                     upcast once per pass (one fp32 copy), products are torch.mm in that dtype (the chunked
                     path of CPU and backend="torch", the CUDA plan for fp32/fp64 inputs)
    HalfProducts     the CUDA plan for bf16/fp16: the weight and the hidden rows stay in their dtype, every
                     product has half-precision operands, fp32 accumulation and fp32 output (cuBLAS on the
                     tensor cores via torch.mm(..., out_dtype=torch.float32)); the fp32 gradient of a chunk's
                     logits enters the backward products as SPLIT_PARTS half-precision parts (plan.py)

A row chunk asks its products for:
    operands(weight, bias) -> (w, b)   what the chunks multiply by and add (once per pass)
    rows(x) -> x                       the chunk's gathered hidden rows as a product operand
    logits(x, w, b, out)               out [n, V] (working dtype) = x w^T + b
    parts(dz) -> Parts                 dz [n, V] (the chunk buffer, dL/dz; may be overwritten) as operands
    grad_hidden(parts, w, out)         out [n, H] (working dtype, or None: a new tensor) = dz @ w
    grad_weight(parts, x, dw)          dw [V, H] (working dtype) += dz^T x
`mm(a, b, out)` is HalfProducts' one primitive (a [m, k], b [k, n] half precision -> fp32 out [m, n], fp32
accumulation): `cuda_mm` on CUDA, `emulated_mm` on CPU (the operands upcast, whose products are exact in fp32:
the same numbers class, for the tests), or a recording stand-in in the tests.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, List, NamedTuple, Optional

import torch

from ...capability import half_addmm_accumulates_fp32

__all__ = ["HalfProducts", "Parts", "SPLIT_PARTS", "WorkProducts", "cuda_addmm_into", "cuda_mm",
           "emulated_addmm_into", "emulated_mm", "half_products", "ieee_fp32"]

SPLIT_PARTS = 2      # the fp32 gradient as hi + lo half-precision parts (plan.py: the measured choice)
_FP16_TOP = 13       # fp16 parts: the chunk's largest |dz| scaled into [2^13, 2^14) (fp16 max is ~2^16)


@contextmanager
def ieee_fp32(device: torch.device):
    """fp32 CUDA products in full fp32 (never TF32, which `torch.backends.cuda.matmul.allow_tf32` may allow):
    TF32's 10-bit mantissa would put the logits' error far beyond eager fp32's. (Traced code is left to the
    compiler's own precision settings.)"""
    flags = torch.backends.cuda.matmul
    if device.type != "cuda" or torch.compiler.is_compiling() or not flags.allow_tf32:
        yield
        return
    flags.allow_tf32 = False
    try:
        yield
    finally:
        flags.allow_tf32 = True


class Parts(NamedTuple):
    """dz as product operands: `stacked` [k n, V] (the k parts of n rows, one under the other), the parts
    themselves, and `scale`: dz = scale * sum(parts) (a power of two, exact)."""
    stacked: torch.Tensor
    parts: List[torch.Tensor]
    scale: float


class WorkProducts:
    """Products in the working dtype `work` (fp32 or fp64): what the chunked path always did."""

    tensor_cores = False

    def __init__(self, work: torch.dtype) -> None:
        self.work = work

    def operands(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        return weight.to(self.work), (bias.to(self.work) if bias is not None else None)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.work)

    def logits(self, x, w, b, out):
        with ieee_fp32(out.device):
            torch.mm(x, w.t(), out=out)
        if b is not None:
            out += b
        return out

    def parts(self, dz: torch.Tensor) -> Parts:
        return Parts(dz, [dz], 1.0)

    def grad_hidden(self, parts: Parts, w: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
        with ieee_fp32(w.device):
            return parts.stacked @ w if out is None else torch.mm(parts.stacked, w, out=out)

    def grad_weight(self, parts: Parts, x: torch.Tensor, dw: torch.Tensor,
                    scratch: Optional[torch.Tensor] = None) -> None:
        with ieee_fp32(dw.device):
            dw.addmm_(parts.stacked.t(), x)


def cuda_mm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b for half-precision a, b with fp32 accumulation and output: cuBLAS on the tensor cores."""
    if out is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def emulated_mm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`cuda_mm`'s numbers on CPU: bf16 x bf16 (fp16 x fp16) products are exact in fp32 (8 + 8 or 11 + 11
    significant bits), so upcast operands and an fp32 product give one fp32 rounding per accumulation, as the
    tensor cores' fp32 accumulation does (up to summation order). The upcast copies are the emulation's only."""
    return torch.mm(a.float(), b.float(), out=out)


class HalfProducts:
    """The CUDA plan's products for bf16/fp16 inputs (module docstring; the error analysis is in plan.py).

    dtype: the operands' dtype (bf16 or fp16; the parts'); mm: the half x half -> fp32 product (`cuda_mm`,
    `emulated_mm`, or a test's recorder); accumulate: an `addmm_into(dw, a, b, alpha)` that adds a @ b * alpha
    into the fp32 dw in place (torch.addmm with out_dtype on torches that take an fp32 `self`), or None: then
    dw gets the product in vocab pieces through the spent chunk buffer (`dz`'s storage, free once split), so
    no [V, H] temporary is ever allocated."""

    tensor_cores = True

    def __init__(self, dtype: torch.dtype, mm: Callable, accumulate: Optional[Callable] = None,
                 n_parts: int = SPLIT_PARTS) -> None:
        self.dtype, self.mm, self.accumulate, self.n_parts = dtype, mm, accumulate, n_parts
        self.work = torch.float32

    def operands(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        # the weight as it is (no fp32 copy); the bias, O(V), in fp32 for the one addition per chunk
        return weight, (bias.float() if bias is not None else None)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def logits(self, x, w, b, out):
        self.mm(x, w.t(), out)
        if b is not None:
            out += b
        return out

    def parts(self, dz: torch.Tensor) -> Parts:
        """dz [n, V] fp32 (overwritten: the residual is formed in place) as `n_parts` parts of the operands'
        dtype, each the rounding of what the previous ones left: dz = scale (p_1 + ... + p_k + r)."""
        dtype = self.dtype
        scale = 1.0
        if dtype == torch.float16:   # fp16's range is ~2^-24 .. 2^16: move the chunk's largest |dz| under 2^14
            top = float(dz.abs().max()) if dz.numel() else 0.0   # one host sync per chunk (fp16 only)
            if 0.0 < top < float("inf"):
                # top in [2^(e-1), 2^e) -> [2^13, 2^14); bounded so that fp32 dz never overflows
                exponent = max(-100, min(100, _FP16_TOP + 1 - math.frexp(top)[1]))
                dz.mul_(2.0 ** exponent)
                scale = 2.0 ** -exponent
        stacked = torch.empty(self.n_parts * dz.shape[0], dz.shape[1], dtype=dtype, device=dz.device)
        parts = list(stacked.view(self.n_parts, *dz.shape).unbind(0))
        for k, part in enumerate(parts):
            part.copy_(dz)                    # round to nearest
            if k + 1 < self.n_parts:
                dz.sub_(part)                 # the residual, exact in fp32
        return Parts(stacked, parts, scale)

    def grad_hidden(self, parts: Parts, w: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
        first, rest = parts.parts[0], parts.parts[1:]
        out = self.mm(first, w, out)
        for part in rest:
            if self.accumulate is not None:
                self.accumulate(out, part, w, 1.0)
            else:
                out += self.mm(part, w)       # [n, H], small beside the chunk
        if parts.scale != 1.0:
            out.mul_(parts.scale)
        return out

    def grad_weight(self, parts: Parts, x: torch.Tensor, dw: torch.Tensor, scratch: Optional[torch.Tensor] = None
                    ) -> None:
        # one product over the stacked parts: dz^T x = [p_1; ...; p_k]^T [x; ...; x], so dw is read and
        # written once per chunk, not once per part
        x_k = x.repeat(self.n_parts, 1) if self.n_parts > 1 else x
        if self.accumulate is not None:
            self.accumulate(dw, parts.stacked.t(), x_k, parts.scale)
            return
        vocab, hidden = dw.shape
        piece = max(1, min(vocab, scratch.numel() // hidden)) if scratch is not None else vocab
        for v0 in range(0, vocab, piece):
            v1 = min(vocab, v0 + piece)
            out = scratch[:(v1 - v0) * hidden].view(v1 - v0, hidden) if scratch is not None else None
            dw[v0:v1].add_(self.mm(parts.stacked[:, v0:v1].t(), x_k, out), alpha=parts.scale)


def cuda_addmm_into(dw: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """dw += alpha a @ b in place: half-precision operands, fp32 accumulation into the fp32 dw."""
    torch.addmm(dw, a, b, out_dtype=torch.float32, alpha=alpha, out=dw)


def emulated_addmm_into(dw: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """`cuda_addmm_into`'s numbers on CPU (see `emulated_mm`)."""
    dw.addmm_(a.float(), b.float(), alpha=alpha)


def half_products(device: torch.device, dtype: torch.dtype) -> HalfProducts:
    """HalfProducts for operands of `dtype` on `device`: cuBLAS on CUDA (accumulating in place where torch's
    addmm takes an fp32 `self`, else through the spent chunk buffer), the exact emulation elsewhere."""
    if device.type == "cuda":
        # the probe runs a 1 x 1 product once; a traced call (the vocab-parallel op under torch.compile) takes
        # the vocab pieces instead, which need no probe
        probe = not torch.compiler.is_compiling() and half_addmm_accumulates_fp32(device, dtype)
        accumulate = cuda_addmm_into if probe else None
        return HalfProducts(dtype, cuda_mm, accumulate)
    return HalfProducts(dtype, emulated_mm, emulated_addmm_into)
