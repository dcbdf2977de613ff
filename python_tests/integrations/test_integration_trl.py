"""aem_kernels.integrations.trl.AEMGRPOTrainer against the installed TRL 1.16.0 (skipped cleanly without it).

A tiny Qwen2 built from a config and a word-level tokenizer built locally (aem_kernels.train): no download.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import aem_kernels as ak
from helpers import REPO_ROOT, oracle_logprobs_entropy

ROOT = REPO_ROOT
WORDS = "red green blue one two three four five yes no".split()
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


def test_missing_trl_names_the_extra():
    code = """
        import sys
        sys.modules["trl"] = None  # what an absent package looks like to the import system
        try:
            import aem_kernels.integrations.trl
        except ImportError as error:
            print("ImportError:", error)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ImportError:" in proc.stdout and "pip install aem-kernels[trl]" in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def trl_api():
    trl = pytest.importorskip("trl")
    integration = pytest.importorskip("aem_kernels.integrations.trl")
    from datasets import Dataset

    from aem_kernels.train.model import ModelSpec, build_policy
    from aem_kernels.train.tokenizer import WordTokenizer

    tok = WordTokenizer(WORDS)
    spec = ModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
    base_model = build_policy(spec, len(tok), tok.pad_id, tok.bos_id, tok.end_id, seed=0)
    dataset = Dataset.from_dict({"prompt": ["red green", "blue one", "two three", "four five"] * 4})

    def reward(completions, **_):
        return [float(c.split().count("yes")) - 0.1 * len(c.split()) for c in completions]

    def make(cls, tmp_path, loss_type="grpo", **kwargs):
        args = trl.GRPOConfig(
            output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
            max_steps=2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
            learning_rate=1e-3, loss_type=loss_type, epsilon_high=0.28, bf16=False,  # fp32: comparable numbers
            importance_sampling_level="sequence" if loss_type == "luspo" else "token")
        trainer = cls(model=copy.deepcopy(base_model), reward_funcs=reward, args=args, train_dataset=dataset,
                      processing_class=tok.hf, **kwargs)
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop; _compute_loss reads it
        return trainer

    return trl, integration, tok, make


def _batch(tok, rows=6, seed=0):
    """A scored generation batch as `_generate_and_score_completions` returns it (left-padded prompts,
    right-padded completions, one completion masked out entirely)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(5, 5 + len(WORDS), (rows, 3), generator=g)
    prompt_mask = torch.ones(rows, 3, dtype=torch.long)
    prompt_ids[0, 0], prompt_mask[0, 0] = tok.pad_id, 0
    completion_ids = torch.randint(5, 5 + len(WORDS), (rows, 5), generator=g)
    completion_mask = torch.ones(rows, 5, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[2, 1:] = 0
    completion_ids[completion_mask == 0] = tok.pad_id
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.randn(rows, generator=g),
            "num_items_in_batch": completion_mask.sum()}


def _loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_beta_zero_loss_and_grad_equal_grpo_trainer(trl_api, tmp_path, loss_type):
    trl, integration, tok, make = trl_api
    stock = make(trl.GRPOTrainer, tmp_path, loss_type)
    inputs = _batch(tok)
    with torch.no_grad():  # off-policy old log-probs so the clipped branches are exercised
        logps, _, _ = stock._get_per_token_logps_and_entropies(
            stock.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), 5)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape)
    expected_loss, expected_grads = _loss_and_grads(stock, inputs)

    # TRL's own LM head: the AEM trainer at beta = 0 is the stock trainer bit for bit.
    same_head = make(integration.AEMGRPOTrainer, tmp_path, loss_type, aem_config=ak.AEMConfig(beta=0.0),
                     token_ops="trl")
    loss, grads = _loss_and_grads(same_head, dict(inputs))
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))

    # This package's token ops, judged by the accuracy rule against the stock trainer run in fp64: the
    # error of loss and gradients is at most 3x that of TRL's own fp32 path + 1e-5.
    ours = make(integration.AEMGRPOTrainer, tmp_path, loss_type, aem_config=ak.AEMConfig(beta=0.0))
    loss, grads = _loss_and_grads(ours, dict(inputs))
    exact = make(trl.GRPOTrainer, tmp_path, loss_type)
    exact.model.double()
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    loss64, grads64 = _loss_and_grads(exact, inputs64)
    assert loss64.dtype == torch.float64 and all(g.dtype == torch.float64 for g in grads64)
    assert len(grads) == len(expected_grads) == len(grads64)
    assert abs(loss.double() - loss64) <= 3 * abs(expected_loss.double() - loss64) + 1e-5
    for ours_g, trl_g, ref_g in zip(grads, expected_grads, grads64):
        bound = 3 * (trl_g.double() - ref_g).abs().max() + 1e-5
        assert (ours_g.double() - ref_g).abs().max() <= bound


def test_beta_zero_leaves_advantages_unchanged(trl_api, tmp_path):
    _, integration, tok, make = trl_api
    trainer = make(integration.AEMGRPOTrainer, tmp_path, aem_config=ak.AEMConfig(beta=0.0))
    inputs = _batch(tok, rows=8)
    expected = inputs["advantages"].clone()
    out = trainer._aem_modulate(dict(inputs))
    assert torch.equal(out["advantages"], expected)
    assert trainer._metrics["train"]["aem/w_std"][-1] == 0.0


@pytest.mark.parametrize("aem", [dict(beta=1.0), dict(beta=2.0, uncertainty="surprisal"),
                                 dict(beta=0.5, baseline="mean", normalize="batch", w_max=1.2)])
def test_advantages_equal_modulate_advantages(trl_api, tmp_path, aem):
    _, integration, tok, make = trl_api
    config = ak.AEMConfig(**aem)
    trainer = make(integration.AEMGRPOTrainer, tmp_path, aem_config=config)
    inputs = _batch(tok, rows=8, seed=1)
    out = trainer._aem_modulate(dict(inputs))

    # the same entropies / log-probs, computed independently from the full logits of the policy
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=mask).logits[:, 2:-1]
    labels = inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    logps, entropy = ak.logprobs_and_entropy(logits, labels)
    ref_lp, ref_h = oracle_logprobs_entropy(logits, labels)
    assert (entropy.double() - ref_h).abs().max() < 1e-5 and (logps.double() - ref_lp).abs().max() < 1e-5
    values = entropy if config.uncertainty == "entropy" else -logps
    m = inputs["completion_mask"].float()
    x = (values * m).sum(1) / m.sum(1).clamp(min=1)
    groups = torch.arange(8) // 4
    expected, metrics = ak.modulate_advantages(inputs["advantages"], x, groups, config,
                                               response_valid=m.sum(1) > 0)
    assert not torch.allclose(expected, inputs["advantages"])
    torch.testing.assert_close(out["advantages"], expected, rtol=1e-5, atol=1e-6)
    assert trainer._metrics["train"]["aem/w_std"][-1] == pytest.approx(metrics["aem/w_std"].item(), rel=1e-4)


def test_surprisal_reuses_trl_old_logprobs(trl_api, tmp_path):
    _, integration, tok, make = trl_api
    trainer = make(integration.AEMGRPOTrainer, tmp_path, aem_config=ak.AEMConfig(uncertainty="surprisal"))
    inputs = _batch(tok, rows=8, seed=3)
    inputs["old_per_token_logps"] = -torch.rand(8, 5) * inputs["completion_mask"]
    x, lengths, _ = trainer._aem_local_stats(inputs)
    m = inputs["completion_mask"].float()
    torch.testing.assert_close(x, -(inputs["old_per_token_logps"] * m).sum(1) / m.sum(1).clamp(min=1))
    assert torch.equal(lengths, m.sum(1))


class _TwoProcessAccelerator:
    """Stands in for accelerate on process `rank` of two: `gather` concatenates both processes' i-th tensor."""

    def __init__(self, real, rank, stats):
        self._real, self.process_index, self._stats, self._calls = real, rank, stats, 0

    def gather(self, tensor):
        mine = self._stats[self.process_index][self._calls]
        assert torch.equal(tensor, mine)
        out = torch.cat([self._stats[0][self._calls], self._stats[1][self._calls]])
        self._calls += 1
        return out

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_groups_split_over_processes(trl_api, tmp_path):
    """6 completions per process, groups of 4: the middle group straddles the two processes."""
    _, integration, tok, make = trl_api
    trainer = make(integration.AEMGRPOTrainer, tmp_path, aem_config=ak.AEMConfig(beta=1.5))
    whole = _batch(tok, rows=12, seed=2)
    expected = trainer._aem_modulate(dict(whole))["advantages"]
    parts = [{k: (v[6 * r:6 * r + 6] if k != "num_items_in_batch" else v) for k, v in whole.items()}
             for r in range(2)]
    stats = [trainer._aem_local_stats(part) for part in parts]
    real = trainer.accelerator
    got = []
    try:
        for rank in range(2):
            trainer.accelerator = _TwoProcessAccelerator(real, rank, stats)
            got.append(trainer._aem_modulate(dict(parts[rank]))["advantages"])
    finally:
        trainer.accelerator = real
    torch.testing.assert_close(torch.cat(got), expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(torch.cat(got)[4:8], whole["advantages"][4:8])  # the straddling group moved
    # without the gather, one process's 6 completions are not whole groups: refused, not silently cut
    with pytest.raises(ValueError, match="whole number of groups"):
        trainer._aem_modulate(dict(parts[0]))


def test_bad_arguments(trl_api, tmp_path):
    _, integration, _, make = trl_api
    with pytest.raises(TypeError, match="aem_config"):
        make(integration.AEMGRPOTrainer, tmp_path, aem_config={"beta": 1.0})
    with pytest.raises(ValueError, match="token_ops"):
        make(integration.AEMGRPOTrainer, tmp_path, token_ops="liger")


def test_two_training_steps_log_aem_metrics(trl_api, tmp_path):
    _, integration, _, make = trl_api
    trainer = make(integration.AEMGRPOTrainer, tmp_path, aem_config=ak.AEMConfig(beta=1.0))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        for key in ("aem/w_std", "aem/drift", "aem/drift_unmodulated", "aem/x_mean", "entropy"):
            assert key in h and torch.isfinite(torch.tensor(float(h[key]))), (key, h)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_example_runs(trl_api):
    import runpy

    example = runpy.run_path(os.path.join(ROOT, "examples", "trl_grpo_aem.py"), run_name="example")
    logs = example["main"](["--steps", "2", "--loss-type", "grpo"])
    assert len(logs) == 2 and all("aem/w_std" in h and "aem/drift" in h for h in logs)
