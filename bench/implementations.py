"""Every implementation the benchmark compares: each backend of ours, and what users would write instead.

Each competitor is written the way its users write it, from the libraries' documented behaviour:

    eager          log_softmax(logits.float()) once, gather the labels, entropy = -sum(p * log p)
    torch.compile  the eager function above under torch.compile (default mode)
    trl            TRL's `selective_log_softmax` (a Python loop over the batch rows: logsumexp per row for
                   fp32, log_softmax per row in the logits' dtype for bf16/fp16) and its
                   `entropy_from_logits` (log_softmax over chunks of 128 flattened rows, in the logits' dtype)
    verl           verl's torch formulas: log-prob = z[y] - logsumexp(z), and
                   entropy = logsumexp(z) - sum(softmax(z) * z), both in the logits' dtype
    liger          Liger-Kernel's cross-entropy with reduction="none", negated, for the log-probs (GPU only);
                   its users take the entropy from verl's formula. Liger writes the logits' gradient into its
                   input during the forward, so when the entropy also needs a gradient (its graph keeps the
                   logits) Liger must run on a copy: that copy is part of what a Liger user pays.
    trl-kernel     TRL's Triton kernel `trl.kernels.logprob_entropy.selective_log_softmax_and_entropy` (one pass
                   for both, fp32 outputs; GPU only); with entropy_grad=False its entropy is detached
    cut-cross-entropy  Apple's CCE; it takes hidden states and the classifier weight, never logits, so it only
                   joins cases whose inputs are hidden states (`input_kind == "hidden"`).
    aem_kernels[cpu]+warm-buffer  (diagnostic, opt-in: the cpu-kernel profile) the C++ forward and backward
                   ops of the cpu backend, the backward writing into a gradient buffer allocated and touched once
                   (as a memory copy's destination is): the kernels' own speed without the first-touch page
                   faults of a fresh N x V buffer that every out-of-place line pays.

Every callable has the signature fn(logits [B, T, V], labels [B, T], entropy_grad: bool) -> (logprobs, entropy)
[B, T]; with entropy_grad=False the entropy is computed without an autograd graph (what a careful user does
when the entropy only feeds a detached statistic, as in AEM's modulation with entropy_coef = 0).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from typing import Callable, Dict, List, Optional, Tuple

import torch

import aem_kernels as ak

from .lines import Implementation, compile_reason, import_reason

Outputs = Tuple[torch.Tensor, torch.Tensor]


def _entropy_context(entropy_grad: bool):
    return contextlib.nullcontext() if entropy_grad else torch.no_grad()


# --- eager PyTorch: the textbook form, upcast once ------------------------------------------------------
def eager_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor, entropy_grad: bool = True) -> Outputs:
    log_probs = torch.log_softmax(logits.float(), dim=-1)          # an fp32 [B, T, V] copy, kept for backward
    picked = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    with _entropy_context(entropy_grad):
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return picked, entropy


# --- TRL: a row loop for the log-probs, 128-row chunks for the entropy ----------------------------------
def trl_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        # one logsumexp per batch row bounds the temporaries to one row of [T, V]
        row_lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - row_lse
    # TRL avoids logsumexp in bf16/fp16 and takes log_softmax row by row in the logits' dtype
    per_row = [torch.log_softmax(row, dim=-1).gather(-1, row_index.unsqueeze(-1)).squeeze(-1)
               for row, row_index in zip(logits, index)]
    return torch.stack(per_row)


def trl_entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    flat = logits.reshape(-1, logits.shape[-1])
    pieces = []
    for chunk in flat.split(chunk_size, dim=0):
        log_p = torch.log_softmax(chunk, dim=-1)
        pieces.append(-(log_p.exp() * log_p).sum(-1))
    return torch.cat(pieces).reshape(logits.shape[:-1])


def trl_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor, entropy_grad: bool = True) -> Outputs:
    logprobs = trl_selective_log_softmax(logits, labels)
    with _entropy_context(entropy_grad):
        entropy = trl_entropy_from_logits(logits)
    return logprobs, entropy


# --- verl: the logsumexp formulas of verl.utils.torch_functional ----------------------------------------
def verl_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def verl_entropy(logits: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def verl_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor, entropy_grad: bool = True) -> Outputs:
    logprobs = verl_logprobs(logits, labels)
    with _entropy_context(entropy_grad):
        entropy = verl_entropy(logits)
    return logprobs, entropy


# --- Liger-Kernel: cross-entropy (reduction="none") as the log-prob path ---------------------------------
_LIGER_LOSS = None


def liger_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor, entropy_grad: bool = True) -> Outputs:
    global _LIGER_LOSS
    if _LIGER_LOSS is None:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        _LIGER_LOSS = LigerCrossEntropyLoss(reduction="none")
    with _entropy_context(entropy_grad):
        entropy = verl_entropy(logits)        # first: Liger's forward overwrites its input with the gradient
    rows = logits.reshape(-1, logits.shape[-1])
    if entropy_grad and torch.is_grad_enabled() and logits.requires_grad:
        rows = rows.clone()                   # the entropy's graph holds the logits; keep them intact
    logprobs = -_LIGER_LOSS(rows, labels.reshape(-1))
    return logprobs.view(labels.shape), entropy


# --- TRL's own Triton kernel (trl >= 1.16): log-probs and entropies of the logits in one pass ------------
def trl_kernel_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor, entropy_grad: bool = True) -> Outputs:
    from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

    logprobs, entropy = selective_log_softmax_and_entropy(logits, labels)
    return logprobs, (entropy if entropy_grad else entropy.detach())


# --- Cut-Cross-Entropy: hidden states + classifier -> log-probs (for hidden-state cases) -----------------
def cce_logprobs_from_hidden(hidden: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(hidden, classifier, labels, reduction="none")


# --- ours -------------------------------------------------------------------------------------------------
def _ours(backend: str, inplace: bool) -> Callable[..., Outputs]:
    def logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor, entropy_grad: bool = True) -> Outputs:
        # our backward skips the entropy term when no gradient reaches it, whatever entropy_grad says
        return ak.logprobs_and_entropy(logits, labels, backend=backend, inplace_backward=inplace)

    return logprobs_entropy


class _WarmBufferLogprobsEntropy(torch.autograd.Function):
    """The cpu backend's raw forward and backward ops; the backward writes dL/dlogits into one persistent
    buffer per shape (allocated and touched on first use), so the timing shows the kernels without the page
    faults of a fresh buffer. Not for users: the returned gradient is overwritten by the next call."""

    _buffer: Dict[tuple, torch.Tensor] = {}

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor):
        from aem_kernels.ops.logprobs import cpu

        rows3d = logits.detach().reshape(1, -1, logits.shape[-1])
        flat_labels = labels.reshape(-1)
        logprobs, entropy, state = cpu.logprobs_entropy_fwd(rows3d, flat_labels, 1.0, -100)
        ctx.save_for_backward(rows3d, flat_labels, state, entropy)
        ctx.shape = logits.shape
        return logprobs.view(labels.shape), entropy.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        from aem_kernels.ops.logprobs import cpu

        rows3d, flat_labels, state, entropy = ctx.saved_tensors
        key = (tuple(rows3d.shape), rows3d.dtype)
        if key not in _WarmBufferLogprobsEntropy._buffer:
            _WarmBufferLogprobsEntropy._buffer.clear()      # one buffer at a time: the current point's
            _WarmBufferLogprobsEntropy._buffer[key] = torch.zeros_like(rows3d)
        grad = _WarmBufferLogprobsEntropy._buffer[key]
        flat = lambda g: None if g is None else g.reshape(-1).float().contiguous()  # noqa: E731
        cpu.logprobs_entropy_bwd(rows3d, flat_labels, state, entropy, flat(grad_logprobs), flat(grad_entropy), 1.0,
                                 -100, grad)
        return grad.view(ctx.shape), None


def warm_buffer_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor, entropy_grad: bool = True) -> Outputs:
    if not (torch.is_grad_enabled() and logits.requires_grad):
        from aem_kernels.ops.logprobs import cpu

        with torch.no_grad():
            logprobs, entropy, _ = cpu.logprobs_entropy_fwd(logits.reshape(1, -1, logits.shape[-1]),
                                                            labels.reshape(-1), 1.0, -100)
        return logprobs.view(labels.shape), entropy.view(labels.shape)
    return _WarmBufferLogprobsEntropy.apply(logits, labels)


def competitor_versions() -> Dict[str, Optional[str]]:
    """Installed versions of the competitor packages (from their metadata: importing verl would start Ray)."""
    versions = {}
    for dist in ("liger-kernel", "cut-cross-entropy", "trl", "verl"):
        try:
            versions[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist.replace("-", "_")] = None
    return versions


_COMPILED: Dict[str, Callable[..., Outputs]] = {}


def compiled_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor, entropy_grad: bool = True) -> Outputs:
    """torch.compile of the eager function, one wrapper per process: dynamo specialises it per shape, dtype
    and grad mode (and marks N and V dynamic once they change), so each new point may compile again."""
    if "eager" not in _COMPILED:
        # a sweep visits more (shape, dtype, grad mode) variants than dynamo's default limit of 8; past the
        # limit dynamo would silently run the eager function and the line would time eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        _COMPILED["eager"] = torch.compile(eager_logprobs_entropy)
    return _COMPILED["eager"](logits, labels, entropy_grad)


def our_implementations(device: torch.device) -> List[Implementation]:
    """One line per backend of ours (and its in-place-backward variant), available or with the reason."""
    lines = []
    for backend, reason in ak.available_backends(device).items():
        not_timed = None
        if reason is None and backend == "triton" and device.type != "cuda":
            not_timed = ("Triton on CPU tensors runs in the interpreter (TRITON_INTERPRET=1), a correctness tool "
                         "whose speed means nothing")
        for inplace in (False, True):
            suffix = "+inplace" if inplace else ""
            lines.append(Implementation(
                name=f"aem_kernels[{backend}]{suffix}",
                description=f"ak.logprobs_and_entropy(..., backend='{backend}'"
                            + (", inplace_backward=True)" if inplace else ")"),
                fn=_ours(backend, inplace) if reason is None else None,
                unavailable=reason, ours=True, backend=backend, inplace=inplace,
                mutates_inputs=inplace, backward_only=inplace, not_timed=not_timed))
    if ak.available_backends(device)["cpu"] is None:
        lines.append(Implementation(
            name="aem_kernels[cpu]+warm-buffer",
            description="the cpu backend's C++ forward/backward ops, the gradient written into a buffer touched "
                        "before (no first-touch page faults); diagnostic",
            fn=warm_buffer_logprobs_entropy, backend="cpu", backward_only=True,
            opt_in="a diagnostic line (the C++ kernels without the page faults of a fresh gradient buffer); "
                   "the cpu-kernel profile runs it"))
    return lines


def competitor_implementations(device: torch.device) -> List[Implementation]:
    on_gpu = device.type == "cuda"
    no_gpu = "needs a CUDA device (Triton kernels)"
    liger_reason = None if on_gpu else no_gpu
    liger_reason = liger_reason or import_reason("liger_kernel", "gpu-bench")
    cce_reason = None if on_gpu else no_gpu
    cce_reason = cce_reason or import_reason("cut_cross_entropy", "gpu-bench")
    trl_reason = (None if on_gpu else no_gpu) or import_reason("trl.kernels.logprob_entropy", "trl")
    return [
        Implementation("eager", "log_softmax(logits.float()) + gather + -(p log p).sum(-1), autograd",
                       eager_logprobs_entropy),
        Implementation("torch.compile", "torch.compile(eager) (default mode); compile time reported apart",
                       None if compile_reason(device) else compiled_logprobs_entropy, unavailable=compile_reason(device),
                       compiled=True),
        Implementation("trl", "TRL selective_log_softmax (row loop) + entropy_from_logits (128-row chunks)",
                       trl_logprobs_entropy),
        Implementation("verl", "verl torch formulas: z[y] - logsumexp(z); logsumexp(z) - sum(softmax(z) z)",
                       verl_logprobs_entropy),
        Implementation("liger", "-LigerCrossEntropyLoss(reduction='none') + verl entropy formula",
                       liger_logprobs_entropy if liger_reason is None else None, unavailable=liger_reason,
                       mutates_inputs=True),
        Implementation("trl-kernel", "TRL's Triton selective_log_softmax_and_entropy (one pass, fp32 outputs)",
                       trl_kernel_logprobs_entropy if trl_reason is None else None, unavailable=trl_reason),
        Implementation("cut-cross-entropy", "-linear_cross_entropy(hidden, classifier, labels, reduction='none')",
                       cce_logprobs_from_hidden if cce_reason is None else None, unavailable=cce_reason,
                       input_kind="hidden"),
    ]


def reference_implementation(lines: List[Implementation]) -> Implementation:
    """The line (of `lines`, the same object) every other line is checked against: our torch backend (fp32
    math, no in-place tricks), itself checked against the fp64 reference by the test suite."""
    return next(impl for impl in lines if impl.ours and impl.backend == "torch" and not impl.inplace)
