"""ops/policy_loss/modes.py: every policy-loss mode per token against its token-by-token statement
(`naive.policy_loss_ref`), the per-token derivatives of the row-local modes against central differences of
that statement (or its stop-gradient form), and the refusals of the modes that reduce over the forward.
"""

from __future__ import annotations

import pytest
import torch

import aem_kernels as ak
from aem_kernels.config import LOSS_MODES
from aem_kernels.ops.policy_loss import (ROW_LOCAL, Segments, policy_token_loss, row_local, single_pass_unavailable,
                                         token_loss_derivatives)
from aem_kernels.ops.policy_loss.naive import policy_loss_ref

PARAMS = dict(clip_low=0.2, clip_high=0.28, tau_pos=1.1, tau_neg=1.7, clip_cov_ratio=0.2, clip_cov_lb=-0.3,
              clip_cov_ub=0.3, kl_cov_ratio=0.15, ppo_kl_coef=0.4)
EXTRA = {"dro": dict(dro_beta=0.3), "dapo": dict(delta=1.3)}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    token_response = torch.tensor([0, 0, 0, -1, 1, 2, 2, 2, 2, -1, 3, 3, 1])  # interleaved, one response of 2
    n = token_response.numel()
    old = -2.5 * torch.rand(n, generator=g, dtype=torch.float64) - 0.05
    lp = (old + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    adv = torch.randn(4, generator=g, dtype=torch.float64)[token_response.clamp(min=0)] * (token_response >= 0)
    return lp, old, adv, token_response


def _config(mode):
    return ak.AEMConfig(beta=0.0, loss_mode=mode, **PARAMS, **EXTRA.get(mode, {}))


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_mode_equals_its_statement(mode):
    lp, old, adv, tr = _inputs(seed=len(mode))
    config = _config(mode)
    torch.manual_seed(0)
    loss, flags = policy_token_loss(lp, old, adv, config, Segments(tr, 4))
    dropped = torch.nonzero(flags["clip"]).reshape(-1).tolist() if mode == "clip_cov" else ()
    if mode == "clip_cov":
        assert len(dropped) == max(int(config.clip_cov_ratio * int((tr >= 0).sum())), 1)
    expected = policy_loss_ref(mode, lp.tolist(), old.tolist(), adv.tolist(), tr.tolist(), config, dropped)
    trained = tr >= 0
    torch.testing.assert_close(loss[trained], torch.tensor(expected, dtype=torch.float64)[trained],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["vanilla", "sapo", "gpg", "dro", "grpo", "dapo", "luspo"])
def test_row_local_derivatives_equal_central_differences(mode):
    lp, old, adv, tr = _inputs(seed=3)
    config = _config(mode).replace(importance_sampling_level="token" if mode == "luspo" else None)
    assert row_local(config) is None
    weights = torch.rand(lp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (tr >= 0)
    grad, _ = token_loss_derivatives(lp, old, adv, weights, None, config)
    step = 1e-6
    for t in torch.nonzero(tr >= 0).reshape(-1).tolist():
        values = []
        for sign in (1, -1):
            shifted = lp.clone()
            shifted[t] += sign * step
            values.append(policy_loss_ref(mode, shifted.tolist(), old.tolist(), adv.tolist(), tr.tolist(),
                                          config)[t])
        assert abs(grad[t] - weights[t] * (values[0] - values[1]) / (2 * step)) < 1e-6


def test_stop_gradient_modes_differentiate_log_prob_only():
    """cispo and dppo: the ratio factor is a constant (verl's detach), so a_t = c_t * L_t / l_t."""
    lp, old, adv, tr = _inputs(seed=5)
    weights = (tr >= 0).double()
    for mode in ("cispo", "dppo_tv", "dppo_kl"):
        config = _config(mode)
        grad, _ = token_loss_derivatives(lp, old, adv, weights, None, config)
        loss, _ = policy_token_loss(lp, old, adv, config)
        torch.testing.assert_close(grad, weights * loss / lp, rtol=1e-12, atol=1e-12)


def test_is_weights_scale_row_local_modes_and_fold_into_vespo():
    lp, old, adv, tr = _inputs(seed=6)
    w = torch.rand(lp.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    plain, _ = policy_token_loss(lp, old, adv, _config("sapo"))
    torch.testing.assert_close(policy_token_loss(lp, old, adv, _config("sapo"), is_weights=w)[0], plain * w)
    seg = Segments(tr, 4)
    vespo = policy_token_loss(lp, old, adv, _config("vespo"), seg, is_weights=w)[0]
    # TRL: log w of the sequence gains sum log(IS ratio): the same as shifting the old log-probs
    shifted = policy_token_loss(lp, old - w.log(), adv, _config("vespo"), seg)[0]
    torch.testing.assert_close(vespo, shifted)


@pytest.mark.parametrize("mode", sorted(set(LOSS_MODES) - set(ROW_LOCAL)))
def test_reducing_modes_refuse_the_single_pass(mode):
    lp, old, adv, tr = _inputs()
    config = _config(mode)
    assert row_local(config) is not None
    with pytest.raises(ValueError, match=f"loss_mode='{mode}'"):
        token_loss_derivatives(lp, old, adv, torch.ones_like(lp), None, config)
    with pytest.raises(ValueError, match="segments"):
        policy_token_loss(lp, old, adv, config)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        token_loss_derivatives(lp, old, adv, torch.ones_like(lp), None,
                               _config("grpo").replace(importance_sampling_level="sequence"))
    assert "vanilla" in single_pass_unavailable("triton", mode)
    assert single_pass_unavailable("triton", "bypass_mode") is None
