"""The fused-linear op's definition and test oracle: the logits materialised, z = hidden @ W^T + b, then eq. 1-2
with the plain log-softmax in `dtype` (fp64 for the truth, fp32 for eager torch's own arithmetic). It holds the
N x V logits and their softmax, which is exactly what the production paths exist to avoid; production code
never imports it."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["fused_linear_logprobs_and_entropy_ref"]


def fused_linear_logprobs_and_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                          bias: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                                          ignore_index: int = -100, dtype: torch.dtype = torch.float64
                                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, entropy) of labels' shape in `dtype`, differentiable (cast the inputs to `dtype` first, as
    eager torch would); ignored positions give 0."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros((), dtype=dtype))).sum(-1)
    active = labels != ignore_index
    logprobs = log_p.gather(-1, torch.where(active, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(active, logprobs, 0.0), torch.where(active, entropy, 0.0)
