"""TargetAutoscaler: children = clamp(ceil(load / target_inputs), min, max).

Load is what Celery's stock autoscaler cannot see: besides the inputs reserved in this
worker (which prefetch caps at the children's slots), it counts the backlog waiting in the
broker. Scale-up is immediate; scale-down waits until demand stayed lower for
``concurrent_scaledown_window`` seconds and drains the children it removes.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

from celery.utils.log import get_logger
from celery.worker import state as worker_state
from celery.worker.autoscale import Autoscaler

from .decorator import settings_for
from .defaults import setting
from .exceptions import ConcurrencyConfigError
from .load import BacklogProbe, Load, demand_in_children, desired_children, reserved_by_task

__all__ = ["TargetAutoscaler"]

logger = get_logger(__name__)

#: How often the worker's event loop asks the autoscaler to decide (seconds).
TICK_S = 1.0
#: No change while load is within this fraction of what the current children target.
TOLERANCE = 0.1
#: Calls of maybe_scale closer together than this reuse the last decision.
MIN_DECISION_GAP_S = 0.2


class TargetAutoscaler(Autoscaler):
    """Scale :class:`~celery_concurrent.pool.ConcurrentPool` children toward a target load.

    Selected by ``worker_autoscaler`` (``celery_concurrent.install`` sets it) and enabled by
    ``celery worker --autoscale=MAX,MIN``.
    """

    def __init__(
        self,
        pool: Any,
        max_concurrency: int,
        min_concurrency: int = 0,
        worker: Any = None,
        keepalive: float = TICK_S,
        mutex: Any = None,
    ) -> None:
        if not hasattr(pool, "attach_consumer"):
            raise ConcurrencyConfigError(
                f"--autoscale with TargetAutoscaler needs ConcurrentPool, but the worker pool "
                f"is {type(pool).__module__}.{type(pool).__name__}: call "
                "celery_concurrent.install(app), or set worker_pool = "
                "'celery_concurrent.pool:ConcurrentPool'"
            )
        _check_command_line_order(sys.argv)
        _check_range(max_concurrency, min_concurrency, "--autoscale")
        app = pool.app
        self.scaledown_window_s = float(setting(app, "concurrent_scaledown_window"))
        if self.scaledown_window_s < 0:
            raise ConcurrencyConfigError(
                f"concurrent_scaledown_window must be >= 0 seconds, got "
                f"{self.scaledown_window_s}: e.g. app.conf.concurrent_scaledown_window = 60"
            )
        super().__init__(pool, max_concurrency, min_concurrency, worker, TICK_S, mutex)
        self.max_concurrency: int = max_concurrency
        self.min_concurrency: int = min_concurrency
        self.backlog = BacklogProbe(
            connect=app.connection_for_read,
            queues=self._consumed_queues,
            interval_s=float(setting(app, "concurrent_backlog_poll_interval")),
        )
        self.desired = max(min_concurrency, 1)
        self.demand = 0.0
        self.last_load = Load(0, 0, 0, {})
        self.last_decision: dict[str, Any] | None = None
        self._recent: deque[tuple[float, int]] = deque()
        self._last_decided_at = -math.inf
        self._observing_since = time.monotonic()

    # -- Celery's Autoscaler interface ------------------------------------------------------

    @property
    def processes(self) -> int:
        """Children currently taking inputs."""
        return int(self.pool.children)

    @property
    def qty(self) -> int:
        return self.last_load.total

    def _maybe_scale(self, req: Any = None) -> bool:
        now = time.monotonic()
        if now - self._last_decided_at < MIN_DECISION_GAP_S:
            return False
        self._last_decided_at = now
        load = self.read_load()
        current = self.processes
        wanted = self._wanted(load)
        self.desired = wanted
        self._remember(now, wanted)
        if wanted > current:
            self._scale(current, wanted, load, "load above target")
            return True
        if wanted < current:
            floor = max(d for _, d in self._recent)  # highest demand within the window
            if floor < current and self._window_full(now):
                self._scale(
                    current, floor, load, f"load below target for {self.scaledown_window_s:g}s"
                )
                return True
        return False

    def maybe_scale(self, req: Any = None) -> None:
        if req is not None:
            self.on_task_received(req)
        self._maybe_scale(req)

    def update(self, max: int | None = None, min: int | None = None) -> tuple[int, int]:
        """Change the range (remote control ``autoscale MAX MIN``); refuses a bad range."""
        with self.mutex:
            new_max = self.max_concurrency if max is None else max
            new_min = self.min_concurrency if min is None else min
            _check_range(new_max, new_min, "autoscale")
            self.max_concurrency, self.min_concurrency = new_max, new_min
            current = self.processes
            bounded = _clamp(current, new_min, new_max)
            if bounded != current:
                self._scale(
                    current,
                    bounded,
                    self.last_load,
                    f"autoscale range changed to {new_max},{new_min}",
                )
            return self.max_concurrency, self.min_concurrency

    def info(self) -> dict[str, Any]:
        """``inspect stats`` / Flower's flat view of :meth:`snapshot` (see :mod:`.info`)."""
        from .info import autoscaler_info

        return autoscaler_info(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """The autoscaler's state, structured (per-task limits, last decision as dicts)."""
        load = self.last_load
        targets, maxes = self._task_limits()
        return {
            "max": self.max_concurrency,
            "min": self.min_concurrency,
            "current": self.processes,
            "desired": self.desired,
            "demand": round(self.demand, 2),
            "qty": load.total,
            "load": load.total,
            "running": load.running,
            "reserved": load.reserved,
            "backlog": load.backlog,
            "target_inputs": targets,
            "max_inputs": maxes,
            "scaledown_window": self.scaledown_window_s,
            "last_decision": self.last_decision,
        }

    # -- reading demand -------------------------------------------------------------------

    def read_load(self) -> Load:
        """Running + reserved here + broker backlog, now."""
        requests = list(worker_state.reserved_requests)
        self.last_load = Load(
            running=int(self.pool.inflight),
            reserved=len(requests),
            backlog=self.backlog.read(fresh=len(requests) >= self.pool.num_processes),
            by_task=reserved_by_task(requests),
        )
        return self.last_load

    def _wanted(self, load: Load) -> int:
        targets, _ = self._task_limits()
        # Backlog of unknown tasks counts at the largest target: an underestimate is
        # corrected on the next tick, once those inputs are reserved and named.
        default_target = max(targets.values()) if targets else 1
        self.demand = demand_in_children(
            load, lambda name: self.pool.limits_for(name).target_inputs, default_target
        )
        return desired_children(
            self.demand,
            self.processes,
            max(self.min_concurrency, 1),
            self.max_concurrency,
            TOLERANCE,
        )

    def _task_limits(self) -> tuple[dict[str, int], dict[str, int]]:
        targets: dict[str, int] = {}
        maxes: dict[str, int] = {}
        for name, task in self.pool.app.tasks.items():
            if settings_for(task) is None:
                continue
            limits = self.pool.limits_for(name)
            targets[name] = limits.target_inputs
            maxes[name] = limits.max_inputs
        return targets, maxes

    def _consumed_queues(self) -> list[str]:
        consumer = getattr(self.worker, "consumer", None)
        task_consumer = getattr(consumer, "task_consumer", None)
        if task_consumer is not None:
            return [q.name for q in task_consumer.queues]
        return list(self.pool.app.amqp.queues.consume_from)

    # -- acting -----------------------------------------------------------------------------

    def _scale(self, current: int, wanted: int, load: Load, reason: str) -> None:
        detail = (
            f"{reason}: load {load.total} (running {load.running}, reserved "
            f"{load.reserved}, backlog {load.backlog}), range {self.min_concurrency}-"
            f"{self.max_concurrency}"
        )
        if wanted > current:
            logger.info("Scaling up %d -> %d children: %s", current, wanted, detail)
            self._last_scale_up = time.monotonic()
            self.pool.grow(wanted - current)
        else:
            logger.info("Scaling down %d -> %d children (draining): %s", current, wanted, detail)
            try:
                self.pool.shrink(current - wanted)
            except ValueError as exc:
                logger.debug("Autoscaler won't scale down: %s", exc)
                return
        if wanted > current:
            # New capacity: lower readings from before it no longer justify a scale-down.
            self._recent.clear()
            self._observing_since = time.monotonic()
        self.last_decision = {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "from": current,
            "to": wanted,
            "reason": detail,
        }

    def _remember(self, now: float, wanted: int) -> None:
        self._recent.append((now, wanted))
        while self._recent and now - self._recent[0][0] > self.scaledown_window_s:
            self._recent.popleft()

    def _window_full(self, now: float) -> bool:
        """True once demand has been observed for a whole window since the last change."""
        return now - self._observing_since >= self.scaledown_window_s


def _check_range(maximum: Any, minimum: Any, source: str) -> None:
    for name, value in (("max", maximum), ("min", minimum)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConcurrencyConfigError(
                f"{source} {name} must be a whole number >= 0, got {value!r}: e.g. --autoscale=8,1"
            )
    if minimum > maximum:
        raise ConcurrencyConfigError(
            f"{source} min={minimum} is above max={maximum}: the order is MAX,MIN, "
            f"e.g. --autoscale={minimum},{maximum}"
        )
    if maximum < 1:
        raise ConcurrencyConfigError(
            f"{source} max must be >= 1, got {maximum}: e.g. --autoscale=8,1"
        )


def _check_command_line_order(argv: list[str]) -> None:
    """Refuse ``--autoscale=MIN,MAX``: Celery's CLI silently swaps the two numbers."""
    for index, arg in enumerate(argv):
        if arg.startswith("--autoscale="):
            raw = arg.partition("=")[2]
        elif arg == "--autoscale" and index + 1 < len(argv):
            raw = argv[index + 1]
        else:
            continue
        parts = raw.split(",")
        if len(parts) == 2 and all(p.strip().lstrip("-").isdigit() for p in parts):
            maximum, minimum = (int(p) for p in parts)
            if minimum > maximum:
                raise ConcurrencyConfigError(
                    f"--autoscale min={minimum} is above max={maximum}: the order is MAX,MIN, "
                    f"e.g. --autoscale={minimum},{maximum}"
                )


def _clamp(value: int, lo: int, hi: int) -> int:
    return max(max(lo, 1), min(hi, value))
