"""Every policy-loss mode on every path agrees: logits on the torch, C++ and Triton (interpreter) backends, hidden
states through the fused-linear loss in two passes and, for the row-local modes, in its single pass; with AEM on
(beta > 0, old entropies so that the weights are known before the forward), the entropy bonus and the KL term.
Accuracy rule: each path's error against the fp64 torch loss is at most 3x that of eager fp32 torch + 1e-5.
A single pass asked for a mode that reduces over this forward is a ValueError naming loss_mode.
"""

from __future__ import annotations

import pytest
import torch

import aem_kernels as ak
from aem_kernels.ops.policy_loss import row_local
from helpers import CPP_BUILT

N_RESP, VOCAB, HIDDEN = 7, 37, 12
MODES = [("vanilla", {}), ("gspo", {}), ("sapo", {}), ("gpg", {}), ("clip_cov", dict(clip_cov_ratio=0.2,
         clip_cov_lb=-0.5, clip_cov_ub=0.5)), ("kl_cov", dict(kl_cov_ratio=0.2)), ("geo_mean", {}),
         ("dppo_tv", {}), ("dppo_kl", {}), ("dro", dict(dro_beta=0.4)), ("cispo", {}), ("bypass_mode", {}),
         ("grpo", {}), ("grpo", dict(importance_sampling_level="sequence")), ("bnpo", {}), ("dr_grpo", {}),
         ("dapo", dict(delta=1.4)), ("luspo", {}), ("vespo", {})]

TRITON_MODES = ("vanilla",)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 1, 4, 6, 3, 2, 5]
    token_response = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths)] + [torch.full((3,), -1)])
    n = token_response.numel()
    hidden = torch.randn(n, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * 0.6
    labels = torch.randint(0, VOCAB, (n,), generator=g)
    with torch.no_grad():
        lp, ent = ak.logprobs_and_entropy((hidden @ weight.T), labels, backend="torch")
    keywords = dict(token_response=token_response, response_group=torch.tensor([0, 0, 0, 1, 1, 2, 2]),
                    old_logprobs=lp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64),
                    old_entropy=ent * (1 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)),
                    ref_logprobs=lp + 0.2 * torch.randn(n, generator=g, dtype=torch.float64))
    advantages = torch.randn(N_RESP, generator=g, dtype=torch.float64)
    return hidden, weight, labels, advantages, keywords


def _cast(keywords, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in keywords.items()}


def _logits_loss(hidden, weight, labels, advantages, keywords, config, dtype, **options):
    logits = (hidden @ weight.T).to(dtype).requires_grad_()
    torch.manual_seed(0)  # clip_cov's draw
    loss, _ = ak.aem_policy_loss(logits, labels, advantages.to(dtype), config=config,
                                 **_cast(keywords, dtype), **options)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach().double(), grad.double()


def _check(result, exact, eager):
    for ours, ref, fp32 in zip(result, exact, eager):
        assert (ours - ref).abs().max() <= 3 * (fp32 - ref).abs().max() + 1e-5


@pytest.mark.parametrize("mode, options", MODES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(MODES)])
def test_every_path_agrees(mode, options):
    hidden, weight, labels, advantages, keywords = _inputs(seed=len(mode))
    config = ak.AEMConfig(beta=1.0, surprisal_source="old", entropy_coef=0.01, kl_coef=0.05, loss_mode=mode,
                          **options)
    exact = _logits_loss(hidden, weight, labels, advantages, keywords, config, torch.float64, backend="torch")
    eager = _logits_loss(hidden, weight, labels, advantages, keywords, config, torch.float32, backend="torch")
    assert exact[1].abs().sum() > 0
    # the backends differ in the per-token op only, which every mode shares: the interpreter (slow) runs one
    backends = (["triton"] if mode in TRITON_MODES else []) + (["cpu"] if CPP_BUILT else [])
    for backend in backends:
        _check(_logits_loss(hidden, weight, labels, advantages, keywords, config, torch.float32, backend=backend),
               exact, eager)

    # hidden states: the gradient of the logits-path loss with respect to hidden and weight is the reference
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.manual_seed(0)
    ref_loss, _ = ak.aem_policy_loss(h @ w.T, labels, advantages, config=config, backend="torch", **keywords)
    exact_h = (ref_loss.detach(), *torch.autograd.grad(ref_loss, [h, w]))
    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    torch.manual_seed(0)
    eager_loss, _ = ak.aem_policy_loss(h32 @ w32.T, labels, advantages.float(), config=config, backend="torch",
                                       **_cast(keywords, torch.float32))
    eager_h = (eager_loss.detach(), *torch.autograd.grad(eager_loss, [h32, w32]))
    passes = [False, True] if row_local(config) is None else [False]
    for single_pass in passes:
        h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
        torch.manual_seed(0)
        loss, _ = ak.fused_linear_aem_policy_loss(h32, w32, labels, advantages.float(), config=config,
                                                  backend="torch", single_pass=single_pass,
                                                  **_cast(keywords, torch.float32))
        result = (loss.detach(), *torch.autograd.grad(loss, [h32, w32]))
        _check([t.double() for t in result], exact_h, [t.double() for t in eager_h])
    if passes == [False]:
        with pytest.raises(ValueError, match="loss_mode"):
            ak.fused_linear_aem_policy_loss(hidden.float().requires_grad_(), weight.float(), labels,
                                            advantages.float(), config=config, backend="torch", single_pass=True,
                                            **_cast(keywords, torch.float32))


def test_triton_single_pass_serves_vanilla_and_names_the_mode_otherwise():
    hidden, weight, labels, advantages, keywords = _inputs()
    logits = (hidden @ weight.T).float()
    kw = _cast(keywords, torch.float32)
    config = ak.AEMConfig(beta=1.0, surprisal_source="old", loss_mode="bypass_mode")
    one = ak.aem_policy_loss(logits, labels, advantages.float(), config=config, backend="triton", single_pass=True,
                             **kw)[0]
    two = ak.aem_policy_loss(logits, labels, advantages.float(), config=config, backend="triton",
                             single_pass=False, **kw)[0]
    torch.testing.assert_close(one, two)
    with pytest.raises(ValueError, match="loss_mode='sapo'"):
        ak.aem_policy_loss(logits, labels, advantages.float(), config=config.replace(loss_mode="sapo"),
                           backend="triton", single_pass=True, **kw)


@pytest.mark.parametrize("mode", ["vanilla", "sapo", "grpo"])
def test_single_passes_take_the_rollout_is_weights(mode):
    """IS weights are known before the forward: the fused-linear single pass (every row-local mode) and the Triton
    kernel (vanilla, without KL and entropy terms: folded into its weights) equal the two passes."""
    hidden, weight, labels, advantages, keywords = _inputs(seed=4)
    kw = _cast(keywords, torch.float32)
    rollout = kw["old_logprobs"] + 0.2 * torch.randn(labels.shape, generator=torch.Generator().manual_seed(3))
    config = ak.AEMConfig(beta=1.0, surprisal_source="old", loss_mode=mode, rollout_is="token",
                          rollout_is_threshold=1.2)
    results = []
    for single_pass in (False, True):
        h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
        loss, metrics = ak.fused_linear_aem_policy_loss(h, w, labels, advantages.float(), config=config,
                                                        backend="torch", single_pass=single_pass,
                                                        rollout_logprobs=rollout, **kw)
        results.append((loss.detach(), *torch.autograd.grad(loss, [h, w])))
    assert metrics["rollout_corr/rollout_is_ratio_fraction_high"] > 0  # the truncation binds
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
    if mode == "vanilla":
        logits = []
        for single_pass in (False, True):
            z = (hidden @ weight.T).float().requires_grad_()
            loss, _ = ak.aem_policy_loss(z, labels, advantages.float(), config=config, backend="triton",
                                         single_pass=single_pass, rollout_logprobs=rollout, **kw)
            logits.append((loss.detach(), *torch.autograd.grad(loss, [z])))
        for one, two in zip(*logits):
            torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="kl_coef"):
            ak.aem_policy_loss((hidden @ weight.T).float(), labels, advantages.float(),
                               config=config.replace(kl_coef=0.1), backend="triton", single_pass=True,
                               rollout_logprobs=rollout, **kw)
