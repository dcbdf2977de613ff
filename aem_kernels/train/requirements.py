"""What each command of `python -m aem_kernels.train` needs beyond torch, checked before any work starts.

All of it is the `train` extra (`pip install 'aem-kernels[train]'`); tqdm is optional (without it, and
whenever the output is not a terminal, progress is a few plain lines).
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Tuple

__all__ = ["INSTALL_HINT", "NEEDS", "missing", "require"]

INSTALL_HINT = "pip install 'aem-kernels[train]'"

_TRAINING = {"transformers": "the policy model", "tokenizers": "the tokenizer", "numpy": "the summary",
             "matplotlib": "the plots"}
NEEDS: Dict[str, Dict[str, str]] = {
    "run": _TRAINING,
    "compare": _TRAINING,
    "demo": _TRAINING,
    "plot": {"numpy": "the summary", "matplotlib": "the plots"},
}


def missing(command: str) -> List[Tuple[str, str]]:
    """(module, what it is for) for each module `command` needs that cannot be imported."""
    absent = []
    for module, purpose in NEEDS.get(command, {}).items():
        try:
            importlib.import_module(module)
        except Exception:   # ImportError, or a broken install that fails while importing
            absent.append((module, purpose))
    return absent


def require(command: str) -> None:
    """Raises SystemExit naming every missing module and the extra to install, before the command works."""
    absent = missing(command)
    if absent:
        names = ", ".join(f"{module} ({purpose})" for module, purpose in absent)
        raise SystemExit(f"python -m aem_kernels.train {command} needs {names}, which "
                         f"{'is' if len(absent) == 1 else 'are'} not installed: {INSTALL_HINT}")
