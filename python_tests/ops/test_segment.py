"""The segment op (eq. 3, 3'): its path decision per device, the production reductions against the oracle
(`naive.py`) with and without the C++ extension, and the deterministic Triton kernel (in the interpreter)."""

import os

import pytest
import torch

from aem_kernels import capability
from aem_kernels.ops import segment
from aem_kernels.ops.segment import naive
from aem_kernels.ops.segment import pytorch as torch_segment


def test_segment_sum_implementation_per_device(monkeypatch):
    if capability.cpu_extension() is not None:
        from aem_kernels.ops.segment import cpu

        assert segment.resolve_segment_sum(torch.device("cpu")) is cpu.segment_sum
    if capability.TRITON_FOUND:
        from aem_kernels.ops.segment import triton

        assert segment.resolve_segment_sum(torch.device("cuda")) is triton.segment_sum
    assert segment.resolve_segment_sum(torch.device("meta")) is torch_segment.segment_sum
    monkeypatch.setattr(segment, "cpu_extension", lambda: None)   # the extension not built
    assert segment.resolve_segment_sum(torch.device("cpu")) is torch_segment.segment_sum


@pytest.mark.parametrize("with_extension", [True, False])
def test_production_reductions_match_the_oracle(monkeypatch, with_extension):
    if not with_extension:
        monkeypatch.setattr(segment, "cpu_extension", lambda: None)
    elif capability.cpu_extension() is None:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(3)
    values = torch.randn(2, 37, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(-1, 6, (2, 37), generator=g)
    ids[ids == 4] = 5  # segment 4 is empty: sum 0, mean 0
    torch.testing.assert_close(segment.segment_sum(values, ids, 7), naive.segment_sum_ref(values, ids, 7),
                               rtol=0, atol=1e-12)
    assert torch.equal(segment.segment_count(ids, 7), naive.segment_count_ref(ids, 7))
    mean = segment.segment_mean(values, ids, 7)
    torch.testing.assert_close(mean, naive.segment_mean_ref(values, ids, 7), rtol=0, atol=1e-12)
    assert mean[4] == 0 and mean[6] == 0
    mean.sum().backward()
    counts = naive.segment_count_ref(ids, 7).clamp(min=1).double()
    expected = torch.where(ids >= 0, 1.0 / counts[ids.clamp(min=0)], 0.0)
    torch.testing.assert_close(values.grad, expected, rtol=0, atol=1e-15)
    assert segment.segment_sum(torch.zeros(0), torch.zeros(0, dtype=torch.long), 3).tolist() == [0, 0, 0]


def _triton_segment():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 on CPU tensors")
    from aem_kernels.ops.segment import triton

    return triton


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_triton_segment_sum_matches_fp64_and_is_deterministic(dtype):
    kernel = _triton_segment()
    g = torch.Generator().manual_seed(5)
    n, responses = 517, 9                       # > 4 chunks of BLOCK_N for the big segments
    values = (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype)
    ids = torch.randint(-1, responses, (n,), generator=g)
    ids[ids == 2] = -1                          # an empty segment
    out = kernel.segment_sum(values, ids, responses)
    assert out.dtype == dtype and out.shape == (responses,)
    exact = naive.segment_sum_ref(values.double(), ids, responses)
    assert out[2] == 0
    # fp32 accumulation (fp64 for fp64), rounded once to the values' dtype: within half an ulp of the result
    # plus the fp32 rounding of n additions
    ulp = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8}[dtype]
    acc = 2.0 ** -52 if dtype == torch.float64 else 2.0 ** -23
    bound = ulp * exact.abs() + n * acc * values.double().abs().sum()
    assert ((out.double() - exact).abs() <= bound).all(), (out.double() - exact).abs().max()
    for _ in range(2):
        assert torch.equal(kernel.segment_sum(values, ids, responses), out)
    assert kernel.segment_sum(values, torch.full((n,), -1), 3).tolist() == [0, 0, 0]
    assert kernel.segment_sum(values[:0], ids[:0], 2).tolist() == [0, 0]
    assert kernel.segment_sum(values, ids.clamp(max=-1), 0).shape == (0,)


def test_triton_segment_sum_gradient_and_registration():
    kernel = _triton_segment()
    g = torch.Generator().manual_seed(6)
    values = torch.randn(2, 23, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(-1, 5, (2, 23), generator=g)
    assert torch.autograd.gradcheck(lambda v: kernel.segment_sum(v, ids, 5), (values,))
    torch.library.opcheck(torch.ops.aem_kernels.triton_segment_sum.default,
                          (values.detach().float().requires_grad_(), ids, 5))


def test_segment_broadcast_is_the_membership_matrix_product():
    """out[t] = per_segment[id_t] (0 for id -1), i.e. the dense membership matrix's transpose applied to the
    per-segment values, with its gradient the segment sum; no segment at all works too."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(-1, 4, (37,), generator=gen)
    values = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    membership = (ids[None, :] == torch.arange(4)[:, None]).to(torch.float64)   # [R, N]
    out = segment.segment_broadcast(values, ids)
    assert torch.equal(out, values.detach() @ membership)
    upstream = torch.randn(37, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * upstream).sum(), values)
    torch.testing.assert_close(grad, membership @ upstream, rtol=0, atol=1e-12)
    assert torch.equal(segment.segment_broadcast(torch.zeros(0), torch.full((5,), -1)), torch.zeros(5))
