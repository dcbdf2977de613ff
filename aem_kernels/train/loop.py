"""One reference-trainer run: warm start (cached), then `steps` of multi-turn GRPO or GRPO+AEM.

Per step: sample `tasks_per_step` task instances, play `group_size` trajectories of each with the KV-cache
sampler (`rollout.py`), score them with the outcome reward, compute GRPO advantages, pack them into
token_response / response_group (`batching.py`) and update the policy with `ak.aem_policy_loss`
(`algorithm.py`). Metrics go to a JSONL file, one line per step ("kind": "train") plus held-out evaluations
("kind": "eval") and a first line with the configuration ("kind": "config").

Determinism: every random stream is derived from the run's seed (task sampling: `random.Random`, token
sampling: a `torch.Generator`) and the torch thread count is fixed, so two runs of one configuration log the
same numbers (wall-clock fields, prefixed "time/", aside).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time
from typing import Any, Dict, List, Optional

import torch

import aem_kernels as ak

from .algorithm import (grpo_advantages, loss_config, measured_entropy_change, policy_terms, ppo_update,
                        split_by_group)
from .batching import build_policy_batch
from .config import TrainConfig
from .envs import TextEnv, make_env
from .model import build_policy
from .progress import progress as progress_reporter
from .rollout import Trajectory, rollout, sample_tasks
from .tokenizer import WordTokenizer
from .warmstart import warm_start

__all__ = ["train", "warm_started_policy", "evaluate", "default_cache_dir"]


def default_cache_dir() -> str:
    return os.environ.get("AEM_TRAIN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "aem_kernels"))


def warm_started_policy(cfg: TrainConfig, env: TextEnv, tokenizer: WordTokenizer, cache_dir: Optional[str],
                        progress: bool = False):
    """The warm-started policy of `cfg.env`; cached on disk under `cache_dir` (None: no cache)."""
    # tiny matrices: one thread avoids OpenMP spin-waiting, which costs a lot on a shared machine
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.warmstart_seed)
    model = build_policy(cfg.model, len(tokenizer), tokenizer.pad_id, tokenizer.bos_id, tokenizer.end_id)
    key = hashlib.sha256(cfg.warmstart_key().encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"warmstart-{cfg.env}-{key}.pt") if cache_dir else None
    if path and os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return model, {k: float(v) for k, v in saved["metrics"].items()}
    bar = progress_reporter(cfg.warmstart_budget, f"warm start {cfg.env}", progress)
    metrics = warm_start(model, tokenizer, env, random.Random(f"warmstart-{cfg.warmstart_seed}"),
                         steps=cfg.warmstart_budget, batch_size=cfg.warmstart_batch, lr=cfg.warmstart_lr,
                         noise=cfg.warmstart_noise, progress=bar)
    if bar is not None:
        bar.close()
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # atomic: parallel runs may race to write the same file
        torch.save({"state_dict": model.state_dict(), "metrics": metrics}, tmp)
        os.replace(tmp, path)
    return model, metrics


def _outcome_metrics(trajectories: List[Trajectory], prefix: str) -> Dict[str, float]:
    n = len(trajectories)
    return {
        f"{prefix}/success": sum(t.success for t in trajectories) / n,
        f"{prefix}/reward": sum(t.reward for t in trajectories) / n,
        f"{prefix}/invalid_per_episode": sum(t.num_invalid for t in trajectories) / n,
        f"{prefix}/turns": sum(len(t.turns) for t in trajectories) / n,
    }


def evaluate(model, tokenizer: WordTokenizer, env: TextEnv, tasks, cfg: TrainConfig, step: int) -> Dict[str, float]:
    """One sampled trajectory per held-out task (temperature `cfg.temperature`)."""
    generator = torch.Generator().manual_seed(1_000_003 * (cfg.seed + 1) + step)
    trajectories = rollout(model, tokenizer, env, tasks, 1, generator, temperature=cfg.temperature,
                           max_action_tokens=cfg.action_tokens)
    return _outcome_metrics(trajectories, "eval")


def _entropy_metrics(minibatches, old_terms) -> Dict[str, float]:
    """Token entropy (mean over action tokens) and response entropy (mean over responses of the mean token
    entropy, eq. 3') of the rollout policy, from the old pass."""
    token_sum, token_count, response_values = 0.0, 0, []
    for batch, (_, entropy) in zip(minibatches, old_terms):
        trained = batch.token_response >= 0
        token_sum += float(entropy[trained].sum())
        token_count += int(trained.sum())
        per_response = ak.response_entropy(entropy, batch.token_response, batch.num_responses)
        nonempty = torch.bincount(batch.token_response[trained], minlength=batch.num_responses) > 0
        response_values += per_response[nonempty].tolist()
    return {"policy/token_entropy": token_sum / max(token_count, 1),
            "policy/response_entropy": sum(response_values) / max(len(response_values), 1)}


def train(cfg: TrainConfig, *, out_path: Optional[str] = None, cache_dir: Optional[str] = None,
          progress: bool = True, position: int = 0) -> List[Dict[str, Any]]:
    """Run `cfg`; returns the logged records (and appends them to `out_path` as JSONL when given)."""
    torch.set_num_threads(cfg.threads)
    env = make_env(cfg.env, cfg.reward_scheme)
    tokenizer = WordTokenizer(env.vocabulary())
    policy, warm_metrics = warm_started_policy(cfg, env, tokenizer, cache_dir, progress)
    reference = None
    if cfg.kl_coef > 0:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    config = loss_config(cfg.method, cfg.beta, entropy_coef=cfg.entropy_coef, clip_high=cfg.clip_high,
                         top_entropy_quantile=cfg.top_entropy_quantile, kl_coef=cfg.kl_coef,
                         temperature=cfg.temperature, spread_floor=cfg.spread_floor,
                         relative_spread_floor=cfg.relative_spread_floor)
    task_rng = random.Random(f"train-{cfg.env}-{cfg.seed}")
    sampler = torch.Generator().manual_seed(cfg.seed)
    eval_tasks = sample_tasks(env, random.Random(f"eval-{cfg.env}"), cfg.eval_tasks)

    records: List[Dict[str, Any]] = []
    sink = open(out_path, "w") if out_path else None

    def log(record: Dict[str, Any]) -> None:
        # 6 significant digits: metrics are noisier than that, and the JSONL files stay small
        record = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in record.items()}
        records.append(record)
        if sink:
            sink.write(json.dumps(record) + "\n")
            sink.flush()

    log({"kind": "config", **cfg.to_dict(), "aem_config": config.to_dict(), **warm_metrics})
    bar = progress_reporter(cfg.steps, f"{cfg.env} {cfg.method} seed {cfg.seed}", progress)
    try:
        log({"kind": "eval", "step": 0, **evaluate(policy, tokenizer, env, eval_tasks, cfg, 0)})
        for step in range(1, cfg.steps + 1):
            started = time.perf_counter()
            tasks = sample_tasks(env, task_rng, cfg.tasks_per_step)
            trajectories = rollout(policy, tokenizer, env, tasks, cfg.group_size, sampler,
                                   temperature=cfg.temperature, max_action_tokens=cfg.action_tokens)
            sampled = time.perf_counter()
            rewards = torch.tensor([t.reward for t in trajectories])
            groups = torch.tensor([t.group for t in trajectories])
            advantages = grpo_advantages(rewards, groups)
            minibatches = [build_policy_batch([trajectories[i] for i in idx], advantages[idx].tolist(), cfg.level,
                                              tokenizer.pad_id)
                           for idx in split_by_group(groups.tolist(), cfg.minibatches)]
            old_terms = [policy_terms(policy, mb, cfg.temperature) for mb in minibatches]
            ref_logprobs = None if reference is None else \
                [policy_terms(reference, mb, cfg.temperature)[0] for mb in minibatches]
            update = ppo_update(policy, optimizer, minibatches, [lp for lp, _ in old_terms], config,
                                epochs=cfg.ppo_epochs, max_grad_norm=cfg.max_grad_norm, ref_logprobs=ref_logprobs)
            # the drift meter's check: the same responses' entropy under the updated policy (one no-grad pass)
            new_entropy = [policy_terms(policy, mb, cfg.temperature)[1] for mb in minibatches]
            update.update(measured_entropy_change(minibatches, [e for _, e in old_terms], new_entropy))
            record = {"kind": "train", "step": step, **_outcome_metrics(trajectories, "rollout"),
                      **_entropy_metrics(minibatches, old_terms),
                      "rollout/zero_adv_groups": _zero_advantage_fraction(rewards, groups), **update,
                      "time/rollout_s": sampled - started, "time/step_s": time.perf_counter() - started}
            log(record)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                log({"kind": "eval", "step": step, **evaluate(policy, tokenizer, env, eval_tasks, cfg, step)})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(success=f"{record['rollout/success']:.2f}",
                                H=f"{record['policy/token_entropy']:.3f}", D=f"{record.get('aem/drift', 0):+.3f}")
    finally:
        if bar is not None:
            bar.close()
        if sink:
            sink.close()
    return records


def _zero_advantage_fraction(rewards: torch.Tensor, groups: torch.Tensor) -> float:
    """Fraction of groups whose trajectories all got the same reward (no GRPO signal)."""
    spread = [float(rewards[groups == g].max() - rewards[groups == g].min()) for g in groups.unique()]
    return sum(s == 0 for s in spread) / len(spread)
