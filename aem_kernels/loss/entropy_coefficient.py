"""`AdaptiveEntropyCoefficient`: TRL 1.16's adaptive entropy control (GRPOConfig `use_adaptive_entropy`, from
Skywork-OR1) as a controller object that a plain training loop steps once per optimiser step.

TRL's rule (`GRPOTrainer._compute_loss`): the entropy bonus of step k is applied with

    coef_k = c_k  if H_{k-1} <= entropy_target  else 0        (H_0 = +inf: no bonus before the first measurement)

and at the end of step k, with H_k the step's token-mean entropy over every micro-batch of the accumulation
window and every process (sum of entropies / number of tokens),

    c_{k+1} = min(c_k + delta, c_max)  if H_k <= entropy_target  else  max(c_k - delta, c_min).

The state is (c, H_last), saved by TRL as {"entropy_coef", "last_world_entropy"}; `state_dict()` uses those keys.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch

from .. import collectives as C
from ..config import AEMConfig

__all__ = ["AdaptiveEntropyCoefficient"]


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise (TypeError if not isinstance(value, (int, float)) or isinstance(value, bool) else ValueError)(
            f"{name} must be a finite real number, got {value!r}")
    return float(value)


class AdaptiveEntropyCoefficient:
    """TRL's adaptive entropy coefficient. Per optimiser step::

        ctrl = ak.AdaptiveEntropyCoefficient(entropy_coef=0.01, entropy_target=2.0)
        for batch in loader:
            config = ctrl.config(base_config)          # = base_config.replace(entropy_coef=ctrl.coef)
            loss, metrics = ak.aem_policy_loss(..., config=config)
            loss.backward(); optimizer.step()
            ctrl.step(metrics["actor/entropy"])         # the step's (world) token-mean entropy

    With gradient accumulation or several processes, `observe(entropy, mask)` each micro-batch and `step()`
    without an argument at the optimiser step (with `process_group=` to sum over the ranks), as TRL measures the
    window's token-mean entropy. Measure over the tokens the bonus acts on (TRL: the top_entropy_quantile subset
    when one is selected).

    Args (TRL's GRPOConfig names and defaults):
        entropy_coef: the initial coefficient c_0.
        entropy_coef_min, entropy_coef_max: bounds of c (min <= max).
        entropy_coef_delta: the step of c (>= 0).
        entropy_target: the entropy (nats per token) at or below which the bonus is applied and c grows.
    """

    def __init__(self, entropy_coef: float = 0.0, entropy_coef_min: float = 0.0, entropy_coef_max: float = 1.0,
                 entropy_coef_delta: float = 0.005, entropy_target: float = 0.2) -> None:
        self.entropy_coef = _number("entropy_coef", entropy_coef)
        self.entropy_coef_min = _number("entropy_coef_min", entropy_coef_min)
        self.entropy_coef_max = _number("entropy_coef_max", entropy_coef_max)
        self.entropy_coef_delta = _number("entropy_coef_delta", entropy_coef_delta)
        self.entropy_target = _number("entropy_target", entropy_target)
        if self.entropy_coef_min > self.entropy_coef_max:
            raise ValueError(f"entropy_coef_min ({entropy_coef_min}) must be <= entropy_coef_max "
                             f"({entropy_coef_max})")
        if self.entropy_coef_delta < 0:
            raise ValueError(f"entropy_coef_delta must be >= 0, got {entropy_coef_delta}")
        self.last_world_entropy = math.inf
        self._window: Optional[torch.Tensor] = None   # [2]: entropy sum and token count of this step so far

    @property
    def coef(self) -> float:
        """The coefficient to apply this step: c if the last measured entropy is <= entropy_target, else 0."""
        return self.entropy_coef if self.last_world_entropy <= self.entropy_target else 0.0

    def config(self, config: AEMConfig) -> AEMConfig:
        """`config` with entropy_coef = `coef` (validated again)."""
        if not isinstance(config, AEMConfig):
            raise TypeError(f"config must be an AEMConfig, got {type(config).__name__}")
        return config.replace(entropy_coef=self.coef)

    def observe(self, entropy: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Add a micro-batch's token entropies (any shape; `mask` of the same shape, nonzero: counted) to this
        step's window. No host sync."""
        if not isinstance(entropy, torch.Tensor) or not entropy.is_floating_point():
            raise TypeError("entropy must be a floating-point tensor")
        entropy = entropy.detach().double()
        if mask is None:
            stats = torch.stack([entropy.sum(), entropy.new_tensor(float(entropy.numel()))])
        else:
            if not isinstance(mask, torch.Tensor) or mask.shape != entropy.shape:
                raise ValueError(f"mask must be a tensor of entropy's shape {tuple(entropy.shape)}")
            mask = mask.detach().to(entropy.dtype)
            stats = torch.stack([(entropy * mask).sum(), mask.sum()])
        self._window = stats if self._window is None else self._window.to(stats.device) + stats

    def step(self, entropy: Union[None, float, torch.Tensor] = None, *, process_group=None) -> float:
        """End of an optimiser step: update c from the step's entropy and return the next step's `coef`.

        Args:
            entropy: the step's world token-mean entropy (float or 0-d tensor; one host sync). None: the window
                of `observe` calls, summed over the ranks of `process_group` (None: this process), as TRL does.
            process_group: only with entropy=None; a torch.distributed group (one all_reduce of 2 values).
        """
        if entropy is None:
            if self._window is None:
                raise ValueError("step() without an entropy needs observe() calls first")
            group = C.resolve_group(process_group, "process_group", none_is_default=False)
            window = C.all_reduce(self._window.clone(), "sum", group)
            world_entropy = float(window[0] / window[1].clamp(min=1.0))
        else:
            if process_group is not None:
                raise ValueError("process_group applies to the observed window (entropy=None); pass the world "
                                 "entropy or observe() the micro-batches")
            if isinstance(entropy, torch.Tensor):
                if entropy.numel() != 1:
                    raise ValueError(f"entropy must be one number, got shape {tuple(entropy.shape)}")
                entropy = float(entropy.detach())
            world_entropy = _number("entropy", entropy)
        if world_entropy <= self.entropy_target:
            self.entropy_coef = min(self.entropy_coef + self.entropy_coef_delta, self.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - self.entropy_coef_delta, self.entropy_coef_min)
        self.last_world_entropy = world_entropy
        self._window = None
        return self.coef

    def state_dict(self) -> Dict[str, float]:
        """{"entropy_coef", "last_world_entropy"}: TRL's entropy_ctrl_state.json."""
        return {"entropy_coef": self.entropy_coef, "last_world_entropy": self.last_world_entropy}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        """Restore `state_dict()` (or TRL's entropy_ctrl_state.json contents)."""
        missing = {"entropy_coef", "last_world_entropy"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        self.entropy_coef = _number("entropy_coef", state["entropy_coef"])
        last = state["last_world_entropy"]
        if isinstance(last, bool) or not isinstance(last, (int, float)) or math.isnan(last):
            raise ValueError(f"last_world_entropy must be a number (inf before the first step), got {last!r}")
        self.last_world_entropy = float(last)
        self._window = None

    def __repr__(self) -> str:
        return (f"AdaptiveEntropyCoefficient(entropy_coef={self.entropy_coef}, coef={self.coef}, "
                f"last_world_entropy={self.last_world_entropy}, entropy_target={self.entropy_target})")
