"""Input forms of `aem_policy_loss`: the canonical packed form, and the padded forms converted to it.

Packed (canonical): logits [..., V], labels logits.shape[:-1], `token_response` of labels' shape mapping each
token to its response (-1: not trained), `response_group` [R]. Advantages are per response [R] or per token
(labels' shape).

Padded, one response per row: logits [B, T, V], labels [B, T], `response_mask` [B, T] (response b is row b),
`response_group` [B], advantages [B] or [B, T].

Padded, turn-level responses: `turn_ids` [B, T] with the turn index k >= 0 of each model-generated token of
row b and -1 elsewhere (prompt, environment observations, padding). Turn (b, k) becomes response
offset_b + k, with offset_b = sum_{b' < b} (max_k of row b' + 1); all turns inherit their row's group from
`response_group` [B] (the trajectories of one task instance form the group). Advantages are per trajectory
[B] (shared by its turns), per turn [R], or per token [B, T].

Only the O(N) maps are built; the logits are never copied (see `aem_kernels.layout`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch

from .. import validation as V
from ..config import TRL_LOSS_MODES, AEMConfig
from ..ops.policy_loss import mode_aggregation
from .aggregation import GlobalBatch

__all__ = ["PackedBatch", "check_correction_inputs", "check_loss_keywords", "loss_batch", "pack_inputs",
           "rollout_corrections_on", "turn_ids_to_token_response"]


@dataclass
class PackedBatch:
    labels: torch.Tensor            # logits.shape[:-1], untrained tokens set to ignore_index
    token_response: torch.Tensor    # [N] int64, -1 for untrained tokens (incl. ignore_index labels)
    response_group: torch.Tensor    # [R] int64
    num_groups: int
    advantages: torch.Tensor        # [R] (response level) or [N] (token level)
    token_level: bool
    old_logprobs: Optional[torch.Tensor]   # [N] or None
    old_entropy: Optional[torch.Tensor]
    ref_logprobs: Optional[torch.Tensor]
    horizon: Optional[int]          # normaliser of "seq-mean-token-sum-norm" (None: longest response)
    # verl's global normalisers and the process group of the statistics (default: this batch alone)
    global_batch: GlobalBatch = GlobalBatch()
    # the inference engine's log-probs [N] (verl's rollout_log_probs, TRL's sampling_per_token_logps), read
    # only by the rollout corrections (`corrections.py`)
    rollout_logprobs: Optional[torch.Tensor] = None

    @property
    def num_responses(self) -> int:
        return self.response_group.shape[0]

    @property
    def process_group(self):
        return self.global_batch.process_group

    def token_weights(self, mode: str, dtype: torch.dtype) -> torch.Tensor:
        """The aggregation weights c_t [N] of `mode` for this batch (`GlobalBatch.token_weights`)."""
        return self.global_batch.token_weights(self.token_response, self.num_responses, mode, self.horizon, dtype)


def turn_ids_to_token_response(turn_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] turn ids (-1: none) -> (token_response [B, T] int64, turns per row [B] int64).

    Row b's turn k becomes response offset_b + k with offset_b = sum of the turns of the rows before it; a turn
    id that never occurs below a row's largest (e.g. 0 and 2 but no 1) is an empty response.
    """
    turn_ids = V.check_tensor("turn_ids", turn_ids)
    if turn_ids.dim() != 2:
        raise ValueError(f"turn_ids must have shape [B, T], got {tuple(turn_ids.shape)}")
    turn_ids = V.check_index_map("turn_ids", turn_ids, None, turn_ids.device, upper=None, allow_untrained=True)
    return _turn_ids_to_token_response(turn_ids)


def _turn_ids_to_token_response(turn_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    turns_per_row = (turn_ids.max(dim=1).values + 1).clamp(min=0) if turn_ids.shape[1] else \
        turn_ids.new_zeros(turn_ids.shape[0])
    offsets = torch.cumsum(turns_per_row, 0) - turns_per_row
    token_response = torch.where(turn_ids >= 0, offsets.unsqueeze(1) + turn_ids, -1)
    return token_response.long(), turns_per_row.long()


def _per_token(name: str, value: Optional[torch.Tensor], shape, device) -> Optional[torch.Tensor]:
    if value is None:
        return None
    return V.check_float_tensor(name, value, shape, device).reshape(-1)


def _check_response_count(token_response: torch.Tensor, num_responses: int) -> None:
    """response_group must have an entry for every response token_response names (packed form). Checked after
    token_response's own range (values >= -1), so that a short response_group is reported as such rather than as
    a token_response out of range."""
    if token_response.numel() and V.value_checks_enabled(token_response):
        largest = int(token_response.max())
        if largest >= num_responses:
            raise ValueError(f"response_group must have one group id per response: token_response refers to "
                             f"response {largest}, so response_group needs at least {largest + 1} entries, got "
                             f"{num_responses} (or token_response must have values in [-1, {num_responses}))")


def pack_inputs(logits: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor, *,
                token_response: Optional[torch.Tensor], response_group: torch.Tensor,
                response_mask: Optional[torch.Tensor], turn_ids: Optional[torch.Tensor],
                old_logprobs: Optional[torch.Tensor], old_entropy: Optional[torch.Tensor],
                ref_logprobs: Optional[torch.Tensor], ignore_index: int, advantage_level: str,
                num_groups: Optional[int], rollout_logprobs: Optional[torch.Tensor] = None) -> PackedBatch:
    """Validate every argument and convert any accepted form to the packed form."""
    device = logits.device
    token_shape = logits.shape[:-1]
    # int64 at once: `torch.where(trained, labels, ignore_index)` below must not wrap ignore_index into a narrow
    # integer dtype (uint8 labels: -100 -> 156)
    labels = V.check_integer_tensor("labels", labels, token_shape, device, "logits.shape[:-1]").long()
    forms = [name for name, value in (("token_response", token_response), ("response_mask", response_mask),
                                      ("turn_ids", turn_ids)) if value is not None]
    if len(forms) != 1:
        raise ValueError("pass exactly one of token_response (packed form), response_mask or turn_ids "
                         f"(padded forms); got {forms or 'none'}")
    V.check_choice("advantage_level", advantage_level, ("auto", "response", "token"))
    advantages = V.check_tensor("advantages", advantages)
    horizon = None
    if token_response is not None:
        response_group = V.check_integer_tensor("response_group", response_group, None, device, "[R]")
        if response_group.dim() != 1:
            raise ValueError(f"response_group must have shape [R], got {tuple(response_group.shape)}")
        num_responses = response_group.shape[0]
        token_response = V.check_index_map("token_response", token_response, token_shape, device,
                                           upper=None, allow_untrained=True)
        _check_response_count(token_response, num_responses)
    else:
        if logits.dim() != 3:
            raise ValueError(f"the padded form needs logits of shape [B, T, V], got {tuple(logits.shape)}")
        rows, horizon = token_shape
        response_group = V.check_integer_tensor("response_group", response_group, (rows,), device,
                                                "[B], the group of each row")
        if response_mask is not None:
            response_mask = V.check_mask("response_mask", response_mask, token_shape, device)
            row_ids = torch.arange(rows, device=device).unsqueeze(1).expand(rows, horizon)
            token_response = torch.where(response_mask, row_ids, -1)
        else:
            turn_ids = V.check_index_map("turn_ids", turn_ids, token_shape, device, upper=None,
                                         allow_untrained=True)
            token_response, turns_per_row = _turn_ids_to_token_response(turn_ids)
            if advantages.dim() == 1 and advantages.shape[0] == rows:
                # the trajectory's advantage is shared by its turns, its group likewise
                advantages = V.check_float_tensor("advantages", advantages, (rows,), device)
                advantages = torch.repeat_interleave(advantages, turns_per_row)
            response_group = torch.repeat_interleave(response_group, turns_per_row)
        num_responses = response_group.shape[0]
    response_group = V.check_index_map("response_group", response_group, (num_responses,), device,
                                       upper=num_groups, allow_untrained=False)
    groups = V.check_count("num_groups", num_groups) if num_groups is not None else \
        (int(response_group.max()) + 1 if num_responses else 0)

    # Untrained tokens get ignore_index so that no backend spends a read of their logits row.
    trained = (token_response >= 0) & (labels != ignore_index)
    labels = torch.where(trained, labels, ignore_index)
    labels = V.check_labels(labels, logits, ignore_index)
    token_response = torch.where(trained, token_response, -1).reshape(-1)

    n_tokens = token_response.shape[0]
    advantages, token_level = _advantage_level(advantages, token_shape, n_tokens, num_responses, advantage_level,
                                               device)
    return PackedBatch(
        labels=labels, token_response=token_response, response_group=response_group, num_groups=groups,
        advantages=advantages, token_level=token_level,
        old_logprobs=_per_token("old_logprobs", old_logprobs, token_shape, device),
        old_entropy=_per_token("old_entropy", old_entropy, token_shape, device),
        ref_logprobs=_per_token("ref_logprobs", ref_logprobs, token_shape, device),
        horizon=horizon,
        rollout_logprobs=_per_token("rollout_logprobs", rollout_logprobs, token_shape, device),
    )


def _advantage_level(advantages: torch.Tensor, token_shape, n_tokens: int, num_responses: int, level: str,
                     device) -> tuple[torch.Tensor, bool]:
    as_tokens = tuple(advantages.shape) == tuple(token_shape) or (advantages.dim() == 1 and
                                                                  advantages.shape[0] == n_tokens)
    as_responses = advantages.dim() == 1 and advantages.shape[0] == num_responses
    if level == "auto":
        if as_tokens and as_responses and n_tokens != 0:
            raise ValueError(f"advantages of shape {tuple(advantages.shape)} fit both the {n_tokens} tokens and the "
                             f"{num_responses} responses; pass advantage_level='token' or 'response'")
        level = "token" if as_tokens else "response" if as_responses else "none"
    if level == "token" and as_tokens:
        return V.check_float_tensor("advantages", advantages, advantages.shape, device).reshape(-1), True
    if level == "response" and as_responses:
        return V.check_float_tensor("advantages", advantages, (num_responses,), device), False
    raise ValueError(f"advantages must have shape [R]=({num_responses},) (one per response) or the labels' shape "
                     f"{tuple(token_shape)} (one per token), got {tuple(advantages.shape)}")


def loss_batch(logits: torch.Tensor, labels, advantages, config: AEMConfig, *, response_group,
               token_response=None, old_logprobs=None, old_entropy=None, ref_logprobs=None, response_mask=None,
               turn_ids=None, advantage_level: str = "auto", num_groups=None, dp_size: int = 1,
               batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None,
               process_group=None, rollout_logprobs=None) -> PackedBatch:
    """The checked, packed batch of a loss call (the keywords of `aem_policy_loss`; `logits` may be a stand-in
    of the logits' shape and device, as the fused-linear loss never builds them): input forms, verl's global
    normalisers, the process group's shared statistics, the KL check and the rollout corrections' inputs.

    `rollout_logprobs` (labels' shape) is read only when a rollout correction is on (config.rollout_is,
    rollout_rs or vllm_importance_sampling_mode); with every correction off it is checked and then ignored, as
    verl ignores its batch's rollout_log_probs without a rollout-correction config."""
    # the normalisers of the aggregation loss_agg_mode names (entropy and KL terms); under TRL's loss types
    # every term aggregates as the type does. (A verl mode that fixes its own policy aggregation, sapo, has
    # its normaliser checked with the policy term, `terms.py`.)
    checked_mode = mode_aggregation(config)[0] if config.loss_mode in TRL_LOSS_MODES else config.loss_agg_mode
    global_batch = GlobalBatch.checked(checked_mode, dp_size, batch_num_tokens, global_batch_size,
                                       loss_scale_factor, process_group)
    batch = pack_inputs(logits, labels, advantages, token_response=token_response, response_group=response_group,
                        response_mask=response_mask, turn_ids=turn_ids, old_logprobs=old_logprobs,
                        old_entropy=old_entropy, ref_logprobs=ref_logprobs, ignore_index=config.ignore_index,
                        advantage_level=advantage_level, num_groups=num_groups, rollout_logprobs=rollout_logprobs)
    if global_batch.process_group is not None:
        global_batch, groups = global_batch.over_ranks(batch.token_response, batch.num_responses, batch.num_groups,
                                                       batch.horizon, infer_dp_size=dp_size == 1)
        if num_groups is None:
            batch.num_groups = groups
    batch.global_batch = global_batch
    if config.kl_coef > 0 and batch.ref_logprobs is None:
        raise ValueError("config.kl_coef > 0 needs `ref_logprobs`")
    check_correction_inputs(batch, config)
    return batch


def rollout_corrections_on(config: AEMConfig) -> bool:
    """Whether a rollout correction (verl's rollout_is / rollout_rs, TRL's vLLM IS mode) is switched on."""
    return (config.rollout_is is not None or config.rollout_rs is not None
            or config.vllm_importance_sampling_mode is not None)


def check_correction_inputs(batch: PackedBatch, config: AEMConfig) -> None:
    """The corrections compare the trainer's old log-probs with the inference engine's: both are needed (the
    old ones too, as in verl's decoupled mode and TRL, so that the weights are known before the forward)."""
    if not rollout_corrections_on(config):
        return
    options = ", ".join(f"{name}={getattr(config, name)!r}" for name in
                        ("rollout_is", "rollout_rs", "vllm_importance_sampling_mode") if getattr(config, name))
    for name in ("rollout_logprobs", "old_logprobs"):
        if getattr(batch, name) is None:
            raise ValueError(f"config.{options} needs `{name}` (labels' shape): the corrections compare the "
                             "trainer's old log-probs with the inference engine's")


def check_loss_keywords(keywords: dict) -> None:
    """TypeError naming a keyword that is not one of `aem_policy_loss`'s batch keywords (those of `loss_batch`)."""
    accepted = [name for name, parameter in inspect.signature(loss_batch).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(keywords) - set(accepted))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the loss takes {sorted(accepted)}")
