"""aem_kernels: fused log-prob / entropy kernels and Adaptive Entropy Modulation (AEM) for LLM RL losses.

The math is in AEM_SPEC.md; every op has a plain-PyTorch twin in `aem_kernels.reference`, the test oracle
(which production code never imports). The layout is described in the README ("Layout").
"""

from .api import (
    LogprobsEntropyFunction,
    entropy_from_logits,
    logprobs_and_entropy,
    logprobs_from_logits,
    response_entropy,
    response_surprisal,
    selective_log_softmax,
)
from ._validation import skip_value_checks
from .causal_lm import causal_lm_aem_policy_loss, causal_lm_logprobs_and_entropy
from .config import AEMConfig
from .dispatch import available_backends
from .errors import BackendUnavailableError
from .loss import AEMLoss, aem_policy_loss
from .fused_linear import (FusedLinearLogprobsEntropyFunction, fused_linear_aem_policy_loss,
                           fused_linear_logprobs_and_entropy)
from .modulation import aem_weights, modulate_advantages, relative_uncertainty
from .packing import turn_ids_to_token_response

__version__ = "0.1.0"

__all__ = [
    "AEMConfig",
    "AEMLoss",
    "BackendUnavailableError",
    "FusedLinearLogprobsEntropyFunction",
    "LogprobsEntropyFunction",
    "aem_policy_loss",
    "aem_weights",
    "causal_lm_aem_policy_loss",
    "causal_lm_logprobs_and_entropy",
    "available_backends",
    "entropy_from_logits",
    "fused_linear_aem_policy_loss",
    "fused_linear_logprobs_and_entropy",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "modulate_advantages",
    "relative_uncertainty",
    "response_entropy",
    "response_surprisal",
    "selective_log_softmax",
    "skip_value_checks",
    "turn_ids_to_token_response",
]
