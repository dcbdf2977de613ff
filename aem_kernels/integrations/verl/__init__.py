"""verl 0.9.1 integration: importing this package registers AEM in verl's own registries.

Registered (verl's public `register_adv_est` / `register_policy_loss`):

* advantage estimator "aem" (`estimator.py`): runs a base estimator (`algorithm.aem.base_estimator`, default
  "grpo") and rescales its token advantages by AEM's response weights (AEM_SPEC eq. 7); groups are verl's
  `uid`, responses the runs of ones of `response_mask` (the turns of a multi-turn trajectory).
* policy loss "aem" (`policy_loss.py`): verl's clipped surrogate (eq. 8), equal to verl's "vanilla" loss in
  every `loss_agg_mode`.

Where verl has the inputs. The estimator runs on the trainer process in `compute_advantage`; groups are lost
after that point (mini-batches are shuffled and split over micro-batches and ranks), so eq. 7 must run there,
not in the policy loss. At that moment the batch holds the rollout policy's per-token log-probs
(`old_log_probs`, recomputed by the actor before the advantage step); the actor's entropies of that pass are
dropped before it (v0 pops "entropys"; v1 does not fetch "entropy"). Hence the verl default here is
uncertainty="surprisal" from the old log-probs (eq. 3, surprisal_source="old"); "entropy" needs a batch that
keeps "entropys"/"entropy" (a custom trainer).

The hook (`hook.py`). verl hands a registered estimator no batch fields beyond the rewards, the mask, the
config and the uids, so the estimator takes its per-token values as the explicit keyword arguments
`old_log_probs=` / `entropys=` (a ValueError names the one it lacks), and importing this package wraps verl's
`compute_advantage` (`patch_compute_advantage()`) so that, for "aem" only, it passes them from the batch;
`compute_advantage(data, ...)` is the same call for a custom trainer.

Token ops (`token_ops.py`). With AEM_KERNELS_VERL_TOKEN_OPS=1 set when this package is imported,
`patch_token_ops()` routes the FSDP engine's `logprobs_from_logits` and `entropy_from_logits` through this
package's kernels.
"""

from __future__ import annotations

import os

from .. import require_framework

require_framework("verl", "verl", "verl==0.9.1")

from .estimator import (ESTIMATOR, aem_settings, compute_aem_advantage, last_metrics,  # noqa: E402
                        modulate_token_advantages, response_turn_ids)
from .hook import advantage_inputs, compute_advantage, patch_compute_advantage  # noqa: E402
from .policy_loss import POLICY_LOSS, compute_policy_loss_aem  # noqa: E402
from .token_ops import TOKEN_OPS_ENV, patch_token_ops  # noqa: E402

__all__ = ["ESTIMATOR", "POLICY_LOSS", "advantage_inputs", "aem_settings", "compute_advantage",
           "compute_aem_advantage", "compute_policy_loss_aem", "last_metrics", "modulate_token_advantages",
           "patch_compute_advantage", "patch_token_ops", "response_turn_ids"]

patch_compute_advantage()
if os.environ.get(TOKEN_OPS_ENV, "0") == "1":
    patch_token_ops()
