"""Exceptions of the package, in a leaf module so that every layer (path decisions, kernels, loss) can raise them
without importing one another."""

from __future__ import annotations

__all__ = ["BackendUnavailableError"]


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend cannot run on this machine or for this tensor (device or dtype)."""
