"""AEM in verl 0.9.1: the PPO trainer's command line, and a tiny local check of the registered hooks.

A full verl run needs Ray, GPUs, a model and a dataset; the switch is only these overrides (see README):

    python -m verl.trainer.main_ppo \\
        algorithm.adv_estimator=aem \\
        +algorithm.aem.base_estimator=grpo +algorithm.aem.beta=1.0 \\
        actor_rollout_ref.actor.policy_loss.loss_mode=aem \\
        +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=aem_kernels.integrations.verl \\
        actor_rollout_ref.rollout.n=8 ...

The estimator needs the batch's per-token old log-probs, which verl's `compute_advantage` does not hand to
registered estimators; importing `aem_kernels.integrations.verl` (VERL_USE_EXTERNAL_MODULES does it in the
trainer process) wraps verl's `compute_advantage` so that, for "aem" only, it passes them as the estimator's
`old_log_probs=` keyword. This script (CPU, seconds; needs `pip install aem-kernels[verl]`, from a checkout
`PYTHONPATH=. python examples/verl_aem.py`) builds a verl-shaped multi-turn batch, runs the advantage step
through that hook (`compute_advantage(data, ...)` on a DataProto, what verl's trainer calls), checks it against
the estimator called with explicit keywords, and checks the estimator and the policy loss against verl's stock
GRPO advantage and "vanilla" policy loss at beta = 0.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.core_algos import (  # noqa: E402
    compute_grpo_outcome_advantage, get_adv_estimator_fn, get_policy_loss_fn)
from verl.workers.config import ActorConfig  # noqa: E402

# What VERL_USE_EXTERNAL_MODULES does in every process: registers "aem" and wraps verl's compute_advantage.
import aem_kernels.integrations.verl as aem_verl  # noqa: E402

# The overrides of the README's command line (the test composes them against verl's own ppo_trainer config).
OVERRIDES = [
    "algorithm.adv_estimator=aem",
    "+algorithm.aem.base_estimator=grpo",
    "+algorithm.aem.beta=1.0",
    "actor_rollout_ref.actor.policy_loss.loss_mode=aem",
    "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=aem_kernels.integrations.verl",
]


def verl_batch(seed: int = 0):
    """8 trajectories of 12 tokens for 2 prompts (uids), each with 2 model turns around a tool output."""
    g = torch.Generator().manual_seed(seed)
    rows, horizon = 8, 12
    mask = torch.ones(rows, horizon)
    mask[:, 4:7] = 0                                   # tool/observation tokens between the two turns
    for b in range(rows):
        mask[b, 9 + b % 3:] = 0                        # right padding of different lengths
    rewards = torch.zeros(rows, horizon)
    last = (mask * torch.arange(horizon)).argmax(dim=1)
    rewards[torch.arange(rows), last] = (torch.rand(rows, generator=g) > 0.5).float() * 10.0  # success 10
    uid = np.array(["task-a"] * 4 + ["task-b"] * 4, dtype=object)
    old_log_probs = -2.0 * torch.rand(rows, horizon, generator=g) * mask
    return rewards, mask, uid, old_log_probs


def main() -> None:
    print("python -m verl.trainer.main_ppo " + " ".join(OVERRIDES) + " <your data/model/rollout overrides>")
    rewards, mask, uid, old_log_probs = verl_batch()
    estimator = get_adv_estimator_fn("aem")
    stock, _ = compute_grpo_outcome_advantage(rewards, mask, uid)
    for beta in (0.0, 1.0):
        config = OmegaConf.create({"adv_estimator": "aem", "norm_adv_by_std_in_grpo": True,
                                   "aem": {"base_estimator": "grpo", "beta": beta}})
        # The trainer's advantage step: the batch's old_log_probs reach the estimator as a keyword argument.
        data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask,
                                            "old_log_probs": old_log_probs}, non_tensors={"uid": uid})
        advantages = aem_verl.compute_advantage(data, adv_estimator="aem", config=config).batch["advantages"]
        explicit, _ = estimator(token_level_rewards=rewards, response_mask=mask, index=uid, config=config,
                                old_log_probs=old_log_probs)
        assert torch.equal(advantages, explicit), "the hook passes the batch's old log-probs"
        turn_weights = [[round(float(advantages[b, t] / stock[b, t]), 3) if stock[b, t] != 0 else None
                         for t in (0, 7)] for b in range(len(uid))]
        metrics = aem_verl.last_metrics()  # verl's estimator interface returns none: log these yourself
        print(f"beta={beta}: weights of (turn 1, turn 2) per trajectory: {turn_weights}; "
              f"aem/w_std {metrics['aem/w_std']:.3f}, aem/drift {metrics['aem/drift']:.4f}")
        if beta == 0:
            assert torch.equal(advantages, stock), "beta = 0 must be verl's GRPO exactly"

    actor = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=4, rollout_n=4)
    log_prob = (old_log_probs + 0.2 * torch.randn(mask.shape)).requires_grad_()
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        losses = {}
        for name in ("aem", "vanilla"):
            loss, _ = get_policy_loss_fn(name)(old_log_probs, log_prob, stock, mask, mode, actor)
            losses[name] = (loss.item(), torch.autograd.grad(loss, log_prob)[0])
        gap = abs(losses["aem"][0] - losses["vanilla"][0])
        grad_gap = (losses["aem"][1] - losses["vanilla"][1]).abs().max().item()
        print(f"policy loss {mode:>24}: aem {losses['aem'][0]:+.7f}  vanilla {losses['vanilla'][0]:+.7f}  "
              f"|value gap| {gap:.1e}  |grad gap| {grad_gap:.1e}")


if __name__ == "__main__":
    main()
