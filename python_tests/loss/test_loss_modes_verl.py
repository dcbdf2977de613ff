"""Every verl 0.9.1 policy-loss mode (`AEMConfig.loss_mode`) at beta = 0 against the installed verl function
(`core_algos.get_policy_loss_fn(mode)` with a real `ActorConfig` / `PolicyLossConfig`): value, gradient with
respect to the log-probs and verl's metrics, in every aggregation mode and with verl's global normalisers
(`global_batch_info`). With beta > 0 the mode sees the modulated advantages. fp64 on both sides: the same
formula in fp64 agrees to rounding.
"""

from __future__ import annotations

import pytest
import torch

import aem_kernels as ak
from aem_kernels.config import VERL_LOSS_MODES
from aem_kernels.loss.aggregation import aggregate
from aem_kernels.loss.inputs import loss_batch
from aem_kernels.loss.terms import loss_from_token_terms, loss_weights
from aem_kernels.ops.policy_loss import Segments, policy_token_loss

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_config = pytest.importorskip("verl.workers.config")

AGG_MODES = ak.config.LOSS_AGG_MODES
NORMS = [{}, {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 11, "loss_scale_factor": 9}]
# the hyper-parameters, chosen so that each mode's selections and clips bind on the batch below
# fp64 on both sides; verl's seq-mean-token-mean divides by L_r + 1e-8 (and geo_mean by L_r + 1e-8), which
# this package leaves out (exact in fp32, a 1e-8 / L_r relative difference in fp64)
TOL = dict(rtol=2e-8, atol=1e-12)
MODE_PARAMS = dict(clip_low=0.2, clip_high=0.28, tau_pos=1.0, tau_neg=1.5, clip_cov_ratio=0.15, clip_cov_lb=0.05,
                   clip_cov_ub=2.0, kl_cov_ratio=0.1, ppo_kl_coef=0.3, dro_beta=0.7)


def _batch(seed=0, rows=6, horizon=7):
    """[B, T] log-probs, old log-probs, mask (ragged, one row empty) and per-row advantages."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 0, 5, 1, 6])[:rows]
    mask = torch.arange(horizon) < lengths[:, None]
    old = -2.0 * torch.rand(rows, horizon, generator=g, dtype=torch.float64) - 0.05
    log_prob = (old + 0.6 * torch.randn(rows, horizon, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    advantages = torch.randn(rows, generator=g, dtype=torch.float64) * 1.5
    return log_prob, old, mask, advantages


def _actor(mode: str, agg: str, norms: dict, config: ak.AEMConfig):
    policy = verl_config.PolicyLossConfig(
        loss_mode=mode, clip_cov_ratio=config.clip_cov_ratio, clip_cov_lb=config.clip_cov_lb,
        clip_cov_ub=config.clip_cov_ub, kl_cov_ratio=config.kl_cov_ratio, ppo_kl_coef=config.ppo_kl_coef,
        dro_beta=config.dro_beta)
    actor = verl_config.ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=config.clip_low,
        clip_ratio_low=config.clip_low, clip_ratio_high=config.clip_high, clip_ratio_c=config.dual_clip,
        loss_agg_mode=agg, tau_pos=config.tau_pos, tau_neg=config.tau_neg, policy_loss=policy,
        loss_scale_factor=norms.get("loss_scale_factor"))
    actor.global_batch_info.update(dp_size=norms.get("dp_size", 1), batch_num_tokens=norms.get("batch_num_tokens"),
                                   global_batch_size=norms.get("global_batch_size"),
                                   loss_scale_factor=norms.get("loss_scale_factor"))
    return actor


def _verl(mode, agg, norms, config, log_prob, old, mask, token_adv, is_weights=None, seed=0):
    log_prob = log_prob.clone().requires_grad_()
    torch.manual_seed(seed)  # clip_cov draws with torch.randperm on the global generator
    loss, metrics = core_algos.get_policy_loss_fn(mode)(old, log_prob, token_adv * mask, mask.double(), agg,
                                                        _actor(mode, agg, norms, config), is_weights)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad, metrics


def _ours(config, log_prob, old, mask, advantages, norms, seed=0):
    rows, horizon = mask.shape
    batch = loss_batch(torch.empty(rows, horizon, 2, dtype=torch.float64), torch.zeros(rows, horizon,
                                                                                      dtype=torch.long),
                       advantages, config, response_group=torch.arange(rows) // 2, response_mask=mask,
                       old_logprobs=old, **norms)
    lp = log_prob.clone().requires_grad_()
    torch.manual_seed(seed)
    loss, metrics = loss_from_token_terms(batch, lp.reshape(-1), torch.zeros(rows * horizon, dtype=torch.float64),
                                          config)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


def _config(mode, agg, **extra):
    return ak.AEMConfig(**{"beta": 0.0, "loss_mode": mode, "loss_agg_mode": agg, **MODE_PARAMS, **extra})


@pytest.mark.parametrize("norms", range(len(NORMS)))
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", VERL_LOSS_MODES)
def test_mode_equals_verl(mode, agg, norms):
    log_prob, old, mask, advantages = _batch(seed=len(mode))
    config = _config(mode, agg)
    ours, our_grad, our_metrics = _ours(config, log_prob, old, mask, advantages, NORMS[norms])
    theirs, their_grad, their_metrics = _verl(mode, agg, NORMS[norms], config, log_prob, old, mask,
                                              advantages[:, None].expand_as(mask))
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(our_grad, their_grad * mask, **TOL)
    assert their_grad[~mask].abs().max() == 0
    assert our_grad.abs().sum() > 0  # the batch trains something in every mode
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        if key in their_metrics and mode != "bypass_mode":
            assert abs(float(our_metrics[key]) - their_metrics[key]) < 1e-6, key


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov", "geo_mean", "gspo", "cispo", "dppo_kl"])
def test_selections_and_clips_bind(mode):
    """The batch exercises what makes each mode differ from the plain surrogate: without it the equality
    above would not test it."""
    log_prob, old, mask, advantages = _batch(seed=len(mode))
    config = _config(mode, "token-mean")
    metrics = _ours(config, log_prob, old, mask, advantages, {})[2]
    if mode == "kl_cov":  # the penalised tokens change the value
        plain = _ours(config.replace(ppo_kl_coef=0.0), log_prob, old, mask, advantages, {})[0]
        assert plain != _ours(config, log_prob, old, mask, advantages, {})[0]
    else:
        assert metrics["actor/pg_clipfrac"] + metrics["actor/pg_clipfrac_lower"] > 0


def test_clip_cov_draws_as_verl_with_the_same_seed():
    """Clip-Cov's random selection: torch.randperm on the global CPU generator, one call per loss call, over the
    eligible tokens in verl's row-major order; seeding the global generator the same way reproduces verl's
    tokens, and another seed draws others."""
    log_prob, old, mask, advantages = _batch(seed=3)
    config = _config("clip_cov", "token-sum", clip_cov_ratio=0.1)
    token_adv = advantages[:, None].expand_as(mask)
    losses = set()
    for seed in range(4):
        ours = _ours(config, log_prob, old, mask, advantages, {}, seed=seed)
        theirs = _verl("clip_cov", "token-sum", {}, config, log_prob, old, mask, token_adv, seed=seed)
        torch.testing.assert_close(ours[1], theirs[1] * mask, **TOL)
        losses.add(round(float(ours[0]), 12))
    assert len(losses) > 1


@pytest.mark.parametrize("mode", ["vanilla", "gspo", "sapo", "clip_cov", "geo_mean", "cispo"])
def test_mode_with_is_weights_equals_verl(mode):
    log_prob, old, mask, advantages = _batch(seed=5)
    g = torch.Generator().manual_seed(1)
    is_weights = torch.rand(mask.shape, generator=g, dtype=torch.float64) + 0.5
    config = _config(mode, "seq-mean-token-mean")
    rows, horizon = mask.shape
    batch = loss_batch(torch.empty(rows, horizon, 2, dtype=torch.float64), torch.zeros(rows, horizon,
                                                                                      dtype=torch.long),
                       advantages, config, response_group=torch.arange(rows) // 2, response_mask=mask,
                       old_logprobs=old)
    lp = log_prob.clone().requires_grad_()
    torch.manual_seed(0)
    pg, _ = policy_token_loss(lp.reshape(-1), old.reshape(-1), (advantages[:, None] * mask).reshape(-1), config,
                              Segments(batch.token_response, rows), is_weights.reshape(-1))
    ours = aggregate(pg, loss_weights(batch, config, torch.float64).policy)
    (grad,) = torch.autograd.grad(ours, lp)
    theirs, their_grad, _ = _verl(mode, "seq-mean-token-mean", {}, config, log_prob, old, mask,
                                  advantages[:, None].expand_as(mask), is_weights)
    torch.testing.assert_close(ours.detach(), theirs, **TOL)
    torch.testing.assert_close(grad, their_grad * mask, **TOL)


@pytest.mark.parametrize("mode", ["vanilla", "gspo", "sapo", "kl_cov", "geo_mean", "dro"])
def test_aem_modulates_the_advantages_every_mode_sees(mode):
    """beta > 0: the loss is the framework's mode on the modulated advantages A~ = w A (eq. 7)."""
    log_prob, old, mask, advantages = _batch(seed=7)
    config = _config(mode, "token-mean", beta=1.5, uncertainty="surprisal")  # x from the log-probs
    ours, our_grad, metrics = _ours(config, log_prob, old, mask, advantages, {})
    weights = metrics["aem/weights"]
    assert weights.std() > 0.05  # the modulation is not the identity here
    theirs, their_grad, _ = _verl(mode, "token-mean", {}, config, log_prob, old, mask,
                                  (weights * advantages)[:, None].expand_as(mask))
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(our_grad, their_grad * mask, **TOL)


@pytest.mark.parametrize("mode", ["vanilla", "geo_mean", "cispo"])
def test_rollout_correction_wiring_equals_verl(mode):
    """rollout_is / rollout_rs from old and rollout log-probs: verl's helper gives the IS weights and the
    rejection mask, and its loss function takes them (rollout_is_weights, the masked response_mask)."""
    helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
    log_prob, old, mask, advantages = _batch(seed=9)
    g = torch.Generator().manual_seed(2)
    rollout = old + 0.15 * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    config = _config(mode, "seq-mean-token-sum", rollout_is="sequence", rollout_is_threshold=1.5,
                     rollout_rs="seq_sum_k1", rollout_rs_threshold="0.6_1.6")
    proto, verl_mask, _ = helper.compute_rollout_correction_and_rejection_mask(
        old, rollout, mask.double(), rollout_is=config.rollout_is, rollout_is_threshold=config.rollout_is_threshold,
        rollout_is_batch_normalize=False, rollout_rs=config.rollout_rs,
        rollout_rs_threshold=config.rollout_rs_threshold)
    verl_mask = verl_mask.bool()
    assert 0 < verl_mask.sum() < mask.sum()  # some responses rejected, some kept
    lp = log_prob.clone().requires_grad_()
    theirs, _ = core_algos.get_policy_loss_fn(mode)(old, lp, advantages[:, None] * verl_mask, verl_mask.double(),
                                                    "seq-mean-token-sum", _actor(mode, "seq-mean-token-sum", {},
                                                                                 config),
                                                    proto.batch["rollout_is_weights"])
    (their_grad,) = torch.autograd.grad(theirs, lp)

    rows, horizon = mask.shape
    batch = loss_batch(torch.empty(rows, horizon, 2, dtype=torch.float64), torch.zeros(rows, horizon,
                                                                                      dtype=torch.long),
                       advantages, config, response_group=torch.arange(rows) // 2, response_mask=mask,
                       old_logprobs=old, rollout_logprobs=rollout)
    lp = log_prob.clone().requires_grad_()
    ours, metrics = loss_from_token_terms(batch, lp.reshape(-1), torch.zeros(rows * horizon, dtype=torch.float64),
                                          config)
    (our_grad,) = torch.autograd.grad(ours, lp)
    torch.testing.assert_close(ours.detach(), theirs.detach(), **TOL)
    torch.testing.assert_close(our_grad, their_grad * verl_mask, **TOL)
    assert "rollout_corr/rollout_is_mean" in metrics


def test_a_mode_with_its_own_aggregation_needs_its_global_normaliser():
    log_prob, old, mask, advantages = _batch()
    with pytest.raises(ValueError, match="global_batch_size is required with loss_mode='sapo'"):
        _ours(_config("sapo", "token-mean"), log_prob, old, mask, advantages, {"dp_size": 2,
                                                                              "batch_num_tokens": 40})


def test_a_trl_type_asks_for_its_own_normaliser_only():
    """Under TRL's grpo type (per-response means) every term aggregates as the type does: with dp_size > 1 it
    needs global_batch_size, and not the token count that loss_agg_mode's default (token-mean) would."""
    log_prob, old, mask, advantages = _batch()
    loss, _, _ = _ours(_config("grpo", "token-mean"), log_prob, old, mask, advantages,
                    {"dp_size": 2, "global_batch_size": 8})
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="global_batch_size"):
        _ours(_config("grpo", "token-mean"), log_prob, old, mask, advantages, {"dp_size": 2, "batch_num_tokens": 40})


def test_verl_mode_options_are_checked():
    with pytest.raises(ValueError, match="dual_clip"):
        ak.AEMConfig(loss_mode="gspo", dual_clip=2.0)
    assert ak.AEMConfig(loss_mode="dppo_tv", dual_clip=20.0).dual_clip == 20.0  # their ratio truncation
    with pytest.raises(ValueError, match="clip_cov_lb"):
        ak.AEMConfig(loss_mode="clip_cov", clip_cov_lb=2.0, clip_cov_ub=1.0)
    with pytest.raises(ValueError, match="kl_cov_ratio"):
        ak.AEMConfig(loss_mode="kl_cov", kl_cov_ratio=0.0)
    with pytest.raises(ValueError, match="rollout_is"):
        ak.AEMConfig(loss_mode="bypass_mode", rollout_is="token")
    with pytest.raises(TypeError, match="use_bias_correction_kl"):
        ak.AEMConfig(use_bias_correction_kl=1)
