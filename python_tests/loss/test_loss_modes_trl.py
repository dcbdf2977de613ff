"""TRL 1.16's loss types as `AEMConfig.loss_mode` at beta = 0 against the real `GRPOTrainer._compute_loss`: value and
gradient with respect to the log-probs, each with TRL's aggregation carried by this package's normalisers.

One tiny trainer for the module (built as in test_integration_trl.py: a tiny Qwen2 from a config, a local word
tokenizer); its `_get_per_token_logps_and_entropies` is replaced by one returning the test's log-probs, so
`_compute_loss` runs TRL's own loss code on them, in fp64.
"""

from __future__ import annotations

import pytest
import torch

import aem_kernels as ak
from aem_kernels.loss.inputs import loss_batch
from aem_kernels.loss.terms import loss_from_token_terms

trl = pytest.importorskip("trl")

WORDS = "red green blue one two three four five yes no".split()
MAX_COMPLETION = 6
TOL = dict(rtol=1e-10, atol=1e-12)  # the same formulas in fp64 on both sides


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from datasets import Dataset

    from aem_kernels.train.model import ModelSpec, build_policy
    from aem_kernels.train.tokenizer import WordTokenizer

    tok = WordTokenizer(WORDS)
    spec = ModelSpec(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=32)
    model = build_policy(spec, len(tok), tok.pad_id, tok.bos_id, tok.end_id, seed=0)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=MAX_COMPLETION, max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, bf16=False)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                              args=args, train_dataset=Dataset.from_dict({"prompt": ["red green"] * 4}),
                              processing_class=tok.hf)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; _compute_loss reads it
    trainer.model.train()
    return trainer


def _batch(seed=0, rows=5, horizon=MAX_COMPLETION):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 2, 4, 1, 5])[:rows]
    mask = (torch.arange(horizon) < lengths[:, None]).long()
    old = -2.0 * torch.rand(rows, horizon, generator=g, dtype=torch.float64) - 0.05
    log_prob = old + 0.4 * torch.randn(rows, horizon, generator=g, dtype=torch.float64)
    advantages = torch.randn(rows, generator=g, dtype=torch.float64)
    return log_prob, old, mask, advantages


def _trl_loss(trainer, loss_type, config, log_prob, old, mask, advantages, level="token", delta=None,
              epsilon_high=None, entropy=None, ref=None):
    rows, horizon = mask.shape
    lp = log_prob.clone().requires_grad_()
    trainer.loss_type, trainer.importance_sampling_level = loss_type, level
    trainer.epsilon_low = config.clip_low
    trainer.epsilon_high = config.clip_high if epsilon_high is None else epsilon_high
    trainer.args.delta = delta
    trainer.args.sapo_temperature_pos, trainer.args.sapo_temperature_neg = config.tau_pos, config.tau_neg
    trainer.top_entropy_quantile = config.top_entropy_quantile
    entropy = torch.zeros_like(lp) if entropy is None else entropy
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (lp, entropy, None)
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long), "prompt_mask": torch.ones(rows, 2,
                                                                                           dtype=torch.long),
              "completion_ids": torch.zeros(rows, horizon, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    trainer.beta = config.kl_coef
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = trainer._compute_loss(trainer.model, inputs)
    trainer.beta = 0.0
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def _ours(config, log_prob, old, mask, advantages, entropy=None, ref=None, **norms):
    rows, horizon = mask.shape
    batch = loss_batch(torch.empty(rows, horizon, 2, dtype=torch.float64),
                       torch.zeros(rows, horizon, dtype=torch.long), advantages, config,
                       response_group=torch.zeros(rows, dtype=torch.long), response_mask=mask.bool(),
                       old_logprobs=old, ref_logprobs=ref, **norms)
    lp = log_prob.clone().requires_grad_()
    entropy = torch.zeros(rows * horizon, dtype=torch.float64) if entropy is None else entropy.reshape(-1)
    loss, _ = loss_from_token_terms(batch, lp.reshape(-1), entropy, config)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


# TRL's normalisers through this package's keywords (one process, no gradient accumulation):
#   grpo, luspo: global_batch_size = completions B (the default: every response); bnpo: the default token count;
#   dr_grpo: loss_scale_factor = max_completion_length; dapo, vespo (and TRL's cispo): batch_num_tokens =
#   num_items_in_batch (x gradient_accumulation_steps / steps_per_generation when those differ)
CASES = [
    ("grpo", {}, {}), ("grpo", {"importance_sampling_level": "sequence"}, {}), ("grpo", {"delta": 1.3}, {}),
    ("bnpo", {}, {}), ("dr_grpo", {}, {"loss_scale_factor": MAX_COMPLETION}),
    ("dapo", {}, {"batch_num_tokens": "items"}), ("luspo", {}, {}),
    ("luspo", {"importance_sampling_level": "token"}, {}), ("vespo", {}, {"batch_num_tokens": "items"}),
]


@pytest.mark.parametrize("mode, options, norms", CASES, ids=lambda c: str(c))
def test_loss_type_equals_grpo_trainer(trainer, mode, options, norms):
    log_prob, old, mask, advantages = _batch(seed=len(mode))
    config = ak.AEMConfig(beta=0.0, loss_mode=mode, clip_low=0.2, clip_high=0.28, **options)
    norms = {k: (mask.sum().item() if v == "items" else v) for k, v in norms.items()}
    ours, our_grad = _ours(config, log_prob, old, mask, advantages, **norms)
    level = options.get("importance_sampling_level", "sequence" if mode == "luspo" else "token")
    theirs, their_grad = _trl_loss(trainer, mode, config, log_prob, old, mask, advantages, level,
                                   options.get("delta"))
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(our_grad, their_grad, **TOL)
    assert our_grad.abs().sum() > 0


def test_trl_sapo_and_cispo_are_verl_modes_where_they_coincide(trainer):
    """TRL's sapo is loss_mode="sapo" (no empty completion, |log ratio| < 20); TRL's cispo with epsilon_high e is
    loss_mode="cispo" with clip_high = e - 1 and a clip_low whose floor no ratio reaches, token-mean over
    num_items_in_batch."""
    log_prob, old, mask, advantages = _batch(seed=11)
    # taus exact in fp32: TRL builds them with torch.where over Python floats (fp32)
    sapo = ak.AEMConfig(beta=0.0, loss_mode="sapo", tau_pos=1.25, tau_neg=1.5)
    ours, our_grad = _ours(sapo, log_prob, old, mask, advantages)
    theirs, their_grad = _trl_loss(trainer, "sapo", sapo, log_prob, old, mask, advantages)
    torch.testing.assert_close(ours, theirs, rtol=2e-8, atol=1e-12)  # verl's L_r + 1e-8
    torch.testing.assert_close(our_grad, their_grad, rtol=2e-8, atol=1e-12)

    cispo = ak.AEMConfig(beta=0.0, loss_mode="cispo", clip_low=0.95, clip_high=0.3)
    assert (log_prob - old).exp()[mask.bool()].min() > 0.05  # the lower clip does not bind
    ours, our_grad = _ours(cispo, log_prob, old, mask, advantages, batch_num_tokens=mask.sum().item())
    theirs, their_grad = _trl_loss(trainer, "cispo", cispo, log_prob, old, mask, advantages, epsilon_high=1.3)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(our_grad, their_grad, **TOL)


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo"])
def test_kl_term_joins_the_per_token_loss_as_trl(trainer, mode):
    """TRL's beta (AEMConfig.kl_coef) adds beta * k3 to each token's loss before the loss type's aggregation."""
    log_prob, old, mask, advantages = _batch(seed=17)
    ref = old + 0.3 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    config = ak.AEMConfig(beta=0.0, loss_mode=mode, kl_coef=0.07)
    norms = {"loss_scale_factor": MAX_COMPLETION} if mode == "dr_grpo" else {}
    ours, our_grad = _ours(config, log_prob, old, mask, advantages, ref=ref, **norms)
    theirs, their_grad = _trl_loss(trainer, mode, config, log_prob, old, mask, advantages, ref=ref)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(our_grad, their_grad, **TOL)
    assert ours != _ours(config.replace(kl_coef=0.0), log_prob, old, mask, advantages, **norms)[0]


@pytest.mark.parametrize("mode", ["grpo", "dapo"])
def test_top_entropy_quantile_wiring_equals_trl(trainer, mode):
    """TRL's 80/20 selection: the policy term of the tokens below the entropy quantile is masked, the
    denominators kept."""
    log_prob, old, mask, advantages = _batch(seed=13)
    entropy = torch.rand(mask.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    config = ak.AEMConfig(beta=0.0, loss_mode=mode, top_entropy_quantile=0.4)
    norms = {"batch_num_tokens": mask.sum().item()} if mode == "dapo" else {}
    ours, our_grad = _ours(config, log_prob, old, mask, advantages, entropy=entropy, **norms)
    theirs, their_grad = _trl_loss(trainer, mode, config, log_prob, old, mask, advantages, entropy=entropy)
    trainer.top_entropy_quantile = 1.0
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(our_grad, their_grad, **TOL)
    kept = (our_grad != 0).sum()
    assert 0 < kept < mask.sum()  # the mask selects


def test_trl_modes_refuse_options_they_ignore():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ak.AEMConfig(loss_mode="dapo", loss_agg_mode="seq-mean-token-sum")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        ak.AEMConfig(loss_mode="vespo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        ak.AEMConfig(loss_mode="gspo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="delta"):
        ak.AEMConfig(loss_mode="vanilla", delta=2.0)
    with pytest.raises(ValueError, match="dual_clip"):
        ak.AEMConfig(loss_mode="grpo", dual_clip=5.0)
    with pytest.raises(ValueError, match="dro_beta"):
        ak.AEMConfig(loss_mode="dro")
    with pytest.raises(ValueError, match="loss_mode"):
        ak.AEMConfig(loss_mode="ppo")
    # the default dual clip serves the modes without one, and a TRL mode accepts its own aggregation's name
    assert ak.AEMConfig(loss_mode="gspo").dual_clip == 3.0
    assert ak.AEMConfig(loss_mode="grpo", loss_agg_mode="seq-mean-token-mean", dual_clip=None)
