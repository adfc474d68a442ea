"""Prefetch as a function of the pool's state, set absolutely on every change.

Brokers count only unacknowledged messages against the prefetch count. What the worker holds
is every waiting input, every ``acks_late`` input running, and every early-acked input running
(already acknowledged, so invisible to the broker). To hold no more than the children's slots:

    prefetch = max(1, slots x multiplier - running early-acked + ETA-scheduled
                      + min(parked, max_parked))

- ``running early-acked`` are subtracted because the broker no longer counts them;
- ETA/countdown inputs waiting for their time hold a message but no slot (Celery raises
  prefetch for them; the formula keeps that);
- ``parked`` inputs wait only because their own task is at its ``max_inputs`` in every child
  while other tasks could start; up to ``max_parked`` of them hold no prefetch, so a saturated
  task does not starve the others on the same queue (see docs/architecture.md);
- the floor of 1 is the broker's (0 would mean "no limit"): a full worker holds one extra.

The value is recomputed from counts, never adjusted by increments, so it cannot drift, and
is re-applied after a reconnection (a new channel, a new QoS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery, bootsteps
from celery.utils.log import get_logger

from .defaults import CELERY_DEFAULT_PREFETCH_MULTIPLIER, CONCURRENT_PREFETCH_MULTIPLIER

__all__ = [
    "ConcurrentPrefetch",
    "PrefetchState",
    "explicitly_configured",
    "install_prefetch_step",
    "prefetch_count",
]

logger = get_logger(__name__)


@dataclass(frozen=True)
class PrefetchState:
    """The counts prefetch is computed from."""

    slots: int
    multiplier: int
    running_early_acked: int = 0
    scheduled: int = 0
    parked: int = 0
    max_parked: int = 0


def prefetch_count(state: PrefetchState) -> int:
    """The QoS prefetch count for ``state`` (see the module docstring)."""
    value = (
        state.slots * state.multiplier
        - state.running_early_acked
        + state.scheduled
        + min(state.parked, state.max_parked)
    )
    return max(1, value)


def explicitly_configured(app: Celery, key: str) -> bool:
    """True when ``key`` was set by the user (not just Celery's default)."""
    return any(key in layer for layer in app.conf.maps[:-1])


def apply_prefetch(consumer: Any, value: int) -> bool:
    """Set the consumer's QoS to ``value``; the worker's loop sends it (``basic_qos``) before
    its next read. Returns False when there is no QoS yet (not connected)."""
    qos = getattr(consumer, "qos", None)
    if qos is None:
        return False
    with qos._mutex:
        qos.value = value
    return True


class ConcurrentPrefetch(bootsteps.StartStopStep):
    """Consumer step: prefetch from the pool's state, at start and after every reconnection.

    Celery sizes the first prefetch from ``-c`` (or the autoscale max), not from the pool,
    and after a reconnection restores it step by step; this step sets the first value from
    the pool's input slots, defaults the multiplier to 1 for this pool, and hands prefetch
    to the pool once the task consumer exists.
    """

    name = "celery_concurrent.prefetch"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        pool = c.pool
        if pool is None or not hasattr(pool, "attach_consumer"):
            return
        if (
            c.prefetch_multiplier == CELERY_DEFAULT_PREFETCH_MULTIPLIER
            and not explicitly_configured(c.app, "worker_prefetch_multiplier")
        ):
            c.prefetch_multiplier = CONCURRENT_PREFETCH_MULTIPLIER
            if c.controller is not None:
                c.controller.prefetch_multiplier = CONCURRENT_PREFETCH_MULTIPLIER
        if c.initial_prefetch_count:
            c.initial_prefetch_count = pool.num_processes * c.prefetch_multiplier
        pool.attach_consumer(c)

    def start(self, c: Any) -> None:
        pool = c.pool
        if pool is None or not hasattr(pool, "attach_consumer"):
            return
        # The pool owns prefetch from here: Celery's step-by-step restore after a
        # reconnection would fight the computed value.
        c._maximum_prefetch_restored = True
        pool.update_prefetch()


def install_prefetch_step(app: Celery) -> None:
    """Add :class:`ConcurrentPrefetch` to the app's consumer blueprint (idempotent)."""
    app.steps["consumer"].add(ConcurrentPrefetch)
