"""`TrainConfig`: every knob of a reference-trainer run, and the named presets (test, demo, tune, compare).

The presets are the budgets documented in the README and in bench/results/trainer/summary.md. Hyper-parameters
(lr, beta, level) were chosen on tuning seed 100 with 60-step runs; the comparison runs fresh seeds
(`COMPARE_SEEDS`) with 150 steps.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .model import ModelSpec

__all__ = ["TrainConfig", "PRESETS", "preset", "TUNE_SEEDS", "COMPARE_SEEDS", "AEM_BETA", "ENTROPY_COEF", "CLIP_HIGHER",
           "MAX_ACTION_TOKENS"]

TUNE_SEEDS = (100,)
COMPARE_SEEDS = tuple(range(10))
# Supervised steps to a weak but non-trivial policy (about 10-40 % success; see summary.md)
WARMSTART_STEPS = {"household": 600, "shop": 400, "safe": 400}
# cap on an action's tokens (with <end>): two-word actions, and "enter" with up to four digits in `safe`
MAX_ACTION_TOKENS = {"household": 3, "shop": 3, "safe": 6}
# AEM strength of method "aem", chosen on tuning seed 100 among {0.5, 1, 2} at turn level (1 and 2 made the
# household policy collapse there; see bench/results/trainer/summary.md)
AEM_BETA = 0.5
# entropy-bonus coefficient of method "entropy" (verl's `entropy_coeff`), chosen on tuning seed 100 on `safe`
# among {0.003, 0.01, 0.03} with as many tuning runs as AEM's beta among {0.5, 1, 2} (150 steps each; see
# bench/results/trainer-explore/summary.md)
ENTROPY_COEF = 0.03
# upper ratio clip of method "clip_higher" (DAPO's clip-higher: clip_low 0.2, clip_high 0.28)
CLIP_HIGHER = 0.28
# the share of highest-entropy tokens method "entropy_tokens" trains on (the "80/20" rule of thumb: the top 20 %)
ENTROPY_TOKENS_QUANTILE = 0.2


@dataclass
class TrainConfig:
    """One run: an environment, a method, a seed, and the budget.

    Attributes:
        env: "household", "shop" or "safe".
        method: "grpo" (AEMConfig(beta=0)), "aem" (AEMConfig(beta=beta), the paper's default form),
            "entropy" (GRPO with an entropy bonus `entropy_coef`), "clip_higher" (GRPO with the upper ratio
            clip `clip_high`, DAPO-style), "entropy_tokens" (GRPO on the top `top_entropy_quantile` entropy
            tokens), or a policy-loss mode ("gspo", "clip_cov", ..., alone or "<mode>_aem"; see
            `algorithm.loss_config`).
        seed: seeds the RL run (task stream, sampling); the warm start has its own fixed seed so that every
            run of an environment starts from the same policy (as RL runs start from one base model).
        steps: RL steps (one rollout batch and one PPO update each).
        tasks_per_step, group_size: task instances per step and trajectories per instance (GRPO's G).
        level: "turn" (each turn a response; the paper's multi-turn setting) or "trajectory".
        beta: AEM strength for method "aem".
        entropy_coef: entropy-bonus coefficient for method "entropy".
        clip_high: upper ratio clip for method "clip_higher" (the other methods keep AEMConfig's 0.2).
        top_entropy_quantile: share of the highest-entropy tokens method "entropy_tokens" trains on.
        spread_floor, relative_spread_floor: AEM's spread floors of eq. 5 (`ak.AEMConfig`), every method.
        lr, ppo_epochs, minibatches, max_grad_norm: the actor update (Adam).
        kl_coef: KL-to-reference coefficient (k3); 0 disables the reference model.
        temperature: sampling temperature (the loss uses the same).
        max_action_tokens: cap on an action's length in tokens (including <end>); None: the environment's
            default (`MAX_ACTION_TOKENS`).
        reward_scheme: "paper" (10 / 0 / -0.1 per invalid action) or "binary" (1 / 0).
        model: the policy's size.
        warmstart_*: supervised warm start on noisy scripted demonstrations (see warmstart.py); the
            default step count depends on the environment (`WARMSTART_STEPS`).
        eval_every, eval_tasks: a fixed held-out task set (the same for every run) is played at steps
            0, eval_every, ..., steps with one sampled trajectory per task.
        threads: torch intra-op threads of this run.
    """

    env: str = "household"
    method: str = "aem"
    seed: int = 0
    steps: int = 150
    tasks_per_step: int = 8
    group_size: int = 6
    level: str = "turn"
    beta: float = AEM_BETA
    entropy_coef: float = ENTROPY_COEF
    clip_high: float = CLIP_HIGHER
    top_entropy_quantile: float = ENTROPY_TOKENS_QUANTILE
    spread_floor: float = 1e-8
    relative_spread_floor: float = 0.0
    lr: float = 3e-4
    ppo_epochs: int = 1
    minibatches: int = 2
    max_grad_norm: float = 1.0
    kl_coef: float = 0.0
    temperature: float = 1.0
    max_action_tokens: Optional[int] = None   # None: MAX_ACTION_TOKENS[env]
    reward_scheme: str = "paper"
    model: ModelSpec = field(default_factory=ModelSpec)
    warmstart_steps: Optional[int] = None   # None: WARMSTART_STEPS[env]
    warmstart_batch: int = 16
    warmstart_lr: float = 1e-2
    warmstart_noise: float = 0.3
    warmstart_seed: int = 1234
    eval_every: int = 25
    eval_tasks: int = 128
    threads: int = 1

    def replace(self, **changes: Any) -> "TrainConfig":
        if "model" in changes and isinstance(changes["model"], dict):
            changes["model"] = ModelSpec(**changes["model"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        values = dict(values)
        values["model"] = ModelSpec(**values.get("model", {}))
        return cls(**values)

    @property
    def warmstart_budget(self) -> int:
        """`warmstart_steps`, or the environment's default."""
        return self.warmstart_steps if self.warmstart_steps is not None else WARMSTART_STEPS.get(self.env, 500)

    @property
    def action_tokens(self) -> int:
        """`max_action_tokens`, or the environment's default."""
        return self.max_action_tokens if self.max_action_tokens is not None else MAX_ACTION_TOKENS.get(self.env, 3)

    def warmstart_key(self) -> str:
        """Everything the warm-started policy depends on (its cache key)."""
        keys = ("env", "reward_scheme", "warmstart_batch", "warmstart_lr", "warmstart_noise", "warmstart_seed")
        return json.dumps({**{k: getattr(self, k) for k in keys}, "max_action_tokens": self.action_tokens,
                           "warmstart_steps": self.warmstart_budget, "model": dataclasses.asdict(self.model)},
                          sort_keys=True)


PRESETS: Dict[str, Dict[str, Any]] = {
    # seconds: the trainer's own tests
    "test": dict(steps=2, tasks_per_step=2, group_size=3, ppo_epochs=2, minibatches=2, eval_every=2,
                 eval_tasks=4, warmstart_steps=3, warmstart_batch=4,
                 model=dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)),
    # a few minutes on 2 CPU cores: both methods, one seed, one environment
    "demo": dict(steps=30, eval_every=10, eval_tasks=64),
    # hyper-parameter search budget (tuning seed only): 60-step runs
    "tune": dict(steps=60, eval_every=20, eval_tasks=64),
    # the committed comparison: both methods x both environments x COMPARE_SEEDS
    "compare": dict(),
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """The configuration of a preset, with `overrides` applied (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig.from_dict(values)
