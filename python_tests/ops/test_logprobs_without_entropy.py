"""with_entropy=False end to end: the C++ op (torch.ops.aem_kernels.logprobs_entropy_fwd, both instruction
sets), the row backends' forward contract (cpu, torch, triton), the chunked fused-linear path and
ak.fused_linear_logprobs_and_entropy. The switch must give the same log-probs, state and gradients as the
with-entropy call (bit for bit on the cpu and torch backends), None for the entropy, and skip the work
(checked structurally: the op's entropy output is empty, the torch backend runs fewer [rows, V] ops, the
chunked path asks its row backend for no entropy)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import aem_kernels as ak
from aem_kernels import capability
from helpers import CPP_BUILT, CPP_REASON
from aem_kernels.ops.fused_linear import chunked as _chunked_linear
from aem_kernels.ops.logprobs import pytorch as _torch
from aem_kernels.ops.logprobs import Backend, resolve_backend

needs_cpp = pytest.mark.skipif(not CPP_BUILT, reason=CPP_REASON)
OPS = torch.ops.aem_kernels if (capability.cpu_extension() is not None) else None
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _assert_bitwise(a, b):
    """Same shape and the same bits (NaN included), not merely close."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.contiguous().view(_BITS[a.element_size()]), b.contiguous().view(_BITS[b.element_size()]))


@pytest.fixture(params=["baseline", "avx2"])
def isa(request):
    """Each instruction-set variant of the row kernels this CPU supports."""
    if not (capability.cpu_extension() is not None):
        pytest.skip(f"C++ extension not built: {capability.cpu_extension_reason()}")
    if not capability.cpu_extension()._select_kernels(request.param):
        pytest.skip(f"this CPU or build cannot run the {request.param} kernels")
    yield request.param
    capability.cpu_extension()._select_kernels("auto")


def _logits(batch, rows, vocab, dtype, scale=3.0, seed=0):
    """[B, T, V] logits with the max in a late block of some rows (the running max is rescaled), -inf entries,
    one all -inf row (no distribution: NaN) and a strided view (every other row of a larger tensor)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, rows, vocab, generator=gen, dtype=torch.float64) * scale
    x[..., -1] += 40.0 * (torch.arange(rows) % 2)        # rows whose max sits in the last block
    x[torch.rand(x.shape, generator=gen) < 0.05] = -math.inf
    x[..., 0] = 0.0                                       # keep the other rows distributions
    x[0, 1] = -math.inf
    base = torch.zeros(batch, 2 * rows, vocab + 3, dtype=dtype)
    strided = base[:, ::2, 1:vocab + 1]
    strided.copy_(x)
    labels = torch.randint(0, vocab, (batch * rows,), generator=gen)
    labels[::5] = -100
    labels[1] = 0                                         # the all -inf row is active
    return strided, labels


# ---- the C++ op ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 37, 2500])
def test_cpp_op_switch_off_gives_identical_logprobs_and_state(isa, dtype, vocab):
    x, labels = _logits(2, 7, vocab, dtype)
    assert not x.is_contiguous()
    for y in (labels, None):
        lp_on, h_on, state_on = OPS.logprobs_entropy_fwd(x, y, 0.7, -100)
        lp_off, h_off, state_off = OPS.logprobs_entropy_fwd(x, y, 0.7, -100, with_entropy=False)
        _assert_bitwise(lp_off, lp_on)
        _assert_bitwise(state_off, state_on)
        # the structural check that the entropy is skipped: the op allocates and writes no entropy at all
        assert h_on.shape == (14,) and h_off.shape == (0,) and h_off.dtype == h_on.dtype
    assert state_on[1].isnan().all()                      # the all -inf row was in the test


@needs_cpp
def test_cpp_op_keeps_the_four_argument_call():
    x, labels = _logits(1, 5, 64, torch.float32)
    schema = str(OPS.logprobs_entropy_fwd.default._schema)
    assert "bool with_entropy=True" in schema
    lp, h, state = OPS.logprobs_entropy_fwd(x, labels, 1.0, -100)
    _, h_pos, _ = OPS.logprobs_entropy_fwd(x, labels, 1.0, -100, False)   # positional form too
    assert h.shape == (5,) and h_pos.shape == (0,)
    # the old call still computes the entropy (its accuracy is test_cpu.py's subject)
    torch.testing.assert_close(h, _torch.logprobs_entropy_fwd(x, labels, 1.0, -100)[1], equal_nan=True)


@needs_cpp
def test_cpp_op_opcheck_and_compile_with_the_switch_off():
    x, labels = _logits(2, 3, 41, torch.float32)
    x = x.contiguous()
    x[0, 1] = 1.0                        # opcheck compares outputs with ==: no NaN row here
    for args in ((x.clone().requires_grad_(), labels, 0.7, -100, False), (x.clone().requires_grad_(), None, 1.3,
                                                                           -100, False)):
        result = torch.library.opcheck(OPS.logprobs_entropy_fwd.default, args)
        assert all(v == "SUCCESS" for v in result.values()), result
    torch._dynamo.reset()
    fn = torch.compile(lambda t: OPS.logprobs_entropy_fwd(t, labels, 0.7, -100, with_entropy=False),
                       backend="aot_eager", fullgraph=True)
    lp, h, state = fn(x)
    _assert_bitwise(lp, OPS.logprobs_entropy_fwd(x, labels, 0.7, -100)[0])
    assert h.shape == (0,)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpp_op_gradient_with_the_switch_off(dtype):
    """The op's autograd formula: through the log-probs only, the same gradient bit for bit; the empty entropy
    output may enter the loss (its gradient is empty and dropped)."""
    x, labels = _logits(2, 5, 300, dtype)
    x = x.contiguous()
    x[0, 1] = 0.5                                          # finite rows: compare finite gradients
    ga = torch.randn(10, dtype=torch.float64).to(x.dtype if dtype == torch.float64 else torch.float32)
    grads = []
    for kwargs in ({}, {"with_entropy": False}):
        leaf = x.clone().requires_grad_()
        lp, h, _ = OPS.logprobs_entropy_fwd(leaf, labels, 0.6, -100, **kwargs)
        loss = (lp * ga).sum() + (h.sum() if kwargs else 0)
        loss.backward()
        grads.append(leaf.grad)
    assert torch.isfinite(grads[0]).all()
    _assert_bitwise(grads[1], grads[0])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_backward_ignores_the_entropy_without_grad_entropy(isa, dtype):
    """With grad_entropy None the backward must not read h: a NaN (or unwritten) entropy gives the same
    gradient as the real one, never NaN * 0."""
    x, labels = _logits(1, 6, 1500, dtype)
    x = x.contiguous()
    x[0, 1] = 0.25
    _, h, state = OPS.logprobs_entropy_fwd(x, labels, 1.3, -100)
    ga = torch.randn(6)
    real = OPS.logprobs_entropy_bwd(x, labels, state, h, ga, None, 1.3, -100)
    garbage = OPS.logprobs_entropy_bwd(x, labels, state, torch.full_like(h, math.nan), ga, None, 1.3, -100)
    assert torch.isfinite(real.float()).all()
    _assert_bitwise(garbage, real)


# ---- the row backends' forward contract -----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_row_backend_forward_contract(backend):
    if backend == "cpu" and not (capability.cpu_extension() is not None):
        pytest.skip("C++ extension not built")
    dtype = torch.float32
    x, labels = _logits(2, 5, 133 if backend == "triton" else 1100, dtype)
    be = resolve_backend(backend, x.device, dtype)
    for y in (labels, None):
        lp_on, h_on, state_on = be.forward(x, y, 0.8, -100)
        lp_off, h_off, state_off = be.forward(x, y, 0.8, -100, with_entropy=False)
        assert h_off is None and h_on is not None
        assert (lp_off is None) == (y is None)
        if y is not None:
            _assert_bitwise(lp_off, lp_on)
        _assert_bitwise(state_off, state_on)


class _RowsByVocabOps(TorchDispatchMode):
    """Records the aten ops whose output is a [rows, V] tensor: the torch backend's per-element work."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.ops = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_backend_skips_the_entropy_ops(dtype):
    x, labels = _logits(1, 9, 211, dtype)
    counted = {}
    for with_entropy in (True, False):
        with _RowsByVocabOps((9, 211)) as mode:
            out = _torch.logprobs_entropy_fwd(x, labels, 1.7, -100, with_entropy=with_entropy)
        counted[with_entropy] = (mode.ops, out)
    (ops_on, (lp_on, h_on, state_on)), (ops_off, (lp_off, h_off, state_off)) = counted[True], counted[False]
    # the entropy's p * s products, their -inf guard and the select are gone; the softmax work is shared
    assert len(ops_off) <= len(ops_on) - 2 and "aten.mul.Tensor" in ops_on and "aten.mul.Tensor" not in ops_off
    assert h_off is None and h_on.shape == (9,)
    _assert_bitwise(lp_off, lp_on)
    _assert_bitwise(state_off, state_on)


def test_torch_backend_switch_off_in_chunks_and_without_labels():
    x, labels = _logits(2, 11, 97, torch.float16)
    lp_on, _, state_on = _torch.logprobs_entropy_fwd(x, labels, 0.4, -100, chunk_rows=3)
    lp_off, h_off, state_off = _torch.logprobs_entropy_fwd(x, labels, 0.4, -100, chunk_rows=3, with_entropy=False)
    _assert_bitwise(lp_off, lp_on)
    _assert_bitwise(state_off, state_on)
    lp_none, h_none, state_none = _torch.logprobs_entropy_fwd(x, None, 0.4, -100, chunk_rows=3, with_entropy=False)
    assert lp_none is None and h_none is None and h_off is None
    _assert_bitwise(state_none, _torch.logprobs_entropy_fwd(x, None, 0.4, -100)[2])


# ---- the chunked fused-linear path and the public function ------------------------------------------------

def _linear_inputs(shape=(3, 23), hidden=17, vocab=1100, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5 * 4).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels.view(-1)[::7] = -100
    ga = torch.randn(shape, generator=gen)
    return x, w, b, labels, ga


def _fused(backend, x, w, b, labels, ga, with_entropy, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    lp, ent = ak.fused_linear_logprobs_and_entropy(leaves[0], leaves[1], labels, bias=leaves[2], temperature=0.8,
                                                   with_entropy=with_entropy, backend=backend, **kwargs)
    (lp * ga).sum().backward()   # through the log-probs only, also for the with-entropy call
    return lp, ent, [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget", [None, 4 * 1100 * 10])
def test_fused_linear_switch_off_is_bitwise_the_logprob_part(backend, dtype, budget):
    if backend == "cpu" and not (capability.cpu_extension() is not None):
        pytest.skip("C++ extension not built")
    x, w, b, labels, ga = _linear_inputs(dtype=dtype)
    lp_on, ent_on, grads_on = _fused(backend, x, w, b, labels, ga, True, chunk_budget_bytes=budget)
    lp_off, ent_off, grads_off = _fused(backend, x, w, b, labels, ga, False, chunk_budget_bytes=budget)
    assert ent_off is None and ent_on is not None and lp_off.shape == labels.shape
    _assert_bitwise(lp_off, lp_on)
    for on, off in zip(grads_on, grads_off):
        assert torch.isfinite(on.float()).all()
        _assert_bitwise(off, on)
    assert (lp_off[labels == -100] == 0).all() and (grads_off[0][labels == -100] == 0).all()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_chunked_path_asks_the_row_backend_for_no_entropy(backend):
    if backend == "cpu" and not (capability.cpu_extension() is not None):
        pytest.skip("C++ extension not built")
    row = resolve_backend(backend, torch.device("cpu"), torch.float32)
    seen = []

    def forward(*args, **kwargs):
        seen.append(kwargs.get("with_entropy", True) is False)
        out = row.forward(*args, **kwargs)
        seen.append(out[1] is None)
        return out

    spy = Backend("spy", forward, row.backward)
    x, w, b, labels, ga = _linear_inputs(shape=(40,))
    x2, labels2 = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
    lp, ent, saved = _chunked_linear.chunked_fwd(spy, x2, w, b, labels2, 1.0, -100, False, budget=4 * 1100 * 8)
    assert ent is None and len(seen) == 2 * math.ceil((labels2 != -100).sum().item() / 8)
    assert all(seen), seen                                  # every chunk: with_entropy=False, entropy None back
    assert saved[3] is None                                 # nothing entropy-shaped kept for the backward
    gx, gw, gb = _chunked_linear.chunked_bwd(spy, x2, w, b, labels2, saved, ga.reshape(-1), None, 1.0, -100,
                                             (True, True, True))
    ref_lp, _, ref_saved = _chunked_linear.chunked_fwd(row, x2, w, b, labels2, 1.0, -100, True, budget=4 * 1100 * 8)
    ref = _chunked_linear.chunked_bwd(row, x2, w, b, labels2, ref_saved, ga.reshape(-1), None, 1.0, -100,
                                      (True, True, True))
    _assert_bitwise(lp, ref_lp)
    for got, want in zip((gx, gw, gb), ref):
        _assert_bitwise(got, want)
    with pytest.raises(ValueError, match="grad_entropy must be None"):
        _chunked_linear.chunked_bwd(spy, x2, w, b, labels2, saved, ga.reshape(-1), ga.reshape(-1), 1.0, -100,
                                    (True, True, True))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fused_linear_switch_off_all_rows_ignored_and_empty(backend):
    if backend == "cpu" and not (capability.cpu_extension() is not None):
        pytest.skip("C++ extension not built")
    for shape in ((6,), (0,)):
        x, w, b, labels, ga = _linear_inputs(shape=shape, vocab=50)
        labels.fill_(-100)
        lp, ent, grads = _fused(backend, x, w, b, labels, ga, False)
        assert ent is None and lp.shape == shape and (lp == 0).all()
        assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_blocked_path_asks_the_row_backend_for_no_entropy(backend):
    """bf16 (the vocab-blocked path): with_entropy=False reaches every block's row forward, and the backward's
    recomputation of each block's statistics never asks for the entropy; log-probs and gradients are those of
    the with-entropy call."""
    from aem_kernels.ops.fused_linear import blocked as _blocked_linear

    if backend == "cpu" and not (capability.cpu_extension() is not None):
        pytest.skip("C++ extension not built")
    row = resolve_backend(backend, torch.device("cpu"), torch.bfloat16)
    asked = []

    def forward(*args, **kwargs):
        asked.append(kwargs.get("with_entropy", True))
        return row.forward(*args, **kwargs)

    spy = Backend("spy", forward, row.backward)
    x, w, b, labels, ga = _linear_inputs(shape=(40,))
    x2, labels2 = x.reshape(-1, x.shape[-1]).bfloat16(), labels.reshape(-1)
    w, b = w.bfloat16(), b.bfloat16()
    budget = 4 * 40 * 128   # 128-column blocks
    lp, ent, saved = _blocked_linear.blocked_fwd(spy, x2, w, b, labels2, 1.0, -100, False, budget=budget)
    assert ent is None and len(asked) > 1 and not any(asked)
    asked.clear()
    grads = _blocked_linear.blocked_bwd(spy, x2, w, b, labels2, saved, ga.reshape(-1), None, 1.0, -100,
                                        (True, True, True))
    assert len(asked) > 1 and not any(asked)
    ref_lp, ref_ent, ref_saved = _blocked_linear.blocked_fwd(row, x2, w, b, labels2, 1.0, -100, True, budget=budget)
    ref = _blocked_linear.blocked_bwd(row, x2, w, b, labels2, ref_saved, ga.reshape(-1), None, 1.0, -100,
                                      (True, True, True))
    assert ref_ent is not None
    _assert_bitwise(lp, ref_lp)
    for got, want in zip(grads, ref):
        _assert_bitwise(got, want)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_logprobs_from_logits_asks_for_no_entropy(backend, monkeypatch):
    """The log-prob-only token op (verl's logprobs_from_logits, TRL's selective_log_softmax) runs the row
    kernels without the entropy's sum; its values and gradient are logprobs_and_entropy's, bit for bit."""
    from aem_kernels.ops import logprobs as api

    if backend == "cpu" and not (capability.cpu_extension() is not None):
        pytest.skip("C++ extension not built")
    row = resolve_backend(backend, torch.device("cpu"), torch.float32)
    asked = []

    def forward(*args, **kwargs):
        asked.append(kwargs.get("with_entropy", True))
        return row.forward(*args, **kwargs)

    spy = Backend("spy", forward, row.backward)
    monkeypatch.setattr(api, "resolve_backend", lambda *args: spy)
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 11, 517, generator=gen) * 4).requires_grad_()
    labels = torch.randint(0, 517, (3, 11), generator=gen)
    labels[1, 2:5] = -100
    lp = ak.logprobs_from_logits(logits, labels)
    assert asked == [False]
    ref, _ = ak.logprobs_and_entropy(logits, labels)
    assert asked == [False, True]
    upstream = torch.randn(lp.shape, generator=gen)
    (g,) = torch.autograd.grad(lp, logits, upstream)
    (g_ref,) = torch.autograd.grad(ref, logits, upstream)
    _assert_bitwise(lp, ref)
    _assert_bitwise(g, g_ref)
