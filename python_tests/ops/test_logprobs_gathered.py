"""K labels per position (TRL's `selective_log_softmax(logits, index)` with index (..., K)) and the `dtype=` of
the token ops, against the real TRL 1.16.0 and fp64 autograd (aem_kernels/gathered.py)."""

import math

import pytest
import torch

import aem_kernels as ak
from helpers import DEVICE

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

BACKENDS = [pytest.param("torch"),
            pytest.param("cpu", marks=pytest.mark.skipif(ak.available_backends("cpu")["cpu"] is not None,
                                                          reason="C++ extension not built")),
            pytest.param("triton", marks=pytest.mark.skipif(ak.available_backends(DEVICE)["triton"] is not None,
                                                             reason="Triton cannot run here"))]


def _eager(logits, index, temperature, math_dtype, weights):
    """(log-probs [..., K], d(sum w * logprobs)/dlogits) by autograd of log_softmax + gather in `math_dtype`;
    entries equal to -100 give 0. The gradient comes back in the logits' dtype, as any autograd would."""
    leaf = logits.detach().clone().requires_grad_()
    active = index != -100
    log_p = torch.log_softmax(leaf.to(math_dtype) / temperature, dim=-1).gather(-1, torch.where(active, index, 0))
    out = torch.where(active, log_p, 0.0)
    (out * weights.to(math_dtype)).sum().backward()
    return out.detach().double(), leaf.grad.double()


def _index(shape, vocab, k, generator=None):
    index = torch.randint(0, vocab, shape + (k,), device=DEVICE)
    if k > 1:
        index[0, 0, 1] = index[0, 0, 0]  # a duplicate token in one position
        index[1, 1, 0] = -100             # an ignored entry (the next one becomes the row's anchor)
    index[1, 2, :] = -100                 # a position with every entry ignored
    return index


def _max_error(value, exact):
    return (value.double() - exact).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("temperature", [0.3, 2.5])
@pytest.mark.parametrize("scale", [3.0, 30.0, 1e4])
def test_accuracy_rule_against_fp64(backend, k, temperature, scale):
    vocab = 131
    full = torch.randn(3, 5, vocab, device=DEVICE, dtype=torch.float64) * scale
    logits = full[:, :-1].float()  # a strided slice of the positions
    index = _index((3, 4), vocab, k)
    weights = torch.randn(3, 4, k, device=DEVICE)
    leaf = logits.clone().requires_grad_()
    out = ak.logprobs_from_logits(leaf, index, temperature=temperature, backend=backend)
    assert out.shape == index.shape and out.dtype == torch.float32 and not out._is_view()
    (out * weights).sum().backward()
    exact, exact_grad = _eager(logits.double(), index, temperature, torch.float64, weights)
    eager, eager_grad = _eager(logits, index, temperature, torch.float32, weights)
    # The accuracy rule: error against fp64 <= 3 x eager fp32's error on the same input + 1e-5.
    assert _max_error(out, exact) <= 3 * _max_error(eager, exact) + 1e-5
    assert torch.all(out[index == -100] == 0)
    grad_bound = 3 * _max_error(eager_grad, exact_grad) + 1e-5
    # The K label positions are written by the K path itself: the rule there at every magnitude.
    active = index != -100
    at_labels = torch.zeros(logits.shape, dtype=torch.bool, device=DEVICE)
    at_labels.scatter_(-1, torch.where(active, index, 0), active)
    assert _max_error(leaf.grad[at_labels], exact_grad[at_labels]) <= grad_bound
    # Everywhere else the gradient is the backend's own single-label backward with coefficient sum_k a_k at
    # the row's first active label, bit for bit.
    # the anchor: the first active label of largest logit
    key = torch.where(active, logits.gather(-1, torch.where(active, index, 0)), float("-inf"))
    first = (active & (key == key.amax(-1, keepdim=True))).to(torch.int8).argmax(-1, keepdim=True)
    anchor = torch.where(active.any(-1), index.gather(-1, first).squeeze(-1), -100)
    plain_leaf = logits.clone().requires_grad_()
    plain = ak.logprobs_from_logits(plain_leaf, anchor, temperature=temperature, backend=backend)
    (plain * torch.where(active, weights, 0.0).sum(-1)).sum().backward()
    assert torch.equal(leaf.grad[~at_labels], plain_grad := plain_leaf.grad[~at_labels]) and plain_grad.numel()
    # And the whole gradient meets the rule, at every magnitude and temperature tested.
    assert _max_error(leaf.grad, exact_grad) <= grad_bound


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [None, 1, 3])
def test_matches_trl_selective_log_softmax(backend, dtype, k):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    logits = (torch.randn(3, 5, 173, device=DEVICE) * 4).to(dtype)
    index = torch.randint(0, 173, (3, 5) + ((k,) if k else ()), device=DEVICE)
    temperature = 0.8
    exact = torch.log_softmax(logits.double() / temperature, -1)
    exact = exact.gather(-1, index if k else index.unsqueeze(-1))
    exact = exact if k else exact.squeeze(-1)
    trl_leaf = logits.clone().requires_grad_()
    theirs = trl_utils.selective_log_softmax(trl_leaf, index, temperature)
    ours_leaf = logits.clone().requires_grad_()
    ours = ak.selective_log_softmax(ours_leaf, index, temperature, backend=backend)
    assert ours.shape == theirs.shape == index.shape and ours.dtype == torch.float32
    if dtype == torch.float32:
        assert _max_error(ours, exact) <= 3 * _max_error(theirs, exact) + 1e-5
    else:  # TRL computes and returns the logits' dtype; ours stays fp32 and is at least as accurate
        assert _max_error(ours, exact) <= _max_error(theirs, exact)
        assert _max_error(ours, exact) <= 1e-5 * max(1.0, exact.abs().max().item())
    rounded = ak.selective_log_softmax(logits, index, temperature, backend=backend, dtype=dtype)
    assert rounded.dtype == theirs.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(rounded, ours)
    else:  # the fp32 result rounded once: within half an ulp of the exact value (+ the fp32 math's error)
        ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=1e-30))))
        assert torch.all((rounded.double() - exact).abs() <= 0.5 * ulp + 1e-5)
        assert _max_error(rounded, exact) <= _max_error(theirs, exact)
    weights = torch.randn(index.shape, device=DEVICE)
    (theirs.float() * weights).sum().backward()
    (ours * weights).sum().backward()
    assert ours_leaf.grad.dtype == dtype
    _, exact_grad = _eager(logits.double(), index if k else index.unsqueeze(-1), temperature, torch.float64,
                           weights if k else weights.unsqueeze(-1))
    _, eager_grad = _eager(logits, index if k else index.unsqueeze(-1), temperature, torch.float32,
                           weights if k else weights.unsqueeze(-1))
    bound = 3 * _max_error(eager_grad, exact_grad) + 1e-5
    assert _max_error(ours_leaf.grad, exact_grad) <= bound
    assert _max_error(ours_leaf.grad, exact_grad) <= max(_max_error(trl_leaf.grad, exact_grad), bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_mask_matches_trl(backend):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    logits = torch.randn(4, 6, 57, device=DEVICE)
    index = torch.randint(0, 57, (4, 6, 2), device=DEVICE)
    row_mask = torch.rand(4, 6, 2, device=DEVICE) > 0.3
    leaves = [logits.clone().requires_grad_() for _ in range(2)]
    theirs = trl_utils.selective_log_softmax(leaves[0], index, 1.0, row_mask)
    ours = ak.selective_log_softmax(leaves[1], index, 1.0, row_mask, backend=backend)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert torch.all(ours[~row_mask] == 0)
    weights = torch.randn(4, 6, 2, device=DEVICE)
    (theirs * weights).sum().backward()
    (ours * weights).sum().backward()
    torch.testing.assert_close(leaves[1].grad, leaves[0].grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_shapes_inplace_backward_and_in_place_edits(backend, inplace):
    cases = [((7, 31), (7, 1)),          # [B, V] logits, [B, 1] index -> [B, 1], like torch.gather
             ((31,), (4,)),              # one position, K = 4
             ((2, 3, 2, 31), (2, 3, 2, 5)),
             ((0, 3, 31), (0, 3, 2))]    # no positions
    for logits_shape, index_shape in cases:
        base = torch.randn(logits_shape, device=DEVICE) * 2
        index = torch.randint(0, 31, index_shape, device=DEVICE)
        leaf = base.clone().requires_grad_()
        out = ak.logprobs_from_logits(leaf * 1.0, index, backend=backend, inplace_backward=inplace)
        assert out.shape == index.shape
        out.masked_fill_(index % 2 == 0, 0.0)  # the output is an ordinary tensor
        weights = torch.randn(index_shape, device=DEVICE)
        (out * weights).sum().backward()
        exact = base.double().requires_grad_()
        expected = torch.log_softmax(exact, -1).gather(-1, index).masked_fill(index % 2 == 0, 0.0)
        (expected * weights.double()).sum().backward()
        torch.testing.assert_close(out.double(), expected.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(leaf.grad.double(), exact.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_duplicates_and_an_index_larger_than_the_vocab(backend):
    """K = 40 > V = 13: every token appears several times in a row; the gradient sums their coefficients."""
    logits = torch.randn(5, 13, device=DEVICE, dtype=torch.float64)
    index = torch.randint(0, 13, (5, 40), device=DEVICE)
    index[2, ::3] = -100
    weights = torch.randn(5, 40, device=DEVICE, dtype=torch.float64)
    leaf = logits.float().requires_grad_()
    out = ak.logprobs_from_logits(leaf, index, backend=backend)
    (out * weights.float()).sum().backward()
    exact, exact_grad = _eager(logits, index, 1.0, torch.float64, weights)
    _, eager_grad = _eager(logits.float(), index, 1.0, torch.float32, weights)
    assert _max_error(out, exact) <= 1e-5
    assert _max_error(leaf.grad, exact_grad) <= 3 * _max_error(eager_grad, exact_grad) + 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_at_minus_inf(backend):
    """A label whose logit is -inf has l = -inf and gradient a_k / tau; the other labels of its row stay finite."""
    logits = torch.randn(4, 29, device=DEVICE)
    logits[:, :5] = float("-inf")
    index = torch.tensor([[0, 7, 9], [3, 3, 1], [11, 0, 2], [20, 21, 22]], device=DEVICE)
    weights = torch.randn(4, 3, device=DEVICE)
    leaf = logits.clone().requires_grad_()
    out = ak.logprobs_from_logits(leaf, index, temperature=0.9, backend=backend)
    (out * weights).sum().backward()  # the loss is -inf; its gradient is finite
    exact = torch.log_softmax(logits.double() / 0.9, -1).gather(-1, index)
    assert torch.equal(torch.isinf(out), index < 5) and torch.all(out[index < 5] < 0)
    torch.testing.assert_close(out[index >= 5].double(), exact[index >= 5], rtol=0, atol=1e-5)
    exact_leaf = logits.double().requires_grad_()
    expected = torch.log_softmax(exact_leaf / 0.9, -1).gather(-1, index)
    (expected * weights.double()).sum().backward()
    assert torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(leaf.grad.double(), exact_leaf.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_index(backend, index_dtype):
    logits = torch.randn(3, 4, 37, device=DEVICE)
    index = torch.randint(0, 37, (3, 4, 3), device=DEVICE)
    leaves = [logits.clone().requires_grad_() for _ in range(2)]
    outs = [ak.selective_log_softmax(leaf, i, backend=backend)
            for leaf, i in zip(leaves, (index, index.to(index_dtype)))]
    for out in outs:
        out.sum().backward()
    assert torch.equal(outs[0], outs[1]) and torch.equal(leaves[0].grad, leaves[1].grad)


def test_fp64_logits_stay_fp64():
    logits = torch.randn(4, 19, dtype=torch.float64, device=DEVICE)
    index = torch.randint(0, 19, (4, 3), device=DEVICE)
    out = ak.logprobs_from_logits(logits, index, backend="torch")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.log_softmax(logits, -1).gather(-1, index), rtol=0, atol=1e-12)


def test_dtype_argument_of_every_token_op():
    logits = torch.randn(3, 4, 23, device=DEVICE).to(torch.bfloat16)
    labels = torch.randint(0, 23, (3, 4), device=DEVICE)
    calls = {
        "logprobs_and_entropy": lambda **kw: ak.logprobs_and_entropy(logits, labels, backend="torch", **kw),
        "logprobs_from_logits": lambda **kw: ak.logprobs_from_logits(logits, labels, backend="torch", **kw),
        "entropy_from_logits": lambda **kw: ak.entropy_from_logits(logits, backend="torch", **kw),
        "selective_log_softmax": lambda **kw: ak.selective_log_softmax(logits, labels[..., None], backend="torch",
                                                                       **kw),
    }
    for name, call in calls.items():
        outputs = call()
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        assert all(out.dtype == torch.float32 for out in outputs), name
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            converted = call(dtype=dtype)
            converted = converted if isinstance(converted, tuple) else (converted,)
            for out, full in zip(converted, outputs):
                assert out.dtype == dtype, name
                assert torch.equal(out, full.to(dtype)), name
        for bad, error in ((torch.int64, TypeError), ("float32", TypeError), (torch.complex64, TypeError)):
            with pytest.raises(error, match="dtype"):
                call(dtype=bad)
    grad_leaf = logits.clone().requires_grad_()
    ak.logprobs_from_logits(grad_leaf, labels, backend="torch", dtype=torch.bfloat16).float().sum().backward()
    assert grad_leaf.grad is not None and grad_leaf.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("index, error, match", [
    (torch.zeros(3, 4, 0, dtype=torch.long), ValueError, r"K >= 1"),
    (torch.zeros(3, 5, 2, dtype=torch.long), ValueError, r"logits.shape\[:-1\] \+ \(K,\)"),
    (torch.zeros(3, 4, 2, 2, dtype=torch.long), ValueError, r"shape"),
    (torch.zeros(3, dtype=torch.long), ValueError, r"shape"),
    (torch.zeros(3, 4, 2), TypeError, r"integer"),
    (torch.full((3, 4, 2), 23, dtype=torch.long), ValueError, r"\[0, 23\)"),
    (torch.full((3, 4, 2), -1, dtype=torch.long), ValueError, r"-1"),
])
def test_bad_index_raises_naming_it(index, error, match):
    logits = torch.randn(3, 4, 23, device=DEVICE)
    with pytest.raises(error, match=match):
        ak.logprobs_from_logits(logits, index.to(DEVICE), backend="torch")
    with pytest.raises(error, match=match) as info:
        ak.selective_log_softmax(logits, index.to(DEVICE), backend="torch")
    assert str(info.value).startswith("index")  # named as the caller named it


def test_other_bad_arguments():
    logits = torch.randn(3, 4, 23, device=DEVICE)
    index = torch.randint(0, 23, (3, 4, 2), device=DEVICE)
    with pytest.raises(ValueError, match="row_mask"):
        ak.selective_log_softmax(logits, index, 1.0, torch.ones(3, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="temperature"):
        ak.selective_log_softmax(logits, index, 0.0)
    with pytest.raises(ValueError, match="labels must have shape"):  # K labels: logprobs_from_logits' form only
        ak.logprobs_and_entropy(logits, index, backend="torch")
    assert math.isfinite(ak.selective_log_softmax(logits, index, backend="torch").sum().item())
