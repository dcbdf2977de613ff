"""The per-token policy-loss terms (`ops.policy_loss.pytorch`: eq. 8 and the KL estimators with verl's clamps)
against their token-by-token definition (`ops.policy_loss.naive`), and their derivatives
(`token_loss_derivatives`) against central differences of that definition in fp64, away from the kinks."""

import pytest
import torch

import aem_kernels as ak
from aem_kernels.ops.policy_loss import kl_penalty, ppo_token_loss, token_loss_derivatives
from aem_kernels.ops.policy_loss.naive import kl_penalty_ref, ppo_token_loss_ref

D = torch.float64
# l - l_old per token: inside the clip range, beyond it on both sides, past the dual clip, past the +-20 clamp
LOG_RATIO = [0.05, 0.5, -0.5, 1.5, -0.07, 25.0, -30.0, 0.1]
ADVANTAGES = [0.7, 1.0, -0.8, -0.9, -0.4, 0.6, -0.5, 1.3]
# l_ref - l per token: small, large (beyond k3's clamp of the value and of the log-ratio) and negative
REF_MINUS_LP = [0.3, -0.2, 2.6, 25.0, -0.4, 0.1, -2.0, 0.0]


def _batch():
    logprobs = torch.linspace(-3.0, -0.2, len(LOG_RATIO), dtype=D)
    old = logprobs - torch.tensor(LOG_RATIO, dtype=D)
    ref = logprobs + torch.tensor(REF_MINUS_LP, dtype=D)
    return logprobs, old, torch.tensor(ADVANTAGES, dtype=D), ref


@pytest.mark.parametrize("dual_clip", [3.0, None])
def test_surrogate_equals_its_definition(dual_clip):
    logprobs, old, adv, _ = _batch()
    config = ak.AEMConfig(dual_clip=dual_clip, clip_low=0.2, clip_high=0.28)
    ours = ppo_token_loss(logprobs, old, adv, config)[0]
    truth = ppo_token_loss_ref(logprobs.tolist(), old.tolist(), adv.tolist(), 0.2, 0.28, dual_clip)
    torch.testing.assert_close(ours, torch.tensor(truth, dtype=D), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_estimators_equal_their_definition(kl_type):
    logprobs, _, _, ref = _batch()
    truth = kl_penalty_ref(logprobs.tolist(), ref.tolist(), kl_type)
    torch.testing.assert_close(kl_penalty(logprobs, ref, kl_type), torch.tensor(truth, dtype=D), rtol=1e-14,
                               atol=1e-14)


@pytest.mark.parametrize("dual_clip", [3.0, None])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_derivatives_are_the_definition_s_slopes(kl_type, dual_clip):
    """a_t = d/dl_t of c_t (L_t + kl_coef KL_t) by central differences of the naive definition (every token
    here sits away from a kink, so the slope is well defined), and b_t = -c_t entropy_coef."""
    logprobs, old, adv, ref = _batch()
    weights = torch.linspace(0.5, 1.5, len(LOG_RATIO), dtype=D)
    config = ak.AEMConfig(dual_clip=dual_clip, kl_type=kl_type, kl_coef=0.1, entropy_coef=0.01)
    a, b = token_loss_derivatives(logprobs, old, adv, weights, ref, config)

    def total(lp):
        surrogate = ppo_token_loss_ref(lp.tolist(), old.tolist(), adv.tolist(), config.clip_low,
                                       config.clip_high, dual_clip)
        kl = kl_penalty_ref(lp.tolist(), ref.tolist(), kl_type)
        return weights * (torch.tensor(surrogate, dtype=D) + config.kl_coef * torch.tensor(kl, dtype=D))

    step = 1e-6
    slopes = (total(logprobs + step) - total(logprobs - step)) / (2 * step)
    torch.testing.assert_close(a, slopes, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(b, -config.entropy_coef * weights)
    assert token_loss_derivatives(logprobs, old, adv, weights, ref, config.replace(entropy_coef=0.0))[1] is None
