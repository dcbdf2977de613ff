"""AEM relative uncertainty and weights (eq. 5, 7) on hand-computed examples, every option, and the metrics."""

import math

import pytest
import torch

import aem_kernels as ak

D = torch.float64


def _t(values, dtype=D):
    return torch.tensor(values, dtype=dtype)


def _weights(x, groups, **cfg):
    adv = torch.ones(len(x), dtype=D)
    out, metrics = ak.modulate_advantages(adv, _t(x), torch.tensor(groups), ak.AEMConfig(**cfg))
    return out, metrics


def test_paper_default_on_hand_computed_group():
    # one group, x = [1, 2, 3]: u = [0, 0.5, 1], phi = exp(-u), w = phi / mean(phi)
    out, metrics = _weights([1.0, 2.0, 3.0], [0, 0, 0])
    phi = [1.0, math.exp(-0.5), math.exp(-1.0)]
    mean = sum(phi) / 3
    expected = _t([p / mean for p in phi])
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(metrics["aem/weights"], expected, rtol=1e-14, atol=0)
    assert out[0] > 1 > out[2]  # the confident response is amplified, the uncertain attenuated
    torch.testing.assert_close(metrics["aem/w_mean"], _t(1.0), rtol=1e-14, atol=0)


def test_two_groups_ties_single_and_all_equal():
    # g0: ties [1, 1, 2] -> u = [0, 0, 1]; g1: single response -> w = 1; g2: all equal -> w = 1
    x = [1.0, 1.0, 2.0, 5.0, 0.3, 0.3]
    groups = [0, 0, 0, 1, 2, 2]
    out, _ = _weights(x, groups, beta=2.0)
    e = math.exp(-2.0)
    mean = (1 + 1 + e) / 3
    expected = _t([1 / mean, 1 / mean, e / mean, 1.0, 1.0, 1.0])
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=0)


def test_beta_zero_is_exactly_plain_advantages():
    adv = _t([0.3, -1.2, 2.0, 0.0])
    out, metrics = ak.modulate_advantages(adv, _t([0.1, 5.0, 2.0, 3.0]), torch.tensor([0, 0, 1, 1]),
                                          ak.AEMConfig(beta=0.0))
    assert torch.equal(out, adv)
    assert torch.equal(metrics["aem/drift"], metrics["aem/drift_unmodulated"])


def test_sign_switch_flips_which_responses_are_amplified():
    plus, _ = _weights([1.0, 2.0, 3.0], [0, 0, 0], sign=1)
    minus, _ = _weights([1.0, 2.0, 3.0], [0, 0, 0], sign=-1)
    assert plus[0] > 1 > plus[2] and minus[2] > 1 > minus[0]
    phi = [1.0, math.exp(0.5), math.exp(1.0)]
    torch.testing.assert_close(minus, _t([p / (sum(phi) / 3) for p in phi]), rtol=1e-14, atol=0)


def test_linear_phi_is_clamped_at_zero_and_normalised():
    # beta = 3, u = [0, 0.5, 1]: 1 - 3u = [1, -0.5, -2] -> clamp -> [1, 0, 0], mean 1/3 -> w = [3, 0, 0]
    out, _ = _weights([0.0, 1.0, 2.0], [0, 0, 0], beta=3.0, phi="linear")
    torch.testing.assert_close(out, _t([3.0, 0.0, 0.0]), rtol=1e-14, atol=0)
    # a group whose every phi is 0 keeps w = 1 (mean(w) = 1 by definition); here u = [0, 1] and 1 - 5u < 0 only
    # for one, so check the all-zero case with sign = -1 on a centred baseline instead.
    out, _ = _weights([0.0, 10.0], [0, 0], beta=1.0, phi="linear", baseline="mean", sign=1)
    # u = [-5, 5]: 1 + 5 = 6, 1 - 5 < 0 -> [6, 0], mean 3 -> [2, 0]
    torch.testing.assert_close(out, _t([2.0, 0.0]), rtol=1e-14, atol=0)


def test_centred_baselines_and_zscore():
    x = [1.0, 2.0, 6.0]
    groups = torch.tensor([0, 0, 0])
    u_mean = ak.relative_uncertainty(_t(x), groups, 1, baseline="mean")
    torch.testing.assert_close(u_mean, _t([-2.0, -1.0, 3.0]), rtol=1e-14, atol=0)
    u_loo = ak.relative_uncertainty(_t(x), groups, 1, baseline="loo")
    torch.testing.assert_close(u_loo, _t([1 - 4.0, 2 - 3.5, 6 - 1.5]), rtol=1e-14, atol=0)
    u_batch = ak.relative_uncertainty(_t(x + [10.0]), torch.tensor([0, 0, 0, 1]), 2, baseline="batch")
    torch.testing.assert_close(u_batch, _t([1 - 4.75, 2 - 4.75, 6 - 4.75, 10 - 4.75]), rtol=1e-14, atol=0)
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)  # unbiased, as GRPO's torch.std
    u_z = ak.relative_uncertainty(_t(x), groups, 1, baseline="mean", zscore=True)
    torch.testing.assert_close(u_z, _t([-2.0, -1.0, 3.0]) / (std + 1e-6), rtol=1e-14, atol=0)
    # one-response groups: centred forms give 0, not NaN
    u_single = ak.relative_uncertainty(_t([4.0]), torch.tensor([0]), 1, baseline="loo", zscore=True)
    assert torch.equal(u_single, _t([0.0]))


def test_minmax_spread_threshold():
    u = ak.relative_uncertainty(_t([1.0, 1.0 + 5e-9]), torch.tensor([0, 0]), 1)
    assert torch.equal(u, _t([0.0, 0.0]))
    u = ak.relative_uncertainty(_t([1.0, 1.0 + 2e-8]), torch.tensor([0, 0]), 1)
    torch.testing.assert_close(u, _t([0.0, 1.0]), rtol=1e-6, atol=0)


def test_normalize_batch_and_none():
    x, groups = [1.0, 3.0, 0.0, 4.0], [0, 0, 1, 1]
    none, _ = _weights(x, groups, normalize="none")
    torch.testing.assert_close(none, _t([1.0, math.exp(-1.0), 1.0, math.exp(-1.0)]), rtol=1e-14, atol=0)
    batch, _ = _weights(x, groups, normalize="batch")
    mean = (2 + 2 * math.exp(-1.0)) / 4
    torch.testing.assert_close(batch, _t([1 / mean, math.exp(-1.0) / mean] * 2), rtol=1e-14, atol=0)


def test_clipping_and_clip_fraction():
    out, metrics = _weights([1.0, 2.0, 3.0], [0, 0, 0], beta=1.5, w_min=0.5, w_max=1.5)
    phi = [1.0, math.exp(-0.75), math.exp(-1.5)]
    raw = [p / (sum(phi) / 3) for p in phi]
    torch.testing.assert_close(out, _t([min(max(r, 0.5), 1.5) for r in raw]), rtol=1e-14, atol=0)
    assert raw[0] > 1.5 and raw[2] < 0.5 and 0.5 < raw[1] < 1.5
    torch.testing.assert_close(metrics["aem/clip_frac"], _t(2 / 3), rtol=1e-14, atol=0)


def test_invalid_responses_are_excluded_from_group_statistics():
    adv = _t([1.0, 1.0, 1.0])
    out, metrics = ak.modulate_advantages(adv, _t([1.0, 3.0, 100.0]), torch.tensor([0, 0, 0]), ak.AEMConfig(),
                                          response_valid=torch.tensor([True, True, False]))
    e = math.exp(-1.0)
    torch.testing.assert_close(out, _t([2 / (1 + e), 2 * e / (1 + e), 1.0]), rtol=1e-14, atol=0)
    torch.testing.assert_close(metrics["aem/x_mean"], _t(2.0), rtol=1e-14, atol=0)


def test_metrics_drift_definition():
    # D = (1/R) sum_r A~_r (x_r - mean_g x)
    adv = _t([1.0, -1.0, 2.0, 0.5])
    x = _t([0.5, 1.5, 2.0, 4.0])
    groups = torch.tensor([0, 0, 1, 1])
    out, metrics = ak.modulate_advantages(adv, x, groups, ak.AEMConfig(beta=0.7))
    dev = _t([-0.5, 0.5, -1.0, 1.0])
    torch.testing.assert_close(metrics["aem/drift"], (out * dev).sum() / 4, rtol=1e-14, atol=0)
    torch.testing.assert_close(metrics["aem/drift_unmodulated"], (adv * dev).sum() / 4, rtol=1e-14, atol=0)
    torch.testing.assert_close(metrics["aem/x_std"], x.std(correction=0), rtol=1e-14, atol=0)
    for key in ("aem/u_mean", "aem/u_std", "aem/w_mean", "aem/w_std", "aem/clip_frac"):
        assert metrics[key].dim() == 0 and torch.isfinite(metrics[key])


def test_gradient_does_not_flow_through_weights():
    x = _t([1.0, 2.0, 3.0]).requires_grad_(True)
    adv = _t([1.0, -1.0, 0.5]).requires_grad_(True)
    out, _ = ak.modulate_advantages(adv, x, torch.tensor([0, 0, 0]), ak.AEMConfig())
    out.sum().backward()
    assert x.grad is None
    w = out.detach() / adv.detach()
    torch.testing.assert_close(adv.grad, w, rtol=1e-14, atol=0)


@pytest.mark.parametrize("bad, error", [
    (dict(advantages=_t([1.0, float("nan")])), ValueError),
    (dict(advantages=_t([[1.0, 2.0]])), ValueError),
    (dict(uncertainty=_t([1.0])), ValueError),
    (dict(uncertainty=_t([1.0, float("inf")])), ValueError),
    (dict(response_group=torch.tensor([0, -1])), ValueError),
    (dict(response_group=torch.tensor([0.0, 1.0])), TypeError),
    (dict(config={"beta": 1.0}), TypeError),
    (dict(num_groups=1), ValueError),  # group id 1 out of range for G = 1
    (dict(response_valid=torch.tensor([1, 1])), ValueError),
])
def test_modulate_advantages_rejects_bad_input(bad, error):
    args = dict(advantages=_t([1.0, 2.0]), uncertainty=_t([0.5, 0.7]), response_group=torch.tensor([0, 1]),
                config=ak.AEMConfig())
    args.update(bad)
    extra = {k: args.pop(k) for k in ("num_groups", "response_valid") if k in args}
    with pytest.raises(error):
        ak.modulate_advantages(args["advantages"], args["uncertainty"], args["response_group"], args["config"],
                               **extra)


@pytest.mark.parametrize("bad, error, names", [
    (dict(uncertainty=[0.5, 0.7]), TypeError, "uncertainty"),
    (dict(uncertainty=_t([[0.5, 0.7]])), ValueError, "uncertainty"),
    (dict(uncertainty=_t([0.5, float("nan")])), ValueError, "uncertainty"),
    (dict(uncertainty=torch.tensor([1, 2])), TypeError, "uncertainty"),
    (dict(response_group=torch.tensor([0])), ValueError, "response_group"),
    (dict(response_group=torch.tensor([0, 2])), ValueError, "response_group"),  # G = 2
    (dict(response_group=torch.tensor([0.0, 1.0])), TypeError, "response_group"),
    (dict(num_groups=-1), ValueError, "num_groups"),
    (dict(num_groups=2.0), TypeError, "num_groups"),
    (dict(valid=torch.tensor([1, 1])), ValueError, "valid"),
    (dict(valid=torch.tensor([True])), ValueError, "valid"),
])
@pytest.mark.parametrize("function", ["relative_uncertainty", "aem_weights"])
def test_weight_functions_reject_bad_input(function, bad, error, names):
    args = dict(uncertainty=_t([0.5, 0.7]), response_group=torch.tensor([0, 1]), num_groups=2, valid=None)
    args.update(bad)
    with pytest.raises(error, match=names):
        if function == "relative_uncertainty":
            ak.relative_uncertainty(args["uncertainty"], args["response_group"], args["num_groups"],
                                    valid=args["valid"])
        else:
            ak.aem_weights(args["uncertainty"], args["response_group"], ak.AEMConfig(),
                           num_groups=args["num_groups"], valid=args["valid"])


def test_weight_functions_reject_bad_options():
    x, groups = _t([0.5, 0.7]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="baseline"):
        ak.relative_uncertainty(x, groups, 1, baseline="median")
    with pytest.raises(TypeError, match="zscore"):
        ak.relative_uncertainty(x, groups, 1, zscore="yes")
    with pytest.raises(TypeError, match="config"):
        ak.aem_weights(x, groups, {"beta": 1.0}, num_groups=1)


def test_public_weights_match_modulate_advantages():
    x, groups = _t([0.2, 0.9, 0.4, 1.5, 1.1]), torch.tensor([0, 0, 0, 1, 1])
    valid = torch.tensor([True, True, False, True, True])
    cfg = ak.AEMConfig(beta=0.7)
    w, u, _ = ak.aem_weights(x, groups, cfg, num_groups=2, valid=valid)
    out, metrics = ak.modulate_advantages(torch.ones(5, dtype=D), x, groups, cfg, response_valid=valid)
    torch.testing.assert_close(w, metrics["aem/weights"], rtol=0, atol=0)
    torch.testing.assert_close(u, ak.relative_uncertainty(x, groups, 2, valid=valid), rtol=0, atol=0)
    # the invalid response: u = 0, w = 1; group 0's min-max uses responses 0 and 1 only
    assert u[2] == 0 and w[2] == 1
    torch.testing.assert_close(u[:2], _t([0.0, 1.0]), rtol=0, atol=0)


# --- properties over random groups (hypothesis) ------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _groups(draw):
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=5))
    groups = [g for g, size in enumerate(sizes) for _ in range(size)]
    x = draw(st.lists(st.floats(0.0, 12.0, allow_nan=False), min_size=len(groups), max_size=len(groups)))
    beta = draw(st.floats(0.0, 5.0))
    return torch.tensor(groups), _t(x), beta


@settings(max_examples=60, deadline=None)
@given(_groups(), st.sampled_from(["minmax", "mean", "loo"]), st.sampled_from([1, -1]))
def test_group_normalised_weights_average_one_and_respect_order(case, baseline, sign):
    groups, x, beta = case
    cfg = ak.AEMConfig(beta=beta, baseline=baseline, sign=sign)
    w, u, clipped = ak.aem_weights(x, groups, cfg, num_groups=int(groups.max()) + 1)
    assert (w > 0).all() and not clipped.any()
    for g in groups.unique():
        in_group = groups == g
        torch.testing.assert_close(w[in_group].mean(), _t(1.0), rtol=1e-12, atol=1e-12)
        xs, ws = x[in_group], w[in_group]
        order = torch.argsort(xs)
        # larger uncertainty never gets a larger weight under sign=+1 (smaller under sign=-1)
        diffs = (ws[order][1:] - ws[order][:-1]) * sign
        assert (diffs <= 1e-12).all()
    if baseline == "minmax":
        assert ((u >= 0) & (u <= 1)).all()
