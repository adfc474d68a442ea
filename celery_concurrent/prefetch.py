"""Make the worker reserve only what the children can start.

Celery sizes its first prefetch from ``-c`` (or the autoscale max), not from the pool, so a
consumer bootstep sets it from :attr:`ConcurrentPool.num_processes` (input slots) before
the task consumer starts, and defaults the multiplier to 1 for this pool.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, bootsteps
from celery.utils.log import get_logger

from .defaults import CELERY_DEFAULT_PREFETCH_MULTIPLIER, CONCURRENT_PREFETCH_MULTIPLIER

__all__ = ["ConcurrentPrefetch", "explicitly_configured", "install_prefetch_step"]

logger = get_logger(__name__)


def explicitly_configured(app: Celery, key: str) -> bool:
    """True when ``key`` was set by the user (not just Celery's default)."""
    return any(key in layer for layer in app.conf.maps[:-1])


class ConcurrentPrefetch(bootsteps.Step):
    """Consumer step: initial prefetch = input slots x multiplier (1 unless configured)."""

    name = "celery_concurrent.prefetch"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        pool = c.pool
        if pool is None or not hasattr(pool, "attach_consumer"):
            return
        pool.attach_consumer(c)
        if (
            c.prefetch_multiplier == CELERY_DEFAULT_PREFETCH_MULTIPLIER
            and not explicitly_configured(c.app, "worker_prefetch_multiplier")
        ):
            c.prefetch_multiplier = CONCURRENT_PREFETCH_MULTIPLIER
            if c.controller is not None:
                c.controller.prefetch_multiplier = CONCURRENT_PREFETCH_MULTIPLIER
        if c.initial_prefetch_count:
            c.initial_prefetch_count = pool.num_processes * c.prefetch_multiplier
            logger.debug(
                "Prefetch set to %d (input slots x multiplier %d)",
                c.initial_prefetch_count,
                c.prefetch_multiplier,
            )


def install_prefetch_step(app: Celery) -> None:
    """Add :class:`ConcurrentPrefetch` to the app's consumer blueprint (idempotent)."""
    app.steps["consumer"].add(ConcurrentPrefetch)
