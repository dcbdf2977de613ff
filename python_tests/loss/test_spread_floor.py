"""AEM's spread floors (eq. 5): `AEMConfig.spread_floor` (absolute, the spec's 1e-8) and
`relative_spread_floor` (relative to the group's mean uncertainty)."""

from __future__ import annotations

import pytest
import torch

import aem_kernels as ak
from aem_kernels.loss.modulation import relative_uncertainty

GROUP = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])


def _uncertainty(dtype=torch.float64):
    """Group 0: four responses about equally uncertain (x ~ 2 +- 1e-4); group 1: clearly spread; group 2: two
    identical responses (spread exactly 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.empty(10, dtype=dtype)
    x[:4] = 2.0 + 1e-4 * torch.randn(4, generator=g, dtype=dtype)
    x[4:8] = torch.tensor([0.5, 1.5, 2.5, 1.0], dtype=dtype)
    x[8:] = 0.7
    return x


def test_default_is_the_spec_min_max():
    x = _uncertainty()
    u = relative_uncertainty(x, GROUP, 3)
    low = torch.stack([x[GROUP == g].min() for g in range(3)])[GROUP]
    high = torch.stack([x[GROUP == g].max() for g in range(3)])[GROUP]
    spread = high - low
    expected = torch.where(spread >= 1e-8, (x - low) / torch.where(spread >= 1e-8, spread, 1.0), 0.0)
    assert torch.equal(u, expected)
    assert torch.equal(u, relative_uncertainty(x, GROUP, 3, spread_floor=1e-8, relative_spread_floor=0.0))


@pytest.mark.parametrize("floors", [dict(relative_spread_floor=1e-3), dict(spread_floor=1e-3)])
def test_near_equal_group_gets_weight_one_with_a_floor(floors):
    x = _uncertainty()
    advantages = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain, plain_metrics = ak.modulate_advantages(advantages, x, GROUP, ak.AEMConfig(beta=1.0))
    floored, metrics = ak.modulate_advantages(advantages, x, GROUP, ak.AEMConfig(beta=1.0, **floors))
    w_plain, w = plain_metrics["aem/weights"], metrics["aem/weights"]
    # without a floor, the 1e-4 noise of group 0 becomes full-strength weights (u spans [0, 1])
    assert float(w_plain[:4].max() - w_plain[:4].min()) > 0.5
    assert torch.equal(w[:4], torch.ones(4, dtype=torch.float64))
    assert torch.equal(floored[:4], advantages[:4])
    # the spread group and the zero-spread group are untouched
    assert torch.equal(w[4:], w_plain[4:])
    assert torch.equal(w[8:], torch.ones(2, dtype=torch.float64))


def test_relative_floor_scales_with_the_group_mean():
    x = _uncertainty()
    # spread of group 1 is 2.0 around a mean of 1.375: a relative floor of 1.0 keeps it, 2.0 removes it
    kept = relative_uncertainty(x, GROUP, 3, relative_spread_floor=1.0)
    removed = relative_uncertainty(x, GROUP, 3, relative_spread_floor=2.0)
    assert torch.equal(kept[4:8], relative_uncertainty(x, GROUP, 3)[4:8])
    assert torch.equal(removed[4:8], torch.zeros(4, dtype=torch.float64))


def test_zscore_relative_floor():
    x = _uncertainty()
    for baseline in ("mean", "loo", "batch"):
        plain = relative_uncertainty(x, GROUP, 3, baseline=baseline, zscore=True)
        floored = relative_uncertainty(x, GROUP, 3, baseline=baseline, zscore=True, relative_spread_floor=1e-3)
        if baseline == "batch":   # the batch std (about 0.6) is well above 1e-3 * |batch mean|: unchanged
            assert torch.equal(floored, plain)
        else:                     # group 0's std (1e-4) is below 1e-3 * 2: its z-scores vanish
            assert float(plain[:4].abs().max()) > 0.5
            assert torch.equal(floored[:4], torch.zeros(4, dtype=torch.float64))
            assert torch.equal(floored[4:8], plain[4:8])


def test_zero_floors_give_no_nan():
    x = _uncertainty()
    u = relative_uncertainty(x, GROUP, 3, spread_floor=0.0)
    assert torch.isfinite(u).all() and torch.equal(u[8:], torch.zeros(2, dtype=torch.float64))
    assert float(u[:4].max()) == 1.0   # no floor at all: the noise group is normalised to [0, 1]


@pytest.mark.parametrize("name, value, error", [("spread_floor", -1.0, ValueError),
                                                ("relative_spread_floor", float("nan"), ValueError),
                                                ("relative_spread_floor", None, TypeError)])
def test_bad_floors(name, value, error):
    with pytest.raises(error, match=name):
        relative_uncertainty(_uncertainty(), GROUP, 3, **{name: value})
