"""The fused-linear op under torch.compile: its forward and backward are torch.library custom ops
("aem_kernels::fused_linear_logprobs_entropy_fwd/_bwd"), so fullgraph=True traces (no data-dependent row
selection or chunk loop in the graph) and gives eager's values and gradients."""

import pytest
import torch

import aem_kernels as ak
from aem_kernels.ops.fused_linear import resolve_fused_linear_path


def _inputs(dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 13, 24, generator=gen).to(dtype)
    weight = (torch.randn(517, 24, generator=gen) * 0.3).to(dtype)
    b = torch.randn(517, generator=gen).to(dtype) if bias else None
    labels = torch.randint(0, 517, (3, 13), generator=gen)
    labels[0, :4] = -100
    return hidden, weight, b, labels


def _loss(hidden, weight, bias, labels, with_entropy, backend):
    lp, ent = ak.fused_linear_logprobs_and_entropy(hidden, weight, labels, bias=bias, with_entropy=with_entropy,
                                                   backend=backend, chunk_budget_bytes=4 * 517 * 8)
    out = (lp * torch.linspace(-1, 2, lp.numel()).view(lp.shape)).sum()
    return out + (ent.square().sum() if ent is not None else 0.0), lp


def _grads(fn, hidden, weight, bias, labels, *args):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    out, lp = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None, labels, *args)
    return [out.detach(), lp.detach()] + list(torch.autograd.grad(out, leaves))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype,with_entropy,bias", [(torch.float32, True, True), (torch.float32, False, False),
                                                      (torch.bfloat16, True, False), (torch.bfloat16, False, True)])
def test_fullgraph_compile_matches_eager(backend, dtype, with_entropy, bias):
    torch._dynamo.reset()
    hidden, weight, b, labels = _inputs(dtype, bias)
    eager = _grads(_loss, hidden, weight, b, labels, with_entropy, backend)
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    got = _grads(compiled, hidden, weight, b, labels, with_entropy, backend)
    for g, e in zip(got, eager):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=0, atol=0)   # the same kernels in the same order


def test_fullgraph_inductor():
    torch._dynamo.reset()
    hidden, weight, b, labels = _inputs(torch.float32)
    eager = _grads(_loss, hidden, weight, b, labels, True, "auto")
    got = _grads(torch.compile(_loss, fullgraph=True), hidden, weight, b, labels, True, "auto")
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)   # inductor may fuse the O(N) tail differently


def test_fused_linear_loss_under_fullgraph_compile_takes_two_passes():
    torch._dynamo.reset()
    hidden, weight, b, labels = _inputs(torch.float32)
    tr = torch.where(labels >= 0, torch.arange(3).view(3, 1).expand(3, 13), -1).reshape(-1)
    kw = dict(token_response=tr, response_group=torch.tensor([0, 0, 1]), num_groups=2,
              old_logprobs=-torch.rand(39), old_entropy=torch.rand(39),
              config=ak.AEMConfig(surprisal_source="old"))
    adv = torch.tensor([0.5, -1.0, 2.0])

    def loss_fn(h, w, bb):
        return ak.fused_linear_aem_policy_loss(h, w, labels.reshape(-1), adv, bias=bb, **kw)[0]

    leaves = [t.clone().requires_grad_() for t in (hidden.reshape(-1, 24), weight, b)]
    eager = loss_fn(*leaves)
    assert type(eager.grad_fn).__name__ == "FusedLinearLossGradientFunctionBackward"   # eager: the single pass
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*leaves)
    grads = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_custom_ops_pass_opcheck(dtype):
    hidden, weight, b, labels = _inputs(dtype)
    hidden2d, flat = hidden.reshape(-1, 24), labels.reshape(-1)
    path = resolve_fused_linear_path("torch" if dtype == torch.float64 else "cpu", hidden.device, dtype)
    args = (hidden2d, weight, b, flat, 0.7, -100, True, path.key, 4 * 517 * 8)   # the ops name their path
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    fwd_op = torch.ops.aem_kernels.fused_linear_logprobs_entropy_fwd.default
    bwd_op = torch.ops.aem_kernels.fused_linear_logprobs_entropy_bwd.default
    torch.library.opcheck(fwd_op, args, test_utils=tests)
    lp, ent, state = fwd_op(*args)
    assert state.shape == (39, 2)
    grad = torch.randn(39, dtype=lp.dtype)
    bwd_args = (hidden2d, weight, b, flat, state, ent, grad, grad.flip(0), 0.7, -100, True, True, True, False,
                path.key, 4 * 517 * 8)
    torch.library.opcheck(bwd_op, bwd_args, test_utils=tests)


def test_vocab_parallel_ops_trace_with_fullgraph(tmp_path):
    """Both vocab-parallel ops under torch.compile(fullgraph=True) inside skip_value_checks (a captured region
    cannot host-sync): a one-rank gloo group, ignored rows included, eager's values and gradients."""
    import torch.distributed as dist
    from aem_kernels.distributed import vocab_parallel_fused_linear_logprobs_and_entropy, \
        vocab_parallel_logprobs_and_entropy

    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(19, 12, generator=gen)
    weight = torch.randn(41, 12, generator=gen)
    labels = torch.randint(0, 41, (19,), generator=gen)
    labels[[2, 7, 8]] = -100
    upstream = torch.randn(2, 19, generator=gen)

    def fused(h, w):
        with ak.skip_value_checks():
            lp, ent = vocab_parallel_fused_linear_logprobs_and_entropy(h, w, labels, chunk_budget_bytes=4 * 41 * 5)
        return (lp * upstream[0]).sum() + (ent * upstream[1]).sum(), lp, ent

    def token(h, w):
        with ak.skip_value_checks():
            lp, ent = vocab_parallel_logprobs_and_entropy(h @ w.T, labels)
        return (lp * upstream[0]).sum() + (ent * upstream[1]).sum(), lp, ent

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for fn in (fused, token):
            results = []
            for run in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
                torch._dynamo.reset()
                h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
                out, lp, ent = run(h, w)
                results.append([out.detach(), lp.detach(), ent.detach(), *torch.autograd.grad(out, (h, w))])
            for got, want in zip(*reversed(results)):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            assert (results[1][1][[2, 7, 8]] == 0).all()
    finally:
        dist.destroy_process_group()
