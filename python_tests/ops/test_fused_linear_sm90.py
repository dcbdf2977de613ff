"""The fused-linear Triton kernels compile for an H100/H200 (sm_90) on a machine without a GPU
(`sm90_compile_fused_linear.py`, Triton's real pipeline to a cubin): no register spills, tensor-core (mma)
products for bf16 operands, and atomics only in the default (non-deterministic) backward."""

import pytest

pytest.importorskip("triton")

from helpers import compile_for_sm90  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    return compile_for_sm90("sm90_compile_fused_linear.py", timeout=900)


def test_every_variant_compiles_without_spills(compiled):
    assert len(compiled) == 8
    for result in compiled:
        assert result["local_bytes"] == 0, result


def test_bf16_uses_tensor_cores_and_atomics_only_by_default(compiled):
    bf16 = [r for r in compiled if r["variant"].startswith("*bf16")]
    assert len(bf16) == 4
    for result in bf16:
        assert result["mma"], result
        assert result["atomics"] == (result["kernel"] == "_fused_linear_bwd_atomic_kernel"), result
