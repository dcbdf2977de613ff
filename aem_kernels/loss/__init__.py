"""The AEM loss above the ops: advantage modulation (eq. 4-7, `modulation.py`), the input forms and the loss
batch (`inputs.py`), verl's aggregation and global normalisers (`aggregation.py`), the loss from per-token
terms (`terms.py`), the policy loss from logits (`policy_loss.py`) and from hidden states (`fused_linear.py`),
and their single pass (`single_pass.py`).
"""

from __future__ import annotations

from ..ops.policy_loss import kl_penalty, ppo_token_loss
from .aggregation import GlobalBatch, aggregate, aggregation_weights
from .fused_linear import fused_linear_aem_policy_loss
from .inputs import PackedBatch, loss_batch, pack_inputs, turn_ids_to_token_response
from .modulation import aem_metrics, aem_weights, modulate_advantages, relative_uncertainty
from .policy_loss import AEMLoss, aem_policy_loss
from .terms import loss_from_token_terms

__all__ = ["AEMLoss", "GlobalBatch", "PackedBatch", "aem_metrics", "aem_policy_loss", "aem_weights", "aggregate",
           "aggregation_weights", "fused_linear_aem_policy_loss", "kl_penalty", "loss_batch",
           "loss_from_token_terms", "modulate_advantages", "pack_inputs", "ppo_token_loss", "relative_uncertainty",
           "turn_ids_to_token_response"]
