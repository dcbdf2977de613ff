"""Loader of the optional C++ CPU extension (`aem_kernels._C`, built by setup.py from csrc/).

The package never compiles anything at import time: when the extension is missing, "auto" falls back to
the torch reference (with a one-time warning) and backend="cpu" raises with the reason.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

_EXTENSION = None
_IMPORT_ERROR: Optional[str] = None

if os.environ.get("AEM_KERNELS_DISABLE_CPU_EXT", "0") == "1":
    _IMPORT_ERROR = "disabled by AEM_KERNELS_DISABLE_CPU_EXT=1"
else:
    try:
        from . import _C as _EXTENSION  # type: ignore[attr-defined, no-redef]
    except ImportError as exc:  # not built (no compiler, or AEM_KERNELS_NO_EXTENSION=1 at install)
        _IMPORT_ERROR = f"the C++ extension aem_kernels._C is not built ({exc}); reinstall with a C++ compiler"

_warned = False


def unavailable_reason() -> Optional[str]:
    global _warned
    if _IMPORT_ERROR is not None and not _warned:
        _warned = True
        warnings.warn(f"aem_kernels: CPU tensors use the torch reference: {_IMPORT_ERROR}", RuntimeWarning,
                      stacklevel=3)
    return _IMPORT_ERROR


def is_available() -> bool:
    return _EXTENSION is not None
