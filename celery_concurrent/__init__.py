"""celery-concurrent: Modal-style input concurrency for Celery tasks."""

from __future__ import annotations

from .autoscale import TargetAutoscaler
from .bridge import current_input_id
from .decorator import ConcurrencySettings, concurrent, settings_for
from .exceptions import ConcurrencyConfigError, ConcurrentError
from .install import install
from .lifecycle import enter, exit
from .pool import ConcurrentPool

__all__ = [
    "ConcurrencyConfigError",
    "ConcurrencySettings",
    "ConcurrentError",
    "ConcurrentPool",
    "TargetAutoscaler",
    "concurrent",
    "current_input_id",
    "enter",
    "exit",
    "install",
    "settings_for",
]

__version__ = "0.1.0"
