"""The comparison's baselines and measurements: each method's AEMConfig reaches ak.aem_policy_loss, the drift
meter's measured entropy change (0 for a step that changes nothing), and the statistics of stats.py."""

import math
import random

import numpy as np
import pytest
import torch

import aem_kernels as ak
from aem_kernels.train import algorithm as A
from aem_kernels.train import stats
from aem_kernels.train.batching import build_policy_batch
from aem_kernels.train.config import CLIP_HIGHER, preset
from aem_kernels.train.envs import make_env
from aem_kernels.train.loop import train
from aem_kernels.train.model import ModelSpec, build_policy
from aem_kernels.train.rollout import rollout
from aem_kernels.train.tokenizer import WordTokenizer

TINY = ModelSpec(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)


def test_each_method_is_its_aem_config():
    grpo = A.loss_config("grpo", 0.5, entropy_coef=0.02, clip_high=0.3)
    assert (grpo.beta, grpo.entropy_coef, grpo.clip_high) == (0.0, 0.0, 0.2)
    aem = A.loss_config("aem", 0.5, entropy_coef=0.02, clip_high=0.3)
    assert (aem.beta, aem.entropy_coef, aem.clip_high) == (0.5, 0.0, 0.2)
    bonus = A.loss_config("entropy", 0.5, entropy_coef=0.02, clip_high=0.3)
    assert (bonus.beta, bonus.entropy_coef, bonus.clip_high, bonus.clip_low) == (0.0, 0.02, 0.2, 0.2)
    higher = A.loss_config("clip_higher", 0.5, entropy_coef=0.02, clip_high=0.3)
    assert (higher.beta, higher.entropy_coef, higher.clip_high, higher.clip_low) == (0.0, 0.0, 0.3, 0.2)
    assert A.loss_config("clip_higher", 1.0, kl_coef=0.01).kl_coef == 0.01
    with pytest.raises(ValueError, match="method"):
        A.loss_config("vanilla", 0.5)   # verl's vanilla loss is method "grpo"


def _batch(seed=0):
    env = make_env("safe")
    tok = WordTokenizer(env.vocabulary())
    torch.manual_seed(seed)
    model = build_policy(TINY, len(tok), tok.pad_id, tok.bos_id, tok.end_id)
    rng = random.Random(seed)
    trajectories = rollout(model, tok, env, [env.sample_task(rng) for _ in range(2)], 3,
                           torch.Generator().manual_seed(seed), max_action_tokens=6)
    return model, build_policy_batch(trajectories, [1.0, -0.5, -0.5, 0.8, 0.2, -1.0], "turn", tok.pad_id)


def _loss_by_hand(model, batch, old_logprobs, config, weights, dtype):
    """AEM_SPEC section 5 written out from the model's logits in `dtype`, token-mean over trained tokens:
    (loss, pg_loss, entropy) with loss = pg_loss - entropy_coef * entropy (kl_coef = 0), the advantages
    modulated by the given per-response weights (w = 1 for the methods with beta = 0)."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    log_p = torch.log_softmax(logits.to(dtype), dim=-1)
    trained = batch.token_response >= 0
    logprob = log_p.gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)[trained]
    entropy = -(log_p.exp() * log_p).sum(-1)[trained]
    advantage = (weights.to(dtype) * batch.advantages.to(dtype))[batch.token_response[trained]]
    ratio = torch.exp(logprob - old_logprobs[trained].to(dtype))
    clipped = ratio.clamp(1 - config.clip_low, 1 + config.clip_high)
    token_loss = -torch.minimum(ratio * advantage, clipped * advantage)
    token_loss = torch.where(advantage < 0, torch.minimum(token_loss, -config.dual_clip * advantage), token_loss)
    pg_loss, mean_entropy = token_loss.mean(), entropy.mean()
    return pg_loss - config.entropy_coef * mean_entropy, pg_loss, mean_entropy


@pytest.mark.parametrize("method", ("grpo", "aem", "entropy", "clip_higher"))
def test_each_method_config_reaches_the_loss(method, monkeypatch):
    """ppo_update hands the method's AEMConfig to the package's loss (ak.causal_lm_aem_policy_loss: the LM head
    through the fused linear path) unchanged, and the loss it gets back is the method's total, computed here
    independently from the model's logits: pg_loss - entropy_coef * entropy (token-mean)."""
    model, batch = _batch()
    seen = []
    real = ak.causal_lm_aem_policy_loss

    def spy(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        # by hand, before the optimizer step moves the model
        weights = metrics["aem/weights"].detach()
        exact = _loss_by_hand(model, batch, kwargs["old_logprobs"], kwargs["config"], weights, torch.float64)
        eager = _loss_by_hand(model, batch, kwargs["old_logprobs"], kwargs["config"], weights, torch.float32)
        seen.append((kwargs["config"], loss.detach().double(), dict(metrics), weights, exact, eager))
        return loss, metrics

    monkeypatch.setattr(A.ak, "causal_lm_aem_policy_loss", spy)
    config = A.loss_config(method, 0.7, entropy_coef=0.05, clip_high=0.35)
    old, _ = A.policy_terms(model, batch)
    metrics = A.ppo_update(model, torch.optim.Adam(model.parameters(), lr=1e-2), [batch], [old], config,
                           epochs=1, max_grad_norm=1.0)
    assert [s[0] for s in seen] == [config]
    _, loss, loss_metrics, weights, exact, eager = seen[0]
    for name, got, want, fp32 in (("loss", loss, exact[0], eager[0]),
                                  ("actor/pg_loss", loss_metrics["actor/pg_loss"], exact[1], eager[1]),
                                  ("actor/entropy", loss_metrics["actor/entropy"], exact[2], eager[2])):
        # the accuracy rule: within 3 x eager fp32's error against fp64, + 1e-5
        bound = 3 * abs(fp32.item() - want.item()) + 1e-5
        assert abs(float(got) - want.item()) <= bound, f"{method} {name}: {float(got)} != {want.item()}"
    bonus = config.entropy_coef * exact[2].item()
    if method == "entropy":   # the bonus is large enough that a loss without it would fail the check above
        assert bonus > 1e-2
    else:
        assert bonus == 0.0
    if method == "aem":
        assert metrics["aem/w_std"] > 0
    else:                     # beta = 0: every weight is exactly 1
        assert metrics["aem/w_std"] == 0 and bool((weights == 1).all())


def test_the_entropy_bonus_and_clip_higher_change_the_gradient():
    model, batch = _batch()
    old, _ = A.policy_terms(model, batch)
    # an off-policy old log-prob: ratio exp(0.22) = 1.25, clipped at 1.2 (GRPO) but not at 1.28 (clip-higher)
    shifted = old - 0.22

    def grad(config, old_logprobs):
        model.zero_grad()
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        loss, _ = ak.aem_policy_loss(logits, batch.labels, batch.advantages, token_response=batch.token_response,
                                     response_group=batch.response_group, old_logprobs=old_logprobs,
                                     config=config, num_groups=batch.num_groups)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    base = grad(A.loss_config("grpo", 0.5), old)
    assert not torch.allclose(base, grad(A.loss_config("entropy", 0.5, entropy_coef=0.1), old))
    assert torch.equal(base, grad(A.loss_config("clip_higher", 0.5, clip_high=0.28), old))  # on-policy: no clip
    assert not torch.allclose(grad(A.loss_config("grpo", 0.5), shifted),
                              grad(A.loss_config("clip_higher", 0.5, clip_high=CLIP_HIGHER), shifted))


def test_measured_entropy_change_is_zero_without_an_update_and_matches_a_direct_computation():
    model, batch = _batch()
    _, before = A.policy_terms(model, batch)
    _, again = A.policy_terms(model, batch)
    zero = A.measured_entropy_change([batch], [before], [again])
    assert zero["drift/measured"] == 0.0 and zero["drift/entropy_before"] == zero["drift/entropy_after"]
    old, _ = A.policy_terms(model, batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)          # lr = 0: the update changes nothing
    A.ppo_update(model, optimizer, [batch], [old], A.loss_config("aem", 1.0), epochs=1, max_grad_norm=1.0)
    _, after = A.policy_terms(model, batch)
    assert A.measured_entropy_change([batch], [before], [after])["drift/measured"] == 0.0
    A.ppo_update(model, torch.optim.Adam(model.parameters(), lr=3e-2), [batch], [old], A.loss_config("aem", 1.0),
                 epochs=1, max_grad_norm=1.0)
    _, after = A.policy_terms(model, batch)
    measured = A.measured_entropy_change([batch], [before], [after])
    # by hand: mean over non-empty responses of (mean token entropy after - before)
    tr = batch.token_response
    per = [(after[tr == r].mean() - before[tr == r].mean()).item() for r in range(batch.num_responses)
           if (tr == r).any()]
    assert measured["drift/measured"] == pytest.approx(sum(per) / len(per), abs=1e-6)
    assert measured["drift/measured"] != 0.0


def test_training_logs_the_measured_drift_next_to_the_predicted_one():
    records = train(preset("test", env="safe", method="aem", seed=1), progress=False)
    steps = [r for r in records if r["kind"] == "train"]
    for r in steps:
        assert math.isfinite(r["aem/drift"]) and math.isfinite(r["drift/measured"])
        assert r["drift/measured"] == pytest.approx(r["drift/entropy_after"] - r["drift/entropy_before"], abs=1e-5)
    zero = train(preset("test", env="safe", method="grpo", seed=1, lr=0.0), progress=False)
    assert all(r["drift/measured"] == 0.0 for r in zero if r["kind"] == "train")


def test_bootstrap_mde_and_paired_comparison():
    rng = np.random.default_rng(0)
    d = rng.normal(0.1, 0.05, size=10)
    low, high = stats.bootstrap_ci(d)
    assert low < d.mean() < high and 0 < low          # clearly positive
    assert stats.bootstrap_ci(d) == (low, high)       # fixed generator: reproducible
    assert stats.bootstrap_ci([3.0, 3.0]) == (3.0, 3.0)
    # MDE for n = 10: (2.262 + 0.883) * sd / sqrt(10)
    assert stats.minimal_detectable_effect(d) == pytest.approx(3.145 * d.std(ddof=1) / math.sqrt(10))
    c = stats.paired_comparison([1.0, 2.0, 3.0], [1.0, 1.0, 4.0])
    assert (c["better"], c["worse"], c["tied"], c["n"]) == (1, 1, 1, 3) and c["mean"] == 0.0
    assert c["low"] <= 0 <= c["high"]
    with pytest.raises(ValueError, match="pair"):
        stats.paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        stats.bootstrap_ci([])
    with pytest.raises(ValueError, match="q must"):
        stats.t_quantile(0.9, 3)


def test_correlations_calibration_and_permutation_test():
    rng = np.random.default_rng(1)
    seeds = np.repeat(np.arange(4), 50)
    steps = np.tile(np.arange(50), 4)
    x = rng.normal(size=200)
    y = 0.5 * x + 0.1 * rng.normal(size=200)
    v = stats.drift_validation(x, y, steps, seeds, permutations=200)
    assert v["pearson"] > 0.9 and v["spearman"] > 0.9 and v["slope"] == pytest.approx(0.5, abs=0.05)
    assert v["p"] == pytest.approx(1 / 201) and v["detrended_p"] == pytest.approx(1 / 201)
    assert v["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    # Spearman is the Pearson of the ranks, ties averaged
    assert stats.spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    # independent series: a large p; a shared trend alone: raw r high, detrended r near 0
    noise = stats.drift_validation(x, rng.normal(size=200), steps, seeds, permutations=200)
    assert noise["p"] > 0.01
    trend = stats.drift_validation(steps + rng.normal(size=200), steps + rng.normal(size=200), steps, seeds,
                                   permutations=200)
    assert trend["pearson"] > 0.9 and abs(trend["detrended_pearson"]) < 0.2 and trend["detrended_p"] > 0.01
    with pytest.raises(ValueError, match="one length"):
        stats.drift_validation(x, y[:-1], steps, seeds)


def test_cli_compare_runs_the_baselines_and_reports_paired_statistics_and_the_drift_meter(tmp_path):
    import json
    import os

    from aem_kernels.train.cli import main
    from aem_kernels.train.config import ENTROPY_COEF

    out = str(tmp_path / "out")
    assert main(["compare", "--preset", "test", "--envs", "safe", "--methods", "grpo", "entropy", "clip_higher",
                 "--seeds", "2", "--out", out, "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    configs = {}
    for name in sorted(os.listdir(os.path.join(out, "runs"))):
        with open(os.path.join(out, "runs", name)) as f:
            configs[name] = json.loads(f.readline())["aem_config"]
    assert len(configs) == 6
    assert configs["safe-entropy-seed0.jsonl"]["entropy_coef"] == ENTROPY_COEF
    assert configs["safe-clip_higher-seed1.jsonl"]["clip_high"] == CLIP_HIGHER
    assert configs["safe-grpo-seed0.jsonl"]["entropy_coef"] == 0.0 and configs["safe-grpo-seed0.jsonl"]["beta"] == 0.0
    with open(os.path.join(out, "summary.md")) as f:
        text = f.read()
    assert "Paired differences against GRPO" in text and "| GRPO+entropy bonus | GRPO | mean held-out success" in text
    assert "| GRPO+clip-higher | GRPO | final held-out success | 2 |" in text
    assert "Drift meter" in text and "| GRPO+entropy bonus | 4 |" in text   # 2 seeds x 2 steps
    assert os.path.getsize(os.path.join(out, "safe-drift.png")) > 10_000


def test_loss_mode_methods_map_to_their_config():
    """Every method names its AEMConfig: the policy-loss modes alone (beta 0) and with AEM (beta given), TRL's
    grpo type as trl_grpo, the entropy-token selection, and the spread floors passed through."""
    assert len(set(A.METHODS)) == len(A.METHODS)
    for method in A.METHODS:
        config = A.loss_config(method, 0.7, relative_spread_floor=0.05)
        assert config.relative_spread_floor == 0.05
        assert config.beta == (0.7 if method == "aem" or method.endswith("_aem") else 0.0), method
        base = method[:-4] if method.endswith("_aem") else method
        assert config.loss_mode == A.METHOD_MODES.get(base, "vanilla"), method
    assert A.loss_config("trl_grpo", 0.7).loss_mode == "grpo" and A.loss_config("grpo", 0.7).loss_mode == "vanilla"
    gspo = A.loss_config("gspo_aem", 0.7)
    assert (gspo.clip_low, gspo.clip_high, gspo.loss_agg_mode) == (3e-4, 4e-4, "seq-mean-token-mean")
    assert A.loss_config("entropy_tokens", 0.7, top_entropy_quantile=0.3).top_entropy_quantile == 0.3
    with pytest.raises(ValueError, match="method"):
        A.loss_config("gspo_aem_aem", 0.7)


@pytest.mark.parametrize("method", ("gspo_aem", "clip_cov", "entropy_tokens"))
def test_loss_mode_methods_train(method, monkeypatch):
    """A PPO update of a loss-mode method hands its config to the package's loss and moves the policy."""
    model, batch = _batch()
    seen = []
    real = ak.causal_lm_aem_policy_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["config"])
        return real(*args, **kwargs)

    monkeypatch.setattr(A.ak, "causal_lm_aem_policy_loss", spy)
    config = A.loss_config(method, 0.7)
    before = [p.detach().clone() for p in model.parameters()]
    old, _ = A.policy_terms(model, batch)
    metrics = A.ppo_update(model, torch.optim.Adam(model.parameters(), lr=1e-2), [batch], [old], config,
                           epochs=1, max_grad_norm=1.0)
    assert seen == [config] and all(v == v for v in metrics.values() if isinstance(v, float))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
