"""The per-token policy-loss terms (eq. 8, the KL estimators, every `AEMConfig.loss_mode`) and the single-pass
AEM loss kernel.

`pytorch.py` holds the clipped surrogate and the KL estimators as verl computes them; `modes.py` every policy-loss
mode of verl and TRL per token, which modes are row-local (a single pass can serve them), the aggregation each
mode implies, and the derivatives (`token_loss_derivatives`, the one torch statement of the per-token gradient);
`triton.py` the single-pass kernel (vanilla), which returns l_t, h_t and the logits' gradient from one launch
when the per-token derivative scalars are known before the forward. The op's path decision
(`single_pass_unavailable`): the kernel serves the row backend "triton" and the vanilla surrogate only.
"""

from __future__ import annotations

from typing import Optional

from .modes import (ROW_LOCAL, Segments, kl_ratio, mode_aggregation, policy_token_loss, row_local,
                    token_loss_derivatives)
from .pytorch import KL_VALUE_CLAMP, LOG_RATIO_CLAMP, kl_penalty, ppo_token_loss

__all__ = ["KL_VALUE_CLAMP", "LOG_RATIO_CLAMP", "ROW_LOCAL", "Segments", "kl_penalty", "kl_ratio", "mode_aggregation",
           "policy_token_loss", "ppo_token_loss", "row_local", "single_pass_unavailable", "token_loss_derivatives"]

# the modes whose per-token derivative the Triton single-pass kernel writes (eq. 8 with the dual clip)
TRITON_SINGLE_PASS_MODES = ("vanilla", "bypass_mode")


def single_pass_unavailable(backend_name: str, loss_mode: str = "vanilla") -> Optional[str]:
    """Why the single-pass kernel cannot serve logits on the row backend `backend_name` with the policy-loss
    mode `loss_mode` (None when it can)."""
    if backend_name != "triton":
        return (f'the single-pass loss is a Triton kernel and the backend resolved to "{backend_name}" (fp64 '
                'logits, which the Triton kernels do not serve, always take the two-pass path)')
    if loss_mode not in TRITON_SINGLE_PASS_MODES:
        return (f"the Triton single-pass kernel computes the vanilla surrogate only, not loss_mode={loss_mode!r} "
                "(hidden states: fused_linear_aem_policy_loss has a single pass for every row-local mode)")
    return None
