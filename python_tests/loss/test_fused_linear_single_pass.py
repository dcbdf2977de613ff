"""The fused-linear AEM loss's single pass (`loss/single_pass.py`, `ops/fused_linear/chunked.chunked_single_pass`):
when the modulation weights are known before the forward, every chunk's gradient is finished in the forward.
It must give the two-pass path's loss, metrics and gradients (up to fp32 summation order), for every option."""

import pytest
import torch

import aem_kernels as ak

N, H, V, R = 53, 24, 301, 6


def _batch(dtype=torch.float32, seed=1, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 0.4).to(dtype)
    b = torch.randn(V, generator=gen).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[[3, 9]] = -100
    token_response = torch.randint(-1, R, (N,), generator=gen)
    token_response[:R] = torch.arange(R)    # every response has a token
    kw = dict(token_response=token_response, response_group=torch.tensor([0, 0, 0, 1, 1, 1]),
              old_logprobs=-torch.rand(N, generator=gen) * 3, old_entropy=torch.rand(N, generator=gen) * 2,
              ref_logprobs=-torch.rand(N, generator=gen) * 3)
    return hidden, weight, b, labels, torch.randn(R, generator=gen), kw


def _run(single_pass, config, dtype=torch.float32, bias=True, requires=(True, True, True), scale=3.0, **extra):
    hidden, weight, b, labels, adv, kw = _batch(dtype, bias=bias)
    leaves = [t.requires_grad_(r) if t is not None else None for t, r in zip((hidden, weight, b), requires)]
    loss, metrics = ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, bias=b, config=config,
                                                    single_pass=single_pass, **kw, **extra)
    (scale * loss).backward()
    return loss.detach(), metrics, [t.grad if t is not None else None for t in leaves], type(loss.grad_fn).__name__


CONFIGS = [
    dict(beta=0.0),
    dict(beta=1.0, surprisal_source="old"),
    dict(beta=1.0, surprisal_source="old", uncertainty="surprisal", entropy_coef=0.01, kl_coef=0.1, kl_type="k3",
         dual_clip=3.0),
    dict(beta=0.5, surprisal_source="old", loss_agg_mode="seq-mean-token-mean", clip_low=0.1, clip_high=0.3),
    dict(beta=0.0, loss_agg_mode="seq-mean-token-sum-norm", kl_coef=0.2, kl_type="k2", temperature=0.7),
    dict(beta=2.0, surprisal_source="old", loss_agg_mode="seq-mean-token-sum", entropy_coef=-0.05),
]


def _assert_same(ours, ref, atol_grad):
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-7)
    assert ours[1].keys() == ref[1].keys()
    for key in ours[1]:
        torch.testing.assert_close(ours[1][key], ref[1][key], rtol=1e-6, atol=1e-7, msg=key)
    for g, r in zip(ours[2], ref[2]):
        assert (g is None) == (r is None)
        if g is not None:
            assert g.dtype == r.dtype and g.shape == r.shape
            torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=atol_grad * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_single_pass_equals_two_pass(backend, index):
    config = ak.AEMConfig(**CONFIGS[index])
    ours = _run(None, config, backend=backend)
    ref = _run(False, config, backend=backend)
    assert ours[3] == "FusedLinearLossGradientFunctionBackward"   # taken unasked: fp32, weights known
    assert ref[3] != ours[3]
    _assert_same(ours, ref, 1e-6)


@pytest.mark.parametrize("requires", [(True, False, False), (False, True, False), (False, False, True),
                                      (True, True, False)])
def test_only_some_inputs_need_gradients(requires):
    config = ak.AEMConfig(beta=1.0, surprisal_source="old")
    ours, ref = _run(True, config, requires=requires), _run(False, config, requires=requires)
    _assert_same(ours, ref, 1e-6)
    for g, r in zip(ours[2], requires):
        assert (g is not None) == r


def test_no_bias_several_chunks_and_fp64():
    config = ak.AEMConfig(beta=1.0, surprisal_source="old", entropy_coef=0.02)
    budget = 7 * V * 4   # seven rows per chunk: eight chunks with a ragged last one
    _assert_same(_run(True, config, bias=False, chunk_budget_bytes=budget), _run(False, config, bias=False), 1e-6)
    ours = _run(None, config, dtype=torch.float64)
    assert ours[3] == "FusedLinearLossGradientFunctionBackward"
    _assert_same(ours, _run(False, config, dtype=torch.float64), 1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_only_when_asked(dtype):
    config = ak.AEMConfig(beta=1.0, surprisal_source="old")
    auto, asked = _run(None, config, dtype=dtype), _run(True, config, dtype=dtype)
    ref = _run(False, config, dtype=dtype)
    assert auto[3] != "FusedLinearLossGradientFunctionBackward"
    assert asked[3] == "FusedLinearLossGradientFunctionBackward"
    # both compute in fp32 and round each gradient once to the inputs' dtype: within one rounding of each other
    _assert_same(asked, ref, 2.0 * torch.finfo(dtype).eps)


def _assert_accuracy_rule(config, weight_scale=1.0, min_logit=0.0):
    """The single pass's loss and three gradients against fp64 of the materialised logits: no worse than 3x
    eager fp32's error against fp64, + 1e-5 (the accuracy rule)."""
    hidden, weight, b, labels, adv, kw = _batch(torch.float64)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight * weight_scale, b)]
    logits = leaves[0] @ leaves[1].T + leaves[2]
    assert logits.abs().max() > min_logit
    truth, _ = ak.aem_policy_loss(logits, labels, adv, config=config, backend="torch", **kw)
    truth_grads = torch.autograd.grad(truth, leaves)
    f32 = [t.detach().float().requires_grad_() for t in leaves]
    loss, _ = ak.fused_linear_aem_policy_loss(*f32[:2], labels, adv, bias=f32[2], config=config, **kw)
    assert type(loss.grad_fn).__name__ == "FusedLinearLossGradientFunctionBackward"
    grads = torch.autograd.grad(loss, f32)
    eager, _ = ak.aem_policy_loss(f32[0] @ f32[1].T + f32[2], labels, adv, config=config, backend="torch", **kw)
    eager_grads = torch.autograd.grad(eager, f32)
    assert abs(loss.double() - truth).item() <= 3 * abs(eager.double() - truth).item() + 1e-5
    for g, e, t in zip(grads, eager_grads, truth_grads):
        assert (g.double() - t).abs().max() <= 3 * (e.double() - t).abs().max() + 1e-5


def test_matches_aem_policy_loss_on_the_materialised_logits():
    _assert_accuracy_rule(ak.AEMConfig(beta=1.0, surprisal_source="old", kl_coef=0.1, entropy_coef=0.01))


def test_gradient_scales_with_the_upstream_gradient_and_accumulates():
    hidden, weight, b, labels, adv, kw = _batch()
    hidden.requires_grad_()
    config = ak.AEMConfig(beta=0.0)
    loss, _ = ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, bias=b, config=config, **kw)
    (g1,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    (g2,) = torch.autograd.grad(-2.5 * loss, hidden, retain_graph=True)
    torch.testing.assert_close(g2, -2.5 * g1)
    (loss + loss).backward()
    torch.testing.assert_close(hidden.grad, 2 * g1)
    assert g1.abs().max() > 0


def test_no_gradient_work_without_grad():
    hidden, weight, b, labels, adv, kw = _batch()
    hidden.requires_grad_()
    config = ak.AEMConfig(beta=0.0)
    with torch.no_grad():
        loss, metrics = ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, bias=b, config=config, **kw)
    assert loss.grad_fn is None
    ref, _ = ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, bias=b, config=config, single_pass=False,
                                             **kw)
    torch.testing.assert_close(loss, ref.detach(), rtol=0, atol=0)


def test_padded_form():
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 9, H, generator=gen, requires_grad=True)
    weight = (torch.randn(V, H, generator=gen) * 0.3).requires_grad_()
    labels = torch.randint(0, V, (2, 9), generator=gen)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    old = -torch.rand(2, 9, generator=gen) * 4
    kw = dict(response_mask=mask, response_group=torch.tensor([0, 0]), old_logprobs=old,
              config=ak.AEMConfig(beta=1.0, surprisal_source="old", uncertainty="surprisal"))
    adv = torch.tensor([0.7, -1.1])
    loss, _ = ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, **kw)
    assert type(loss.grad_fn).__name__ == "FusedLinearLossGradientFunctionBackward"
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref, _ = ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, single_pass=False, **kw)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_single_pass_true_says_why_it_cannot_apply():
    hidden, weight, b, labels, adv, kw = _batch()
    hidden.requires_grad_()
    with pytest.raises(ValueError, match="single_pass=True cannot apply: .*surprisal_source"):
        ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, config=ak.AEMConfig(beta=1.0), single_pass=True,
                                        **kw)
    kw.pop("old_entropy")
    with pytest.raises(ValueError, match="single_pass=True cannot apply: .*old_entropy"):
        ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, single_pass=True,
                                        config=ak.AEMConfig(beta=1.0, surprisal_source="old"), **kw)
    with pytest.raises(ValueError, match="single_pass=True cannot apply: .*Triton"):
        ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, config=ak.AEMConfig(beta=0.0), single_pass=True,
                                        backend="triton", **kw)
    with pytest.raises(TypeError, match="single_pass"):
        ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, config=ak.AEMConfig(beta=0.0), single_pass=1,
                                        **kw)


def test_gradients_are_handed_on_without_a_copy():
    """The single pass's gradient buffers become `.grad` themselves for the usual upstream gradient 1 (no second
    [V, H] / [N, H] copy at the backward); with a retained graph they are copied, so a second backward is right."""
    from aem_kernels.ops.fused_linear import chunked

    ptrs = {}
    original = chunked.chunked_single_pass

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        ptrs.update(hidden=out[2][0].data_ptr(), weight=out[2][1].data_ptr())
        return out

    hidden, weight, b, labels, adv, kw = _batch()
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    config = ak.AEMConfig(beta=0.0)
    try:
        chunked.chunked_single_pass = spy
        loss, _ = ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, config=config, **kw)
        loss.backward()
        assert hidden.grad.data_ptr() == ptrs["hidden"] and weight.grad.data_ptr() == ptrs["weight"]
        first = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        loss, _ = ak.fused_linear_aem_policy_loss(hidden, weight, labels, adv, config=config, **kw)
        loss.backward(retain_graph=True)
        assert weight.grad.data_ptr() != ptrs["weight"]
        loss.backward()
    finally:
        chunked.chunked_single_pass = original
    for t, g in zip(leaves, first):
        torch.testing.assert_close(t.grad, 2 * g)


@pytest.mark.parametrize("scale,temperature", [(1.0, 0.3), (300.0, 1.0), (300.0, 0.3)])
def test_accuracy_rule_at_large_logits_and_low_temperature(scale, temperature):
    """The rule at logits of magnitude up to ~1e4 (scale 300 on weights of norm ~30) and tau 0.3."""
    config = ak.AEMConfig(beta=1.0, surprisal_source="old", entropy_coef=0.05, temperature=temperature)
    _assert_accuracy_rule(config, scale, 1e3 if scale > 1 else 1.0)
