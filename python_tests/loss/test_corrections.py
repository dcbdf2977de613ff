"""loss.corrections against the installed frameworks: verl 0.9.1's rollout correction
(`compute_rollout_correction_and_rejection_mask`, the function verl's trainer calls), TRL 1.16's vLLM
importance sampling (its inline block of `GRPOTrainer._generate_and_score_completions`, executed as TRL's own
source on the same tensors) and `GRPOTrainer.get_high_entropy_mask` (called on a minimal trainer stand-in);
and the checks of `rollout_logprobs` and of the config fields."""

from __future__ import annotations

import inspect
import math
import sys
import textwrap
import types

import pytest
import torch

import aem_kernels as ak
from aem_kernels.loss.corrections import apply_rollout_corrections, entropy_token_mask
from aem_kernels.loss.inputs import loss_batch

B, T, V = 6, 9, 11


def _inputs(dtype=torch.float64, seed=0, spread=0.3):
    """Padded batch: ragged responses, one empty row; rollout log-probs off the old ones by N(0, spread)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    mask[3, 2:] = False
    mask[5, :] = False
    old = -2 * torch.rand(B, T, generator=g, dtype=torch.float64)
    rollout = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    return mask, old.to(dtype), rollout.to(dtype)


def _batch(config, mask, old, rollout, **kwargs):
    return loss_batch(torch.empty(B, T, V), torch.zeros(B, T, dtype=torch.long), torch.randn(B),
                      config, response_group=torch.arange(B) // 2, response_mask=mask, old_logprobs=old,
                      rollout_logprobs=rollout, **kwargs)


VERL_CASES = [
    dict(rollout_is="token"),
    dict(rollout_is="sequence", rollout_is_threshold="0.5_3.0"),
    dict(rollout_is="token", rollout_is_threshold="0.8_1.25", rollout_is_batch_normalize=True),
    dict(rollout_is="sequence", rollout_is_threshold=1.5, rollout_is_batch_normalize=True,
         rollout_rs="seq_sum_k1", rollout_rs_threshold="0.5_2.0"),
    dict(rollout_rs="token_k1,seq_mean_k3,seq_max_k2", rollout_rs_threshold="1.3,0.05,0.1"),
    dict(rollout_rs="token_k2,token_k3,seq_sum_k2,seq_mean_k1,seq_max_k3",
         rollout_rs_threshold="0.08,0.08,0.5,1.1,0.1"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", VERL_CASES)
def test_equals_verl_rollout_correction(case, dtype):
    helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
    mask, old, rollout = _inputs(dtype)
    config = ak.AEMConfig(**case)
    batch, weights, metrics = apply_rollout_corrections(_batch(config, mask, old, rollout), config)
    proto, verl_mask, verl_metrics = helper.compute_rollout_correction_and_rejection_mask(
        old, rollout, mask.to(dtype), rollout_is=config.rollout_is, rollout_is_threshold=config.rollout_is_threshold,
        rollout_is_batch_normalize=config.rollout_is_batch_normalize, rollout_rs=config.rollout_rs,
        rollout_rs_threshold=config.rollout_rs_threshold)
    kept = (batch.token_response >= 0).reshape(B, T)
    assert torch.equal(kept, verl_mask.bool())
    if config.rollout_rs is not None:
        assert kept.sum() < mask.sum()  # the case rejects something
        assert torch.equal(batch.labels == config.ignore_index, ~kept)
    if config.rollout_is is None:
        assert weights is None
    else:
        # fp32 sums of a few terms in another order: a few ulps
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights.reshape(B, T), proto.batch["rollout_is_weights"] * verl_mask, **tol)
    shared = set(metrics) & set(verl_metrics)
    assert len(shared) == len(metrics) and len(shared) >= 10
    for name in shared:  # verl reports some fractions in fp32
        assert metrics[name].item() == pytest.approx(verl_metrics[name], rel=1e-5, abs=1e-6), name


def _trl_block(method, start: str, end: str) -> str:
    """TRL's own source of an inline block of `method`, dedented, to run on given tensors."""
    source = inspect.getsource(method)
    first = source.index(start)
    return textwrap.dedent(source[first - (len(source[:first]) - len(source[:first].rstrip(" "))):
                                  source.index(end, first)])


class _OneProcess:
    def gather(self, tensor):
        return tensor.reshape(-1)

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor


@pytest.mark.parametrize("mode, low, high", [("token_truncate", None, 1.2), ("token_mask", 0.8, 1.25),
                                             ("sequence_truncate", 0.5, 2.0), ("sequence_mask", None, 1.5)])
def test_equals_trl_vllm_importance_sampling(mode, low, high):
    trl = pytest.importorskip("trl")
    method = trl.GRPOTrainer._generate_and_score_completions
    ratio_code = _trl_block(method, "if self.use_vllm and self.vllm_importance_sampling_correction:\n"
                            "                mask = completion_mask", "# Compute the per-token log probabilities")
    metric_code = _trl_block(method, "if self.use_vllm and self.vllm_importance_sampling_correction:\n"
                             "            delta = torch.abs", "output = {")
    mask, old, rollout = _inputs(torch.float32, seed=1, spread=0.2)
    trainer = types.SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                                    vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=low,
                                    vllm_importance_sampling_clip_max=high, accelerator=_OneProcess(),
                                    _metrics={"train": {}})
    trainer._metrics["train"] = __import__("collections").defaultdict(list)
    scope = dict(vars(sys.modules[trl.GRPOTrainer.__module__]), self=trainer, completion_mask=mask.long(),
                 tool_mask=None, old_per_token_logps=old, sampling_per_token_logps=rollout, mode="train",
                 device=old.device, math=math)
    exec(ratio_code, scope)
    exec(metric_code, scope)
    trl_ratio = scope["vllm_importance_sampling_ratio"].expand(B, T)

    config = ak.AEMConfig(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=low,
                          vllm_importance_sampling_clip_max=high)
    batch, weights, metrics = apply_rollout_corrections(_batch(config, mask, old, rollout), config)
    assert torch.equal(batch.token_response.reshape(B, T) >= 0, mask)  # TRL's masks keep the tokens
    torch.testing.assert_close(weights.reshape(B, T), torch.where(mask, trl_ratio, 0.0), rtol=1e-5, atol=1e-6)
    assert bool(((weights == 0) & mask.reshape(-1)).any()) == mode.endswith("mask")
    for name, values in trainer._metrics["train"].items():
        assert metrics[name].item() == pytest.approx(values[-1], rel=1e-5, abs=1e-6), name
    assert len(trainer._metrics["train"]) == 5 and set(trainer._metrics["train"]) == set(metrics)


@pytest.mark.parametrize("quantile", [0.0, 0.2, 0.5, 0.93])
def test_entropy_mask_equals_trl_get_high_entropy_mask(quantile):
    trl = pytest.importorskip("trl")
    mask, _, _ = _inputs(torch.float32, seed=2)
    entropy = 3 * torch.rand(B, T, generator=torch.Generator().manual_seed(3))
    entropy[0, 1] = entropy[0, 2]   # a tie at the threshold is kept by both (>=)
    config = ak.AEMConfig(top_entropy_quantile=quantile)
    batch = loss_batch(torch.empty(B, T, V), torch.zeros(B, T, dtype=torch.long), torch.randn(B), config,
                       response_group=torch.arange(B), response_mask=mask)
    got = entropy_token_mask(entropy.reshape(-1), batch, config)
    trainer = types.SimpleNamespace(accelerator=_OneProcess())
    expected = trl.GRPOTrainer.get_high_entropy_mask(trainer, entropy, mask.long(), 1 - quantile)
    assert torch.equal(got.reshape(B, T), expected)
    assert 0 < int(got.sum()) < int(mask.sum())


def test_entropy_mask_edge_cases():
    config = ak.AEMConfig(top_entropy_quantile=0.3)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    batch = loss_batch(torch.empty(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.randn(2), config,
                       response_group=torch.arange(2), response_mask=mask)
    assert not entropy_token_mask(torch.rand(6), batch, config).any()   # no trained token: none kept, as TRL
    assert entropy_token_mask(torch.rand(6), batch, ak.AEMConfig()) is None  # q = 1: no selection


def test_rollout_logprobs_checks():
    mask, old, rollout = _inputs(torch.float32)
    on = ak.AEMConfig(rollout_rs="token_k2", rollout_rs_threshold=0.1)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        _batch(on, mask, old, None)
    with pytest.raises(ValueError, match="old_logprobs"):
        _batch(on, mask, None, rollout)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        _batch(on, mask, old, rollout[:, :-1])
    bad = rollout.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="rollout_logprobs"):
        _batch(on, mask, old, bad)
    with pytest.raises(TypeError, match="rollout_logprobs"):
        _batch(on, mask, old, rollout.to(torch.int64))
    # every correction off: rollout_logprobs is checked, then ignored (as verl without a rollout-correction config)
    off = ak.AEMConfig()
    batch = _batch(off, mask, old, rollout)
    assert apply_rollout_corrections(batch, off) == (batch, None, {})
    with pytest.raises(ValueError, match="rollout_logprobs"):
        _batch(off, mask, old, bad)


def test_loss_keyword_reaches_the_batch():
    """`aem_policy_loss(..., rollout_logprobs=)` and the fused-linear loss accept the keyword (the latter through
    loss_batch's signature) and refuse a correction without it."""
    mask, old, rollout = _inputs(torch.float32)
    logits = torch.randn(B, T, V)
    config = ak.AEMConfig(rollout_is="token", beta=0.0)
    common = dict(response_mask=mask, response_group=torch.arange(B) // 2, old_logprobs=old, config=config)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        ak.aem_policy_loss(logits, torch.zeros(B, T, dtype=torch.long), torch.randn(B), **common)
    hidden, weight = torch.randn(B, T, 4), torch.randn(V, 4)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        ak.fused_linear_aem_policy_loss(hidden, weight, torch.zeros(B, T, dtype=torch.long), torch.randn(B),
                                        **common)
    loss, _ = ak.aem_policy_loss(logits, torch.zeros(B, T, dtype=torch.long), torch.randn(B), rollout_logprobs=rollout,
                                 **common)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("field, value, error", [
    ("top_entropy_quantile", 1.5, ValueError), ("top_entropy_quantile", -0.1, ValueError),
    ("top_entropy_quantile", "0.2", TypeError), ("rollout_is", "seq", ValueError),
    ("rollout_is_threshold", True, TypeError), ("rollout_is_threshold", "2_1", ValueError),
    ("rollout_is_threshold", "x", ValueError), ("rollout_is_threshold", -1.0, ValueError),
    ("rollout_is_batch_normalize", 1, TypeError), ("rollout_rs", "token_k4", ValueError),
    ("rollout_rs", 3, TypeError), ("vllm_importance_sampling_mode", "token", ValueError),
    ("vllm_importance_sampling_clip_max", float("nan"), ValueError),
    ("vllm_importance_sampling_clip_min", -0.5, ValueError),
    ("spread_floor", -1e-9, ValueError), ("spread_floor", float("inf"), ValueError),
    ("relative_spread_floor", -0.1, ValueError), ("relative_spread_floor", "0.1", TypeError),
])
def test_invalid_fields(field, value, error):
    base = {"rollout_is": "token"} if field.startswith("rollout_is_") else \
        {"rollout_rs_threshold": 1.0} if field == "rollout_rs" else {}
    with pytest.raises(error, match=field):
        ak.AEMConfig(**{**base, field: value})


def test_cross_field_checks():
    with pytest.raises(ValueError, match="rollout_is_threshold"):
        ak.AEMConfig(rollout_is="token", rollout_is_threshold=None)
    with pytest.raises(ValueError, match="rollout_rs_threshold"):
        ak.AEMConfig(rollout_rs="token_k1")
    with pytest.raises(ValueError, match="rollout_rs_threshold"):
        ak.AEMConfig(rollout_rs="token_k1,token_k2", rollout_rs_threshold="1,2,3")
    with pytest.raises(ValueError, match="rollout_rs_threshold"):
        ak.AEMConfig(rollout_rs="token_k2", rollout_rs_threshold="0.5_2")   # k2 takes one upper bound
    with pytest.raises(ValueError, match="clip_min"):
        ak.AEMConfig(vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=2.0,
                     vllm_importance_sampling_clip_max=2.0)
    with pytest.raises(ValueError, match="clip_max"):
        ak.AEMConfig(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        ak.AEMConfig(rollout_is="token", vllm_importance_sampling_mode="token_mask")
    assert ak.AEMConfig(rollout_rs="seq_max_k3", rollout_rs_threshold=0.1,
                        vllm_importance_sampling_mode="sequence_mask").rollout_rs
