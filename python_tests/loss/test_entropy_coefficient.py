"""ak.AdaptiveEntropyCoefficient against TRL 1.16's adaptive entropy control: TRL's own source block of
`GRPOTrainer._compute_loss` (the entropy bonus and its controller update) executed on a minimal trainer
stand-in over consecutive optimiser steps with gradient accumulation, next to the controller fed the same
entropies."""

from __future__ import annotations

import collections
import inspect
import json
import math
import sys
import textwrap
import types

import pytest
import torch

import aem_kernels as ak

ARGS = dict(entropy_coef=0.01, entropy_coef_min=0.0, entropy_coef_max=0.02, entropy_coef_delta=0.005,
            entropy_target=0.3)
# the step entropies: below the target (c grows to its max), above it (c falls to its min), below again
LEVELS = [0.1, 0.1, 0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.2, 0.25]


def _trl_bonus_block(trl) -> str:
    source = inspect.getsource(trl.GRPOTrainer._compute_loss)
    start = source.index("        if self._entropy_bonus_enabled:")
    return textwrap.dedent(source[start:source.index("        # The policy loss above is scaled", start)])


class _Accelerator:
    def __init__(self) -> None:
        self.sync_gradients = True

    def gather(self, tensor):
        return tensor.reshape(-1)

    def reduce(self, tensor, reduction="sum"):
        return tensor


def test_equals_trl_adaptive_entropy_over_steps():
    trl = pytest.importorskip("trl")
    code = _trl_bonus_block(trl)
    trainer = types.SimpleNamespace(
        _entropy_bonus_enabled=True, use_adaptive_entropy=True, entropy_coef=ARGS["entropy_coef"],
        _last_world_entropy=float("inf"), _entropy_window_stats=None, current_gradient_accumulation_steps=2,
        args=types.SimpleNamespace(**{k: v for k, v in ARGS.items() if k != "entropy_coef"}),
        accelerator=_Accelerator(), _metrics={"train": collections.defaultdict(list)})
    ctrl = ak.AdaptiveEntropyCoefficient(**ARGS)
    g = torch.Generator().manual_seed(0)
    applied, seen = [], []
    for level in LEVELS:
        for micro in range(2):   # two micro-batches of different lengths per optimiser step
            rows, cols = 3, 5 + 2 * micro
            entropies = 2 * level * torch.rand(rows, cols, generator=g)
            mask = (torch.rand(rows, cols, generator=g) > 0.2).float()
            trainer.accelerator.sync_gradients = micro == 1
            scope = dict(vars(sys.modules[trl.GRPOTrainer.__module__]), self=trainer, mode="train", mask=mask,
                         entropy_mask=None, entropies=entropies, loss=torch.tensor(0.0),
                         policy_loss=torch.tensor(0.0))
            exec(code, scope)
            trl_coef = float(-scope["loss"] / scope["entropy_loss"]) if float(scope["loss"]) != 0 else 0.0
            assert trl_coef == pytest.approx(ctrl.coef, rel=1e-6, abs=0.0)   # the coefficient each step applies
            ctrl.observe(entropies, mask)
        ctrl.step()
        assert ctrl.entropy_coef == trainer.entropy_coef
        assert ctrl.last_world_entropy == pytest.approx(trainer._last_world_entropy, rel=1e-6)
        applied.append(ctrl.coef)
        seen.append(ctrl.entropy_coef)
    # the run exercises both branches, both clamps and the gate
    assert ARGS["entropy_coef_max"] in seen and 0.0 in seen and 0.0 in applied and max(applied) > 0
    # TRL's checkpoint file holds the same state
    saved = json.loads(json.dumps({"entropy_coef": trainer.entropy_coef,
                                   "last_world_entropy": trainer._last_world_entropy}))
    restored = ak.AdaptiveEntropyCoefficient(**ARGS)
    restored.load_state_dict(saved)
    assert restored.entropy_coef == ctrl.entropy_coef and restored.coef == ctrl.coef
    assert set(ctrl.state_dict()) == set(saved)


def test_step_with_a_given_entropy_and_config():
    ctrl = ak.AdaptiveEntropyCoefficient(entropy_coef=0.1, entropy_target=1.0, entropy_coef_delta=0.05)
    assert ctrl.coef == 0.0   # no measurement yet: last entropy is +inf, above any target (TRL's start)
    assert ctrl.step(torch.tensor(0.5)) == pytest.approx(0.15)
    config = ctrl.config(ak.AEMConfig(beta=0.0))
    assert config.entropy_coef == pytest.approx(0.15) and config.beta == 0.0
    assert ctrl.step(2.0) == 0.0 and ctrl.entropy_coef == pytest.approx(0.1)
    state = ctrl.state_dict()
    assert json.loads(json.dumps(state)) == state
    fresh = ak.AdaptiveEntropyCoefficient()
    fresh.load_state_dict({"entropy_coef": 0.3, "last_world_entropy": math.inf})
    assert fresh.coef == 0.0 and fresh.entropy_coef == 0.3


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(entropy_coef_min=0.5, entropy_coef_max=0.1), ValueError, "entropy_coef_min"),
    (dict(entropy_coef_delta=-0.1), ValueError, "entropy_coef_delta"),
    (dict(entropy_target=float("nan")), ValueError, "entropy_target"),
    (dict(entropy_coef="0.1"), TypeError, "entropy_coef"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ak.AdaptiveEntropyCoefficient(**kwargs)


def test_bad_calls():
    ctrl = ak.AdaptiveEntropyCoefficient()
    with pytest.raises(ValueError, match="observe"):
        ctrl.step()
    with pytest.raises(ValueError, match="entropy"):
        ctrl.step(torch.ones(2))
    with pytest.raises(ValueError, match="entropy"):
        ctrl.step(float("nan"))
    with pytest.raises(ValueError, match="mask"):
        ctrl.observe(torch.ones(3), torch.ones(2))
    with pytest.raises(TypeError, match="config"):
        ctrl.config({"entropy_coef": 0.1})
    with pytest.raises(ValueError, match="last_world_entropy"):
        ctrl.load_state_dict({"entropy_coef": 0.1})
