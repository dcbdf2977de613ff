"""The hook that hands the "aem" estimator its per-token values: a wrap of verl's `compute_advantage`.

verl 0.9.1's `compute_advantage` calls a registered estimator with token_level_rewards, response_mask, config
and index only; it adds batch fields by name for its own estimators (`old_log_probs` for
"optimal_token_baseline", the batch for "gdpo"). `compute_advantage` here is verl's function plus that one
branch for "aem": the estimator gets `advantage_inputs(data)` (the batch's old log-probs and entropies) as
keyword arguments; every other estimator runs verl's own function unchanged. `patch_compute_advantage()` puts
it in place of `verl.trainer.ppo.ray_trainer.compute_advantage`, the function both verl trainers call (v0's
`fit`; v1 through `compute_advantage_for_multi_trajectories`, whose module binds it by name when imported).
Under VERL_USE_EXTERNAL_MODULES the integration is imported inside `import verl`, before the trainer module
exists, so the wrap is applied as soon as that module has run (a one-shot import hook on its name); if the
trainer is already imported, it is wrapped at once, with the modules that bound the name. Nothing is kept
between calls: each call reads its own batch.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import sys
from types import ModuleType
from typing import Any, Callable, Dict

import torch

from .estimator import ESTIMATOR, compute_aem_advantage

__all__ = ["advantage_inputs", "compute_advantage", "patch_compute_advantage"]

_TRAINER = "verl.trainer.ppo.ray_trainer"
# Modules that bind verl's compute_advantage by name (`from ...ray_trainer import compute_advantage`) on import.
_BOUND_BY_NAME = ("verl.trainer.ppo.v1.utils", "verl.experimental.separation.ray_trainer")


def _is_aem(adv_estimator: Any) -> bool:
    return getattr(adv_estimator, "value", adv_estimator) == ESTIMATOR  # a name or an Enum member


def advantage_inputs(data: Any) -> Dict[str, torch.Tensor]:
    """The estimator's per-token keyword arguments from a verl DataProto: `old_log_probs` (data.batch
    "old_log_probs") and `entropys` (data.batch "entropys", or v1's "entropy"), those the batch holds."""
    batch = data.batch
    keys = batch.keys()
    inputs = {"old_log_probs": batch["old_log_probs"]} if "old_log_probs" in keys else {}
    for key in ("entropys", "entropy"):
        if key in keys:
            inputs["entropys"] = batch[key]
            break
    return inputs


def _verl_compute_advantage() -> Callable[..., Any]:
    """verl's own compute_advantage (unwrapped if this module's wrap is in place)."""
    function = importlib.import_module(_TRAINER).compute_advantage
    return function.__wrapped__ if getattr(function, "aem_hook", False) else function


def compute_advantage(data: Any, adv_estimator: Any, gamma: float = 1.0, lam: float = 1.0, num_repeat: int = 1,
                      norm_adv_by_std_in_grpo: bool = True, config: Any = None) -> Any:
    """verl's `ray_trainer.compute_advantage` (same arguments) with the "aem" estimator given its inputs.

    For adv_estimator "aem": the estimator gets verl's generic-branch arguments (data.batch's
    token_level_rewards and response_mask, config, index = non_tensor_batch "uid" and reward_baselines when
    present) plus `advantage_inputs(data)`; writes data.batch "advantages" / "returns" [B, T] and returns
    `data`. Any other estimator: verl's own function, unchanged (gamma, lam, num_repeat and
    norm_adv_by_std_in_grpo are its arguments; "aem" reads its settings from `config`, as verl's generic branch).
    """
    if not _is_aem(adv_estimator):
        return _verl_compute_advantage()(data, adv_estimator=adv_estimator, gamma=gamma, lam=lam,
                                         num_repeat=num_repeat, norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
                                         config=config)
    batch = data.batch
    if "response_mask" not in batch.keys():  # verl's fallback for trainers that do not store it
        batch["response_mask"] = importlib.import_module(_TRAINER).compute_response_mask(data)
    kwargs = {"token_level_rewards": batch["token_level_rewards"], "response_mask": batch["response_mask"],
              "config": config, **advantage_inputs(data)}
    if "uid" in data.non_tensor_batch:
        kwargs["index"] = data.non_tensor_batch["uid"]
    if "reward_baselines" in batch.keys():
        kwargs["reward_baselines"] = batch["reward_baselines"]
    batch["advantages"], batch["returns"] = compute_aem_advantage(**kwargs)
    return data


def _install(trainer: ModuleType) -> None:
    """Wrap `trainer.compute_advantage` (and the modules' copies bound by name) once."""
    original = getattr(trainer, "compute_advantage", None)
    if original is None or getattr(original, "aem_hook", False):
        return

    @functools.wraps(original)
    def compute_advantage_with_aem(data: Any, adv_estimator: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_aem(adv_estimator):
            return compute_advantage(data, adv_estimator, *args, **kwargs)
        return original(data, adv_estimator, *args, **kwargs)

    compute_advantage_with_aem.aem_hook = True
    trainer.compute_advantage = compute_advantage_with_aem
    for name in _BOUND_BY_NAME:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "compute_advantage", None) is original:
            module.compute_advantage = compute_advantage_with_aem


class _WrapOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """One-shot import hook: lets verl's trainer module run, then wraps its compute_advantage (before any
    `from ... import compute_advantage` of another module can copy the unwrapped function)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TRAINER:
            return None
        for finder in sys.meta_path:
            found = None if finder is self else getattr(finder, "find_spec", None)
            spec = found(fullname, path, target) if found is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            self.loader = spec.loader
            spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader  # the module looks as if imported plainly
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _install(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, ... for tracebacks and inspect
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


def patch_compute_advantage() -> None:
    """Put `compute_advantage` of this module in place of verl's `ray_trainer.compute_advantage` (run on import).

    Now if verl's trainer module is imported (also replacing the copies that `verl.trainer.ppo.v1.utils` and
    `verl.experimental.separation.ray_trainer` bound), else as soon as it is. Idempotent; estimators other than
    "aem" still run verl's own function.
    """
    trainer = sys.modules.get(_TRAINER)
    if trainer is not None:
        _install(trainer)
    elif not any(isinstance(finder, _WrapOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WrapOnImport())
