"""verl's FSDP engine's per-token log-probs and entropies through this package's kernels.

verl's policy-loss functions receive log-probs, not logits: the logits live in the engine's forward. What verl
can use are the token ops (no fp32 copy of the logits, section-6 backward); the loss-level fused ops
(`aem_policy_loss` from logits, the single-pass kernel) would need verl's engine to hand the loss the logits,
which it does not.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...ops.logprobs import entropy_from_logits, logprobs_from_logits

__all__ = ["TOKEN_OPS_ENV", "patch_token_ops"]

TOKEN_OPS_ENV = "AEM_KERNELS_VERL_TOKEN_OPS"


def _logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True
                          ) -> torch.Tensor:
    return logprobs_from_logits(logits, labels, inplace_backward=inplace_backward)


def _entropy_from_logits(logits: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    return entropy_from_logits(logits, chunk_size=chunk_size)


def patch_token_ops() -> None:
    """Route verl's FSDP engine's per-token log-probs and entropies through this package's kernels.

    Replaces `verl.workers.engine.fsdp.transformer_impl.logprobs_from_logits` and
    `verl.utils.torch_functional.entropy_from_logits(_with_chunking)`; call it (or set
    AEM_KERNELS_VERL_TOKEN_OPS=1 before this module is imported) before the engine is built, since the
    engine binds its entropy function at construction. Excluded from torch.compile, which verl applies to the
    entropy function by default.
    """
    import verl.utils.torch_functional as verl_F
    import verl.workers.engine.fsdp.transformer_impl as fsdp_engine

    disable = torch.compiler.disable
    fsdp_engine.logprobs_from_logits = disable(_logprobs_from_logits)
    verl_F.entropy_from_logits = disable(_entropy_from_logits)
    verl_F.entropy_from_logits_with_chunking = disable(_entropy_from_logits)
