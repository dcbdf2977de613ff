"""GPU-only checks of the Triton path (skipped without CUDA): compiled kernels on production shapes, 64-bit
offsets, CUDA-graph capture, torch.compile with inductor, and run-to-run determinism where atomics really
race. Memory: the largest test holds 4.3 GB of bf16 logits (gradient in place); all fit in 80 GB.
"""

import pytest
import torch

import aem_kernels as ak
from helpers import reference_backward, reference_forward

triton = pytest.importorskip("triton")
from aem_kernels.ops.segment.triton import segment_sums_deterministic  # noqa: E402

pytestmark = pytest.mark.gpu
IGNORE = -100


def _ops():
    from aem_kernels.ops.logprobs import triton as logprobs
    return logprobs




def _within_half_ulp(got, expected, dtype):
    """The kernel rounds its fp32 gradient to the storage dtype once: half an ulp, relative 2^-8 / 2^-11."""
    half_ulp = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -20}[dtype]
    return bool(((got.double() - expected).abs() <= half_ulp * expected.abs() + 1e-6).all())


def test_large_vocab_non_contiguous_matches_reference():
    b, t, vocab = 4, 257, 151936
    full = (torch.randn(b, t + 1, vocab, device="cuda") * 3).to(torch.bfloat16)
    logits3d = full[:, :-1]
    labels = torch.randint(0, vocab, (b * t,), device="cuda")
    labels[[5, 700]] = IGNORE
    lp, h, state = _ops().logprobs_entropy_fwd(logits3d, labels, 0.8, IGNORE)
    lp_ref, h_ref, _ = reference_forward(logits3d, labels, 0.8)
    # fp32 sums over 151936 terms: ~1e-6 relative; 1e-4 absolute covers log-probs of size ~10-20.
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-4)
    a, g = torch.randn_like(lp), torch.randn_like(lp)
    grad = torch.empty(logits3d.shape, dtype=logits3d.dtype, device="cuda")
    _ops().logprobs_entropy_bwd(logits3d, labels, state, h, a, g, 0.8, IGNORE, grad)
    assert _within_half_ulp(grad, reference_backward(logits3d, labels, 0.8, a, g), torch.bfloat16)


def test_more_than_2_31_elements():
    """N * V = 14300 * 151936 = 2.17e9 > 2^31 bf16 elements (4.3 GB; gradient in place): the last rows sit
    past the 32-bit offset range, which only int64 row offsets address correctly."""
    n, vocab = 14300, 151936
    assert n * vocab > 2 ** 31
    logits3d = torch.randn(1, n, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device="cuda")
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    sub = logits3d[:, rows].clone()  # the reference of 2e9 elements would not fit: check a few rows
    lp, h, state = _ops().logprobs_entropy_fwd(logits3d, labels, 1.0, IGNORE)
    lp_ref, h_ref, _ = reference_forward(sub, labels[rows])
    torch.testing.assert_close(lp[rows].double(), lp_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h[rows].double(), h_ref, rtol=1e-5, atol=1e-4)
    ones = torch.ones(n, device="cuda")
    _ops().logprobs_entropy_bwd(logits3d, labels, state, h, ones, None, 1.0, IGNORE, logits3d)
    expected = reference_backward(sub, labels[rows], 1.0, ones[:5], None)
    assert _within_half_ulp(logits3d[:, rows], expected, torch.bfloat16)


def test_cuda_graph_capture_and_replay():
    """No host sync in the launchers: forward + backward capture into a CUDA graph and replay on new data."""
    vocab, n = 32000, 128
    logits3d = torch.randn(2, n // 2, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device="cuda")
    a, b = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    grad = torch.empty_like(logits3d)
    tr = torch.randint(-1, 16, (n,), device="cuda")

    def step():
        lp, h, state = _ops().logprobs_entropy_fwd(logits3d, labels, 1.0, IGNORE)
        _, sums_h = segment_sums_deterministic((lp, h), tr, 16)
        _ops().logprobs_entropy_bwd(logits3d, labels, state, h, a, b, 1.0, IGNORE, grad)
        return lp, h, sums_h

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    logits3d.copy_(torch.randn_like(logits3d))
    graph.replay()
    torch.cuda.synchronize()
    expected_grad = grad.clone()
    eager = step()
    for got, want in zip(captured, eager):
        assert torch.equal(got, want)
    assert torch.equal(grad, expected_grad)


def test_deterministic_response_sums_are_bit_identical():
    vocab, n, responses = 32000, 8192, 64
    logits3d = torch.randn(1, n, vocab, device="cuda", dtype=torch.bfloat16) * 4
    labels = torch.randint(0, vocab, (n,), device="cuda")
    tr = torch.randint(-1, responses, (n,), device="cuda")
    runs = []
    for _ in range(3):
        lp, h, _ = _ops().logprobs_entropy_fwd(logits3d, labels, 1.0, IGNORE)
        runs.append(segment_sums_deterministic((lp, h), tr, responses))
    for other in runs[1:]:
        assert torch.equal(other[0], runs[0][0]) and torch.equal(other[1], runs[0][1])
    atomic = torch.zeros(responses + 1, device="cuda").index_add_(0, torch.where(tr >= 0, tr, responses), h)
    torch.testing.assert_close(atomic[:responses], runs[0][1], rtol=1e-5, atol=1e-3)


def test_torch_compile_inductor_fullgraph():
    x = torch.randn(4, 33, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 32000, (4, 32), device="cuda")

    def loss_fn(logits, labels):
        lp, h = ak.logprobs_and_entropy(logits[:, :-1], labels, backend="triton")
        return (2 * lp + h).sum()

    loss = torch.compile(loss_fn, fullgraph=True)(x, labels)
    loss.backward()
    grad, x.grad = x.grad.clone(), None
    eager = loss_fn(x, labels)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, x.grad)


def test_single_pass_loss_large_vocab():
    n, vocab = 2048, 151936
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16) * 2
    labels = torch.randint(0, vocab, (n,), device="cuda")
    extras = dict(token_response=torch.arange(n, device="cuda") // 128,  # 16 responses of 128 tokens
                  response_group=torch.arange(16, device="cuda") // 4,
                  old_logprobs=-torch.rand(n, device="cuda") * 8, old_entropy=torch.rand(n, device="cuda") * 3,
                  ref_logprobs=-torch.rand(n, device="cuda") * 8)
    advantages = torch.randn(16, device="cuda")
    config = ak.AEMConfig(surprisal_source="old", kl_coef=0.05, entropy_coef=0.01)
    results = {}
    for single_pass in (True, False):
        x = logits.detach().clone().requires_grad_()
        loss, metrics = ak.aem_policy_loss(x, labels, advantages, config=config, single_pass=single_pass,
                                           **extras)
        assert (type(loss.grad_fn).__name__ == "FusedGradientFunctionBackward") == single_pass  # "auto" -> triton
        loss.backward()
        results[single_pass] = (loss.detach(), x.grad, metrics)
    # The fused kernel sums l_t, h_t with the forward kernel's tiles and code (bit-identical in the interpreter);
    # compiled separately, FMA contraction may still differ in the last bit, hence a tolerance of a few ulps.
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-7)
    for key in results[True][2]:
        torch.testing.assert_close(results[True][2][key], results[False][2][key], rtol=1e-6, atol=1e-7, msg=key)
    # Both round an fp32 gradient to bf16; the fp32 values differ by a few ulps, so at most one bf16 ulp apart.
    diff = (results[True][1].float() - results[False][1].float()).abs()
    assert (diff <= 2.0 ** -7 * results[False][1].float().abs() + 1e-7).all()
