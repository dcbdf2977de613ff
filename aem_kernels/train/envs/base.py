"""The text-environment interface of the reference trainer, and the paper's reward rule.

An environment hands out *task instances* (`sample_task`), each of which can be played several times from the
same start (`reset`): that is what a GRPO group is, G trajectories of one instance. An episode alternates
model actions (a few words, e.g. "go drawer") and environment observations (a short sentence); only the
actions are trained. The reward is outcome-only, as in the paper's ALFWorld/WebShop set-up:

    success  +10 (once, when the goal is reached; the episode ends)
    failure    0 (the turn limit runs out)
    invalid  -0.1 per action that does not parse or whose precondition fails ("nothing happens .")

`reward_scheme="binary"` gives 1 for success and 0 otherwise (no invalid-action penalty), like the paper's
SWE setting. The trainer uses the trajectory's summed reward as one outcome; it never sees per-turn rewards.

Every observation ends with a short restatement of the goal (`goal_reminder`), as agent prompts restate the
task at every turn (verl-agent's ALFWorld prompt does): the facts a decision needs then sit at a fixed
distance before it, which a few-layer model learns in hundreds of warm-start steps instead of thousands.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, List, Sequence

__all__ = ["StepResult", "TextEnv", "RewardRule", "INVALID_OBSERVATION", "REWARD_SCHEMES"]

INVALID_OBSERVATION = "nothing happens ."
REWARD_SCHEMES = ("paper", "binary")


@dataclass(frozen=True)
class RewardRule:
    """Reward of one step: `success` when the goal is reached, plus `invalid` for an invalid action."""

    success: float = 10.0
    invalid: float = -0.1

    @classmethod
    def from_scheme(cls, scheme: str) -> "RewardRule":
        if scheme == "paper":
            return cls(10.0, -0.1)
        if scheme == "binary":
            return cls(1.0, 0.0)
        raise ValueError(f"reward_scheme must be one of {REWARD_SCHEMES}, got {scheme!r}")


@dataclass(frozen=True)
class StepResult:
    """What one action produced: the next observation text, the step's reward and the episode's status."""

    observation: str
    reward: float
    done: bool
    valid: bool
    success: bool


class TextEnv(ABC):
    """A multi-turn text environment with an outcome reward (see the module docstring).

    Subclasses define `name`, `max_turns`, the word list, task sampling, the transition function, a scripted
    expert (for the supervised warm start) and a random action (the demonstrations' noise).
    """

    name: str = "env"
    max_turns: int = 8

    def __init__(self, reward_scheme: str = "paper") -> None:
        self.rewards = RewardRule.from_scheme(reward_scheme)

    @abstractmethod
    def vocabulary(self) -> List[str]:
        """Every word an observation or a valid action can contain (the tokenizer is built from it)."""

    @abstractmethod
    def sample_task(self, rng: random.Random) -> Any:
        """A task instance (immutable); `reset(task)` always starts the same episode from it."""

    @abstractmethod
    def reset(self, task: Any) -> Any:
        """A fresh mutable episode state for `task`; its first observation is `first_observation(state)`."""

    @abstractmethod
    def first_observation(self, state: Any) -> str:
        """The goal and the initial observation."""

    @abstractmethod
    def goal_reminder(self, state: Any) -> str:
        """A short restatement of the goal closing every observation ("goal : hot mug shelf .")."""

    @abstractmethod
    def _transition(self, state: Any, words: Sequence[str]) -> tuple:
        """Apply a parsed action: (observation, valid, success, terminal). Must not touch state when invalid;
        `terminal` ends the episode (success always does; a wrong purchase does too)."""

    @abstractmethod
    def expert_action(self, state: Any, rng: random.Random) -> str:
        """A scripted action that uses only what the agent has observed (so a policy can imitate it)."""

    @abstractmethod
    def random_action(self, rng: random.Random) -> str:
        """A uniformly drawn verb with a uniformly drawn argument (often invalid): demonstration noise."""

    def step(self, state: Any, action: str) -> StepResult:
        """Play one action (a whitespace-separated string) and count the turn against `max_turns`."""
        if state.done:
            raise ValueError("step() called on a finished episode")
        observation, valid, success, terminal = self._transition(state, action.split())
        state.turn += 1
        state.done = success or terminal or state.turn >= self.max_turns
        state.success = success
        reward = (self.rewards.success if success else 0.0) + (0.0 if valid else self.rewards.invalid)
        reply = observation if valid else INVALID_OBSERVATION
        if not state.done:
            reply = f"{reply} {self.goal_reminder(state)}"
        return StepResult(reply, reward, state.done, valid, success)
