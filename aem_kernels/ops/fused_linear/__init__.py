"""Fused linear + log-prob/entropy: per-token log-probs (eq. 1) and entropies (eq. 2) straight from hidden
states and the classifier (LM head) weight, never building the logits.

At 150k-token vocabularies the logits dominate an RL step's memory (N = 16k tokens x V = 152k is 5 GB in
bf16, its fp32 softmax and gradient as much again). Here the logits exist only as row chunks of a bounded
budget (`chunked.py`; on CUDA the CUDA plan of `plan.py`), vocab blocks (CPU bf16/fp16, `blocked.py`: no fp32
copy of the weight) or register tiles (path "tiles", `triton.py`), recomputed in the backward, which yields the
gradients of the hidden states, the weight and the bias (section 6 chained through z = (hidden @ W^T + b) / tau):

    dL/dhidden = G W,   dL/dW = G^T hidden,   dL/db = sum_t G_t,
    G_t = [a_t (onehot(y_t) - p_t) - b_t p_t (log p_t + h_t)] / tau

The values equal `logprobs_and_entropy(hidden @ weight.T + bias, labels)` computed in fp32 from the same
inputs (fp32 accumulation for bf16/fp16 inputs, as eager fp32 does after upcasting them), within the
package's accuracy rule; `naive.py` is that definition, the tests' oracle.

The op's one path decision is `resolve_fused_linear_path`, its table `plan.auto_kind`: on CUDA the CUDA plan
(bf16/fp16: row chunks whose products run on the tensor cores, cuBLAS with half-precision operands and fp32
output, the weight never copied, "<row>-chunked-tc"; fp32: row chunks with fp32 cuBLAS products; fp64: the
torch row backend's chunks), the chunks' statistics from the row backend (Triton's row kernels by default); on
CPU a BLAS path over the row backend, vocab blocks for bf16/fp16 hidden states and row chunks otherwise (and
the tile kernels when backend="triton" runs in Triton's interpreter, their test vehicle). `path=` names a path
instead: "tiles" (the Triton tile kernels, `triton.py`), "chunked" or "blocked". With `vocab_parallel=True` it
decides the vocab-parallel op's path (`vocab_parallel.py`): always row chunks over the rank's shard,
"<row>-chunked" (on CUDA with half precision "<row>-chunked-tc"); see that function for why. The loss's single
pass (`chunked.chunked_single_pass`, when the per-token derivatives are known before the forward) is the
row-chunk paths', taken unasked for fp32/fp64 only.

Every BLAS path runs the one chunk loop of `loop.py` with its per-chunk steps; every path's chunk plan, and
the one budget knob `chunk_budget_bytes` (the bytes of the one fp32 logits buffer; Triton refuses it), are in
`plan.py`.

The op's forward and backward are torch.library custom ops (torch.compile, fullgraph too, sees two opaque
calls, not the chunk loops and their data-dependent row selection). The path travels to them as its name, and
its O(N) backward state as one [N, 2] tensor. The op's autograd Functions are first-order only: a double
backward raises a clear RuntimeError (`aem_kernels.contract.first_order_only`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ... import validation as V
from ...contract import first_order_only
from ...capability import TRITON_DTYPES, half_mm_fp32_out, triton_reason
from ...errors import BackendUnavailableError
from ...layout import compute_dtype
from ..logprobs import Backend, load_backend, resolve_backend
from .checks import check_linear, logits_like
from .plan import auto_kind, check_chunk_budget, chunked_kind
from .products import WorkProducts, half_products

__all__ = ["FusedLinearLogprobsEntropyFunction", "FusedLinearPath", "PATHS", "check_budget", "check_linear",
           "fused_linear_apply", "fused_linear_logprobs_and_entropy", "fused_linear_path",
           "logits_like", "resolve_fused_linear_path"]

@dataclass(frozen=True)
class FusedLinearPath:
    """One path of the op, named by `key` ("triton", "<row backend>-chunked" or "<row backend>-blocked") over
    the row backend `row` (None for the tile kernels; "triton-chunked", Triton's row kernels on row chunks, is
    the vocab-parallel op's path on CUDA):
    `forward(hidden2d, weight, bias, labels, temperature, ignore_index, with_entropy, budget) -> (logprobs,
    entropy | None, saved)`, `backward(hidden2d, weight, bias, labels, saved, grad_logprobs, grad_entropy,
    temperature, ignore_index, needs, deterministic, budget) -> (grad_hidden, grad_weight, grad_bias)`,
    `pack(saved, n_rows, dtype, device) -> state [N, 2]` and `unpack(state, entropy, labels, ignore_index,
    vocab, hidden, dtype, budget) -> saved` (the state crosses the custom op as one tensor), `state_dtype(hidden
    dtype)`, and `single_pass` (the chunked path's one-pass loss, else None)."""

    key: str
    row: Optional[Backend]
    forward: Callable
    backward: Callable
    pack: Callable
    unpack: Callable
    state_dtype: Callable
    single_pass: Optional[Callable] = None
    products: Optional[Callable] = None


def _work_products(device: torch.device, dtype: torch.dtype) -> WorkProducts:
    return WorkProducts(compute_dtype(dtype))


def _half_products(device: torch.device, dtype: torch.dtype):
    return half_products(device, dtype)   # looked up per call: the tests put a recording product here


def _build_path(key: str) -> FusedLinearPath:
    if key == "triton":
        from . import triton as tiles

        def triton_forward(*args, budget=None):   # the tiles are the working set (a budget is refused earlier)
            return tiles.fused_linear_fwd(*args)

        return FusedLinearPath("triton", None, triton_forward, tiles.fused_linear_bwd,
                               pack=lambda saved, *_: torch.stack(saved, dim=1),                # (m, log d)
                               unpack=lambda state, *_: tuple(t.contiguous() for t in state.unbind(1)),
                               state_dtype=lambda dtype: torch.float32)
    row_name, kind = key.split("-", 1)
    row = load_backend(row_name)
    from . import blocked, chunked

    # "chunked-tc": the CUDA plan's half-precision products (cuBLAS there, their exact emulation elsewhere)
    products = _half_products if kind == "chunked-tc" else _work_products
    if kind == "blocked":
        def forward(*args, budget=None):
            return blocked.blocked_fwd(row, *args, budget=budget)

        def backward(hidden2d, weight, bias, labels, saved, entropy, grad_logprobs, grad_entropy, temperature,
                     ignore_index, needs, deterministic=False):
            # always deterministic: fixed block order, BLAS reductions
            return blocked.blocked_bwd(row, hidden2d, weight, bias, labels, saved, grad_logprobs, grad_entropy,
                                       temperature, ignore_index, needs)
    else:
        def forward(hidden2d, *args, budget=None):
            return chunked.chunked_fwd(row, hidden2d, *args, budget=budget,
                                       products=products(hidden2d.device, hidden2d.dtype))

        def backward(hidden2d, weight, bias, labels, saved, entropy, grad_logprobs, grad_entropy, temperature,
                     ignore_index, needs, deterministic=False):
            # always deterministic: fixed chunk order, BLAS reductions
            return chunked.chunked_bwd(row, hidden2d, weight, bias, labels, saved, grad_logprobs, grad_entropy,
                                       temperature, ignore_index, needs,
                                       products=products(hidden2d.device, hidden2d.dtype))

    def single_pass(hidden2d, *args, **kwargs):   # row chunks for every dtype
        return chunked.chunked_single_pass(row, hidden2d, *args, products=products(hidden2d.device, hidden2d.dtype),
                                           **kwargs)

    if kind == "blocked":
        pack, unpack, state_dtype = blocked.blocked_pack, blocked.blocked_unpack, (lambda dtype: torch.float64)
    else:
        pack, state_dtype = chunked.chunked_pack, chunked.compute_dtype

        def unpack(state, entropy, labels, ignore_index, vocab, hidden, dtype, budget):
            return chunked.chunked_unpack(state, entropy, labels, ignore_index, vocab, dtype, budget,
                                          kind == "chunked-tc")

    return FusedLinearPath(key, row, forward, backward, pack, unpack, state_dtype, single_pass, products)


_PATHS: Dict[str, FusedLinearPath] = {}


def fused_linear_path(key: str) -> FusedLinearPath:
    """The path named `key` (built once; the custom ops find their path by this name)."""
    if key not in _PATHS:
        _PATHS[key] = _build_path(key)
    return _PATHS[key]


PATHS = ("auto", "tiles", "chunked", "blocked")


def _explicit_path(path: str, backend: str, device: torch.device, dtype: torch.dtype) -> FusedLinearPath:
    """The path the caller named (`path` other than "auto"), or a ValueError naming `path` when it cannot run
    for these inputs."""
    if path == "tiles":
        if backend not in ("auto", "triton"):
            raise ValueError(f'path="tiles" runs the Triton tile kernels, which have no row backend; got '
                             f'backend={backend!r} (pass backend="auto" or "triton" with it)')
        reason = triton_reason(device)
        if reason is not None:
            raise ValueError(f'path="tiles" cannot run here: {reason}')
        if dtype not in TRITON_DTYPES:
            raise ValueError(f'path="tiles" serves fp16/bf16/fp32 hidden states (the tile kernels compute in '
                             f'fp32), got {dtype}; use path="chunked"')
        return fused_linear_path("triton")
    if path == "blocked" and dtype == torch.float64:
        raise ValueError('path="blocked" computes its vocab blocks in fp32, so it does not serve fp64 hidden '
                         'states; use path="chunked" (or "auto")')
    row = resolve_backend("torch" if backend == "auto" and dtype == torch.float64 else backend, device, dtype)
    if path == "chunked":
        path = chunked_kind(device.type, dtype, half_mm_fp32_out(device.type))
    return fused_linear_path(f"{row.name}-{path}")


def resolve_fused_linear_path(backend: str, device: torch.device, dtype: torch.dtype, *,
                              vocab_parallel: bool = False, path: str = "auto") -> FusedLinearPath:
    """The path for hidden states of `dtype` on `device` (the row backend's choice, same names and errors;
    see the module docstring).

    path: "auto" (this decision), or the caller's choice of "tiles" (the Triton tile kernels: CUDA tensors, or
    the Triton interpreter), "chunked" (row chunks over the whole vocabulary) or "blocked" (vocabulary blocks
    over every row; not fp64), both over `backend`'s row backend; a path that cannot run for these inputs is
    a ValueError naming `path`.

    vocab_parallel=True: the vocab-parallel op's path, always row chunks over this rank's shard
    (`vocab_parallel.py`), "<row>-chunked" or, on CUDA with half precision, the CUDA plan's "<row>-chunked-tc",
    on the row backend's own choice for `dtype`, every dtype (path "auto" or "chunked"):
      - no tile kernels: the ranks combine per-row slice statistics (lse_k, h_k, s_y), which the Triton tile
        kernels do not output; on CUDA the chunks run Triton's row kernels instead;
      - bf16/fp16 keep row chunks, not vocab blocks: blocks inside a shard would combine their statistics
        twice (blocks, then ranks), changing the numbers of every existing call; off CUDA the fp32 copy of the
        weight that the blocked path avoids is the shard's, V_k H = V H / world.
    """
    V.check_choice("path", path, PATHS)
    if vocab_parallel:
        if path not in ("auto", "chunked"):
            raise ValueError(f'path must be "auto" or "chunked" for the vocab-parallel op (row chunks over the '
                             f'shard: the ranks combine per-row statistics), got {path!r}')
        kind = chunked_kind(device.type, dtype, half_mm_fp32_out(device.type))
        return fused_linear_path(f"{resolve_backend(backend, device, dtype).name}-{kind}")
    if path != "auto":
        return _explicit_path(path, backend, device, dtype)
    if backend == "auto" and dtype == torch.float64:
        backend = "torch"
    row = resolve_backend(backend, device, dtype)
    if row.name == "triton" and device.type != "cuda":
        # Triton's interpreter (CPU tensors): the tile kernels, as before the CUDA plan (their test vehicle)
        return fused_linear_path("triton")
    if row.name == "triton" and dtype == torch.float64:
        raise BackendUnavailableError('backend="triton" is not available for fp64 hidden states (the Triton '
                                      'kernels compute in fp32); use backend="torch"')
    return fused_linear_path(f"{row.name}-{auto_kind(device.type, dtype, half_mm_fp32_out(device.type))}")


def _budget_arg(budget: Optional[int]) -> int:
    return -1 if budget is None else budget


def _budget_value(budget: int) -> Optional[int]:
    return None if budget < 0 else budget


@torch.library.custom_op("aem_kernels::fused_linear_logprobs_entropy_fwd", mutates_args=())
def _fused_linear_fwd_op(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, temperature: float, ignore_index: int, with_entropy: bool,
                         path: str, budget: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [N], entropy [N] ([0] without it), state [N, 2]) of the fused-linear path named `path`."""
    be = fused_linear_path(path)
    logprobs, entropy, saved = be.forward(hidden2d, weight, bias, labels, temperature, ignore_index, with_entropy,
                                          budget=_budget_value(budget))
    state = be.pack(saved, hidden2d.shape[0], hidden2d.dtype, hidden2d.device)
    if entropy is None:
        entropy = logprobs.new_empty(0)
    return logprobs, entropy, state


@_fused_linear_fwd_op.register_fake
def _(hidden2d, weight, bias, labels, temperature, ignore_index, with_entropy, path, budget):
    be = fused_linear_path(path)
    n_rows, work = hidden2d.shape[0], torch.float64 if hidden2d.dtype == torch.float64 else torch.float32
    return (hidden2d.new_empty(n_rows, dtype=work), hidden2d.new_empty(n_rows if with_entropy else 0, dtype=work),
            hidden2d.new_empty(n_rows, 2, dtype=be.state_dtype(hidden2d.dtype)))


@torch.library.custom_op("aem_kernels::fused_linear_logprobs_entropy_bwd", mutates_args=())
def _fused_linear_bwd_op(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, state: torch.Tensor, entropy: Optional[torch.Tensor],
                         grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                         temperature: float, ignore_index: int, need_hidden: bool, need_weight: bool,
                         need_bias: bool, deterministic: bool, path: str, budget: int
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes; an empty [0] tensor where not needed."""
    be = fused_linear_path(path)
    saved = be.unpack(state, entropy, labels, ignore_index, weight.shape[0], hidden2d.shape[1], hidden2d.dtype,
                      _budget_value(budget))
    grads = be.backward(hidden2d, weight, bias, labels, saved, entropy, grad_logprobs, grad_entropy, temperature,
                        ignore_index, (need_hidden, need_weight, need_bias), deterministic)
    return tuple(g if g is not None else hidden2d.new_empty(0) for g in grads)


@_fused_linear_bwd_op.register_fake
def _(hidden2d, weight, bias, labels, state, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
      need_hidden, need_weight, need_bias, deterministic, path, budget):
    return (torch.empty_like(hidden2d) if need_hidden else hidden2d.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden2d.new_empty(0),
            torch.empty_like(bias) if need_bias and bias is not None else hidden2d.new_empty(0))


class FusedLinearLogprobsEntropyFunction(torch.autograd.Function):
    """(hidden2d [N, H], weight [V, H], bias [V] | None, labels [N]) -> (logprobs [N], entropy [N] | None) on a
    `FusedLinearPath`; options = (deterministic, budget, the outputs' shape)."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels, temperature, ignore_index, with_entropy, path, options):
        deterministic, budget, shape = options
        logprobs, entropy, state = _fused_linear_fwd_op(hidden2d, weight, bias, labels, temperature, ignore_index,
                                                        with_entropy, path.key, _budget_arg(budget))
        entropy = entropy if with_entropy else None
        ctx.save_for_backward(hidden2d, weight, bias, labels, entropy, state)
        ctx.config = (temperature, ignore_index, with_entropy, path.key, deterministic, _budget_arg(budget))
        ctx.set_materialize_grads(False)
        # O(N) private copies in labels' shape, not views: users edit their log-probs in place (masked_fill_),
        # and such an edit must not reach the entropy (or backend state) saved above.
        return logprobs.reshape(shape).clone(), (entropy.reshape(shape).clone() if entropy is not None else None)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logprobs, grad_entropy):
        # the backward op computes numbers, not a graph: a double backward (create_graph=True, then a gradient
        # of the gradient) raises a clear error (aem_kernels.contract), never a wrong second derivative
        hidden2d, weight, bias, labels, entropy, state = ctx.saved_tensors
        temperature, ignore_index, with_entropy, path, deterministic, budget = ctx.config
        if not with_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 9
        flat = (lambda g: g.reshape(-1).contiguous() if g is not None else None)  # noqa: E731 (labels' shape in)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = _fused_linear_bwd_op(hidden2d, weight, bias, labels, state, entropy, flat(grad_logprobs),
                                     flat(grad_entropy), temperature, ignore_index, need_hidden, need_weight,
                                     need_bias and bias is not None, deterministic, path, budget)
        wanted = (need_hidden, need_weight, need_bias and bias is not None)
        return (*(g if w else None for g, w in zip(grads, wanted)), None, None, None, None, None, None)


def check_budget(budget: object, path: Optional[FusedLinearPath] = None) -> Optional[int]:
    """`chunk_budget_bytes` checked for `path` (`plan.py` states its meaning): None or a positive int; the
    Triton path refuses one (ValueError) rather than ignore it."""
    return check_chunk_budget(budget, path.key if path is not None else None)


def fused_linear_apply(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       labels: torch.Tensor, temperature: float, ignore_index: int, with_entropy: bool,
                       path: FusedLinearPath, deterministic: bool, budget: Optional[int]):
    """`FusedLinearLogprobsEntropyFunction` on checked inputs: hidden [..., H], labels hidden.shape[:-1]."""
    return FusedLinearLogprobsEntropyFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), temperature, ignore_index,
        with_entropy, path, (deterministic, budget, labels.shape))


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
    path: str = "auto",
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
            bf16/fp16), "triton", "cpu", "torch"; see `resolve_fused_linear_path`.
        deterministic: Triton only: separate dH and dW passes instead of atomics (bit-identical run to run);
            the chunked path is always deterministic.
        chunk_budget_bytes: bytes of the one fp32 logits buffer of the CPU / torch paths (its shape is the
            path's: a chunk of rows for fp32/fp64 hidden states, a block of vocabulary columns over every row
            for bf16/fp16; defaults and plans: `ops/fused_linear/plan.py`). The Triton path has no such buffer
            and refuses it (ValueError).
        path: "auto" (the op's decision, `resolve_fused_linear_path`), "tiles" (the Triton tile kernels; CUDA
            or the Triton interpreter), "chunked" (row chunks over the whole vocabulary) or "blocked"
            (vocabulary blocks over every row), the last two over `backend`'s row backend; a path that cannot
            run for these inputs is a ValueError naming `path`.

    Returns:
        (logprobs, entropy | None), each of labels' shape, fp32 (fp64 for fp64 inputs); differentiable with
        respect to hidden, weight and bias.
    """
    hidden, weight, bias = check_linear(hidden, weight, bias)
    temperature = V.check_temperature(temperature)
    ignore_index = V.check_ignore_index(ignore_index)
    labels = V.check_labels(labels, logits_like(hidden, weight.shape[0]), ignore_index)
    with_entropy = V.check_bool("with_entropy", with_entropy)
    deterministic = V.check_bool("deterministic", deterministic)
    chosen = resolve_fused_linear_path(backend, hidden.device, hidden.dtype, path=path)
    budget = check_budget(chunk_budget_bytes, chosen)
    return fused_linear_apply(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chosen,
                              deterministic, budget)
