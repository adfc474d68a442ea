"""``install(app)``: select the concurrent pool (and autoscaler) with sane defaults."""

from __future__ import annotations

from celery import Celery

from .aio import install_async_client
from .defaults import (
    AUTOSCALER_PATH,
    CONCURRENT_PREFETCH_MULTIPLIER,
    METRICS_STEP_PATH,
    POOL_PATH,
)
from .prefetch import explicitly_configured, install_prefetch_step
from .redis_acks import RedisFastAcks

__all__ = ["install"]


def install(app: Celery, *, autoscaler: bool = True) -> Celery:
    """Make ``celery -A proj worker`` use :class:`~celery_concurrent.pool.ConcurrentPool`.

    Sets ``worker_pool`` and (unless ``autoscaler=False``) ``worker_autoscaler``, and
    ``worker_prefetch_multiplier = 1`` unless you configured it, so a worker reserves only
    what its children can start. Settings you set explicitly win, except ``worker_pool``.

    Returns:
        The same app, for chaining.
    """
    app.conf.worker_pool = POOL_PATH
    if autoscaler and not explicitly_configured(app, "worker_autoscaler"):
        app.conf.worker_autoscaler = AUTOSCALER_PATH
    if not explicitly_configured(app, "worker_prefetch_multiplier"):
        app.conf.worker_prefetch_multiplier = CONCURRENT_PREFETCH_MULTIPLIER
    install_prefetch_step(app)
    app.steps["consumer"].add(RedisFastAcks)
    app.steps["worker"].add(METRICS_STEP_PATH)  # inert without a port
    install_async_client(app)  # task.adelay/aapply_async, result.aget
    return app
