"""Fused linear + log-prob/entropy: per-token log-probs (eq. 1), entropies (eq. 2) and the AEM policy loss
(sections 4-5) straight from hidden states and the classifier (LM head) weight, never building the logits.

At 150k-token vocabularies the logits dominate an RL step's memory (N = 16k tokens x V = 152k is 5 GB in
bf16, its fp32 softmax and gradient as much again). Here the logits exist only as tiles (Triton,
`ops/fused_linear.py`) or row chunks of a bounded budget (CPU and backend="torch", `_chunked_linear.py`),
recomputed in the backward, which yields the gradients of the hidden states, the weight and the bias
(section 6 chained through z = (hidden @ W^T + b) / tau):

    dL/dhidden = G W,   dL/dW = G^T hidden,   dL/db = sum_t G_t,   G_t = [a_t (onehot(y_t) - p_t) - b_t p_t (log p_t + h_t)] / tau

The values equal `logprobs_and_entropy(hidden @ weight.T + bias, labels)` computed in fp32 from the same
inputs (fp32 accumulation for bf16/fp16 inputs, as eager fp32 does after upcasting them), within the
package's accuracy rule. The backend is chosen once, in `dispatch.resolve_fused_linear_backend`.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import _validation as V
from .config import AEMConfig
from .dispatch import resolve_fused_linear_backend
from .loss import _loss_batch, _loss_from_token_terms

__all__ = ["FusedLinearLogprobsEntropyFunction", "fused_linear_logprobs_and_entropy", "fused_linear_aem_policy_loss"]

_HIDDEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class FusedLinearLogprobsEntropyFunction(torch.autograd.Function):
    """(hidden2d [N, H], weight [V, H], bias [V] | None, labels [N]) -> (logprobs [N], entropy [N] | None)."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels, temperature, ignore_index, with_entropy, backend, options):
        deterministic, budget, shape = options
        logprobs, entropy, saved = backend.forward(hidden2d, weight, bias, labels, temperature, ignore_index,
                                                   with_entropy, budget=budget)
        ctx.save_for_backward(hidden2d, weight, bias, labels, entropy)
        ctx.saved = saved   # the backend's own O(N) state, opaque here
        ctx.config = (temperature, ignore_index, with_entropy, backend, deterministic)
        ctx.set_materialize_grads(False)
        # O(N) private copies in labels' shape, not views: users edit their log-probs in place (masked_fill_),
        # and such an edit must not reach the entropy (or backend state) saved above.
        return logprobs.reshape(shape).clone(), (entropy.reshape(shape).clone() if entropy is not None else None)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden2d, weight, bias, labels, entropy = ctx.saved_tensors
        temperature, ignore_index, with_entropy, backend, deterministic = ctx.config
        if not with_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 9
        flat = (lambda g: g.reshape(-1).contiguous() if g is not None else None)  # noqa: E731 (labels' shape in)
        needs = tuple(ctx.needs_input_grad[:3])
        grads = backend.backward(hidden2d, weight, bias, labels, ctx.saved, entropy, flat(grad_logprobs),
                                 flat(grad_entropy), temperature, ignore_index, needs, deterministic)
        return (*grads, None, None, None, None, None, None)


def _check_linear(hidden: object, weight: object, bias: object) -> Tuple[torch.Tensor, torch.Tensor,
                                                                        Optional[torch.Tensor]]:
    """hidden [..., H], weight [V, H], bias [V] | None of one floating dtype on one device."""
    hidden = V.check_tensor("hidden", hidden)
    weight = V.check_tensor("weight", weight)
    if hidden.dtype not in _HIDDEN_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    width = hidden.shape[-1]
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H] = [V, {width}] (the LM head's weight), got "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != width:
        raise ValueError(f"weight must have shape [V, H] with H = hidden.shape[-1] = {width}, got "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have a vocabulary dimension V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}; put them on one device")
    if bias is not None:
        bias = V.check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}; put them on one device")
    return hidden, weight, bias


def _logits_like(hidden: torch.Tensor, vocab: int) -> torch.Tensor:
    """A zero-stride stand-in with the logits' shape [..., V] and device, for the shape and label checks
    that the logits-based functions share (one element of memory, never read)."""
    return hidden.new_zeros(()).expand(*hidden.shape[:-1], vocab)


def _check_budget(budget: object) -> Optional[int]:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"chunk_budget_bytes must be None or a positive int (bytes), got {budget!r}")
    return budget


def _apply(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend, deterministic, budget):
    be = resolve_fused_linear_backend(backend, hidden.device, hidden.dtype)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    return FusedLinearLogprobsEntropyFunction.apply(
        hidden2d, weight, bias, labels.reshape(-1), temperature, ignore_index, with_entropy, be,
        (deterministic, budget, labels.shape))


def fused_linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = True,
    backend: str = "auto",
    deterministic: bool = False,
    chunk_budget_bytes: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token log-probs (eq. 1) and entropies (eq. 2) of the logits hidden @ weight.T + bias, never built.

    Args:
        hidden: [..., H] fp32/bf16/fp16 (fp64 for checks), any strides.
        weight: [V, H] of hidden's dtype and device (e.g. `model.lm_head.weight`, tied embeddings alike).
        labels: hidden.shape[:-1], integer, values in [0, V) or `ignore_index`.
        bias: [V] or None.
        temperature: tau > 0; the logits are divided by it.
        ignore_index: positions with this label give 0 and no gradient (and cost no matmul on the CPU path).
        with_entropy: False skips the entropy work (Triton: its statistics and its backward term; chunked
            path: its backward term) and returns None for it (not zeros that could be mistaken for values).
        backend: "auto" (Triton on CUDA, the chunked C++ path on CPU), "triton", "cpu", "torch"; see
            `dispatch.resolve_fused_linear_backend`.
        deterministic: Triton only: separate dH and dW passes instead of atomics (bit-identical run to run);
            the chunked path is always deterministic.
        chunk_budget_bytes: CPU / torch paths: bytes of the fp32 logits buffer, a row chunk for fp32/fp64
            (default: 1/16 of the logits in the inputs' dtype, clamped to [16 MiB, 1 GiB]; `_chunked_linear.py`),
            a vocab block for bf16/fp16 (default 1/64, within [1 MiB, 256 MiB]; `_blocked_linear.py`).

    Returns:
        (logprobs, entropy | None), each of labels' shape, fp32 (fp64 for fp64 inputs); differentiable with
        respect to hidden, weight and bias.
    """
    hidden, weight, bias = _check_linear(hidden, weight, bias)
    temperature = V.check_temperature(temperature)
    ignore_index = V.check_ignore_index(ignore_index)
    labels = V.check_labels(labels, _logits_like(hidden, weight.shape[0]), ignore_index)
    with_entropy = V.check_bool("with_entropy", with_entropy)
    deterministic = V.check_bool("deterministic", deterministic)
    budget = _check_budget(chunk_budget_bytes)
    return _apply(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend, deterministic,
                  budget)


def fused_linear_aem_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    token_response: Optional[torch.Tensor] = None,
    response_group: torch.Tensor,
    old_logprobs: Optional[torch.Tensor] = None,
    old_entropy: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    config: AEMConfig = AEMConfig(),
    backend: str = "auto",
    response_mask: Optional[torch.Tensor] = None,
    turn_ids: Optional[torch.Tensor] = None,
    advantage_level: str = "auto",
    num_groups: Optional[int] = None,
    inplace_backward: bool = False,
    single_pass: Optional[bool] = None,
    dp_size: int = 1,
    batch_num_tokens: Optional[float] = None,
    global_batch_size: Optional[float] = None,
    loss_scale_factor: Optional[float] = None,
    process_group=None,
    deterministic: bool = False,
    chunk_budget_bytes: Optional[int] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """`aem_policy_loss` of the logits hidden @ weight.T + bias, computed without building them.

    Every input form (packed `token_response`, padded `response_mask` / `turn_ids` with hidden [B, T, H]),
    option and metric is that of `aem_policy_loss`; the per-token log-probs and entropies come from
    `fused_linear_logprobs_and_entropy` and feed the same loss code. `inplace_backward` is accepted for
    signature compatibility and changes nothing (the chunk buffers are always overwritten by their gradient);
    `single_pass=True` raises (the single-pass kernel reads materialised logits). `deterministic` and
    `chunk_budget_bytes` as in `fused_linear_logprobs_and_entropy`; verl's global normalisers (`dp_size`,
    `batch_num_tokens`, `global_batch_size`, `loss_scale_factor`) and `process_group` as in `aem_policy_loss`.
    """
    config = V.check_config(config)
    hidden, weight, bias = _check_linear(hidden, weight, bias)
    V.check_bool("inplace_backward", inplace_backward)
    if V.check_optional_bool("single_pass", single_pass):
        raise ValueError("single_pass=True cannot apply: the single-pass kernel reads materialised logits; the "
                         "fused linear loss computes them tile by tile in two passes")
    deterministic = V.check_bool("deterministic", deterministic)
    budget = _check_budget(chunk_budget_bytes)
    batch = _loss_batch(_logits_like(hidden, weight.shape[0]), labels, advantages, config,
                        token_response=token_response, response_group=response_group, response_mask=response_mask,
                        turn_ids=turn_ids, old_logprobs=old_logprobs, old_entropy=old_entropy,
                        ref_logprobs=ref_logprobs, advantage_level=advantage_level, num_groups=num_groups,
                        dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                        loss_scale_factor=loss_scale_factor, process_group=process_group)
    logprobs, entropy = _apply(hidden, weight, bias, batch.labels, config.temperature, config.ignore_index, True,
                               backend, deterministic, budget)
    return _loss_from_token_terms(batch, logprobs.reshape(-1), entropy.reshape(-1), config)
