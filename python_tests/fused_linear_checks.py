"""Shared checks of the fused-linear tests (ops/, loss/, distributed/): inputs, the materialised oracle with
its gradients, and the accuracy rule (|ours - fp64| <= 3 |eager fp32 - fp64| + 1e-5, max abs)."""

from __future__ import annotations

import torch

import aem_kernels as ak
from aem_kernels.ops.fused_linear import fused_linear_apply, fused_linear_path
from aem_kernels.ops.fused_linear.naive import fused_linear_logprobs_and_entropy_ref

BACKENDS = ["cpu", "torch", "triton"]


def device_for(backend: str) -> str:
    """Triton runs on CUDA tensors where a GPU is present (else in the interpreter on CPU tensors)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def linear_inputs(shape=(37,), hidden=29, vocab=301, dtype=torch.float32, scale=1.0, ignore=(3, 11), bias=True,
            seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, hidden, generator=gen) * scale).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5 * 3).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    labels = torch.randint(0, vocab, shape, generator=gen)
    flat = labels.view(-1)
    for i in ignore:
        if i < flat.numel():
            flat[i] = -100
    ga = torch.randn(shape, generator=gen, dtype=torch.float64)
    gb = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, w, b, labels, ga, gb


def materialised(x, w, b, labels, temperature, dtype, ignore_index=-100):
    """Eager torch on the materialised logits in `dtype` (fp32: the rule's eager; fp64: the truth), with the
    leaves it differentiates: the op's naive definition."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    lp, entropy = fused_linear_logprobs_and_entropy_ref(leaves[0], leaves[1], labels, leaves[2],
                                                        temperature=temperature, ignore_index=ignore_index,
                                                        dtype=dtype)
    return lp, entropy, leaves


def grads(outputs, leaves, ga, gb):
    lp, ent = outputs
    loss = (lp.double() * ga).sum() + ((ent.double() * gb).sum() if ent is not None else 0)
    return torch.autograd.grad(loss, [t for t in leaves if t is not None])


def max_error(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_rule(name, ours, eager, truth):
    """Accuracy rule: |ours - fp64| <= 3 |eager fp32 - fp64| + 1e-5 (max abs)."""
    e_ours, e_eager = max_error(ours, truth), max_error(eager, truth)
    assert e_ours <= 3 * e_eager + 1e-5, f"{name}: error {e_ours:.3g} > 3 x eager's {e_eager:.3g} + 1e-5"


def check_against_rule(backend, x, w, b, labels, ga, gb, temperature=1.0, with_entropy=True, key=None,
                       **kwargs):
    """The public op on `backend` (or, with `key`, the path of that name, e.g. the CUDA plan's
    "cpu-chunked-tc" with its CPU product; kwargs then: chunk_budget_bytes) against the accuracy rule."""
    dev = device_for(backend) if key is None else "cpu"
    leaves = [t.detach().to(dev).requires_grad_() if t is not None else None for t in (x, w, b)]
    if key is None:
        lp, ent = ak.fused_linear_logprobs_and_entropy(leaves[0], leaves[1], labels.to(dev), bias=leaves[2],
                                                       temperature=temperature, with_entropy=with_entropy,
                                                       backend=backend, **kwargs)
    else:
        lp, ent = fused_linear_apply(leaves[0], leaves[1], leaves[2], labels, temperature, -100, with_entropy,
                                     fused_linear_path(key), False, kwargs.get("chunk_budget_bytes"))
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    ours_grads = [g.cpu() for g in grads((lp, ent), leaves, ga.to(dev), gb.to(dev) if with_entropy else None)]
    lp, ent = lp.cpu(), (ent.cpu() if ent is not None else None)
    eager = materialised(x, w, b, labels, temperature, torch.float32)
    truth = materialised(x, w, b, labels, temperature, torch.float64)
    gb_used = gb if with_entropy else None
    eager_grads = grads(eager[:2] if with_entropy else (eager[0], None), eager[2], ga, gb_used)
    truth_grads = grads(truth[:2] if with_entropy else (truth[0], None), truth[2], ga, gb_used)
    assert_rule("logprobs", lp, eager[0], truth[0])
    if with_entropy:
        assert_rule("entropy", ent, eager[1], truth[1])
    else:
        assert ent is None
    for name, ours, eag, tru, leaf in zip(("hidden", "weight", "bias"), ours_grads, eager_grads, truth_grads,
                                          [t for t in leaves if t is not None]):
        assert ours.dtype == leaf.dtype and ours.shape == leaf.shape
        # the rule for a half-precision leaf: eager's gradient, like ours, ends rounded to the leaf's dtype
        assert_rule(f"grad {name}", ours, eag.to(leaf.dtype), tru)
    return lp, ent, ours_grads
