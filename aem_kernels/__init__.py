"""aem_kernels: fused log-prob / entropy kernels and Adaptive Entropy Modulation (AEM) for LLM RL losses.

The math is in AEM_SPEC.md. The layout (README, "Layout"): `ops/<op>/` (logprobs, fused_linear, segment,
policy_loss; each with its plain definition `naive.py`, its backends and its one path decision in
`__init__.py`), `loss/` above the ops, the causal-LM helpers, `distributed`, `integrations/` and `train/` above
the loss. Importing the package loads no framework, trainer or benchmark.
"""

from .causal_lm import causal_lm_aem_policy_loss, causal_lm_logprobs_and_entropy
from .config import AEMConfig
from .errors import BackendUnavailableError
from .loss import (AEMLoss, aem_policy_loss, aem_weights, fused_linear_aem_policy_loss, modulate_advantages,
                   relative_uncertainty, turn_ids_to_token_response)
from .loss.entropy_coefficient import AdaptiveEntropyCoefficient
from .ops.fused_linear import FusedLinearLogprobsEntropyFunction, fused_linear_logprobs_and_entropy
from .ops.logprobs import (LogprobsEntropyFunction, available_backends, entropy_from_logits, logprobs_and_entropy,
                           logprobs_from_logits, selective_log_softmax)
from .ops.segment import response_entropy, response_surprisal
from .validation import skip_value_checks

__version__ = "0.1.0"

__all__ = [
    "AEMConfig",
    "AEMLoss",
    "AdaptiveEntropyCoefficient",
    "BackendUnavailableError",
    "FusedLinearLogprobsEntropyFunction",
    "LogprobsEntropyFunction",
    "aem_policy_loss",
    "aem_weights",
    "available_backends",
    "causal_lm_aem_policy_loss",
    "causal_lm_logprobs_and_entropy",
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
