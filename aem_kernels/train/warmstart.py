"""Supervised warm start on noisy scripted demonstrations, so RL starts from a weak but non-trivial policy.

A demonstration is an episode played by the environment's scripted expert, except that each action is
replaced, with probability `noise`, by a random (often invalid) action. The policy is trained by maximum
likelihood on *all* the demonstrated actions (environment tokens masked out), so it learns the expert's
moves mixed with the noise: at noise 0.4 it succeeds on a fraction of the tasks, wastes turns and makes
invalid moves, which leaves RL something to improve and a reward signal to improve it with. The loss uses
`ak.logprobs_from_logits` (mean negative log-likelihood of the action tokens).
"""

from __future__ import annotations

import math
import random
from typing import Dict, List

import torch

import aem_kernels as ak

from .batching import build_policy_batch
from .envs import TextEnv
from .model import forward_logits
from .rollout import Trajectory, Turn
from .tokenizer import WordTokenizer

__all__ = ["demonstration", "warm_start"]


def demonstration(env: TextEnv, tokenizer: WordTokenizer, task, rng: random.Random, noise: float) -> Trajectory:
    """One noisy scripted episode of `task`, tokenised like a rollout."""
    state = env.reset(task)
    trajectory = Trajectory(group=0, prompt_ids=[tokenizer.bos_id] +
                            tokenizer.observation_ids(env.first_observation(state)))
    while not state.done:
        noisy = rng.random() < noise
        action = env.random_action(rng) if noisy else env.expert_action(state, rng)
        result = env.step(state, action)
        observation = [] if result.done else tokenizer.observation_ids(result.observation)
        trajectory.turns.append(Turn(tokenizer.action_ids(action), observation, result.valid, trained=not noisy))
        trajectory.reward += result.reward
        trajectory.success = result.success
    return trajectory


def warm_start(model: torch.nn.Module, tokenizer: WordTokenizer, env: TextEnv, rng: random.Random, *,
               steps: int, batch_size: int, lr: float, noise: float, progress=None) -> Dict[str, float]:
    """Train `model` in place for `steps` Adam steps on fresh demonstrations; returns the last losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # linear warm-up over 5 % of the steps, then cosine decay to 10 %
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else
        0.1 + 0.45 * (1.0 + math.cos(math.pi * (s - warmup) / max(steps - warmup, 1))))
    model.train()
    losses: List[float] = []
    for _ in range(steps):
        demos = [demonstration(env, tokenizer, env.sample_task(rng), rng, noise) for _ in range(batch_size)]
        batch = build_policy_batch(demos, [0.0] * len(demos), "trajectory", tokenizer.pad_id)
        logits = forward_logits(model, batch.input_ids, batch.attention_mask)[:, :-1]
        logprobs = ak.logprobs_from_logits(logits, batch.labels)
        trained = batch.token_response >= 0
        loss = -(logprobs * trained).sum() / trained.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(nll=f"{losses[-1]:.3f}")
    tail = losses[-10:] or [float("nan")]
    return {"warmstart/nll": sum(tail) / len(tail), "warmstart/steps": float(steps)}
