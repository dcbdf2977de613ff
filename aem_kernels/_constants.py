"""Numerical constants shared by the Python loss (`loss.py`) and the single-pass kernel (`ops/aem_loss.py`),
so both clamp at the same place: they are verl's (`compute_policy_loss_vanilla`, `kl_penalty`)."""

from __future__ import annotations

__all__ = ["LOG_RATIO_CLAMP", "KL_VALUE_CLAMP"]

# log(pi / pi_old) and the k3 estimator's log-ratio are clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] (eq. 8).
LOG_RATIO_CLAMP = 20.0
# The k3 KL estimate itself is clamped to [-KL_VALUE_CLAMP, KL_VALUE_CLAMP].
KL_VALUE_CLAMP = 10.0
