"""Equivalence with the installed TRL 1.16.0: `trl.trainer.utils.selective_log_softmax` (the plain one-label
index; temperature) and `entropy_from_logits` (chunk_size), values and gradients. Skips when TRL is absent
(`pip install .[trl]`).

Tolerances follow the accuracy rule: our error against fp64 is at most 3x eager fp32 torch's + 1e-5, and we
agree with TRL to within TRL's own error plus that bound (bf16: TRL returns bf16-rounded values, we fp32).
"""

import itertools

import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")

import aem_kernels as ak  # noqa: E402

D = torch.float64
CASES = list(itertools.product([torch.float32, torch.bfloat16], [1.0, 0.7], ["torch", "cpu", "triton"]))


def _inputs(dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(4, 9, 263, generator=g, dtype=D) * 5).to(dtype)
    return logits, torch.randint(0, 263, (4, 9), generator=g)


def _check(ours, theirs, exact, eager):
    bound = 3 * (eager.double() - exact).abs().max() + 1e-5
    assert (ours.double() - exact).abs().max() <= bound
    assert bool(((ours.double() - theirs.double()).abs() <= (theirs.double() - exact).abs() + bound).all())


@pytest.mark.parametrize("dtype, temperature, backend", CASES)
def test_selective_log_softmax_equals_trl(dtype, temperature, backend):
    logits, index = _inputs(dtype)
    gather = lambda lp: lp.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    exact = gather(torch.log_softmax(logits.double() / temperature, -1))
    eager = gather(torch.log_softmax(logits.float() / temperature, -1))
    theirs = trl_utils.selective_log_softmax(logits, index, temperature=temperature)
    ours = ak.logprobs_from_logits(logits, index=index, temperature=temperature, backend=backend)
    assert ours.dtype == torch.float32 and theirs.dtype == dtype and ours.shape == theirs.shape == index.shape
    _check(ours, theirs, exact, eager)


@pytest.mark.parametrize("dtype, temperature, backend", CASES)
def test_entropy_from_logits_equals_trl(dtype, temperature, backend):
    logits, _ = _inputs(dtype, seed=4)

    def entropy(x):
        log_p = torch.log_softmax(x / temperature, -1)
        return -(log_p.exp() * log_p).sum(-1)

    # TRL's entropy has no temperature: it gets the scaled logits, as its trainers pass them
    theirs = trl_utils.entropy_from_logits(logits / temperature if temperature != 1.0 else logits, chunk_size=5)
    ours = ak.entropy_from_logits(logits, temperature=temperature, chunk_size=5, backend=backend)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape == logits.shape[:-1]
    _check(ours, theirs, entropy(logits.double()), entropy(logits.float()))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_gradients_equal_trl(backend):
    """d(sum a logprob + b entropy)/dlogits through TRL's functions (fp32 and fp64) vs ours (fp32)."""
    logits, index = _inputs(torch.float32, seed=6)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)

    def trl_grad(dtype):
        x = logits.detach().to(dtype).clone().requires_grad_(True)
        lp = trl_utils.selective_log_softmax(x, index, temperature=0.8)
        h = trl_utils.entropy_from_logits(x / 0.8)
        ((a.to(dtype) * lp).sum() + (b.to(dtype) * h).sum()).backward()
        return x.grad.double()

    x = logits.clone().requires_grad_(True)
    lp, h = ak.logprobs_and_entropy(x, index, temperature=0.8, backend=backend)
    ((a * lp).sum() + (b * h).sum()).backward()
    exact, eager = trl_grad(D), trl_grad(torch.float32)
    assert (x.grad.double() - exact).abs().max() <= 3 * (eager - exact).abs().max() + 1e-5
