"""Setting names and their defaults, in one place.

Our settings share the ``concurrent_`` prefix; where Celery already has a setting
(``worker_pool``, ``worker_autoscaler``, ``worker_prefetch_multiplier``) we use Celery's.
Durations are seconds.
"""

from __future__ import annotations

from typing import Any

POOL_PATH = "celery_concurrent.pool:ConcurrentPool"
AUTOSCALER_PATH = "celery_concurrent.autoscale:TargetAutoscaler"
#: A string, so that only workers import the metrics module.
METRICS_STEP_PATH = "celery_concurrent.metrics:MetricsStep"

#: Inputs a child runs at once for a task that has no ``@concurrent``.
UNDECORATED_MAX_INPUTS = 1

#: Setting name -> default.
SETTINGS: dict[str, Any] = {
    # Input slots per child; None means the largest max_inputs among registered tasks.
    "concurrent_slots_per_child": None,
    # Warm shutdown: how long in-flight inputs may run before the children are stopped.
    "concurrent_shutdown_timeout": 60.0,
    # How long a cancelled input (terminate, time_limit) may take to stop before the parent
    # replaces its child.
    "concurrent_cancel_grace": 1.0,
    # Inputs parked behind their own task's max_inputs that hold no prefetch, per worker;
    # parked inputs beyond it go back to the broker (see parking.py).
    "concurrent_max_parked": 20,
    # Warn when a child's event loop is blocked for longer than this (0 disables).
    "concurrent_loop_block_warning": 0.5,
    # Autoscaler: how long demand must stay lower before children are removed.
    "concurrent_scaledown_window": 60.0,
    # Autoscaler: how often broker backlog is polled.
    "concurrent_backlog_poll_interval": 1.0,
    # Prometheus metrics port (None: off) and address; env CELERY_CONCURRENT_METRICS_PORT.
    "concurrent_metrics_port": None,
    "concurrent_metrics_address": "127.0.0.1",
    # How a child runs sync inputs: "threads" or "gevent" (extra celery-concurrent[gevent]).
    "concurrent_sync_backend": "threads",
    # Redis broker: one client and one round trip per batch for acks (see redis_acks.py).
    "concurrent_redis_fast_acks": True,
    # Redis broker: after each BRPOP, take up to the free prefetch in one script call that
    # also records them as unacked (see redis_fetch.py).
    "concurrent_redis_batch_fetch": True,
    # Redis result backend: async inputs' result writes and publishes go to a writer thread
    # per child, in batches, instead of blocking the loop (see result_writer.py). Opt-in:
    # its queueing widens Celery's read-then-write race between a retry's RETRY store and the
    # retried run's SUCCESS (see docs/architecture.md).
    "concurrent_result_writer": False,
}

#: Celery's own default for worker_prefetch_multiplier; we use 1 unless the user chose.
CELERY_DEFAULT_PREFETCH_MULTIPLIER = 4
CONCURRENT_PREFETCH_MULTIPLIER = 1


def setting(app: Any, name: str) -> Any:
    """Read one of our settings from ``app.conf``, falling back to its default."""
    value = app.conf.get(name)
    return SETTINGS[name] if value is None else value
