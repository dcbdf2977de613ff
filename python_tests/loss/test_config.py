"""AEMConfig: the paper's defaults and a ValueError/TypeError for every invalid value."""

import pytest
import torch

import aem_kernels as ak


def test_defaults_are_the_papers_form():
    cfg = ak.AEMConfig()
    # the paper's form (AEM_SPEC section 4) and verl's PPO defaults, every option of the loss family off
    assert cfg.to_dict() == dict(
        beta=1.0, phi="exp", sign=1, uncertainty="entropy", surprisal_reduction="mean", baseline="minmax",
        zscore=False, normalize="group", w_min=0.0, w_max=None, surprisal_source="current", clip_low=0.2,
        clip_high=0.2, dual_clip=3.0, loss_agg_mode="token-mean", entropy_coef=0.0, kl_coef=0.0, kl_type="k3",
        temperature=1.0, ignore_index=-100,
        **{k: v for k, v in cfg.to_dict().items() if k in LOSS_FAMILY_FIELDS})
    assert {k: cfg.to_dict()[k] for k in LOSS_FAMILY_DEFAULTS} == LOSS_FAMILY_DEFAULTS


# the third-wave fields (AEM_SPEC 7c) with verl's / TRL's defaults; the other fields of the family are listed
# in LOSS_FAMILY_FIELDS (their defaults are checked against the frameworks in the loss-mode tests)
LOSS_FAMILY_DEFAULTS = dict(
    loss_mode="vanilla", tau_pos=1.0, tau_neg=1.05, clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0,
    kl_cov_ratio=0.0002, ppo_kl_coef=0.1, dro_beta=None, top_entropy_quantile=1.0, rollout_is=None,
    rollout_is_threshold=2.0, rollout_rs=None, rollout_rs_threshold=None, spread_floor=1e-8,
    relative_spread_floor=0.0, vllm_importance_sampling_mode=None, vllm_importance_sampling_clip_min=None,
    vllm_importance_sampling_clip_max=3.0, rollout_is_batch_normalize=False)
LOSS_FAMILY_FIELDS = set(LOSS_FAMILY_DEFAULTS) | {
    "delta", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "importance_sampling_level",
    "use_bias_correction_kl"}


def test_verl_kl_names_are_normalised_and_replace_validates():
    assert ak.AEMConfig(kl_type="low_var_kl").kl_type == "k3"
    assert ak.AEMConfig(kl_type="mse").kl_type == "k2"
    assert ak.AEMConfig(kl_type="kl").kl_type == "k1"
    assert ak.AEMConfig().replace(beta=0.0).beta == 0.0
    with pytest.raises(ValueError, match="beta"):
        ak.AEMConfig().replace(beta=-1.0)


@pytest.mark.parametrize("field, value, error", [
    ("beta", -0.1, ValueError), ("beta", float("nan"), ValueError), ("beta", "1", TypeError),
    ("phi", "softmax", ValueError), ("sign", 0, ValueError), ("sign", True, ValueError),
    ("uncertainty", "variance", ValueError), ("surprisal_reduction", "max", ValueError),
    ("baseline", "median", ValueError), ("zscore", 1, TypeError), ("normalize", "global", ValueError),
    ("w_min", -1.0, ValueError), ("w_max", float("inf"), ValueError), ("surprisal_source", "ref", ValueError),
    # w_max = 0 would clip every weight, hence every advantage, to 0
    ("w_max", 0.0, ValueError), ("w_max", -0.5, ValueError), ("zscore", "no", TypeError),
    ("clip_low", 1.0, ValueError), ("clip_low", -0.1, ValueError), ("clip_high", -0.2, ValueError),
    ("dual_clip", 1.0, ValueError), ("loss_agg_mode", "mean", ValueError), ("entropy_coef", float("inf"), ValueError),
    ("kl_coef", -0.1, ValueError), ("kl_type", "k4", ValueError), ("temperature", 0.0, ValueError),
    ("temperature", -1.0, ValueError), ("temperature", torch.tensor(1.0, requires_grad=True), TypeError),
    ("ignore_index", 1.5, TypeError),
])
def test_invalid_values(field, value, error):
    with pytest.raises(error, match=field):
        ak.AEMConfig(**{field: value})


def test_cross_field_checks():
    with pytest.raises(ValueError, match="zscore"):
        ak.AEMConfig(zscore=True)  # min-max is not a centred baseline
    assert ak.AEMConfig(zscore=True, baseline="mean").zscore
    with pytest.raises(ValueError, match="w_max"):
        ak.AEMConfig(w_min=2.0, w_max=1.0)
    assert ak.AEMConfig(dual_clip=None, w_min=None).dual_clip is None
