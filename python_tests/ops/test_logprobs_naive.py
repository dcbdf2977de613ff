"""The torch backend (`_torch.py`) of the token ops and the segment reductions against independent fp64
formulations; the oracle of `reference.py` against the same formulations."""

import pytest
import torch

import aem_kernels as ak
from aem_kernels.ops.logprobs import naive as reference
from aem_kernels.ops.logprobs import pytorch as _torch
from aem_kernels.ops.segment import naive as segment_naive
from aem_kernels.layout import as_rows3d

from helpers import adversarial_logits, oracle_logprobs_entropy

KINDS = ["normal", "huge", "neg_inf", "equal", "peaked"]


def _labels(n, vocab, g, ignore_frac=0.2):
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    return labels


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_forward_fp64_matches_oracle(kind, temperature):
    g = torch.Generator().manual_seed(1)
    logits = adversarial_logits(kind, 37, 101, g)
    labels = _labels(37, 101, g)
    if kind == "neg_inf":  # a label on a -inf logit has log-prob -inf; keep labels on the finite column here
        labels = torch.where(labels >= 0, 0, labels)
    lp, h = ak.logprobs_and_entropy(logits, labels, temperature=temperature, backend="torch")
    lp_ref, h_ref = oracle_logprobs_entropy(logits, labels, temperature)
    # both in fp64: differences are rounding of O(|z|/tau) sums (|z| up to 1e4): 1e-12 relative to the scale.
    scale = logits[torch.isfinite(logits)].abs().max().item() / temperature + 1
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "huge", "equal", "peaked"])
def test_forward_low_precision_matches_oracle_on_same_values(dtype, kind):
    g = torch.Generator().manual_seed(2)
    logits = adversarial_logits(kind, 29, 257, g)
    if dtype == torch.float16:
        logits = logits.clamp(-6e4, 6e4)
    logits = logits.to(dtype)
    labels = _labels(29, 257, g)
    lp, h = ak.logprobs_and_entropy(logits, labels, backend="torch")
    assert lp.dtype == torch.float32 and h.dtype == torch.float32
    lp_ref, h_ref = oracle_logprobs_entropy(logits, labels)
    # fp32 math on exactly representable inputs: the shifted form keeps the error at fp32 rounding of
    # O(log V) quantities plus eps * |s| for the shifted logits (|s| <= 2e4 for the "huge" rows).
    spread = (logits.double().amax(-1) - logits.double().amin(-1)).max().item()
    atol = 4e-7 * (spread + torch.log(torch.tensor(257.0)).item())
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=atol)
    torch.testing.assert_close(h.double(), h_ref, rtol=0, atol=atol + 1e-6)


def test_special_rows():
    # all-equal row: h = log V, l = -log V; V = 1: both 0; a label on a -inf logit: l = -inf, finite entropy.
    vocab = 50
    logits = torch.zeros(3, vocab, dtype=torch.float64)
    logits[2, 5] = float("-inf")
    lp, h = ak.logprobs_and_entropy(logits, torch.tensor([3, 7, 5]), backend="torch")
    log_v = torch.log(torch.tensor(float(vocab), dtype=torch.float64))
    torch.testing.assert_close(lp[:2], -log_v.expand(2), rtol=0, atol=1e-14)
    torch.testing.assert_close(h[:2], log_v.expand(2), rtol=0, atol=1e-14)
    assert lp[2] == float("-inf") and torch.isfinite(h[2])
    one = ak.logprobs_and_entropy(torch.randn(4, 1), torch.zeros(4, dtype=torch.long), backend="torch")
    assert torch.equal(one[0], torch.zeros(4)) and torch.equal(one[1], torch.zeros(4))


def test_all_neg_inf_row_is_nan_not_silently_zero():
    logits = torch.full((2, 8), float("-inf"))
    logits[1] = 0.0
    lp, h = ak.logprobs_and_entropy(logits, torch.tensor([1, 1]), backend="torch")
    assert torch.isnan(lp[0]) and torch.isnan(h[0])
    assert torch.isfinite(lp[1]) and torch.isfinite(h[1])


def test_single_token_empty_and_all_ignored():
    lp, h = ak.logprobs_and_entropy(torch.randn(1, 9), torch.tensor([4]), backend="torch")
    assert lp.shape == (1,) and lp.item() < 0 and h.item() > 0
    lp, h = ak.logprobs_and_entropy(torch.randn(0, 9), torch.zeros(0, dtype=torch.long), backend="torch")
    assert lp.shape == (0,) and h.shape == (0,)
    logits = torch.randn(5, 9, requires_grad=True)
    lp, h = ak.logprobs_and_entropy(logits, torch.full((5,), -100), backend="torch")
    assert torch.equal(lp, torch.zeros(5)) and torch.equal(h, torch.zeros(5))
    (lp.sum() + h.sum()).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_non_contiguous_and_4d_layouts_match_contiguous():
    g = torch.Generator().manual_seed(3)
    full = torch.randn(3, 8, 33, generator=g, dtype=torch.float64)
    sliced = full[:, :-1]  # cannot be flattened to [N, V] without a copy
    labels = torch.randint(0, 33, (3, 7), generator=g)
    lp, h = ak.logprobs_and_entropy(sliced, labels, backend="torch")
    lp_ref, h_ref = oracle_logprobs_entropy(sliced, labels)
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-13)
    four_d = torch.randn(2, 5, 6, 33, generator=g, dtype=torch.float64)[:, :, 1:]
    labels4 = torch.randint(0, 33, four_d.shape[:-1], generator=g)
    lp4, h4 = ak.logprobs_and_entropy(four_d, labels4, backend="torch")
    lp4_ref, h4_ref = oracle_logprobs_entropy(four_d, labels4)
    torch.testing.assert_close(lp4, lp4_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(h4, h4_ref, rtol=0, atol=1e-13)


def test_as_rows3d_never_copies_up_to_3d():
    base = torch.randn(4, 9, 17)
    for view in (base, base[:, :-1], base[1:, ::2], base.transpose(0, 1)):
        assert as_rows3d(view).data_ptr() == view.data_ptr()
        assert as_rows3d(view).shape[-1] == 17


def _grad_via_oracle(logits, labels, temperature, g_lp, g_h):
    x = logits.detach().double().requires_grad_(True)
    lp, h = oracle_logprobs_entropy(x, labels, temperature)
    lp = torch.zeros_like(h) if lp is None else lp
    (lp * g_lp + h * g_h).sum().backward()
    return x.grad


@pytest.mark.parametrize("kind", ["normal", "huge", "neg_inf", "peaked"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_backward_matches_autograd_of_oracle(kind, temperature):
    g = torch.Generator().manual_seed(4)
    logits = adversarial_logits(kind, 23, 67, g)
    labels = _labels(23, 67, g)
    if kind == "neg_inf":
        labels = torch.where(labels >= 0, 0, labels)
    g_lp, g_h = torch.randn(23, generator=g, dtype=torch.float64), torch.randn(23, generator=g, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    lp, h = ak.logprobs_and_entropy(x, labels, temperature=temperature, backend="torch")
    (lp * g_lp + h * g_h).sum().backward()
    expected = _grad_via_oracle(logits, labels, temperature, g_lp, g_h)
    # fp64 both ways; entries are O(|a| + |b| log V) / tau, rounding of the lse of 1e4-sized logits ~1e-12.
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-10)


def test_backward_only_one_output_and_low_precision_grad_dtype():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(11, 40, generator=g).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 40, (11,), generator=g)
    ak.entropy_from_logits(logits, backend="torch").sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    expected = _grad_via_oracle(logits, None, 1.0, 0.0, torch.ones(11, dtype=torch.float64))
    # the gradient is computed in fp32 and rounded once to bf16 (relative 2^-8)
    torch.testing.assert_close(logits.grad.double(), expected, rtol=2 ** -8, atol=1e-6)
    logits.grad = None
    ak.logprobs_from_logits(logits, labels, backend="torch").sum().backward()
    expected = _grad_via_oracle(logits, labels, 1.0, torch.ones(11, dtype=torch.float64), 0.0)
    torch.testing.assert_close(logits.grad.double(), expected, rtol=2 ** -8, atol=1e-6)


def test_gradcheck_fp64_function():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (2, 4), generator=g)
    labels[0, 1] = -100
    assert torch.autograd.gradcheck(
        lambda x: ak.logprobs_and_entropy(x, labels, temperature=0.8, backend="torch"), (logits,))
    assert torch.autograd.gradcheck(lambda x: ak.entropy_from_logits(x, temperature=1.3, backend="torch"),
                                    (logits,))


def test_inplace_backward_writes_into_logits():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(3, 6, 21, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 21, (3, 6), generator=g)
    expected = _grad_via_oracle(base, labels, 1.0, torch.ones(3, 6, dtype=torch.float64),
                                torch.full((3, 6), 0.5, dtype=torch.float64))
    leaf = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    logits = base.clone() + leaf  # non-leaf: the gradient flows into `leaf` after being written in place
    keep = logits.data_ptr()
    captured = {}
    logits.register_hook(lambda grad: captured.setdefault("ptr", grad.data_ptr()) and None)
    lp, h = ak.logprobs_and_entropy(logits, labels, backend="torch", inplace_backward=True)
    (lp.sum() + 0.5 * h.sum()).backward()
    assert captured["ptr"] == keep
    torch.testing.assert_close(logits.detach(), expected, rtol=0, atol=1e-12)


def test_chunked_walk_matches_single_chunk(monkeypatch):
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 13, 50, generator=g, dtype=torch.float64)[:, 1:]
    labels = torch.randint(0, 50, (2, 12), generator=g)
    whole = ak.logprobs_and_entropy(logits, labels, backend="torch")
    monkeypatch.setattr(_torch, "_CHUNK_BYTES", 50 * 8 * 5)  # 5 rows per chunk: uneven last chunk
    chunked = ak.logprobs_and_entropy(logits, labels, backend="torch")
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_segment_reductions_and_empty_responses():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 2, 0, -1, 2])
    torch.testing.assert_close(segment_naive.segment_sum_ref(values, ids, 4),
                               torch.tensor([4.0, 0.0, 7.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(segment_naive.segment_mean_ref(values, ids, 4),
                               torch.tensor([2.0, 0.0, 3.5, 0.0], dtype=torch.float64))
    assert torch.equal(segment_naive.segment_count_ref(ids, 4), torch.tensor([2, 0, 2, 0]))
    segment_naive.segment_mean_ref(values, ids, 4).sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([0.5, 0.5, 0.5, 0.0, 0.5], dtype=torch.float64))


def test_response_surprisal_and_entropy_public():
    lp = torch.tensor([-1.0, -2.0, -0.5, -4.0])
    ent = torch.tensor([0.5, 1.5, 1.0, 3.0])
    tr = torch.tensor([1, 1, 0, -1])
    torch.testing.assert_close(ak.response_surprisal(lp, tr, 3), torch.tensor([0.5, 1.5, 0.0]))
    torch.testing.assert_close(ak.response_surprisal(lp, tr, 3, reduction="sum"), torch.tensor([0.5, 3.0, 0.0]))
    torch.testing.assert_close(ak.response_entropy(ent, tr, 3), torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(ak.response_entropy(ent, tr, 3, reduction="sum"), torch.tensor([1.0, 2.0, 0.0]))


@pytest.mark.parametrize("kind", KINDS)
def test_oracle_of_reference_py_matches_independent_formulas(kind):
    """reference.py (the oracle the kernel tests use) against helpers' formulas and autograd, in fp64."""
    g = torch.Generator().manual_seed(9)
    logits = adversarial_logits(kind, 19, 45, g)
    labels = _labels(19, 45, g)
    if kind == "neg_inf":
        labels = torch.where(labels >= 0, 0, labels)
    lp, h, lse = reference.logprobs_entropy_fwd_ref(logits.view(1, 19, 45), labels, 0.7, -100)
    lp_x, h_x = oracle_logprobs_entropy(logits, labels, 0.7)
    scale = logits[torch.isfinite(logits)].abs().max().item() / 0.7 + 1
    torch.testing.assert_close(lp, lp_x, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(h, h_x, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(lse, torch.logsumexp(logits / 0.7, -1), rtol=0, atol=1e-12 * scale)
    _, h_all, _ = reference.logprobs_entropy_fwd_ref(logits.view(1, 19, 45), None, 0.7, -100)
    torch.testing.assert_close(h_all, oracle_logprobs_entropy(logits, None, 0.7)[1], rtol=0, atol=1e-12 * scale)
    g_lp, g_h = torch.randn(19, generator=g, dtype=torch.float64), torch.randn(19, generator=g, dtype=torch.float64)
    out = torch.full((1, 19, 45), float("nan"), dtype=torch.float64)
    reference.logprobs_entropy_bwd_ref(logits.view(1, 19, 45), labels, lse, h, g_lp, g_h, 0.7, -100, out)
    expected = _grad_via_oracle(logits, labels, 0.7, g_lp, g_h)
    torch.testing.assert_close(out.view(19, 45), expected, rtol=0, atol=1e-10)
    assert (out.view(19, 45)[labels == -100] == 0).all()


def test_oracle_special_rows():
    logits = torch.randn(1, 3, 8, dtype=torch.float64)
    logits[0, 1] = float("-inf")                       # no distribution: NaN, not a silent 0
    lp, h, _ = reference.logprobs_entropy_fwd_ref(logits, torch.tensor([2, 2, -100]), 1.0, -100)
    assert lp[1].isnan() and h[1].isnan() and lp[2] == 0 and h[2] == 0 and torch.isfinite(lp[0])
    # in place over the logits themselves, bf16 storage: the fp32 result rounded once
    x = torch.randn(1, 4, 16).to(torch.bfloat16)
    expected = _grad_via_oracle(x.view(4, 16), None, 1.0, 0.0, torch.ones(4, dtype=torch.float64))
    reference.logprobs_entropy_bwd_ref(x, None, None, None, None, torch.ones(4), 1.0, -100, x)
    torch.testing.assert_close(x.view(4, 16).double(), expected, rtol=2 ** -8, atol=1e-6)
