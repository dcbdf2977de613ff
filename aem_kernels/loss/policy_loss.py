"""The AEM-modulated clipped policy loss from logits (AEM_SPEC sections 4-5) and its `nn.Module` wrapper.

The loss equals verl's `compute_policy_loss_vanilla` + `agg_loss` + `kl_penalty` combination (the +-20 clamp of
the log-ratio and the k3 clamps included), so beta = 0 reproduces verl's actor loss. The log-probs and
entropies come from `LogprobsEntropyFunction`, so the backward is one section-6 pass over the logits whatever
the aggregation: autograd only carries O(N) per-token scalars down to it (`terms.py`). When the backend is
Triton and the weights w_r do not depend on this forward, the single pass (`single_pass.py`) gives the loss
and the logits' gradient from one launch.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import validation as V
from ..config import AEMConfig
from ..contract import check_inplace_backward
from ..ops.logprobs import BACKENDS, LogprobsEntropyFunction, resolve_backend
from .inputs import loss_batch
from .single_pass import logits_single_pass_loss, logits_single_pass_unavailable
from .terms import loss_from_token_terms

__all__ = ["AEMLoss", "aem_policy_loss"]


def aem_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    *,
    token_response: Optional[torch.Tensor] = None,
    response_group: torch.Tensor,
    old_logprobs: Optional[torch.Tensor] = None,
    old_entropy: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    config: AEMConfig = AEMConfig(),
    backend: str = "auto",
    response_mask: Optional[torch.Tensor] = None,
    turn_ids: Optional[torch.Tensor] = None,
    advantage_level: str = "auto",
    num_groups: Optional[int] = None,
    inplace_backward: bool = False,
    single_pass: Optional[bool] = None,
    dp_size: int = 1,
    batch_num_tokens: Optional[float] = None,
    global_batch_size: Optional[float] = None,
    loss_scale_factor: Optional[float] = None,
    process_group=None,
    rollout_logprobs: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """AEM-modulated PPO/GRPO loss from logits (sections 4-5). See `inputs.py` for the input forms.

    Args:
        logits: [..., V] (packed) or [B, T, V] (padded), fp32/bf16/fp16/fp64, unit vocab stride.
        labels: logits.shape[:-1], integer; untrained positions may hold anything.
        advantages: [R] per response, or labels' shape per token (padded turn form: also [B] per trajectory).
        token_response: labels' shape, int, response of each token or -1 (packed form).
        response_group: [R] (packed) or [B] (padded) int group ids >= 0.
        old_logprobs: labels' shape; the rollout policy's log-probs (default: this forward's, detached: rho = 1).
        old_entropy: labels' shape; needed for surprisal_source="old" with uncertainty="entropy".
        ref_logprobs: labels' shape; needed when config.kl_coef > 0.
        config: `AEMConfig`; its temperature and ignore_index apply to the logits.
        backend: "auto", "triton", "cpu", "torch".
        response_mask / turn_ids: [B, T] padded forms (instead of token_response).
        advantage_level: "auto", "response" or "token" (needed only when R == N makes the shape ambiguous).
        num_groups: G (default max group id + 1, one host sync).
        inplace_backward: write the logits' gradient into the logits' storage.
        single_pass: loss terms and gradient from one Triton launch (`ops/policy_loss/triton.py`), possible
            when the modulation weights do not depend on this forward (surprisal_source="old", or beta = 0)
            and config.loss_mode is "vanilla" or "bypass_mode" (the kernel's loss; every other mode takes two
            passes here, README "Policy-loss modes"). None: use it whenever it applies on the Triton backend; True: require it (ValueError saying why it cannot
            apply); False: the two-pass path. Loss and metrics are the same either way; with
            inplace_backward the gradient overwrites the logits already in the forward.
        dp_size, batch_num_tokens, global_batch_size, loss_scale_factor: verl 0.9.1's global normalisers of
            `agg_loss` (see `aggregation_weights`), for a batch that is one micro-batch or one data-parallel
            rank's share of the global batch: the data-parallel size, the global batch's trained tokens and
            non-empty responses, and the divisor of "seq-mean-token-sum-norm" (default: the padded length T;
            packed form: the longest response). Given the global counts, the micro-batch losses summed and the
            ranks' gradients averaged equal the whole batch's. The loss, actor/pg_loss, actor/entropy and
            actor/kl_loss carry these weights (per-micro-batch shares, to be summed as verl's metrics are);
            the clip fractions and ppo_kl stay means over this call's tokens, as in verl.
        process_group: None: everything is computed from this call's batch. A torch.distributed ProcessGroup
            (the data-parallel group): each rank passes its own responses (token_response indexes them) with
            GLOBAL group ids; the AEM statistics and weights use every rank's responses (see
            `modulate_advantages`), num_groups defaults to the maximum over the ranks, and verl's normalisers
            default to the whole batch over the ranks (dp_size = group size, batch_num_tokens and
            global_batch_size all-reduced, the seq-mean-token-sum-norm divisor the ranks' largest): averaging the
            ranks' gradients (DDP/FSDP) gives exactly the whole batch's gradient in every loss_agg_mode.
            Normalisers passed explicitly are kept (e.g. counts over several micro-batches; dp_size=1, the
            default, stands for the group size). Every metric is
            then the whole batch's (actor/pg_loss etc. summed over the ranks / dp_size); "aem/weights" holds
            this rank's [R]. For rank-local statistics with a global normalisation, pass process_group=None and
            the normalisers yourself.
        rollout_logprobs: labels' shape; the inference engine's log-probs of the sampled tokens (verl's
            rollout_log_probs, TRL's sampling_per_token_logps), finite. Needed (with old_logprobs) when a rollout
            correction is on: config.rollout_is / rollout_rs (verl's rollout correction) or
            config.vllm_importance_sampling_mode (TRL's); see `loss.corrections.apply_rollout_corrections`.
            With every correction off it is checked and ignored (as verl ignores rollout_log_probs then).

    Returns:
        (loss 0-d, metrics) where metrics holds detached 0-d tensors: actor/pg_loss, actor/pg_clipfrac,
        actor/ppo_kl, actor/pg_clipfrac_lower, actor/entropy, actor/kl_loss (when kl_coef > 0), the aem/* stats
        of `modulate_advantages`, and "aem/weights" [R].
    """
    config = V.check_config(config)
    logits = V.check_logits(logits)
    inplace_backward = check_inplace_backward(logits, inplace_backward)
    batch = loss_batch(logits, labels, advantages, config, token_response=token_response,
                        response_group=response_group, response_mask=response_mask, turn_ids=turn_ids,
                        old_logprobs=old_logprobs, old_entropy=old_entropy, ref_logprobs=ref_logprobs,
                        advantage_level=advantage_level, num_groups=num_groups, dp_size=dp_size,
                        batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                        loss_scale_factor=loss_scale_factor, process_group=process_group,
                        rollout_logprobs=rollout_logprobs)
    be = resolve_backend(backend, logits.device, logits.dtype)
    single_pass = V.check_optional_bool("single_pass", single_pass)
    if single_pass is not False:
        reason = logits_single_pass_unavailable(config, be.name, batch)
        if reason is None:
            return logits_single_pass_loss(logits, batch, config, inplace_backward)
        if single_pass:
            raise ValueError(f"single_pass=True cannot apply: {reason}")
    logprobs, entropy = LogprobsEntropyFunction.apply(logits, batch.labels, config.temperature, config.ignore_index,
                                                      be, inplace_backward)
    logprobs, entropy = logprobs.reshape(-1), entropy.reshape(-1)
    return loss_from_token_terms(batch, logprobs, entropy, config)


class AEMLoss(torch.nn.Module):
    """`aem_policy_loss` with a fixed `AEMConfig`: `loss, metrics = AEMLoss(cfg)(logits, labels, adv, ...)`."""

    def __init__(self, config: AEMConfig = AEMConfig(), backend: str = "auto") -> None:
        super().__init__()
        self.config = V.check_config(config)
        self.backend = V.check_choice("backend", backend, BACKENDS)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor, *, dp_size: int = 1,
                batch_num_tokens: Optional[float] = None, global_batch_size: Optional[float] = None,
                loss_scale_factor: Optional[float] = None,
                **kwargs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """`aem_policy_loss` with this module's config and backend; every other keyword passes through."""
        return aem_policy_loss(logits, labels, advantages, config=self.config, backend=self.backend,
                               dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                               global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor, **kwargs)

    def extra_repr(self) -> str:
        return f"config={self.config}, backend={self.backend!r}"
