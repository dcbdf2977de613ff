"""Public token ops: the autograd Function over all backends, and the drop-in functions built on it.

`LogprobsEntropyFunction` computes (eq. 1-2) per row of logits and saves only O(N) state (the backend's per-row
state, entropy) plus a reference to the logits. Its backward is the section-6 formula evaluated by the chosen
backend in one read of the logits and one write of the gradient (optionally into the logits' own storage),
never autograd through a softmax copy.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _validation as V
from ._layout import as_rows3d, gradient_buffer
from .dispatch import Backend, resolve_backend
from .gathered import GatheredLogprobsFunction
from .reductions import segment_count, segment_sum

__all__ = [
    "LogprobsEntropyFunction",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "entropy_from_logits",
    "selective_log_softmax",
    "response_surprisal",
    "response_entropy",
]


class LogprobsEntropyFunction(torch.autograd.Function):
    """(logits [..., V], labels [...] | None) -> (logprobs [...], entropy [...]); see module docstring."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: Optional[torch.Tensor], temperature: float, ignore_index: int,
                backend: Backend, inplace_backward: bool, with_entropy: bool = True):
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
        logits3d = as_rows3d(logits)
        buffer = gradient_buffer(logits, inplace=inplace_backward, rows3d=logits3d)
        flat = (lambda g: g.reshape(-1).contiguous() if g is not None else None)
        backend.backward(logits3d, labels, state, entropy, flat(grad_logprobs), flat(grad_entropy), temperature,
                         ignore_index, buffer.rows3d)
        return (buffer.finish(),) + rest


def _prepare(logits, labels, temperature, ignore_index, backend, allow_k=False, labels_name="labels"):
    logits = V.check_logits(logits)
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
        backend: "auto", "triton", "cpu" or "torch" (see `aem_kernels.dispatch`).
        inplace_backward: write the logits' gradient into the logits' own storage (the logits must not be
            needed after the backward); peak memory stays at one N x V buffer.
        dtype: the outputs' dtype; None (default) keeps the fp32 math's result (fp64 for fp64 logits), also
            for half-precision logits; `dtype=logits.dtype` rounds them to the logits' dtype, as TRL returns.

    Returns:
        (logprobs, entropy), each of labels' shape: ordinary tensors that may be edited in place.
    """
    logits, labels, temperature, ignore_index, be = _prepare(logits, labels, temperature, ignore_index, backend)
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
                                                             allow_k=True, labels_name=name)
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
    logits, _, temperature, _, be = _prepare(logits, None, temperature, -100, backend)
    dtype = V.check_output_dtype(dtype)
    return _as(dtype, LogprobsEntropyFunction.apply(logits, None, temperature, -100, be, inplace_backward)[1])


def _segment_inputs(name: str, values, token_response, num_responses):
    values = V.check_tensor(name, values)
    if not values.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {values.dtype}")
    num_responses = V.check_count("num_responses", num_responses)
    token_response = V.check_index_map("token_response", token_response, values.shape, values.device,
                                       upper=num_responses, allow_untrained=True)
    return values, token_response, num_responses


def _reduce(values, token_response, num_responses, reduction):
    # the reductions module picks the implementation for the device (see dispatch.resolve_segment_sum)
    if reduction == "sum":
        return segment_sum(values, token_response, num_responses)
    if reduction == "mean":  # an empty response has mean 0
        counts = segment_count(token_response, num_responses).clamp(min=1).to(values.dtype)
        return segment_sum(values, token_response, num_responses) / counts
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def response_surprisal(token_logprobs: torch.Tensor, token_response: torch.Tensor, num_responses: int, *,
                       reduction: str = "mean") -> torch.Tensor:
    """Response surprisal (eq. 3): S_r = -sum_{t in r} l_t ("sum") or s_r = S_r / L_r ("mean").

    Args:
        token_logprobs: [N] float (any shape; token_response must match it).
        token_response: [N] int, the response of each token, -1 for untrained tokens.
        num_responses: R.
    Returns:
        [R] in token_logprobs' dtype; an empty response (L_r = 0) gives 0. Differentiable.
    """
    values, token_response, num_responses = _segment_inputs("token_logprobs", token_logprobs, token_response,
                                                            num_responses)
    return _reduce(-values, token_response, num_responses, reduction)


def response_entropy(token_entropy: torch.Tensor, token_response: torch.Tensor, num_responses: int, *,
                     reduction: str = "mean") -> torch.Tensor:
    """Response entropy (eq. 3'): H_r = (1/L_r) sum_{t in r} h_t ("mean", the paper's proxy) or the sum.

    Shapes and the empty-response convention as in `response_surprisal`.
    """
    values, token_response, num_responses = _segment_inputs("token_entropy", token_entropy, token_response,
                                                            num_responses)
    return _reduce(values, token_response, num_responses, reduction)
