"""Framework integrations: AEM and the fused token ops as a switch inside verl and TRL.

`aem_kernels.integrations.verl` (extra `[verl]`, verl 0.9.1) registers an advantage estimator and a policy loss
in verl's registries and wraps verl's `compute_advantage` to hand the estimator the batch's old log-probs;
`aem_kernels.integrations.trl` (extra `[trl]`, TRL 1.16.0) holds `AEMGRPOTrainer`.
Importing `aem_kernels` or this package imports neither framework; importing an integration without its
framework raises an ImportError that names the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require_framework"]


def require_framework(module: str, extra: str, pinned: str) -> ModuleType:
    """Import `module` or raise an ImportError naming the extra (`pip install aem-kernels[extra]`)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"aem_kernels.integrations.{extra} needs {pinned}, which is not installed or fails to import "
            f"({error}); install it with `pip install aem-kernels[{extra}]`") from error
