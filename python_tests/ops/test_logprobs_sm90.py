"""The Triton kernels compile for an H100/H200 (sm_90) even on a machine without a GPU.

The interpreter runs the kernels' Python semantics; `sm90_compile.py` compiles them ahead of time through
Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for GPUTarget("cuda", 90), which
catches what only the compiler sees (type unification of loop-carried values, unsupported ops, scalar
atomics) and checks the launch table's promises (ops/utils.py): no register spills, 16-byte vector loads
and stores when strides and V are divisible by 16, and a register count that lets at least three forward
programs share an SM.
"""

import pytest

pytest.importorskip("triton")

from helpers import compile_for_sm90  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    return compile_for_sm90("sm90_compile.py", timeout=600)


def test_every_kernel_compiles_without_spills(compiled):
    assert len(compiled) == 20  # 19 + the one-value segment sum
    for result in compiled:
        assert result["local_bytes"] == 0, result  # no register spills
        if result["kernel"] != "_segment_sum_kernel":  # (gathers by token index: nothing to vectorise)
            assert result["vector_loads"], result


def test_forward_register_budget_and_atomics(compiled):
    forward = [r for r in compiled if r["kernel"] == "_logprobs_entropy_fwd_kernel"]
    assert len(forward) == 6
    for result in forward:
        assert result["registers"] <= 80, result  # 3 x 256 threads x 80 registers <= one SM's 65536
    assert not any(result["atomics"] for result in compiled)  # (the segment sums are fixed-order, not atomic)


def test_gradient_kernels_store_vectors(compiled):
    for result in compiled:
        if result["kernel"] in ("_logprobs_entropy_bwd_kernel", "_scale_rows_kernel") or (
                result["kernel"] == "_aem_loss_fused_kernel" and "'WRITE_GRAD': True" in result["variant"]):
            assert result["vector_stores"], result
