"""The AEM-modulated clipped policy loss (AEM_SPEC.md sections 4-5) and its `nn.Module` wrapper.

Per trained token t of response r, with modulated advantage A~_t = w_r A_t (eq. 7):

    rho_t = exp(clamp(l_t - l_t^old, -20, 20))
    L_t   = max(-A~_t rho_t, -A~_t clip(rho_t, 1 - eps_low, 1 + eps_high))         (8)
    L_t   = min(L_t, -c A~_t)          when A~_t < 0 and the dual clip c is on
    loss  = agg(L) - entropy_coef * agg(h) + kl_coef * agg(KL(l, l^ref))

exactly as verl's `compute_policy_loss_vanilla` + `agg_loss` + `kl_penalty` compute it (the +-20 clamp of the
log-ratio and the k3 clamps included), so beta = 0 reproduces verl's actor loss. The log-probs and entropies
come from `LogprobsEntropyFunction`, so the backward is one section-6 pass over the logits whatever the
aggregation: autograd only carries O(N) per-token scalars down to it.

Single pass: when the backend has a single-pass kernel (`Backend.single_pass_loss`, decided in dispatch.py)
and the weights w_r do not depend on this forward, `_single_pass_loss` prepares the per-token A~_t and c_t
here, lets the kernel return l_t, h_t and the logits' gradient from one launch (`ops/aem_loss.py`), and
computes the loss value and metrics with the same functions as the two-pass path.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import torch

from . import _collectives as C
from . import _validation as V
from ._constants import KL_VALUE_CLAMP, LOG_RATIO_CLAMP
from .api import LogprobsEntropyFunction
from .config import LOSS_AGG_MODES as _AGG_MODES, AEMConfig
from .dispatch import BACKENDS, Backend, resolve_backend
from .modulation import _aem_weights, aem_metrics
from .packing import PackedBatch, pack_inputs
from .reductions import segment_count, segment_mean, segment_sum

__all__ = ["aem_policy_loss", "AEMLoss", "aggregate", "aggregation_weights", "kl_penalty", "ppo_token_loss"]


def _positive_number(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{name} must be a positive real number or a one-element tensor, got a tensor of "
                             f"shape {tuple(value.shape)}")
        value = value.item()  # one host sync; verl itself passes Python numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be None or a positive number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_global_batch_info(mode: str, dp_size: int = 1, batch_num_tokens=None, global_batch_size=None,
                            loss_scale_factor=None) -> Dict[str, object]:
    """Validate verl's global normalisers for `mode` and return them as verl's `global_batch_info` dict.

    dp_size: int >= 1. batch_num_tokens / global_batch_size / loss_scale_factor: None or a number > 0 (a
    one-element tensor is read with one host sync). As in verl's `agg_loss`, "token-mean" needs
    batch_num_tokens and the seq-mean modes need global_batch_size when dp_size > 1; unused ones are ignored.
    """
    if mode not in _AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {_AGG_MODES}, got {mode!r}")
    if isinstance(dp_size, bool) or not isinstance(dp_size, numbers.Integral):
        raise TypeError(f"dp_size must be an int >= 1, got {type(dp_size).__name__}")
    if dp_size < 1:
        raise ValueError(f"dp_size must be an int >= 1, got {dp_size}")
    info = {"dp_size": int(dp_size), "batch_num_tokens": _positive_number("batch_num_tokens", batch_num_tokens),
            "global_batch_size": _positive_number("global_batch_size", global_batch_size),
            "loss_scale_factor": _positive_number("loss_scale_factor", loss_scale_factor)}
    needed = "batch_num_tokens" if mode == "token-mean" else None if mode == "token-sum" else "global_batch_size"
    if dp_size > 1 and needed is not None and info[needed] is None:
        what = "trained tokens" if needed == "batch_num_tokens" else "non-empty responses"
        raise ValueError(f"{needed} (the number of {what} of the global batch, over all ranks and micro-batches) "
                         f"is required with loss_agg_mode={mode!r} when dp_size > 1 (dp_size={dp_size})")
    return info


def aggregation_weights(token_response: torch.Tensor, num_responses: int, mode: str,
                        horizon: Optional[int] = None, dtype: torch.dtype = torch.float32, *, dp_size: int = 1,
                        batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """Per-token weights c [N] such that verl 0.9.1's `agg_loss(v, mask, mode, dp_size, batch_num_tokens,
    global_batch_size, loss_scale_factor)` of a per-token quantity v is sum_t c_t v_t.

    Every aggregation mode is linear in the per-token values with weights that depend only on the masks and
    the global normalisers, which is what lets a fused kernel fold the aggregation into the per-token gradient
    scalars. With D = dp_size, N_g = batch_num_tokens (default: this batch's trained tokens), R_g =
    global_batch_size (default: this batch's non-empty responses R'), L_r the tokens of response r and S =
    loss_scale_factor (default `horizon`: the padded length T; in the packed form the longest response):
        token-mean               c_t = D / N_g
        token-sum                c_t = D
        seq-mean-token-sum       c_t = D / R_g
        seq-mean-token-sum-norm  c_t = D / (R_g S)
        seq-mean-token-mean      c_t = D / (R_g L_r)
    Each micro-batch (or rank) given the global N_g / R_g (and a fixed S) gets the share of the whole batch's
    loss its tokens carry, times D: summing over micro-batches and averaging over ranks (DDP/FSDP's gradient
    all-reduce) gives the whole batch's loss and gradient. Untrained tokens (token_response == -1) get 0.
    An empty batch gives all-zero weights (verl's 0 / 0 would be NaN). verl adds 1e-8 to L_r; with the boolean
    mask of its actor that sum is an fp32 one and rounds back to L_r for every L_r >= 1, so it is left out.
    """
    info = _check_global_batch_info(mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    dp_size = info["dp_size"]
    trained = token_response >= 0
    ones = trained.to(dtype)
    if mode == "token-sum":
        return ones * dp_size
    if mode == "token-mean":
        tokens = info["batch_num_tokens"]
        if tokens is None:
            tokens = trained.sum().clamp(min=1).to(dtype)
        return ones * (dp_size / tokens)
    counts = segment_count(token_response, num_responses)
    sequences = info["global_batch_size"]
    if sequences is None:
        sequences = (counts > 0).sum().clamp(min=1).to(dtype)
    if mode == "seq-mean-token-sum":
        return ones * (dp_size / sequences)
    if mode == "seq-mean-token-sum-norm":
        scale = info["loss_scale_factor"]
        if scale is None:
            scale = horizon if horizon is not None else (counts.max().clamp(min=1).to(dtype) if num_responses
                                                         else 1)
        return ones * (dp_size / (sequences * scale))
    # untrained tokens read the slot at index R (so that R = 0, a rank holding no response, works)
    slot = torch.where(trained, token_response, num_responses)
    length = torch.cat([counts.clamp(min=1), counts.new_ones(1)]).to(dtype)[slot]
    return ones * (dp_size / sequences) / length


def aggregate(values: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """sum_t c_t v_t over trained tokens (c from `aggregation_weights`; untrained values never leak NaN)."""
    return torch.where(token_weights != 0, values * token_weights, 0.0).sum()


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimators (Schulman): k1 = l - l_ref, k2 = (l - l_ref)^2 / 2,
    k3 = exp(l_ref - l) - (l_ref - l) - 1 with verl's clamps (log-ratio to +-20, result to +-10)."""
    if kl_type == "k1":
        return logprobs - ref_logprobs
    if kl_type == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kl_type == "k3":
        log_ratio = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (log_ratio.exp() - log_ratio - 1.0).clamp(-KL_VALUE_CLAMP, KL_VALUE_CLAMP)
    raise ValueError(f"kl_type must be 'k1', 'k2' or 'k3', got {kl_type!r}")


def ppo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   config: AEMConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token clipped surrogate L_t of eq. 8 and the per-token clip indicators (float 0/1)."""
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    loss = torch.maximum(unclipped, clipped)
    flags = {"clip": (clipped > unclipped).to(loss.dtype), "neg_log_ratio": -log_ratio.detach()}
    if config.dual_clip is not None:
        floor = -advantages * config.dual_clip
        flags["clip_lower"] = ((loss > floor) & (advantages < 0)).to(loss.dtype)
        loss = torch.where(advantages < 0, torch.minimum(floor, loss), loss)
    else:
        flags["clip_lower"] = torch.zeros_like(loss)
    return loss, flags


def _token_mean(values: torch.Tensor, trained: torch.Tensor, group=None) -> torch.Tensor:
    sums = torch.stack([torch.where(trained, values, 0.0).sum(), trained.sum().to(values.dtype)])
    sums = C.all_reduce(sums, "sum", group)  # over every rank's tokens with a process group
    return sums[0] / sums[1].clamp(min=1)


def _uncertainty(batch: PackedBatch, logprobs: torch.Tensor, entropy: torch.Tensor,
                 config: AEMConfig) -> torch.Tensor:
    """x_r: response entropy (eq. 3') or surprisal (eq. 3) of the current or the old policy, detached."""
    if config.uncertainty == "entropy":
        source = entropy.detach() if config.surprisal_source == "current" else batch.old_entropy
        needed = "old_entropy"
    else:
        source = -logprobs.detach() if config.surprisal_source == "current" else (
            -batch.old_logprobs if batch.old_logprobs is not None else None)
        needed = "old_logprobs"
    if source is None:
        raise ValueError(f'surprisal_source="old" with uncertainty="{config.uncertainty}" needs `{needed}`')
    reduce = segment_mean if config.surprisal_reduction == "mean" else segment_sum
    return reduce(source.to(entropy.dtype), batch.token_response, batch.num_responses)


def _loss_batch(logits: torch.Tensor, labels, advantages, config: AEMConfig, *, num_groups, dp_size,
                batch_num_tokens, global_batch_size, loss_scale_factor, process_group, **forms) -> PackedBatch:
    """The checked, packed batch of a loss call (`aem_policy_loss` and its fused-linear twin): input forms,
    verl's global normalisers, the process group's shared statistics and the KL check. `logits` may be a
    stand-in of the logits' shape, dtype and device (the fused-linear loss never builds them)."""
    global_batch_info = _check_global_batch_info(config.loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
                                                loss_scale_factor)
    group = C.resolve_group(process_group, "process_group", none_is_default=False)
    batch = pack_inputs(logits, labels, advantages, ignore_index=config.ignore_index, num_groups=num_groups,
                        **forms)
    batch.global_batch_info = global_batch_info
    if group is not None:
        _share_over_ranks(batch, group, num_groups is None, dp_size == 1)
    if config.kl_coef > 0 and batch.ref_logprobs is None:
        raise ValueError("config.kl_coef > 0 needs `ref_logprobs`")
    return batch


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
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """AEM-modulated PPO/GRPO loss from logits (sections 4-5). See `packing.py` for the input forms.

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
        single_pass: loss terms and gradient from one Triton launch (`ops/aem_loss.py`), possible when the
            modulation weights do not depend on this forward (surprisal_source="old", or beta = 0). None: use
            it whenever it applies on the Triton backend; True: require it (ValueError saying why it cannot
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

    Returns:
        (loss 0-d, metrics) where metrics holds detached 0-d tensors: actor/pg_loss, actor/pg_clipfrac,
        actor/ppo_kl, actor/pg_clipfrac_lower, actor/entropy, actor/kl_loss (when kl_coef > 0), the aem/* stats
        of `modulate_advantages`, and "aem/weights" [R].
    """
    config = V.check_config(config)
    logits = V.check_logits(logits)
    batch = _loss_batch(logits, labels, advantages, config, token_response=token_response,
                        response_group=response_group, response_mask=response_mask, turn_ids=turn_ids,
                        old_logprobs=old_logprobs, old_entropy=old_entropy, ref_logprobs=ref_logprobs,
                        advantage_level=advantage_level, num_groups=num_groups, dp_size=dp_size,
                        batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                        loss_scale_factor=loss_scale_factor, process_group=process_group)
    be = resolve_backend(backend, logits.device, logits.dtype)
    single_pass = V.check_optional_bool("single_pass", single_pass)
    if single_pass is not False:
        reason = _single_pass_unavailable(config, be, batch)
        if reason is None:
            return _single_pass_loss(logits, batch, config, be, inplace_backward)
        if single_pass:
            raise ValueError(f"single_pass=True cannot apply: {reason}")
    logprobs, entropy = LogprobsEntropyFunction.apply(logits, batch.labels, config.temperature, config.ignore_index,
                                                      be, inplace_backward)
    logprobs, entropy = logprobs.reshape(-1), entropy.reshape(-1)
    return _loss_from_token_terms(batch, logprobs, entropy, config)


def _share_over_ranks(batch: PackedBatch, group, infer_groups: bool, infer_dp_size: bool) -> None:
    """Whole-batch G and verl normalisers over the ranks of `group` (one MAX and one SUM all_reduce of two
    numbers, one host sync); values the caller passed are kept."""
    counts = segment_count(batch.token_response, batch.num_responses)
    longest = counts.max() if batch.num_responses else counts.new_zeros(())
    horizon = longest if batch.horizon is None else counts.new_tensor(batch.horizon)
    maxima = C.all_reduce(torch.stack([counts.new_tensor(batch.num_groups), horizon]), "max", group)
    sums = C.all_reduce(torch.stack([counts.sum(), (counts > 0).sum()]), "sum", group)
    (groups, horizon), (tokens, sequences) = maxima.tolist(), sums.tolist()
    info = batch.global_batch_info
    if infer_groups:
        batch.num_groups = groups
    if infer_dp_size:
        info["dp_size"] = C.group_size(group)
    # an empty global batch has all-zero token weights; 1 keeps the normalisers valid
    defaults = {"batch_num_tokens": tokens, "global_batch_size": sequences, "loss_scale_factor": horizon}
    for name, value in defaults.items():
        if info.get(name) is None:
            info[name] = float(max(value, 1))
    batch.process_group = group


def _global_value(value: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """A loss term's whole-batch value: this rank's share summed over the ranks / dp_size (itself alone)."""
    if batch.process_group is None:
        return value.detach()
    return C.all_reduce(value.detach().clone().reshape(1), "sum", batch.process_group)[0] / \
        batch.global_batch_info["dp_size"]


def _modulated_token_advantages(batch: PackedBatch, x: torch.Tensor, config: AEMConfig, dtype: torch.dtype):
    """A~_t = w_r A_t (eq. 7) per token, from the response uncertainty x [R]. Returns (token_adv [N],
    response_adv [R], weights [R], u [R], clipped [R], valid [R])."""
    tr, num_responses = batch.token_response, batch.num_responses
    valid = segment_count(tr, num_responses) > 0
    weights, u, clipped = _aem_weights(x, batch.response_group, config, batch.num_groups, valid,
                                       batch.process_group)
    weights = weights.to(dtype)
    # untrained tokens read a zero slot at index R, so a batch without responses (a data-parallel rank
    # holding none) works too
    safe_tr = torch.where(tr >= 0, tr, num_responses)
    padded = (lambda per_response: torch.cat([per_response, per_response.new_zeros(1)]))  # noqa: E731
    if batch.token_level:
        token_adv = batch.advantages.to(dtype) * padded(weights)[safe_tr]
        response_adv = segment_mean(batch.advantages.to(dtype), tr, num_responses)
    else:
        response_adv = batch.advantages.to(dtype)
        token_adv = padded(weights * response_adv)[safe_tr]
    token_adv = torch.where(tr >= 0, token_adv, 0.0)
    return token_adv, response_adv, weights, u, clipped, valid


def _single_pass_unavailable(config: AEMConfig, backend: Backend, batch: PackedBatch) -> Optional[str]:
    """Why the single-pass kernel cannot serve this call (None when it can). Whether the backend has one (for
    this device and dtype) was decided by dispatch.py; what is checked here is the loss's own condition."""
    if backend.single_pass_loss is None:
        return (f'the single-pass loss is a Triton kernel and the backend resolved to "{backend.name}" (fp64 '
                'logits, which the Triton kernels do not serve, always take the two-pass path)')
    return _weights_unknown_before_forward(config, batch)


def _weights_unknown_before_forward(config: AEMConfig, batch: PackedBatch) -> Optional[str]:
    """None when the modulation weights w_r (eq. 7) are known before the forward, so that every token's loss
    derivative is row-local (what a single pass needs); else why not."""
    if config.surprisal_source == "current" and config.beta != 0:
        return ("the modulation weights depend on this forward's own entropies/log-probs "
                '(surprisal_source="current" with beta != 0), known only after every row is reduced; use '
                'surprisal_source="old" (with old_entropy or old_logprobs) or beta=0')
    if config.surprisal_source == "old":
        needed = "old_entropy" if config.uncertainty == "entropy" else "old_logprobs"
        if getattr(batch, needed) is None:
            return f'surprisal_source="old" with uncertainty="{config.uncertainty}" needs `{needed}`'
    return None


def _single_pass_token_terms(batch: PackedBatch, config: AEMConfig, dtype: torch.dtype):
    """(A~_t [N], c_t [N]): the modulated advantages and aggregation weights of a single-pass call, known before
    the forward (`_weights_unknown_before_forward` is None)."""
    placeholder = torch.zeros(batch.token_response.shape[0], dtype=dtype, device=batch.token_response.device)
    # With surprisal_source="old" x_r comes from the batch; with beta = 0 the weights ignore x entirely.
    x = _uncertainty(batch, placeholder, placeholder, config)
    token_adv = _modulated_token_advantages(batch, x, config, dtype)[0]
    token_weights = aggregation_weights(batch.token_response, batch.num_responses, config.loss_agg_mode,
                                        batch.horizon, dtype, **batch.global_batch_info)
    return token_adv, token_weights


def _row_local_loss_grads(batch: PackedBatch, config: AEMConfig, token_adv: torch.Tensor,
                          token_weights: torch.Tensor):
    """token_grads(index, l, h) -> (dL/dl, dL/dh | None) for the tokens at `index`: the loss of
    `_loss_from_token_terms` differentiated token by token (autograd over the same functions, on O(n)
    vectors), for paths that finish the gradient in the forward (the fused-linear single pass)."""
    old, ref = batch.old_logprobs, batch.ref_logprobs

    def token_grads(index: torch.Tensor, logprobs: torch.Tensor, entropy: torch.Tensor):
        with torch.enable_grad():
            lp = logprobs.detach().requires_grad_()
            weights, adv = token_weights[index].to(lp.dtype), token_adv[index].to(lp.dtype)
            old_lp = old[index].to(lp.dtype) if old is not None else lp.detach()
            total = aggregate(ppo_token_loss(lp, old_lp, adv, config)[0], weights)
            if config.kl_coef > 0:
                total = total + config.kl_coef * aggregate(kl_penalty(lp, ref[index].to(lp.dtype), config.kl_type),
                                                           weights)
            (grad_lp,) = torch.autograd.grad(total, [lp])
        # d/dh of -entropy_coef * agg(h): constant per token
        grad_ent = (-config.entropy_coef * weights) if config.entropy_coef != 0 else None
        return grad_lp, grad_ent

    return token_grads


def _single_pass_loss(logits: torch.Tensor, batch: PackedBatch, config: AEMConfig, backend: Backend,
                      inplace_backward: bool) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The single-pass path for a packed batch (see the module docstring). The token scalars, the loss value
    and the metrics come from this module's own functions, so they match the two-pass path by construction;
    only the kernel is different."""
    token_adv, token_weights = _single_pass_token_terms(batch, config, torch.float32)
    kernel = backend.single_pass_loss
    logprobs, entropy, grad = kernel.terms(
        logits, batch.labels, token_adv, token_weights, batch.old_logprobs, batch.ref_logprobs,
        temperature=config.temperature, ignore_index=config.ignore_index, clip_low=config.clip_low,
        clip_high=config.clip_high, dual_clip=config.dual_clip, entropy_coef=config.entropy_coef,
        kl_coef=config.kl_coef, kl_type=config.kl_type, inplace_backward=inplace_backward)
    with torch.no_grad():
        loss, metrics = _loss_from_token_terms(batch, logprobs, entropy, config)
    if grad is not None:
        loss = kernel.attach_gradient(loss, logits, grad)
    return loss, metrics


def _loss_from_token_terms(batch: PackedBatch, logprobs: torch.Tensor, entropy: torch.Tensor,
                           config: AEMConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    tr, num_responses = batch.token_response, batch.num_responses
    trained = tr >= 0
    dtype = logprobs.dtype

    x = _uncertainty(batch, logprobs, entropy, config)
    token_adv, response_adv, weights, u, clipped, valid = _modulated_token_advantages(batch, x, config, dtype)

    old = batch.old_logprobs.to(dtype) if batch.old_logprobs is not None else logprobs.detach()
    pg, flags = ppo_token_loss(logprobs, old, token_adv, config)
    token_weights = aggregation_weights(tr, num_responses, config.loss_agg_mode, batch.horizon, dtype,
                                        **batch.global_batch_info)
    agg = lambda values: aggregate(values, token_weights)  # noqa: E731
    pg_loss = agg(pg)
    loss = pg_loss
    entropy_agg = agg(entropy)
    if config.entropy_coef != 0:
        loss = loss - config.entropy_coef * entropy_agg
    group = batch.process_group
    metrics: Dict[str, torch.Tensor] = {
        "actor/pg_loss": _global_value(pg_loss, batch),
        "actor/pg_clipfrac": _token_mean(flags["clip"], trained, group),
        "actor/ppo_kl": _token_mean(flags["neg_log_ratio"], trained, group),
        "actor/pg_clipfrac_lower": _token_mean(flags["clip_lower"], trained, group),
        "actor/entropy": _global_value(entropy_agg, batch),
    }
    if config.kl_coef > 0:
        kl_loss = agg(kl_penalty(logprobs, batch.ref_logprobs.to(dtype), config.kl_type))
        loss = loss + config.kl_coef * kl_loss
        metrics["actor/kl_loss"] = _global_value(kl_loss, batch)
    metrics.update(aem_metrics(x, u, weights, clipped, response_adv, weights * response_adv, batch.response_group,
                               batch.num_groups, valid, group))
    metrics["aem/weights"] = weights.detach()
    return loss, metrics


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
