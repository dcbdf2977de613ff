"""Fused linear + log-prob/entropy: per-token log-probs (eq. 1), entropies (eq. 2) and the AEM policy loss
(sections 4-5) straight from hidden states and the classifier (LM head) weight, never building the logits.

At 150k-token vocabularies the logits dominate an RL step's memory (N = 16k tokens x V = 152k is 5 GB in
bf16, its fp32 softmax and gradient as much again). Here the logits exist only as tiles (Triton,
`ops/fused_linear.py`), row chunks of a bounded budget (CPU and backend="torch" for fp32/fp64,
`_chunked_linear.py`) or vocab blocks (the same for bf16/fp16, `_blocked_linear.py`: no fp32 copy of the
weight), recomputed in the backward, which yields the gradients of the hidden states, the weight and the bias
(section 6 chained through z = (hidden @ W^T + b) / tau):

    dL/dhidden = G W,   dL/dW = G^T hidden,   dL/db = sum_t G_t,   G_t = [a_t (onehot(y_t) - p_t) - b_t p_t (log p_t + h_t)] / tau

The values equal `logprobs_and_entropy(hidden @ weight.T + bias, labels)` computed in fp32 from the same
inputs (fp32 accumulation for bf16/fp16 inputs, as eager fp32 does after upcasting them), within the
package's accuracy rule. The backend is chosen once, in `dispatch.resolve_fused_linear_backend`.

The op's forward and backward are torch.library custom ops (torch.compile sees two opaque calls). The loss
has a single pass on the chunked path: when the AEM weights are known before the forward, a_t and b_t are
row-local, so G is computed per chunk while its logits are in the buffer and the backward only scales it
(`_single_pass_loss`).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import _validation as V
from .config import AEMConfig
from .dispatch import FusedLinearBackend, resolve_fused_linear_backend
from .loss import (_loss_batch, _loss_from_token_terms, _row_local_loss_grads, _single_pass_token_terms,
                   _weights_unknown_before_forward)

__all__ = ["FusedLinearLogprobsEntropyFunction", "FusedLinearLossGradientFunction", "fused_linear_logprobs_and_entropy",
           "fused_linear_aem_policy_loss"]

_HIDDEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- the op as torch.library custom ops: torch.compile (fullgraph too) sees two opaque calls, not the chunk loops
# and their data-dependent row selection. The backend's O(N) backward state travels as one [N, 2] tensor.

# The ops name their path by a string key (custom ops take no Python objects): the dispatcher's paths and any
# other FusedLinearBackend handed to FusedLinearLogprobsEntropyFunction.apply are kept here under their key.
_PATHS: Dict[str, FusedLinearBackend] = {}


def _path_key(backend: FusedLinearBackend) -> str:
    key = f"{backend.name}@{id(backend):x}"
    _PATHS.setdefault(key, backend)
    return key


def _budget_arg(budget: Optional[int]) -> int:
    return -1 if budget is None else budget


def _budget_value(budget: int) -> Optional[int]:
    return None if budget < 0 else budget


@torch.library.custom_op("aem_kernels::fused_linear_logprobs_entropy_fwd", mutates_args=())
def _fused_linear_fwd_op(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, temperature: float, ignore_index: int, with_entropy: bool,
                         backend: str, budget: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [N], entropy [N] ([0] without it), state [N, 2]) of the fused-linear path `_PATHS[backend]`."""
    be = _PATHS[backend]
    logprobs, entropy, saved = be.forward(hidden2d, weight, bias, labels, temperature, ignore_index, with_entropy,
                                          budget=_budget_value(budget))
    state = be.pack(saved, hidden2d.shape[0], hidden2d.dtype, hidden2d.device)
    if entropy is None:
        entropy = logprobs.new_empty(0)
    return logprobs, entropy, state


@_fused_linear_fwd_op.register_fake
def _(hidden2d, weight, bias, labels, temperature, ignore_index, with_entropy, backend, budget):
    be = _PATHS[backend]
    n_rows, work = hidden2d.shape[0], torch.float64 if hidden2d.dtype == torch.float64 else torch.float32
    return (hidden2d.new_empty(n_rows, dtype=work), hidden2d.new_empty(n_rows if with_entropy else 0, dtype=work),
            hidden2d.new_empty(n_rows, 2, dtype=be.state_dtype(hidden2d.dtype)))


@torch.library.custom_op("aem_kernels::fused_linear_logprobs_entropy_bwd", mutates_args=())
def _fused_linear_bwd_op(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, state: torch.Tensor, entropy: Optional[torch.Tensor],
                         grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                         temperature: float, ignore_index: int, need_hidden: bool, need_weight: bool,
                         need_bias: bool, deterministic: bool, backend: str, budget: int
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes; an empty [0] tensor where not needed."""
    be = _PATHS[backend]
    saved = be.unpack(state, entropy, labels, ignore_index, weight.shape[0], hidden2d.shape[1], hidden2d.dtype,
                      _budget_value(budget))
    grads = be.backward(hidden2d, weight, bias, labels, saved, entropy, grad_logprobs, grad_entropy, temperature,
                        ignore_index, (need_hidden, need_weight, need_bias), deterministic)
    return tuple(g if g is not None else hidden2d.new_empty(0) for g in grads)


@_fused_linear_bwd_op.register_fake
def _(hidden2d, weight, bias, labels, state, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
      need_hidden, need_weight, need_bias, deterministic, backend, budget):
    return (torch.empty_like(hidden2d) if need_hidden else hidden2d.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden2d.new_empty(0),
            torch.empty_like(bias) if need_bias and bias is not None else hidden2d.new_empty(0))


class FusedLinearLogprobsEntropyFunction(torch.autograd.Function):
    """(hidden2d [N, H], weight [V, H], bias [V] | None, labels [N]) -> (logprobs [N], entropy [N] | None)."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels, temperature, ignore_index, with_entropy, backend, options):
        deterministic, budget, shape = options
        logprobs, entropy, state = _fused_linear_fwd_op(hidden2d, weight, bias, labels, temperature, ignore_index,
                                                        with_entropy, _path_key(backend), _budget_arg(budget))
        entropy = entropy if with_entropy else None
        ctx.save_for_backward(hidden2d, weight, bias, labels, entropy, state)
        ctx.config = (temperature, ignore_index, with_entropy, _path_key(backend), deterministic, _budget_arg(budget))
        ctx.set_materialize_grads(False)
        # O(N) private copies in labels' shape, not views: users edit their log-probs in place (masked_fill_),
        # and such an edit must not reach the entropy (or backend state) saved above.
        return logprobs.reshape(shape).clone(), (entropy.reshape(shape).clone() if entropy is not None else None)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden2d, weight, bias, labels, entropy, state = ctx.saved_tensors
        temperature, ignore_index, with_entropy, backend, deterministic, budget = ctx.config
        if not with_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 9
        flat = (lambda g: g.reshape(-1).contiguous() if g is not None else None)  # noqa: E731 (labels' shape in)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = _fused_linear_bwd_op(hidden2d, weight, bias, labels, state, entropy, flat(grad_logprobs),
                                     flat(grad_entropy), temperature, ignore_index, need_hidden, need_weight,
                                     need_bias and bias is not None, deterministic, backend, budget)
        wanted = (need_hidden, need_weight, need_bias and bias is not None)
        return (*(g if w else None for g, w in zip(grads, wanted)), None, None, None, None, None, None)


class FusedLinearLossGradientFunction(torch.autograd.Function):
    """(loss 0-d, hidden, weight, bias, grads) -> loss, whose backward returns the gradients the single pass
    computed in the forward (in the working dtype) times the upstream gradient, cast to each input's dtype.

    Memory: the gradients are saved tensors, so autograd frees them after the backward (unless retain_graph);
    for the usual upstream gradient 1 in the inputs' dtype they are handed on as they are, and AccumulateGrad
    can take them as `.grad` without a copy (it copies when a retained graph still holds them)."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grads):
        inputs = (hidden, weight, bias)
        shaped = [g.reshape(t.shape) if g is not None and t is not None else None for g, t in zip(grads, inputs)]
        ctx.save_for_backward(*shaped)
        ctx.dtypes = [t.dtype if t is not None else None for t in inputs]
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        unit = bool(grad_loss == 1)
        out = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            if grad is None or dtype is None:
                out.append(None)
            elif unit:
                out.append(grad.to(dtype))
            else:
                out.append((grad * grad_loss.to(grad.dtype)).to(dtype))
        return (None, *out, None)


def _check_linear(hidden: object, weight: object, bias: object, names: Tuple[str, str] = ("weight", "bias")
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """hidden [..., H], weight [V, H], bias [V] | None of one floating dtype on one device; `names` spell the
    weight and bias arguments in the messages."""
    wn, bn = names
    hidden = V.check_tensor("hidden", hidden)
    weight = V.check_tensor(wn, weight)
    if hidden.dtype not in _HIDDEN_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    width = hidden.shape[-1]
    if weight.dim() != 2:
        raise ValueError(f"{wn} must have shape [V, H] = [V, {width}] (the LM head's weight), got "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != width:
        raise ValueError(f"{wn} must have shape [V, H] with H = hidden.shape[-1] = {width}, got "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{wn} must have a vocabulary dimension V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{wn} must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{wn} is on {weight.device} but hidden is on {hidden.device}; put them on one device")
    if bias is not None:
        bias = V.check_tensor(bn, bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bn} must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{bn} must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"{bn} is on {bias.device} but hidden is on {hidden.device}; put them on one device")
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
            and vocab-blocked paths: the row kernels' entropy sum, the blocks' entropy combination inputs and
            the backward term) and returns None for it (not zeros that could be mistaken for values).
        backend: "auto" (Triton on CUDA; on CPU the chunked C++ path for fp32, its vocab-blocked twin for
            bf16/fp16), "triton", "cpu", "torch"; see
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
    `single_pass`: None: when the modulation weights are known before the forward (surprisal_source="old", or
    beta = 0; the same condition as `aem_policy_loss`) and the path is the chunked one (CPU, backend="torch")
    with fp32/fp64 hidden states, every chunk's gradient is finished in the forward while its logits are in the
    buffer, so they are not recomputed in the backward (three matmuls instead of four; same loss, metrics and
    gradients up to fp32 summation order); True: require that (bf16/fp16 included, which then holds the fp32
    weight copy and gradient accumulator from the forward to the backward; ValueError saying why when it cannot
    apply, e.g. on the Triton path); False: always two passes. `deterministic` and
    `chunk_budget_bytes` as in `fused_linear_logprobs_and_entropy`; verl's global normalisers (`dp_size`,
    `batch_num_tokens`, `global_batch_size`, `loss_scale_factor`) and `process_group` as in `aem_policy_loss`.
    """
    config = V.check_config(config)
    hidden, weight, bias = _check_linear(hidden, weight, bias)
    V.check_bool("inplace_backward", inplace_backward)
    single_pass = V.check_optional_bool("single_pass", single_pass)
    deterministic = V.check_bool("deterministic", deterministic)
    budget = _check_budget(chunk_budget_bytes)
    batch = _loss_batch(_logits_like(hidden, weight.shape[0]), labels, advantages, config,
                        token_response=token_response, response_group=response_group, response_mask=response_mask,
                        turn_ids=turn_ids, old_logprobs=old_logprobs, old_entropy=old_entropy,
                        ref_logprobs=ref_logprobs, advantage_level=advantage_level, num_groups=num_groups,
                        dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                        loss_scale_factor=loss_scale_factor, process_group=process_group)
    be = resolve_fused_linear_backend(backend, hidden.device, hidden.dtype)
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    if single_pass is not False:
        reason = _single_pass_unavailable(be, config, batch, hidden.dtype, single_pass)
        if reason is None and torch.compiler.is_compiling():
            # its per-chunk autograd of the token terms and data-dependent row selection do not trace
            reason = "under torch.compile the fused-linear loss takes its two passes (custom ops)"
        if reason is None and any(needs):
            return _single_pass_loss(hidden, weight, bias, batch, config, be, needs, budget)
        if single_pass and reason is not None:
            raise ValueError(f"single_pass=True cannot apply: {reason}")
    logprobs, entropy = _apply(hidden, weight, bias, batch.labels, config.temperature, config.ignore_index, True,
                               backend, deterministic, budget)
    return _loss_from_token_terms(batch, logprobs.reshape(-1), entropy.reshape(-1), config)


def _single_pass_unavailable(be, config: AEMConfig, batch, dtype: torch.dtype, asked: Optional[bool]):
    """Why the fused-linear loss cannot finish its gradient in the forward (None when it can)."""
    if be.single_pass is None:
        return (f'the "{be.name}" fused-linear path has no single pass (the Triton tile kernels recompute the '
                'logits in the backward)')
    if not asked and dtype not in be.single_pass_auto_dtypes:
        # half precision: the single pass holds the fp32 weight copy and gradient accumulator from the forward
        # to the backward; taken only when asked for
        return f"not taken unasked for {dtype} hidden states (it holds fp32 copies of the weight and its gradient)"
    return _weights_unknown_before_forward(config, batch)


def _single_pass_loss(hidden, weight, bias, batch, config: AEMConfig, be, needs, budget):
    """The loss value, metrics and the gradients of hidden, weight and bias from one pass over the logit chunks
    (`_chunked_linear.chunked_single_pass`); value and metrics from the same functions as the two-pass path."""
    work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    token_adv, token_weights = _single_pass_token_terms(batch, config, work)
    token_grads = _row_local_loss_grads(batch, config, token_adv, token_weights)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    with torch.no_grad():
        logprobs, entropy, grads = be.single_pass(hidden2d, weight, bias, batch.labels.reshape(-1),
                                                  config.temperature, config.ignore_index, token_grads, needs,
                                                  budget=budget)
        loss, metrics = _loss_from_token_terms(batch, logprobs, entropy, config)
    return FusedLinearLossGradientFunction.apply(loss, hidden, weight, bias, grads), metrics
