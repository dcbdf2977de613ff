"""AEMConfig: the paper's defaults and a ValueError/TypeError for every invalid value."""

import pytest
import torch

import aem_kernels as ak


def test_defaults_are_the_papers_form():
    cfg = ak.AEMConfig()
    assert cfg.to_dict() == dict(
        beta=1.0, phi="exp", sign=1, uncertainty="entropy", surprisal_reduction="mean", baseline="minmax",
        zscore=False, normalize="group", w_min=0.0, w_max=None, surprisal_source="current", clip_low=0.2,
        clip_high=0.2, dual_clip=3.0, loss_agg_mode="token-mean", entropy_coef=0.0, kl_coef=0.0, kl_type="k3",
        temperature=1.0, ignore_index=-100)


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
