"""The `path` keyword of the fused-linear ops: each named path ("tiles", "chunked", "blocked") runs that path and
meets the accuracy rule; a path that cannot run for the inputs is a ValueError naming `path`."""

from __future__ import annotations

import pytest
import torch

import aem_kernels as ak
from aem_kernels.distributed import vocab_parallel_fused_linear_logprobs_and_entropy
from aem_kernels.ops.fused_linear import resolve_fused_linear_path
from fused_linear_checks import check_against_rule, linear_inputs

CPU = torch.device("cpu")


@pytest.mark.parametrize("path, dtype, key", [
    ("tiles", torch.float32, "triton"),            # the tile kernels in Triton's interpreter
    ("chunked", torch.bfloat16, "cpu-chunked"),    # row chunks where "auto" takes vocab blocks
    ("blocked", torch.float32, "cpu-blocked"),     # vocab blocks where "auto" takes row chunks
])
def test_named_path_runs_that_path_within_the_rule(path, dtype, key):
    assert resolve_fused_linear_path("auto", CPU, dtype, path=path).key == key
    x, w, b, labels, ga, gb = linear_inputs(shape=(23,), hidden=19, vocab=211, dtype=dtype)
    check_against_rule("auto", x, w, b, labels, ga, gb, temperature=0.7, path=path)


def test_auto_is_the_decision_and_backend_still_picks_the_row_backend():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert resolve_fused_linear_path("auto", CPU, dtype, path="auto") is resolve_fused_linear_path("auto", CPU,
                                                                                                         dtype)
    assert resolve_fused_linear_path("torch", CPU, torch.bfloat16, path="chunked").key == "torch-chunked"
    assert resolve_fused_linear_path("auto", CPU, torch.float64, path="chunked").key == "torch-chunked"


@pytest.mark.parametrize("kwargs, match", [
    (dict(path="rows"), "path must be one of"),
    (dict(path=None), "path must be one of"),
    (dict(path="tiles", backend="cpu"), 'path="tiles"'),
    (dict(path="tiles", dtype=torch.float64), 'path="tiles"'),
    (dict(path="blocked", dtype=torch.float64), 'path="blocked"'),
    (dict(path="blocked", vocab_parallel=True), "path must be"),
    (dict(path="tiles", vocab_parallel=True), "path must be"),
])
def test_impossible_path_is_a_value_error_naming_path(kwargs, match):
    kwargs = dict(kwargs)
    dtype, backend = kwargs.pop("dtype", torch.float32), kwargs.pop("backend", "auto")
    with pytest.raises(ValueError, match=match):
        resolve_fused_linear_path(backend, CPU, dtype, **kwargs)


def test_public_ops_take_the_keyword():
    x, w, b, labels, _, _ = linear_inputs(shape=(10,), hidden=8, vocab=50, dtype=torch.float64)
    batch = dict(token_response=torch.arange(10) % 2, response_group=torch.tensor([0, 0]))
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="path"):
        ak.fused_linear_logprobs_and_entropy(x, w, labels, path="blocked")
    with pytest.raises(ValueError, match="path"):
        ak.fused_linear_aem_policy_loss(x, w, labels, adv, path="tiles", **batch)
    with pytest.raises(ValueError, match="path"):
        vocab_parallel_fused_linear_logprobs_and_entropy(x, w, labels, path="blocked")
    losses = []
    for path in ("chunked", "blocked"):
        leaf = x.float().requires_grad_()
        loss = ak.fused_linear_aem_policy_loss(leaf, w.float(), labels, adv.float(), path=path, **batch)[0]
        loss.backward()
        losses.append((loss.detach(), leaf.grad))
    for by_rows, by_blocks in zip(*losses):
        torch.testing.assert_close(by_rows, by_blocks, rtol=1e-5, atol=1e-6)
