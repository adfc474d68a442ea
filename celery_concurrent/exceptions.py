"""Exceptions raised by celery-concurrent."""

from __future__ import annotations

__all__ = ["ConcurrencyConfigError", "ConcurrentError"]


class ConcurrentError(Exception):
    """Base class of every error celery-concurrent raises on its own."""


class ConcurrencyConfigError(ConcurrentError, ValueError):
    """A worker, pool or autoscaler setting cannot work; the message names the fix."""
