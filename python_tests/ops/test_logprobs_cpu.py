"""The C++ CPU backend (backend="cpu") against the fp64 torch reference: forward and backward, odd shapes, every
logits dtype, both instruction-set variants of the row kernels, and the segment reduction.

Tolerance: the accuracy rule (Cut-Cross-Entropy's): the kernel's max abs error against fp64 autograd is at
most 3 x the error of eager fp32 torch autograd on the same input + 1e-5, for the log-probs, the entropies and
the gradient (both gradients are stored in the logits' dtype, as autograd returns them). The earlier bound
is kept as well, where it is the tighter one (unit-scale logits, small V): no worse than twice the torch
backend's error on the same input plus eps * (4 (1 + max|z|) + sqrt(V)) * (output scale).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aem_kernels as ak
from aem_kernels import capability
from helpers import CPP_BUILT, CPP_REASON
from aem_kernels.ops.logprobs import cpu as cpu_backend
from aem_kernels.layout import as_rows3d
from aem_kernels.ops.logprobs.naive import logprobs_entropy_fwd_ref
from aem_kernels.ops.segment.naive import segment_mean_ref as segment_mean, segment_sum_ref as segment_sum
from aem_kernels.ops.segment import cpu as segment_cpu

pytestmark = pytest.mark.skipif(not CPP_BUILT, reason=CPP_REASON)

ISAS = ["baseline", "avx2"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test with each instruction-set variant of the row kernels this CPU supports."""
    if not capability.cpu_extension()._select_kernels(request.param):
        pytest.skip(f"this CPU or build cannot run the {request.param} kernels")
    yield request.param
    capability.cpu_extension()._select_kernels("auto")


def _logits(shape, dtype, scale=3.0, neg_inf_frac=0.0):
    x = torch.randn(shape, dtype=torch.float64) * scale
    if neg_inf_frac:
        x[torch.rand(shape) < neg_inf_frac] = -math.inf
        x[..., 0] = 0.0  # keep every row a distribution
    return x.to(dtype)


def _labels(shape, vocab, ignore_index=-100, ignore_frac=0.25):
    y = torch.randint(0, vocab, shape)
    y[torch.rand(shape) < ignore_frac] = ignore_index
    return y


def _assert_close(kernel, eager, exact):
    """The accuracy rule: max|kernel - exact| <= 3 max|eager - exact| + 1e-5; NaNs and infinities in the same
    places."""
    kernel, eager = kernel.double(), eager.double()
    assert torch.equal(kernel.isnan(), exact.isnan()), "NaN pattern differs from the fp64 reference"
    assert torch.equal(kernel.isinf(), exact.isinf()) and torch.equal(kernel[exact.isinf()], exact[exact.isinf()])
    ok = torch.isfinite(exact)
    if not bool(ok.any()):
        return
    err = (kernel[ok] - exact[ok]).abs().max().item()
    base = (eager[ok] - exact[ok]).abs().max().item()
    assert err <= 3 * base + 1e-5, f"error {err:.3g} vs eager fp32 error {base:.3g}"


def _assert_within_torch(kernel, torch_same, exact, floor):
    """The earlier bound: max|kernel - exact| <= 2 max|torch_same - exact| + floor."""
    ok = torch.isfinite(exact)
    if not bool(ok.any()):
        return
    err = (kernel.double()[ok] - exact[ok]).abs().max().item()
    base = (torch_same.double()[ok] - exact[ok]).abs().max().item()
    assert err <= 2 * base + floor, f"error {err:.3g} vs torch same-dtype error {base:.3g} (floor {floor:.3g})"


def _floor(logits, temperature, scale=1.0):
    finite = logits[torch.isfinite(logits)].double()
    z_max = finite.abs().max().item() / temperature if finite.numel() else 0.0
    eps = 2.0 ** -52 if logits.dtype == torch.float64 else 2.0 ** -23
    return eps * (4 * (1 + z_max) + math.sqrt(logits.shape[-1])) * scale


def _eager(logits, labels, temperature, ignore_index, weights, math_dtype):
    """eq. 1-2 by eager torch autograd in `math_dtype` (fp64: the exact reference); returns (logprobs, entropy,
    grad). Eager's NaN of 0 * log 0 at a -inf logit counts as the true 0; ignored rows give 0."""
    leaf = logits.detach().clone().requires_grad_()
    log_p = torch.log_softmax(leaf.to(math_dtype) / temperature, dim=-1)
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros((), dtype=math_dtype))).sum(-1)
    active = labels != ignore_index
    lp = log_p.gather(-1, torch.where(active, labels, 0).unsqueeze(-1)).squeeze(-1)
    lp, entropy = torch.where(active, lp, 0.0), torch.where(active, entropy, 0.0)
    _losses(lp, entropy, weights).backward()
    return lp.detach(), entropy.detach(), leaf.grad


def _losses(logprobs, entropy, weights):
    """sum_t a_t l_t + b_t h_t with fixed per-token weights (a, b); None drops that term."""
    a, b = weights
    loss = 0.0
    if a is not None:
        loss = loss + (logprobs * a.to(logprobs.dtype)).sum()
    if b is not None:
        loss = loss + (entropy * b.to(entropy.dtype)).sum()
    return loss


def _run(logits, labels, backend, temperature, ignore_index, weights, inplace=False):
    """Forward + backward through the public API; returns (logprobs, entropy, grad)."""
    leaf = logits.detach().clone().requires_grad_()
    lp, h = ak.logprobs_and_entropy(leaf, labels, temperature=temperature, ignore_index=ignore_index,
                                    backend=backend, inplace_backward=inplace)
    _losses(lp, h, weights).backward()
    return lp.detach(), h.detach(), leaf.grad


def _check(logits, labels, *, temperature=1.0, ignore_index=-100, weights="both"):
    n = labels.numel()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    w = {"both": (a, b), "logprobs": (a, None), "entropy": (None, b)}[weights]
    w = tuple(t.view(labels.shape) if t is not None else None for t in w)
    lp, h, grad = _run(logits, labels, "cpu", temperature, ignore_index, w)
    eager_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lp_t, h_t, grad_t = _eager(logits, labels, temperature, ignore_index, w, eager_dtype)
    lp_x, h_x, grad_x = _eager(logits.double(), labels, temperature, ignore_index, w, torch.float64)
    assert lp.dtype == h.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    _assert_close(lp, lp_t, lp_x)
    _assert_close(h, h_t, h_x)
    # eager's gradient comes back in the logits' dtype too, so its error includes that rounding
    _assert_close(grad, grad_t, grad_x)
    lp_b, h_b, grad_b = _run(logits, labels, "torch", temperature, ignore_index, w)
    floor = _floor(logits, temperature)
    _assert_within_torch(lp, lp_b, lp_x, floor)
    _assert_within_torch(h, h_b, h_x, floor)
    grad_scale = grad_x[~grad_x.isnan()].abs().max().item() if grad_x.numel() else 0.0
    store_eps = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}.get(logits.dtype, 0.0)
    _assert_within_torch(grad, grad_b, grad_x, floor * max(grad_scale, 1.0) + store_eps * grad_scale)
    return lp, h, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 1), (1, 1, 7), (2, 7, 33), (1, 13, 1000), (3, 3, 4099)])
def test_forward_backward_shapes_dtypes(isa, dtype, shape):
    logits = _logits(shape, dtype)
    _check(logits, _labels(shape[:-1], shape[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [15, 16, 17, 1023, 1024, 1025, 2049])
def test_vocab_at_lane_and_block_boundaries(isa, dtype, vocab):
    # 16 lanes per partial sum, 1024 elements per L1 block: tails of every length path
    logits = _logits((1, 5, vocab), dtype, neg_inf_frac=0.1)
    _check(logits, _labels((1, 5), vocab), temperature=1.3)


@given(batch=st.integers(1, 3), rows=st.integers(1, 6), vocab=st.integers(1, 2100),
       dtype=st.sampled_from(DTYPES), temperature=st.floats(0.25, 4.0), scale=st.sampled_from([0.1, 3.0, 300.0]),
       ignore_frac=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2 ** 16))
@settings(max_examples=25, deadline=None)
def test_random_cases(batch, rows, vocab, dtype, temperature, scale, ignore_frac, seed):
    torch.manual_seed(seed)
    logits = _logits((batch, rows, vocab), dtype, scale=scale)
    _check(logits, _labels((batch, rows), vocab, ignore_frac=ignore_frac), temperature=temperature)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 2.5])
@pytest.mark.parametrize("weights", ["both", "logprobs", "entropy"])
def test_temperature_and_partial_gradients(isa, temperature, weights):
    logits = _logits((2, 9, 1537), torch.float32)
    _check(logits, _labels((2, 9), 1537), temperature=temperature, weights=weights)


@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_entries(isa, dtype):
    logits = _logits((2, 6, 2051), dtype, neg_inf_frac=0.3)
    labels = _labels((2, 6), 2051)
    labels[0, 0] = 0  # a finite label; labels may also point at -inf entries: l = -inf, as in the reference
    lp, h, grad = _check(logits, labels, temperature=0.8)
    assert torch.isfinite(h).all() and torch.isfinite(grad).all()


def test_all_neg_inf_row_is_nan_like_reference(isa):
    logits = _logits((1, 3, 40), torch.float32)
    logits[0, 1] = -math.inf
    lp, h, state = cpu_backend.logprobs_entropy_fwd(logits, torch.tensor([1, 2, 3]), 1.0, -100)
    assert lp[1].isnan() and h[1].isnan() and state[1].isnan().all()
    assert torch.isfinite(lp[[0, 2]]).all() and torch.isfinite(h[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_magnitude_logits(isa, dtype):
    # +-1e4 (fp16 and bf16 hold them); the entropy of such peaked rows must stay accurate (no cancellation).
    logits = _logits((2, 5, 3000), torch.float32, scale=1e4).clamp(-6e4, 6e4).to(dtype)
    _check(logits, _labels((2, 5), 3000))


def test_ignore_index_everywhere_and_custom_ignore_index(isa):
    logits = _logits((2, 4, 300), torch.float32)
    lp, h, grad = _check(logits, torch.full((2, 4), -100))
    assert (lp == 0).all() and (h == 0).all() and (grad == 0).all()
    labels = _labels((2, 4), 300, ignore_index=7, ignore_frac=0.5)
    _check(logits, labels, ignore_index=7)


def test_entropy_only_without_labels(isa):
    logits = _logits((3, 4, 777), torch.bfloat16)
    leaf = logits.clone().requires_grad_()
    h = ak.entropy_from_logits(leaf, temperature=0.9, backend="cpu")
    h.sum().backward()
    every = torch.zeros(logits.shape[:-1], dtype=torch.long)  # _eager's entropy needs a label; its l is unused
    weights = (None, torch.ones(logits.shape[:-1], dtype=torch.float64))
    _, h_e, grad_e = _eager(logits, every, 0.9, -100, weights, torch.float32)
    _, h_x, grad_x = _eager(logits.double(), every, 0.9, -100, weights, torch.float64)
    _assert_close(h, h_e, h_x)              # the accuracy rule, and the earlier absolute / relative bounds too
    _assert_close(leaf.grad, grad_e, grad_x)
    assert (h.double() - h_x).abs().max() < 1e-5
    assert (leaf.grad.double() - grad_x).abs().max() <= 2.0 ** -8 * grad_x.abs().max() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_rows(isa, dtype):
    full = _logits((3, 8, 1031), dtype)
    _check(full[:, :-1], _labels((3, 7), 1031))  # the usual shift: stride_b = 8 V, T = 7
    swapped = _logits((6, 3, 515), dtype).transpose(0, 1)  # stride_b < stride_t
    _check(swapped, _labels((3, 6), 515))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_into_the_logits(isa, dtype):
    full = _logits((2, 6, 2500), dtype)
    labels = _labels((2, 5), 2500)
    _, _, expected = _run(full[:, :-1], labels, "cpu", 0.9, -100, (torch.ones(2, 5), torch.full((2, 5), 0.5)))
    leaf = full.clone().requires_grad_()
    with torch.no_grad():
        work = leaf.clone()  # a non-leaf buffer the op may overwrite
    work.requires_grad_()
    view = work[:, :-1]
    lp, h = ak.logprobs_and_entropy(view, labels, temperature=0.9, backend="cpu", inplace_backward=True)
    grads = torch.autograd.grad(lp.sum() + 0.5 * h.sum(), view)
    assert grads[0].data_ptr() == view.data_ptr()  # the gradient lives in the logits' own storage
    assert torch.equal(grads[0], expected)


def test_empty_input():
    for shape in [(0, 50), (2, 0, 50)]:
        logits = torch.randn(shape, requires_grad=True)
        labels = torch.zeros(shape[:-1], dtype=torch.long)
        lp, h = ak.logprobs_and_entropy(logits, labels, backend="cpu")
        assert lp.shape == h.shape == shape[:-1]
        (lp.sum() + h.sum()).backward()
        assert logits.grad.shape == logits.shape


def test_segment_sum_matches_reference_and_is_deterministic():
    values = torch.randn(1000, dtype=torch.float64)
    ids = torch.randint(-1, 7, (1000,))
    ids[ids == 4] = 5  # segment 4 is empty
    out = segment_cpu.segment_sum(values, ids, 9)
    assert torch.allclose(out, segment_sum(values, ids, 9), atol=1e-12)
    assert out[4] == 0 and out[7] == 0 and out[8] == 0
    values32 = values.float()
    first = segment_cpu.segment_sum(values32, ids, 9)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(first, segment_cpu.segment_sum(values32, ids, 9))
    finally:
        torch.set_num_threads(previous)
    # fp64 accumulation rounded once: at least as accurate as fp32 index_add
    assert (first.double() - out).abs().max() <= (segment_sum(values32, ids, 9).double() - out).abs().max() + 1e-7


def test_segment_sum_gradient_and_public_reductions():
    values = torch.randn(40, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(-1, 5, (40,))
    assert torch.autograd.gradcheck(lambda v: segment_cpu.segment_sum(v, ids, 5), (values,))
    for reduction, ref in (("sum", segment_sum), ("mean", segment_mean)):
        got = ak.response_surprisal(values, ids, 5, reduction=reduction)
        assert torch.allclose(got, ref(-values, ids, 5), atol=1e-12)
        got = ak.response_entropy(values.float(), ids, 5, reduction=reduction)
        assert torch.allclose(got.double(), ref(values, ids, 5), atol=1e-5)


def test_thread_count_gives_bit_identical_results():
    logits = _logits((4, 33, 3001), torch.float32)
    labels = _labels((4, 33), 3001)
    w = (torch.randn(4, 33), torch.randn(4, 33))
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_run(logits, labels, "cpu", 0.8, -100, w))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for got, first in zip(other, results[0]):
            assert torch.equal(got, first)


def test_kernel_variants_agree():
    """Both instruction sets implement the same math; their results differ only by fp32 rounding (FMA)."""
    logits = _logits((2, 10, 5003), torch.float32)
    labels = _labels((2, 10), 5003)
    outs = {}
    for name in ISAS:
        if capability.cpu_extension()._select_kernels(name):
            outs[name] = cpu_backend.logprobs_entropy_fwd(as_rows3d(logits), labels.view(-1), 1.0, -100)
    capability.cpu_extension()._select_kernels("auto")
    exact = logprobs_entropy_fwd_ref(logits.double(), labels.view(-1), 1.0, -100)
    active = labels.view(-1) != -100
    for name, (logprobs, entropy, state) in outs.items():
        lse = state[:, 0].double() + state[:, 1].double()  # (row max, log d) at temperature 1
        for got, ref in zip((logprobs, entropy, lse), exact):
            assert (got[active].double() - ref[active]).abs().max() < 5e-6, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_are_exact_for_every_bit_pattern(isa, dtype):
    """With V = 1 the state's row max is the logit itself (and log d = 0), so the forward returns every 16-bit
    pattern converted to fp32: it must equal torch's conversion bit for bit (non-finite logits have no
    distribution and give NaN)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    logits = bits.view(dtype).view(1, -1, 1)
    _, _, state = cpu_backend.logprobs_entropy_fwd(logits, None, 1.0, -100)
    expected = logits.view(-1).float()
    finite = torch.isfinite(expected)
    assert torch.equal(state[finite, 0], expected[finite]) and (state[finite, 1] == 0).all()
    assert state[~finite, 1].isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_round_to_nearest_even(isa, dtype):
    """The bf16/fp16 kernels compute exactly what the fp32 kernel computes on the same (exactly representable)
    values, then round once: their gradient must be the fp32 kernel's gradient rounded by torch, bit for bit.
    Logits of scale 20 spread the gradients over many binades, down to fp16 subnormals."""
    logits = _logits((3, 8, 1500), torch.float32, scale=20.0).to(dtype)
    labels = _labels((3, 8), 1500)
    w = (torch.randn(3, 8), torch.randn(3, 8))
    lp, h, grad = _run(logits, labels, "cpu", 0.9, -100, w)
    lp32, h32, grad32 = _run(logits.float(), labels, "cpu", 0.9, -100, w)
    assert torch.equal(lp, lp32) and torch.equal(h, h32)
    assert torch.equal(grad, grad32.to(dtype))
    assert ((grad32.abs() < 6.1e-5) & (grad32 != 0)).any()  # the fp16 subnormal range is exercised
