"""Text environments of the reference trainer (multi-turn, outcome-only reward; see `base.py`)."""

from .base import INVALID_OBSERVATION, REWARD_SCHEMES, RewardRule, StepResult, TextEnv
from .household import HouseholdEnv
from .safe import SafeEnv
from .shop import ShopEnv

ENVS = {"household": HouseholdEnv, "shop": ShopEnv, "safe": SafeEnv}

__all__ = ["ENVS", "HouseholdEnv", "INVALID_OBSERVATION", "REWARD_SCHEMES", "RewardRule", "SafeEnv", "ShopEnv",
           "StepResult", "TextEnv", "make_env"]


def make_env(name: str, reward_scheme: str = "paper") -> TextEnv:
    """An environment by name ("household", "shop" or "safe")."""
    if name not in ENVS:
        raise ValueError(f"env must be one of {tuple(ENVS)}, got {name!r}")
    return ENVS[name](reward_scheme=reward_scheme)
