"""The C++ CPU backend of the token ops: the backend functions the op's path decision (`ops/logprobs/__init__.py`)
hands out for backend="cpu", over the extension `aem_kernels._C` that `capability.py` loads.

The extension registers `torch.ops.aem_kernels.{logprobs_entropy_fwd, logprobs_entropy_bwd_,
logprobs_entropy_bwd}`; this module adds their fake (meta) implementations so `torch.compile` traces them, and
an autograd formula so the raw forward op is differentiable too. The kernels read each row of logits once in the
forward and once (plus one write, optionally in place) in the backward; see csrc/row_kernels_impl.h for the
math and the vectorisation. Without the extension "auto" takes the torch backend and backend="cpu" raises with
the reason (`capability.cpu_extension_reason`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...capability import cpu_extension
from ...contract import first_order_only
from ...layout import compute_dtype

__all__ = ["DTYPES", "kernel_isa", "logprobs_entropy_fwd", "logprobs_entropy_bwd"]

# What this backend serves (read by the path decision): CPU tensors of every logits dtype, fp64 computed in fp64.
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def kernel_isa() -> Optional[str]:
    """Instruction set of the row kernels in use ("avx2" or "baseline"), None without the extension.
    ATEN_CPU_CAPABILITY=default (torch's own switch) selects the baseline."""
    extension = cpu_extension()
    return extension.kernel_isa() if extension is not None else None


# ---- backend functions (the interface of the path decision) ----------------------------------------------------

def logprobs_entropy_fwd(logits3d: torch.Tensor, labels: Optional[torch.Tensor], temperature: float,
                         ignore_index: int, *, with_entropy: bool = True
                         ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """[B, T, V] logits, labels [B*T] | None -> (logprobs [B*T] | None, entropy [B*T] | None, state [B*T, 2]),
    fp32 (fp64 for fp64 logits); state = (row max of the logits, log d), what `logprobs_entropy_bwd` needs. One
    read of each row. Rows whose label is ignore_index are not read: all outputs are 0 there.
    with_entropy=False runs the kernels without the entropy's sum and returns None for it."""
    logprobs, entropy, state = torch.ops.aem_kernels.logprobs_entropy_fwd(logits3d, labels, float(temperature),
                                                                          int(ignore_index), bool(with_entropy))
    return (logprobs if labels is not None else None), (entropy if with_entropy else None), state


def logprobs_entropy_bwd(logits3d: torch.Tensor, labels: Optional[torch.Tensor], state: torch.Tensor,
                         entropy: torch.Tensor, grad_logprobs: Optional[torch.Tensor],
                         grad_entropy: Optional[torch.Tensor], temperature: float, ignore_index: int,
                         grad_out3d: torch.Tensor) -> torch.Tensor:
    """Writes dL/dlogits (AEM_SPEC section 6) into grad_out3d ([B, T, V], may be logits3d itself) and returns it;
    `state` is what `logprobs_entropy_fwd` returned for these logits."""
    torch.ops.aem_kernels.logprobs_entropy_bwd_(logits3d, labels, state, entropy, grad_logprobs, grad_entropy,
                                                float(temperature), int(ignore_index), grad_out3d)
    return grad_out3d


# ---- fake implementations and autograd formulas of the raw ops ---------------------------------------------

def _register_op_python_parts() -> None:
    lib = "aem_kernels::"

    @torch.library.register_fake(lib + "logprobs_entropy_fwd")
    def _fwd_fake(logits, labels, temperature, ignore_index, with_entropy=True):
        rows = logits.shape[0] * logits.shape[1]
        dtype = compute_dtype(logits.dtype)
        logprobs = logits.new_empty((rows if labels is not None else 0,), dtype=dtype)
        entropy = logits.new_empty((rows if with_entropy else 0,), dtype=dtype)
        return logprobs, entropy, logits.new_empty((rows, 2), dtype=dtype)

    @torch.library.register_fake(lib + "logprobs_entropy_bwd_")
    def _bwd_inplace_fake(logits, labels, state, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
                          grad_out):
        return None

    @torch.library.register_fake(lib + "logprobs_entropy_bwd")
    def _bwd_fake(logits, labels, state, entropy, grad_logprobs, grad_entropy, temperature, ignore_index):
        return logits.new_empty(logits.shape)

    def _fwd_setup(ctx, inputs, output):
        logits, labels, temperature, ignore_index = inputs[:4]
        with_entropy = inputs[4] if len(inputs) > 4 else True
        _, entropy, state = output
        ctx.save_for_backward(logits, labels, state, entropy)
        # The state (row max, log d) is what the backward consumes, not a differentiable output.
        ctx.mark_non_differentiable(state)
        ctx.temperature, ctx.ignore_index, ctx.with_entropy = temperature, ignore_index, with_entropy
        ctx.set_materialize_grads(False)

    @first_order_only  # the C++ backward is not differentiable: double backward raises (aem_kernels.contract)
    def _fwd_backward(ctx, grad_logprobs, grad_entropy, grad_state):
        logits, labels, state, entropy = ctx.saved_tensors
        if not ctx.with_entropy:
            # The entropy output is empty: no gradient reaches it, and without grad_entropy the backward does
            # not read the entropy; zeros of the checked shape stand in.
            grad_entropy, entropy = None, state.new_zeros(state.shape[0])
        grad = torch.ops.aem_kernels.logprobs_entropy_bwd(logits, labels, state, entropy, grad_logprobs,
                                                          grad_entropy, ctx.temperature, ctx.ignore_index)
        return grad, None, None, None, None

    torch.library.register_autograd(lib + "logprobs_entropy_fwd", _fwd_backward, setup_context=_fwd_setup)


if cpu_extension() is not None:
    _register_op_python_parts()
