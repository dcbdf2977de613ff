"""`AEMConfig`: every knob of the AEM-modulated policy loss, validated once.

The defaults are the paper's form (AEM_SPEC.md section 4): mean token entropy as the response uncertainty,
per-group min-max relative uncertainty, w = exp(-beta * u) divided by its group mean, no upper clip, and
verl's PPO defaults for the surrogate (clip 0.2/0.2, dual clip 3.0, token-mean aggregation).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

__all__ = ["AEMConfig", "LOSS_AGG_MODES", "KL_TYPES"]

LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
# verl's spellings of the three Schulman estimators map onto ours.
KL_TYPES = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}

_CHOICES = {
    "phi": ("exp", "linear"),
    "uncertainty": ("entropy", "surprisal"),
    "surprisal_reduction": ("mean", "sum"),
    "baseline": ("minmax", "mean", "loo", "batch"),
    "normalize": ("group", "batch", "none"),
    "surprisal_source": ("current", "old"),
    "loss_agg_mode": LOSS_AGG_MODES,
}


def _finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"AEMConfig.{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"AEMConfig.{name} must be finite, got {value}")
    return float(value)


@dataclass(frozen=True)
class AEMConfig:
    """Configuration of AEM advantage modulation (eq. 5, 7) and the clipped policy loss (eq. 8).

    Attributes:
        beta: modulation strength beta >= 0 (the paper's lambda). 0 gives plain GRPO/PPO exactly.
        phi: "exp" (the paper; the KL-regularised minimiser) or "linear" (phi(x) = max(0, 1 + x); the
            clamp at 0 keeps a weight from flipping an advantage's sign).
        sign: +1 (the paper: confident responses amplified) or -1 (the opposite variant, for comparison).
        uncertainty: "entropy" (mean token entropy H_r, eq. 3') or "surprisal" (S_r / L_r, eq. 3).
        surprisal_reduction: "mean" or "sum" over the response's tokens.
        baseline: relative uncertainty u_r (eq. 5): "minmax" (the paper), "mean", "loo", "batch".
        zscore: divide the centred baselines by the group (or batch) std + 1e-6; not valid with "minmax".
        normalize: normalisation set N(r) of eq. 7: "group" (the paper), "batch" or "none".
        w_min, w_max: clip range of the weights, 0 <= w_min <= w_max and w_max > 0; None means no bound on
            that side.
        surprisal_source: "current" (detached values of this forward) or "old" (the rollout's values:
            `old_entropy` for uncertainty="entropy", `old_logprobs` for "surprisal").
        clip_low, clip_high: PPO ratio clip 1 - clip_low .. 1 + clip_high (verl's clip_ratio_low/high).
        dual_clip: the dual-clip constant c > 1 for negative advantages (verl's clip_ratio_c); None: off.
        loss_agg_mode: verl's aggregation names (see `LOSS_AGG_MODES`).
        entropy_coef: entropy bonus coefficient (loss -= entropy_coef * agg(h)).
        kl_coef: coefficient of the KL-to-reference term (needs `ref_logprobs` when > 0).
        kl_type: "k1", "k2" or "k3" (verl's "kl", "mse", "low_var_kl" accepted and normalised).
        temperature: logits are divided by it before the softmax (eq. 1-2).
        ignore_index: label value of untrained positions.
    """

    beta: float = 1.0
    phi: str = "exp"
    sign: int = 1
    uncertainty: str = "entropy"
    surprisal_reduction: str = "mean"
    baseline: str = "minmax"
    zscore: bool = False
    normalize: str = "group"
    w_min: Optional[float] = 0.0
    w_max: Optional[float] = None
    surprisal_source: str = "current"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = 3.0
    loss_agg_mode: str = "token-mean"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_type: str = "k3"
    temperature: float = 1.0
    ignore_index: int = -100
    # --- the policy-loss mode and its hyper-parameters (verl's names; TRL's for what verl lacks) ---
    # loss_mode: one of `LOSS_MODES` (verl 0.9.1's policy losses by verl's name, TRL 1.16's loss types by
    #   TRL's name where verl has none; a TRL name implies TRL's aggregation). See ops/policy_loss/modes.py.
    # tau_pos, tau_neg: SAPO's gate temperatures for A > 0 and A <= 0 (verl's actor fields; TRL's
    #   sapo_temperature_pos/neg). clip_cov_ratio, clip_cov_lb, clip_cov_ub: Clip-Cov's share of tokens and
    #   covariance window; kl_cov_ratio, ppo_kl_coef: KL-Cov's share of tokens and |log-ratio| coefficient;
    #   dro_beta: DRO's quadratic log-ratio penalty (> 0, required by "dro"): verl's policy_loss fields.
    # delta: TRL's two-sided clipping bound on the ratio of the GRPO-family loss types (None: off).
    # vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's Gamma weighting (TRL's names).
    # importance_sampling_level: TRL's "token" or "sequence" ratio of its GRPO-family loss types; None: the
    #   loss type's own ("sequence" for luspo, "token" otherwise).
    loss_mode: str = "vanilla"
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    ppo_kl_coef: float = 0.1
    dro_beta: Optional[float] = None
    delta: Optional[float] = None
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    importance_sampling_level: Optional[str] = None
    # use_bias_correction_kl: TRL's: under a TRL loss type the KL term of each token is multiplied by its
    #   importance ratio (token or sequence level, as the loss type's), differentiated through it.
    use_bias_correction_kl: bool = True
    # (end of the policy-loss block)

    # --- corrections and selections applied around the loss mode ---
    # (loss/corrections.py, loss/modulation.py; README "Rollout corrections, ...")
    # top_entropy_quantile: TRL's rho of "Beyond the 80/20 rule": train the policy term on the tokens whose
    #     entropy is at or above the (1 - q) quantile of the trained tokens' entropies; 1.0 keeps every token.
    # rollout_is: verl's IS level "token" | "sequence" | None (off), weights exp(old - rollout) truncated by
    #     rollout_is_threshold: a number or "upper" (TIS: clamp at upper) or "lower_upper" (IcePop: 0 outside).
    # rollout_is_batch_normalize: verl's option, weights divided by their batch mean.
    # rollout_rs: verl's rejection options, comma separated ("token_k1", "seq_mean_k3", ...) or None, with
    #     rollout_rs_threshold (one spec, or one per option; "lower_upper" ratio bounds for the *_k1 options).
    # vllm_importance_sampling_mode: TRL's "token_truncate" | "token_mask" | "sequence_truncate" |
    #     "sequence_mask" | None (off; TRL's vllm_importance_sampling_correction=False), with its clip bounds.
    # spread_floor, relative_spread_floor: eq. 5's min-max u_r is 0 in a group whose spread is below
    #     max(spread_floor, relative_spread_floor * |mean_g x|).
    top_entropy_quantile: float = 1.0
    rollout_is: Optional[str] = None
    rollout_is_threshold: Any = 2.0
    rollout_is_batch_normalize: bool = False
    rollout_rs: Optional[str] = None
    rollout_rs_threshold: Any = None
    vllm_importance_sampling_mode: Optional[str] = None
    vllm_importance_sampling_clip_min: Optional[float] = None
    vllm_importance_sampling_clip_max: Optional[float] = 3.0
    spread_floor: float = 1e-8
    relative_spread_floor: float = 0.0
    # (end of the corrections block)

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"AEMConfig.{name} must be one of {choices}, got {value!r}")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"AEMConfig.kl_type must be one of {tuple(KL_TYPES)}, got {self.kl_type!r}")
        object.__setattr__(self, "kl_type", KL_TYPES[self.kl_type])
        if self.sign not in (1, -1) or isinstance(self.sign, bool):
            raise ValueError(f"AEMConfig.sign must be +1 or -1, got {self.sign!r}")
        if not isinstance(self.zscore, bool):
            raise TypeError(f"AEMConfig.zscore must be a bool, got {type(self.zscore).__name__}")
        if self.zscore and self.baseline == "minmax":
            raise ValueError("AEMConfig.zscore=True applies to the centred baselines ('mean', 'loo', 'batch'), "
                             "not to 'minmax'")
        if _finite_number("beta", self.beta) < 0:
            raise ValueError(f"AEMConfig.beta must be >= 0, got {self.beta}")
        for name in ("w_min", "w_max"):
            value = getattr(self, name)
            if value is not None and _finite_number(name, value) < 0:
                raise ValueError(f"AEMConfig.{name} must be >= 0 or None, got {value}")
        if self.w_max is not None and self.w_max <= 0:
            # w_max = 0 would clip every weight to 0: every advantage vanishes and the loss trains nothing
            raise ValueError(f"AEMConfig.w_max must be > 0 or None, got {self.w_max} (it would zero every "
                             "advantage)")
        if self.w_min is not None and self.w_max is not None and self.w_max < self.w_min:
            raise ValueError(f"AEMConfig.w_max ({self.w_max}) must be >= w_min ({self.w_min})")
        if not 0 <= _finite_number("clip_low", self.clip_low) < 1:
            raise ValueError(f"AEMConfig.clip_low must be in [0, 1), got {self.clip_low}")
        if _finite_number("clip_high", self.clip_high) < 0:
            raise ValueError(f"AEMConfig.clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and _finite_number("dual_clip", self.dual_clip) <= 1:
            raise ValueError(f"AEMConfig.dual_clip must be > 1 or None, got {self.dual_clip}")
        _finite_number("entropy_coef", self.entropy_coef)
        if _finite_number("kl_coef", self.kl_coef) < 0:
            raise ValueError(f"AEMConfig.kl_coef must be >= 0, got {self.kl_coef}")
        if _finite_number("temperature", self.temperature) <= 0:
            raise ValueError(f"AEMConfig.temperature must be > 0, got {self.temperature}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"AEMConfig.ignore_index must be an int, got {type(self.ignore_index).__name__}")
        _check_policy_loss_fields(self)
        _check_correction_fields(self)

    def replace(self, **changes: Any) -> "AEMConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


# verl 0.9.1's registered policy losses, and TRL 1.16's loss types that verl has no mode of that name for (TRL's
# "cispo" and "sapo" are verl's modes of those names; ops/policy_loss/modes.py says how they relate).
VERL_LOSS_MODES = ("vanilla", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dppo_tv", "dppo_kl", "dro",
                   "cispo", "bypass_mode")
TRL_LOSS_MODES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "vespo")
LOSS_MODES = VERL_LOSS_MODES + TRL_LOSS_MODES
# the aggregation each TRL loss type implies (its normaliser defaults and keywords: ops/policy_loss/modes.py)
TRL_AGGREGATION = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                   "dapo": "token-mean", "luspo": "seq-mean-token-sum", "vespo": "token-mean"}
# modes whose loss has verl's dual clip (clip_ratio_c), and those that read it as a ratio truncation instead
DUAL_CLIP_MODES = ("vanilla", "bypass_mode")
TRUNCATION_MODES = ("dppo_tv", "dppo_kl")
DEFAULT_DUAL_CLIP = 3.0


def _check_policy_loss_fields(config: AEMConfig) -> None:
    """The policy-loss mode and its hyper-parameters."""
    mode = config.loss_mode
    if mode not in LOSS_MODES:
        raise ValueError(f"AEMConfig.loss_mode must be one of {LOSS_MODES}, got {mode!r}")
    for name in ("tau_pos", "tau_neg", "clip_cov_ratio", "kl_cov_ratio"):
        if _finite_number(name, getattr(config, name)) <= 0:
            raise ValueError(f"AEMConfig.{name} must be > 0, got {getattr(config, name)}")
    for name in ("clip_cov_lb", "clip_cov_ub", "ppo_kl_coef", "vespo_k_pos", "vespo_k_neg"):
        _finite_number(name, getattr(config, name))
    for name in ("vespo_lambda_pos", "vespo_lambda_neg"):
        if _finite_number(name, getattr(config, name)) < 0:
            raise ValueError(f"AEMConfig.{name} must be >= 0, got {getattr(config, name)}")
    if config.clip_cov_lb >= config.clip_cov_ub:
        raise ValueError(f"AEMConfig.clip_cov_lb ({config.clip_cov_lb}) must be < clip_cov_ub ({config.clip_cov_ub})")
    if config.dro_beta is not None and _finite_number("dro_beta", config.dro_beta) <= 0:
        raise ValueError(f"AEMConfig.dro_beta must be > 0 or None, got {config.dro_beta}")
    if mode == "dro" and config.dro_beta is None:
        raise ValueError('AEMConfig.dro_beta (> 0) is required with loss_mode="dro"')
    if config.delta is not None:
        if _finite_number("delta", config.delta) <= 1:
            raise ValueError(f"AEMConfig.delta must be > 1 or None, got {config.delta}")
        if mode not in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            raise ValueError(f"AEMConfig.delta (TRL's two-sided clipping) applies to the loss modes grpo, bnpo, "
                             f"dr_grpo, dapo and luspo, not to loss_mode={mode!r}")
    # dual_clip: the default (3.0) and None both mean "none" for a mode without a dual clip, so that the default
    # config serves every mode; any other value there would be silently unused, so it is refused
    if (mode not in DUAL_CLIP_MODES + TRUNCATION_MODES and config.dual_clip is not None
            and config.dual_clip != DEFAULT_DUAL_CLIP):
        raise ValueError(f"AEMConfig.dual_clip={config.dual_clip} has no effect with loss_mode={mode!r}, which has "
                         f"no dual clip (only {DUAL_CLIP_MODES + TRUNCATION_MODES} read it); leave it at the default "
                         "3.0 or None")
    if not isinstance(config.use_bias_correction_kl, bool):
        raise TypeError(f"AEMConfig.use_bias_correction_kl must be a bool, got "
                        f"{type(config.use_bias_correction_kl).__name__}")
    level = config.importance_sampling_level
    if level not in (None, "token", "sequence"):
        raise ValueError(f"AEMConfig.importance_sampling_level must be None, 'token' or 'sequence', got {level!r}")
    if level == "sequence" and mode not in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        raise ValueError("AEMConfig.importance_sampling_level='sequence' applies to the TRL loss modes grpo, bnpo, "
                         f"dr_grpo, dapo and luspo (TRL's vespo computes its sequence weights itself; verl's "
                         f"sequence-level ratio is loss_mode='gspo'), not to loss_mode={mode!r}")
    if mode == "bypass_mode":
        on = [name for name in ("rollout_is", "rollout_rs", "vllm_importance_sampling_mode")
              if getattr(config, name, None) is not None]
        if on:
            # verl's bypass_mode computes its rejection from this forward's log-probs against the rollout's
            # (old = rollout) and applies no IS weight under ppo_clip: not the corrections of loss/corrections.py
            raise ValueError(f"loss_mode='bypass_mode' is verl's ppo_clip bypass without rollout correction here; "
                             f"{', '.join(on)} must be None with it (pass the rollout log-probs as old_logprobs)")
    # a TRL loss type implies its aggregation: loss_agg_mode may stay at the default or name that aggregation
    if mode in TRL_AGGREGATION and config.loss_agg_mode not in ("token-mean", TRL_AGGREGATION[mode]):
        raise ValueError(f"AEMConfig.loss_agg_mode={config.loss_agg_mode!r} does not apply to loss_mode={mode!r}: "
                         f"TRL's {mode} implies {TRL_AGGREGATION[mode]!r} (leave loss_agg_mode at its default)")
    # (end of the policy-loss checks)


def _check_correction_fields(config: AEMConfig) -> None:
    """Rollout corrections, the entropy-token selection and the modulation's spread floors."""
    if not 0.0 <= _finite_number("top_entropy_quantile", config.top_entropy_quantile) <= 1.0:
        raise ValueError(f"AEMConfig.top_entropy_quantile must be in [0, 1], got {config.top_entropy_quantile}")
    if config.rollout_is is not None and config.rollout_is not in ROLLOUT_IS_LEVELS:
        raise ValueError(f"AEMConfig.rollout_is must be one of {ROLLOUT_IS_LEVELS} or None, got {config.rollout_is!r}")
    if config.rollout_is is not None and config.rollout_is_threshold is None:
        # verl silently skips the weights then; a switched-on option that does nothing is refused here
        raise ValueError("AEMConfig.rollout_is_threshold must be set when rollout_is is")
    if config.rollout_is_threshold is not None:
        rollout_is_bounds(config.rollout_is_threshold)
    if not isinstance(config.rollout_is_batch_normalize, bool):
        raise TypeError("AEMConfig.rollout_is_batch_normalize must be a bool, got "
                        f"{type(config.rollout_is_batch_normalize).__name__}")
    if config.rollout_rs is not None:
        rollout_rs_bounds(config.rollout_rs, config.rollout_rs_threshold)
    mode = config.vllm_importance_sampling_mode
    if mode is not None and mode not in VLLM_IS_MODES:
        raise ValueError(f"AEMConfig.vllm_importance_sampling_mode must be one of {VLLM_IS_MODES} or None, got "
                         f"{mode!r}")
    bounds = [config.vllm_importance_sampling_clip_min, config.vllm_importance_sampling_clip_max]
    for name, value in zip(("vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max"), bounds):
        if value is not None and _finite_number(name, value) < 0:
            raise ValueError(f"AEMConfig.{name} must be >= 0 or None, got {value}")
    if None not in bounds and bounds[0] >= bounds[1]:
        raise ValueError(f"AEMConfig.vllm_importance_sampling_clip_min ({bounds[0]}) must be less than "
                         f"vllm_importance_sampling_clip_max ({bounds[1]}) (as TRL's GRPOConfig)")
    if mode is not None and mode.endswith("_truncate") and bounds == [None, None]:
        raise ValueError("AEMConfig.vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max must be "
                         f"set for vllm_importance_sampling_mode={mode!r}")
    if mode is not None and config.rollout_is is not None:
        raise ValueError("AEMConfig.rollout_is and vllm_importance_sampling_mode are two importance weightings of "
                         "the same mismatch (verl's and TRL's); set one of them")
    for name in ("spread_floor", "relative_spread_floor"):
        if _finite_number(name, getattr(config, name)) < 0:
            raise ValueError(f"AEMConfig.{name} must be >= 0, got {getattr(config, name)}")
    # (end of the correction checks)


ROLLOUT_IS_LEVELS = ("token", "sequence")
ROLLOUT_RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
                      "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _threshold_number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"AEMConfig.{name}: {text!r} is not a number") from None
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"AEMConfig.{name} bounds must be positive and finite, got {text!r}")
    return value


def rollout_is_bounds(spec: Any) -> tuple:
    """verl's `rollout_is_threshold` spec -> (upper, lower or None): a number or "upper" (TIS), "lower_upper"
    (IcePop), 0 < lower <= upper."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"AEMConfig.rollout_is_threshold must be a number or a 'lower_upper' string, got "
                        f"{type(spec).__name__}")
    text = str(spec).strip()
    lower_text, _, upper_text = text.partition("_") if "_" in text else ("", "", text)
    upper = _threshold_number("rollout_is_threshold", upper_text)
    lower = _threshold_number("rollout_is_threshold", lower_text) if lower_text else None
    if lower is not None and lower > upper:
        raise ValueError(f"AEMConfig.rollout_is_threshold: lower bound {lower} > upper bound {upper}")
    return upper, lower


def rollout_rs_bounds(rollout_rs: Any, spec: Any) -> dict:
    """verl's `rollout_rs` options and `rollout_rs_threshold` -> {option: (lower or None, upper)} in the options'
    order (duplicates dropped). One spec for all options or one per option, comma separated; a *_k1 option takes
    ratio bounds "lower_upper" (a single number u means 1/u_u), the others one upper bound."""
    if not isinstance(rollout_rs, str):
        raise TypeError(f"AEMConfig.rollout_rs must be a string of comma-separated options or None, got "
                        f"{type(rollout_rs).__name__}")
    options = list(dict.fromkeys(part.strip() for part in rollout_rs.split(",") if part.strip()))
    bad = [option for option in options if option not in ROLLOUT_RS_OPTIONS]
    if not options or bad:
        raise ValueError(f"AEMConfig.rollout_rs options must be among {ROLLOUT_RS_OPTIONS}, got {rollout_rs!r}")
    if spec is None:
        raise ValueError("AEMConfig.rollout_rs_threshold must be set when rollout_rs is")
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"AEMConfig.rollout_rs_threshold must be a number or a string, got {type(spec).__name__}")
    specs = [str(spec)] if not isinstance(spec, str) else [p.strip() for p in spec.split(",") if p.strip()]
    if len(specs) not in (1, len(options)):
        raise ValueError(f"AEMConfig.rollout_rs_threshold needs one threshold or one per rollout_rs option "
                         f"({len(options)}), got {len(specs)}")
    specs = specs * len(options) if len(specs) == 1 else specs
    bounds = {}
    for option, text in zip(options, specs):
        if option.endswith("k1"):
            lower_text, _, upper_text = text.partition("_") if "_" in text else ("", "", text)
            upper = _threshold_number("rollout_rs_threshold", upper_text)
            lower = _threshold_number("rollout_rs_threshold", lower_text) if lower_text else 1.0 / upper
            if lower > upper:
                raise ValueError(f"AEMConfig.rollout_rs_threshold for {option}: lower {lower} > upper {upper}")
            bounds[option] = (lower, upper)
        elif "_" in text:
            raise ValueError(f"AEMConfig.rollout_rs_threshold for {option} takes one upper bound, got {text!r}")
        else:
            bounds[option] = (None, _threshold_number("rollout_rs_threshold", text))
    return bounds
