"""Causal language models (transformers' Llama / Qwen2 / Mistral-style `*ForCausalLM`) straight to per-token
log-probs, entropies and the AEM loss, without their logits: the backbone (`model.model`, or
`model.get_decoder()`) runs to the last hidden states and its LM head (`model.get_output_embeddings()`,
the embedding matrix itself when the embeddings are tied) goes through the fused linear op, so the
[B, T, V] logits never exist. `model(...)` is never called (it would build them).

Alignment: position t predicts token t+1. Without `labels` the outputs are [B, T-1]: entry t is
log p(input_ids[:, t+1] | input_ids[:, :t+1]), from the hidden state at position t; targets that are padding
(attention_mask[:, t+1] == 0) are ignored (0, no gradient). With `labels`, their shape says which alignment
they use: [B, T-1] are already shifted (labels[:, t] is predicted at position t < T-1, as `input_ids[:, 1:]`);
[B, T] are per position (labels[:, t] is predicted at position t, as Hugging Face's labels after their
internal shift would be: pass `labels[:, 1:]` of HF-style labels instead). Entries equal to ignore_index are
skipped.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .loss import fused_linear_aem_policy_loss
from .ops.fused_linear import fused_linear_logprobs_and_entropy

__all__ = ["causal_lm_logprobs_and_entropy", "causal_lm_aem_policy_loss", "causal_lm_hidden_and_head"]


def _head(model: torch.nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"model must be a causal LM with an LM head (get_output_embeddings() returning a linear "
                        f"layer), got {type(model).__name__}")
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"model.config.{name}={value} transforms the logits after the LM head; the fused "
                             "path computes plain hidden @ weight.T + bias logits only")
    return head.weight, getattr(head, "bias", None)


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, "model", None)
    if not isinstance(base, torch.nn.Module) and hasattr(model, "get_decoder"):
        base = model.get_decoder()
    if not isinstance(base, torch.nn.Module):
        raise TypeError(f"cannot find the backbone of {type(model).__name__} (neither .model nor get_decoder())")
    return base


def causal_lm_hidden_and_head(model: torch.nn.Module, input_ids: torch.Tensor, *,
                              attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                              ignore_index: int = -100, **model_kwargs):
    """(hidden [B, T', H], weight [V, H], bias [V] | None, labels [B, T']) aligned as the module docstring says."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    batch, length = input_ids.shape
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != (batch, length)):
        raise ValueError(f"attention_mask must have input_ids' shape {(batch, length)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) not in ((batch, length), (batch, length - 1)):
            raise ValueError(f"labels must have shape [B, T-1] = {(batch, length - 1)} (shifted) or [B, T] = "
                             f"{(batch, length)} (per position), got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    # every check before the backbone's forward (the expensive part)
    weight, bias = _head(model)
    backbone = _backbone(model)
    kwargs = dict(model_kwargs)
    kwargs.setdefault("use_cache", False)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
    if labels is None:
        labels = input_ids[:, 1:]
        if attention_mask is not None:
            labels = torch.where(attention_mask[:, 1:] != 0, labels, ignore_index)
    if labels.shape[1] == length - 1:
        hidden = hidden[:, :-1]
    return hidden, weight, bias, labels


def causal_lm_logprobs_and_entropy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = True,
    backend: str = "auto",
    **model_kwargs,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token (log-probs, entropies) of a causal LM, [B, T-1] (or labels' shape), fp32, without logits.

    Args:
        model: a transformers `*ForCausalLM` (Llama, Qwen2, Mistral, ...; tied embeddings fine).
        input_ids: [B, T]; attention_mask: [B, T] (1 real, 0 padding), passed to the backbone.
        labels: None (input_ids shifted, padding targets ignored) or [B, T-1] / [B, T] (module docstring).
        temperature, ignore_index, with_entropy, backend: as `fused_linear_logprobs_and_entropy`.
        model_kwargs: further keywords of the backbone's forward (e.g. position_ids).
    Gradients reach every parameter of the backbone and the LM head.
    """
    hidden, weight, bias, labels = causal_lm_hidden_and_head(model, input_ids, attention_mask=attention_mask,
                                                             labels=labels, ignore_index=ignore_index,
                                                             **model_kwargs)
    return fused_linear_logprobs_and_entropy(hidden, weight, labels, bias=bias, temperature=temperature,
                                             ignore_index=ignore_index, with_entropy=with_entropy, backend=backend)


def causal_lm_aem_policy_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    advantages: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    model_kwargs: Optional[dict] = None,
    **loss_kwargs,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """`aem_policy_loss` of a causal LM's next-token predictions without its logits.

    `labels` and the alignment as in `causal_lm_logprobs_and_entropy`; every other keyword (token_response /
    response_mask / turn_ids of the labels' shape, response_group, old_logprobs, config, backend, ...) is
    `fused_linear_aem_policy_loss`'s; `model_kwargs` go to the backbone.
    """
    config = loss_kwargs.get("config")
    ignore_index = config.ignore_index if config is not None else -100
    hidden, weight, bias, labels = causal_lm_hidden_and_head(model, input_ids, attention_mask=attention_mask,
                                                             labels=labels, ignore_index=ignore_index,
                                                             **(model_kwargs or {}))
    return fused_linear_aem_policy_loss(hidden, weight, labels, advantages, bias=bias, **loss_kwargs)
