"""Demand a worker sees: inputs running and reserved here, plus backlog in the broker."""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from celery.utils.log import get_logger

__all__ = ["BacklogProbe", "Load", "demand_in_children", "desired_children"]

logger = get_logger(__name__)


@dataclass(frozen=True)
class Load:
    """One reading of demand on a worker."""

    running: int
    reserved: int  # received by this worker and not finished, running ones included
    backlog: int  # waiting in the broker for the queues this worker consumes
    by_task: Mapping[str, int]  # reserved inputs per task name

    @property
    def total(self) -> int:
        """Inputs this worker should be serving: reserved here plus backlog."""
        return self.reserved + self.backlog


def demand_in_children(load: Load, target_of: Callable[[str], int], default_target: int) -> float:
    """Children needed at target: sum over tasks of load_t / target_t (not rounded).

    Backlog carries no task names, so it is split in the proportions of the inputs already
    reserved here (all of it at ``default_target`` when none are).
    """
    weighted = 0.0
    reserved = sum(load.by_task.values())
    for name, count in load.by_task.items():
        share = count + (load.backlog * count / reserved if reserved else 0)
        weighted += share / target_of(name)
    if load.backlog and not reserved:
        weighted += load.backlog / default_target
    return weighted


def desired_children(demand: float, current: int, lo: int, hi: int, tolerance: float = 0.1) -> int:
    """clamp(ceil(demand), lo, hi), keeping ``current`` while demand is within tolerance."""
    if current and abs(demand / current - 1.0) <= tolerance:
        wanted = current
    else:
        wanted = math.ceil(demand - 1e-9)
    return max(lo, min(hi, wanted))


#: Shortest time between backlog reads while the worker is full.
FRESH_INTERVAL_S = 0.2


class BacklogProbe:
    """Counts messages waiting in the broker, at most once per ``interval_s``.

    Uses a passive queue declare, which answers with the message count on every kombu
    transport (Redis: list length over priority sub-queues; AMQP: queue.declare-ok).
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        queues: Callable[[], Iterable[str]],
        interval_s: float = 1.0,
    ) -> None:
        self._connect = connect
        self._queues = queues
        self.interval_s = interval_s
        self._connection: Any = None
        self._last_at = -math.inf
        self._last = 0
        self.errors = 0

    @property
    def last_read_at(self) -> float | None:
        """``time.monotonic()`` of the last read from the broker; None before the first."""
        return None if self._last_at == -math.inf else self._last_at

    def read(self, fresh: bool = False) -> int:
        """Messages waiting, refreshed if the last reading is older than the interval.

        ``fresh`` (the worker is full, so demand may be hiding in the broker) shortens the
        interval to :data:`FRESH_INTERVAL_S`.
        """
        now = time.monotonic()
        interval = min(self.interval_s, FRESH_INTERVAL_S) if fresh else self.interval_s
        if now - self._last_at >= interval:
            self._last_at = now
            self._last = self._count()
        return self._last

    def _count(self) -> int:
        total = 0
        for queue in self._queues():
            try:
                total += self._count_one(queue)
            except Exception as exc:  # a broken probe must never stop the worker
                self.errors += 1
                logger.debug("Backlog probe for queue %r failed: %r", queue, exc)
                self.close()
        return total

    def _count_one(self, queue: str) -> int:
        if self._connection is None:
            self._connection = self._connect()
        channel = self._connection.default_channel
        ok = channel.queue_declare(queue=queue, passive=True)
        return int(ok.message_count)

    def close(self) -> None:
        """Drop the probe's own broker connection."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None


def reserved_by_task(requests: Iterable[Any]) -> Counter[str]:
    """How many requests of each task name."""
    return Counter(getattr(r, "name", "?") for r in requests)
