"""Regression: the backward through a strided slice logits[:, :-1] (the shape every causal-LM loss uses)."""

import torch

import aem_kernels as ak


def _torch_terms(logits, labels):
    log_p = torch.log_softmax(logits, -1)
    return log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def test_backward_through_sliced_logits_matches_autograd():
    full = torch.randn(3, 6, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    logprobs, entropy = ak.logprobs_and_entropy(full[:, :-1], labels, backend="torch")
    (logprobs.sum() + 0.5 * entropy.sum()).backward()
    ours, full.grad = full.grad.clone(), None
    ref_logprobs, ref_entropy = _torch_terms(full[:, :-1], labels)
    (ref_logprobs.sum() + 0.5 * ref_entropy.sum()).backward()
    # fp64 on both sides: agreement to rounding
    torch.testing.assert_close(ours, full.grad, rtol=1e-10, atol=1e-12)
    assert ours[:, -1].abs().max() == 0  # the sliced-off position gets no gradient
