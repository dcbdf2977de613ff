"""The policy: a small causal LM from `transformers`, built from a config (random init, no hub download).

A Qwen2 decoder (grouped-query attention, RoPE, SwiGLU, RMSNorm, tied embeddings) of a few layers and a small
hidden size, which is the architecture of the paper's Qwen2.5 policies at toy scale. The helpers here hide the
one API difference that matters between transformers releases: the KV-cache keyword (`cache` in 5.x,
`past_key_values` before).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:   # imported where used: the command line checks for transformers before any work
    from transformers import DynamicCache, Qwen2ForCausalLM

__all__ = ["ModelSpec", "build_policy", "new_cache", "forward_logits"]


@dataclass(frozen=True)
class ModelSpec:
    """Size of the policy network."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 192
    max_positions: int = 512
    attention: str = "sdpa"  # "sdpa" or "eager"
    # a larger initial scale than Hugging Face's 0.02: at width 64 it lets attention leave its uniform start
    # (and the warm start leave its copy-task plateau) in hundreds of steps instead of thousands
    init_std: float = 0.25


def build_policy(spec: ModelSpec, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                 seed: Optional[int] = None) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2ForCausalLM of the given size (float32, on CPU)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
        use_cache=True, initializer_range=spec.init_std,
    )
    config._attn_implementation = spec.attention
    if seed is not None:
        torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


@functools.lru_cache(maxsize=None)
def _cache_keyword() -> str:
    from transformers import Qwen2ForCausalLM

    return "cache" if "cache" in inspect.signature(Qwen2ForCausalLM.forward).parameters else "past_key_values"


def new_cache() -> DynamicCache:
    """An empty KV cache; `forward_logits` fills it in place, call after call."""
    from transformers import DynamicCache

    return DynamicCache()


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                   position_ids: Optional[torch.Tensor] = None, cache: Optional[DynamicCache] = None,
                   last_only: bool = False) -> torch.Tensor:
    """Logits [B, T, V] (or [B, 1, V] with `last_only`) of a causal LM.

    Args:
        input_ids: [B, T] the new tokens.
        attention_mask: [B, past + T], 1 for real tokens, 0 for padding anywhere (holes are fine).
        position_ids: [B, T]; default 0..T-1 (right-padded sequences without a cache).
        cache: a `DynamicCache` holding the past keys/values; it is extended in place.
        last_only: compute the LM head for the last position only (sampling).
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": cache is not None}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if cache is not None:
        kwargs[_cache_keyword()] = cache
    if last_only:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs).logits
