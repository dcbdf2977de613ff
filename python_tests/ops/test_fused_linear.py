"""ak.fused_linear_logprobs_and_entropy and ak.fused_linear_aem_policy_loss on the chunked CPU/torch paths and
(small shapes, Triton's interpreter) the Triton kernels: values and the three gradients against fp64 under the
accuracy rule, the input validation, and the loss twin against aem_policy_loss on materialised logits."""

from __future__ import annotations

import pytest
import torch

import aem_kernels as ak
from aem_kernels import BackendUnavailableError
from aem_kernels.ops.fused_linear import plan
from aem_kernels.ops.fused_linear import resolve_fused_linear_path
from fused_linear_checks import (BACKENDS, check_against_rule, device_for, grads, linear_inputs,
                                 materialised, max_error)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_and_three_gradients_follow_the_accuracy_rule(backend, dtype):
    x, w, b, labels, ga, gb = linear_inputs(dtype=dtype)
    check_against_rule(backend, x, w, b, labels, ga, gb, temperature=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_hidden_odd_sizes_no_bias_and_temperature(backend):
    x, w, b, labels, ga, gb = linear_inputs(shape=(2, 19), hidden=37, vocab=683, bias=False, ignore=(0, 20, 37))
    check_against_rule(backend, x, w, None, labels, ga, gb, temperature=2.5)


# The chunked path's accuracy is its row backend's: the row kernels keep (m, log d) apart, as the Triton
# kernels do (test below), so both meet the rule at large magnitudes too.
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("scale", [30.0, 3000.0])
@pytest.mark.parametrize("temperature", [0.3, 3.0])
def test_large_logit_magnitudes(backend, scale, temperature):
    # logits of std ~ 3 * scale: up to ~1e4
    x, w, b, labels, ga, gb = linear_inputs(scale=scale, vocab=517, hidden=24)
    check_against_rule(backend, x, w, b, labels, ga, gb, temperature=temperature)


def test_large_logit_magnitudes_triton():
    x, w, b, labels, ga, gb = linear_inputs(scale=3000.0, vocab=333, hidden=24)
    check_against_rule("triton", x, w, b, labels, ga, gb, temperature=0.3, path="tiles")


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_entropy(backend):
    x, w, b, labels, ga, gb = linear_inputs(vocab=407, hidden=33)
    lp, ent, _ = check_against_rule(backend, x, w, b, labels, ga, gb, with_entropy=False)
    assert ent is None
    dev = device_for(backend)
    full, _ = ak.fused_linear_logprobs_and_entropy(x.to(dev), w.to(dev), labels.to(dev), bias=b.to(dev),
                                                   backend=backend)
    torch.testing.assert_close(lp, full.cpu(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("budget", [1, 4 * 301 * 5, 10 ** 9])
def test_chunking_is_invisible(budget):
    x, w, b, labels, ga, gb = linear_inputs()
    lp, ent, grads = check_against_rule("cpu", x, w, b, labels, ga, gb, chunk_budget_bytes=budget)
    rows = plan.chunk_plan(37, 301, torch.float32, budget)
    assert rows == (1 if budget == 1 else 5 if budget < 10 ** 9 else 37)


def test_half_precision_several_chunks():
    x, w, b, labels, ga, gb = linear_inputs(dtype=torch.bfloat16, hidden=40, vocab=700)
    check_against_rule("cpu", x, w, b, labels, ga, gb, chunk_budget_bytes=4 * 700 * 6)
    assert plan.chunk_plan(37, 700, torch.bfloat16, 4 * 700 * 6) == 6


def test_default_budget():
    rows = plan.chunk_plan(4096, 151936, torch.float32)
    assert rows == 256   # = logits / 16 at fp32
    assert plan.chunk_plan(4096, 151936, torch.bfloat16) == 256   # the row floor (budget: 128 rows)
    assert plan.chunk_plan(100000, 32000, torch.bfloat16) == 100000 * 2 // 64
    rows = plan.chunk_plan(8, 1000, torch.float32)
    assert rows == 8   # the 16 MiB floor holds every row of a small batch


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_give_zero_and_no_gradient(backend):
    x, w, b, labels, ga, gb = linear_inputs(shape=(21,), ignore=range(21))
    dev = device_for(backend)
    leaves = [t.to(dev).requires_grad_() for t in (x, w, b)]
    lp, ent = ak.fused_linear_logprobs_and_entropy(*leaves[:2], labels.to(dev), bias=leaves[2], backend=backend)
    assert torch.equal(lp.cpu(), torch.zeros(21)) and torch.equal(ent.cpu(), torch.zeros(21))
    for g in grads((lp, ent), leaves, ga.to(dev), gb.to(dev)):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, w, b, _, _, _ = linear_inputs()
    dev = device_for(backend)
    hidden = x[:0].to(dev).requires_grad_()
    lp, ent = ak.fused_linear_logprobs_and_entropy(hidden, w.to(dev), torch.zeros(0, dtype=torch.long, device=dev),
                                                   backend=backend)
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == (0, 29)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_entropy", [True, False])
def test_outputs_may_be_edited_in_place(backend, with_entropy):
    """Users masked_fill_ their log-probs: the outputs are ordinary tensors, and an edit made after the loss is
    built reaches neither the saved entropy nor the backward."""
    dev = device_for(backend)
    x, w, b, labels, ga, gb = linear_inputs(shape=(3, 5), vocab=67)
    x, w, b, labels = x.to(dev), w.to(dev), b.to(dev), labels.to(dev)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]

    def loss(edit):
        lp, ent = ak.fused_linear_logprobs_and_entropy(leaves[0], leaves[1], labels, bias=leaves[2],
                                                       backend=backend, with_entropy=with_entropy)
        total = (lp * ga.to(dev, lp.dtype)).sum()
        if with_entropy:
            total = total + (ent * gb.to(dev, ent.dtype)).sum()
        if edit:
            assert not lp._is_view() and (ent is None or not ent._is_view())
            lp.masked_fill_(labels == -100, 7.0).mul_(3.0)
            if ent is not None:
                ent.fill_(-1.0)
        return torch.autograd.grad(total, leaves)

    for plain, edited in zip(loss(False), loss(True)):
        assert torch.equal(plain, edited)


def test_triton_deterministic_matches_atomic():
    x, w, b, labels, ga, gb = linear_inputs(vocab=333, hidden=35)
    _, _, det = check_against_rule("triton", x, w, b, labels, ga, gb, deterministic=True, path="tiles")
    _, _, atomic = check_against_rule("triton", x, w, b, labels, ga, gb, path="tiles")
    for a, d in zip(atomic, det):
        torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-6)


def test_only_hidden_needs_grad_and_strided_hidden():
    x, w, b, labels, ga, gb = linear_inputs(shape=(4, 10), hidden=32)
    big = torch.randn(4, 12, 32)
    big[:, :10] = x
    hidden = big.requires_grad_()
    lp, ent = ak.fused_linear_logprobs_and_entropy(hidden[:, :10], w, labels, bias=b)
    (grad,) = grads((lp, ent), [hidden], ga, gb)
    eager = materialised(x, w, b, labels, 1.0, torch.float32)
    (ref,) = grads(eager[:2], [eager[2][0]], ga, gb)
    torch.testing.assert_close(grad[:, :10], ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(grad[:, 10:], torch.zeros(4, 2, 32))


def test_matches_logprobs_and_entropy_of_materialised_logits():
    x, w, b, labels, _, _ = linear_inputs(shape=(3, 7), vocab=129)
    ours = ak.fused_linear_logprobs_and_entropy(x, w, labels, bias=b, temperature=1.3)
    ref = ak.logprobs_and_entropy(x @ w.T + b, labels, temperature=1.3)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_fp64_inputs_take_the_torch_path():
    x, w, b, labels, ga, gb = linear_inputs(dtype=torch.float64)
    assert resolve_fused_linear_path("auto", torch.device("cpu"), torch.float64).key == "torch-chunked"
    lp, ent = ak.fused_linear_logprobs_and_entropy(x, w, labels, bias=b)
    truth = materialised(x, w, b, labels, 1.0, torch.float64)
    assert lp.dtype == torch.float64 and max_error(lp, truth[0]) < 1e-12 and max_error(ent, truth[1]) < 1e-12
    with pytest.raises(BackendUnavailableError, match="fp64"):
        dev = device_for("triton")
        ak.fused_linear_logprobs_and_entropy(x.to(dev), w.to(dev), labels.to(dev), backend="triton")


# ---- validation ------------------------------------------------------------------------------------------

def _bad_calls():
    x, w, b, labels, _, _ = linear_inputs(shape=(2, 5), hidden=8, vocab=50)
    f = ak.fused_linear_logprobs_and_entropy
    return [
        ("hidden", TypeError, lambda: f(x.numpy(), w, labels)),
        ("hidden", TypeError, lambda: f(x.long(), w.long(), labels)),
        ("weight", ValueError, lambda: f(x, w[:, :7], labels)),            # width mismatch
        ("weight", ValueError, lambda: f(x, w.T.contiguous(), labels)),    # [H, V]
        ("weight", ValueError, lambda: f(x, w[0], labels)),                # not 2-D
        ("weight", TypeError, lambda: f(x, w.double(), labels)),
        ("weight", ValueError, lambda: f(x, w.to("meta"), labels)),
        ("bias", ValueError, lambda: f(x, w, labels, bias=b[:-1])),
        ("bias", ValueError, lambda: f(x, w, labels, bias=b[None])),
        ("bias", TypeError, lambda: f(x, w, labels, bias=b.half())),
        ("bias", ValueError, lambda: f(x, w, labels, bias=b.to("meta"))),
        ("labels", ValueError, lambda: f(x, w, labels[:, :4])),
        ("labels", TypeError, lambda: f(x, w, labels.float())),
        ("labels", ValueError, lambda: f(x, w, torch.full_like(labels, 50))),
        ("temperature", ValueError, lambda: f(x, w, labels, temperature=0.0)),
        ("with_entropy", TypeError, lambda: f(x, w, labels, with_entropy=1)),
        ("deterministic", TypeError, lambda: f(x, w, labels, deterministic="yes")),
        ("chunk_budget_bytes", ValueError, lambda: f(x, w, labels, chunk_budget_bytes=0)),
        ("backend", ValueError, lambda: f(x, w, labels, backend="cuda")),
    ]


@pytest.mark.parametrize("index", range(19))
def test_bad_input_names_the_argument(index):
    name, error, call = _bad_calls()[index]
    with pytest.raises(error, match=name):
        call()


def test_bad_inputs_list_is_complete():
    assert len(_bad_calls()) == 19


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_gpu_llm_like_shapes(dtype, deterministic):
    # several full 64 x 128 tiles and ragged edges in every dimension, compiled kernels (not the interpreter)
    x, w, b, labels, ga, gb = linear_inputs(shape=(3, 333), hidden=520, vocab=5003, dtype=dtype, ignore=(0, 500))
    check_against_rule("triton", x, w, b, labels, ga, gb, temperature=0.8, deterministic=deterministic,
                       path="tiles")
