"""The per-token policy-loss terms (eq. 8, the KL estimators) and the single-pass AEM loss kernel.

`pytorch.py` holds the terms as verl computes them and their derivatives (`token_loss_derivatives`, the one
torch statement of the per-token gradient); `triton.py` the single-pass kernel, which returns l_t, h_t and the
logits' gradient from one launch when the per-token derivative scalars are known before the forward. The op's
path decision (`single_pass_unavailable`): the kernel serves the row backend "triton" only.
"""

from __future__ import annotations

from typing import Optional

from .pytorch import KL_VALUE_CLAMP, LOG_RATIO_CLAMP, kl_penalty, ppo_token_loss, token_loss_derivatives

__all__ = ["KL_VALUE_CLAMP", "LOG_RATIO_CLAMP", "kl_penalty", "ppo_token_loss", "single_pass_unavailable",
           "token_loss_derivatives"]


def single_pass_unavailable(backend_name: str) -> Optional[str]:
    """Why the single-pass kernel cannot serve logits on the row backend `backend_name` (None when it can)."""
    if backend_name != "triton":
        return (f'the single-pass loss is a Triton kernel and the backend resolved to "{backend_name}" (fp64 '
                'logits, which the Triton kernels do not serve, always take the two-pass path)')
    return None

