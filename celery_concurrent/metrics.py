"""Prometheus metrics of a worker: children, desired children, inputs, backlog, per task.

A worker bootstep (:class:`MetricsStep`, added by :func:`celery_concurrent.install`) serves
the Prometheus text format from the worker's main process when ``concurrent_metrics_port``
(or the environment variable ``CELERY_CONCURRENT_METRICS_PORT``) is set. Values are read at
scrape time from the pool (``_get_info()``) and the autoscaler (``info()``): there is no
polling thread. ``celery_concurrent_desired_children`` is the signal to scale worker
replicas on (KEDA / HPA, see ``autoscale/``).

``prometheus_client`` is optional: ``pip install 'celery-concurrent[prometheus]'``.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery.utils.log import get_logger

from .defaults import setting
from .exceptions import ConcurrencyConfigError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry

__all__ = [
    "ENV_ADDRESS",
    "ENV_PORT",
    "MetricsStep",
    "Sample",
    "TaskSample",
    "make_collector",
    "metrics_endpoint",
    "read_sample",
]

logger = get_logger(__name__)

ENV_PORT = "CELERY_CONCURRENT_METRICS_PORT"
ENV_ADDRESS = "CELERY_CONCURRENT_METRICS_ADDRESS"
INSTALL_HINT = "pip install 'celery-concurrent[prometheus]'"
PREFIX = "celery_concurrent"


@dataclass(frozen=True)
class TaskSample:
    """One task's numbers in one worker."""

    inflight: int = 0
    waiting: int = 0
    max_inputs: int | None = None
    target_inputs: int | None = None


@dataclass(frozen=True)
class Sample:
    """What a scrape reports for one worker."""

    worker: str
    children: int
    desired_children: int
    demand_children: float
    draining_children: int
    inflight_inputs: int
    waiting_inputs: int
    input_slots: int
    backlog: int | None = None  # None without an autoscaler (nobody reads the broker)
    autoscale_max: int | None = None
    autoscale_min: int | None = None
    tasks: Mapping[str, TaskSample] = field(default_factory=dict)


def metrics_endpoint(app: Any) -> tuple[str, int] | None:
    """``(address, port)`` to serve metrics on, or None when metrics are off.

    The environment (``CELERY_CONCURRENT_METRICS_PORT``, ``CELERY_CONCURRENT_METRICS_ADDRESS``)
    wins over the settings ``concurrent_metrics_port`` / ``concurrent_metrics_address``, so a
    deployment can turn metrics on without changing the app. Port 0 picks a free port.
    """
    raw_port: Any = os.environ.get(ENV_PORT) or setting(app, "concurrent_metrics_port")
    if raw_port is None or raw_port == "":
        return None
    source = ENV_PORT if os.environ.get(ENV_PORT) else "concurrent_metrics_port"
    try:
        if isinstance(raw_port, bool):
            raise ValueError(raw_port)
        port = int(str(raw_port).strip())
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConcurrencyConfigError(
            f"{source} must be a TCP port number 0-65535, got {raw_port!r}: e.g. "
            f"{ENV_PORT}=9808 or app.conf.concurrent_metrics_port = 9808"
        )
    address = os.environ.get(ENV_ADDRESS) or setting(app, "concurrent_metrics_address")
    return str(address), port


# -- reading the worker ---------------------------------------------------------------------


def read_sample(worker: Any) -> Sample:
    """Read the live numbers of ``worker`` (a Celery WorkController) without changing them."""
    pool = worker.pool
    info: dict[str, Any] = dict(pool._get_info())
    autoscaler = getattr(worker, "autoscaler", None)
    scaler: dict[str, Any] = {}
    if autoscaler is not None:
        # info() only reads attributes; holding the pool's lock keeps its cache of task
        # limits (filled by limits_for) consistent with the pool's own readers.
        lock = getattr(pool, "_lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            scaler = dict(autoscaler.info())

    children_info = info.get("children") or []
    processes = info.get("processes") or []
    current = _int(getattr(pool, "children", None), default=len(processes))
    draining = sum(1 for c in children_info if c.get("state") == "draining")

    pool_tasks: Mapping[str, Any] = info.get("tasks") or {}
    targets: Mapping[str, Any] = scaler.get("target_inputs") or {}
    maxes: Mapping[str, Any] = scaler.get("max_inputs") or {}
    tasks: dict[str, TaskSample] = {}
    for name in sorted(set(pool_tasks) | set(targets) | set(maxes)):
        seen = pool_tasks.get(name) or {}
        max_inputs = maxes.get(name, seen.get("max_inputs"))
        target_inputs = targets.get(name, seen.get("target_inputs"))
        tasks[name] = TaskSample(
            inflight=_int(seen.get("inflight")),
            waiting=_int(seen.get("waiting")),
            max_inputs=None if max_inputs is None else int(max_inputs),
            target_inputs=None if target_inputs is None else int(target_inputs),
        )

    demand = getattr(autoscaler, "demand", None) if autoscaler is not None else None
    if not isinstance(demand, (int, float)) or isinstance(demand, bool):
        demand = scaler.get("demand")
    if not isinstance(demand, (int, float)) or isinstance(demand, bool):
        demand = _local_demand(tasks)

    return Sample(
        worker=str(getattr(worker, "hostname", None) or "unknown"),
        children=current,
        desired_children=_int(scaler.get("desired"), default=current),
        demand_children=float(demand),
        draining_children=draining,
        inflight_inputs=_int(info.get("inflight")),
        waiting_inputs=_int(info.get("waiting")),
        input_slots=_int(info.get("max-concurrency")),
        backlog=None if "backlog" not in scaler else _int(scaler["backlog"]),
        autoscale_max=None if "max" not in scaler else _int(scaler["max"]),
        autoscale_min=None if "min" not in scaler else _int(scaler["min"]),
        tasks=tasks,
    )


def _local_demand(tasks: Mapping[str, TaskSample]) -> float:
    """Children needed at target for what this worker holds (no autoscaler: no backlog)."""
    demand = 0.0
    for task in tasks.values():
        load = task.inflight + task.waiting
        if load:
            demand += load / max(task.target_inputs or 1, 1)
    return demand


def _int(value: Any, default: int = 0) -> int:
    if value is None or isinstance(value, bool):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return int(number) if math.isfinite(number) else default


# -- Prometheus ---------------------------------------------------------------------------

_GAUGES: tuple[tuple[str, str], ...] = (
    ("children", "Children taking inputs now (draining ones excluded)."),
    (
        "desired_children",
        "Children the autoscaler wants: clamp(ceil(demand), min, max); equals children "
        "without an autoscaler. Scale worker replicas on this.",
    ),
    (
        "demand_children",
        "Unrounded demand in children: sum over tasks of (reserved + backlog share) / "
        "target_inputs.",
    ),
    ("draining_children", "Children finishing their inputs before they exit."),
    ("inflight_inputs", "Inputs running in the children."),
    ("waiting_inputs", "Inputs received by the worker, waiting in the parent for a slot."),
    ("input_slots", "Input slots: children x slots per child (what prefetch reserves)."),
)
_AUTOSCALER_GAUGES: tuple[tuple[str, str], ...] = (
    ("backlog", "Messages waiting in the broker for this worker's queues, as last read."),
    ("autoscale_max_children", "Upper bound of the autoscaler (--autoscale MAX)."),
    ("autoscale_min_children", "Lower bound of the autoscaler (--autoscale MIN)."),
)
_TASK_GAUGES: tuple[tuple[str, str], ...] = (
    ("task_inflight", "Inputs of this task running in the children."),
    ("task_waiting", "Inputs of this task waiting in the parent for a slot."),
    ("task_max_inputs", "max_inputs of this task: its cap per child."),
    ("task_target_inputs", "target_inputs of this task: the load per child aimed for."),
)


def _require_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConcurrencyConfigError(
            f"Prometheus metrics are enabled ({ENV_PORT} or concurrent_metrics_port is set) "
            f"but prometheus_client is not installed: {INSTALL_HINT}"
        ) from exc
    return prometheus_client


def metric_families(sample: Sample) -> list[Metric]:
    """The Prometheus metric families of one sample (every series labelled ``worker``)."""
    from prometheus_client.core import GaugeMetricFamily

    values: dict[str, float | None] = {
        "children": sample.children,
        "desired_children": sample.desired_children,
        "demand_children": sample.demand_children,
        "draining_children": sample.draining_children,
        "inflight_inputs": sample.inflight_inputs,
        "waiting_inputs": sample.waiting_inputs,
        "input_slots": sample.input_slots,
        "backlog": sample.backlog,
        "autoscale_max_children": sample.autoscale_max,
        "autoscale_min_children": sample.autoscale_min,
    }
    families: list[Metric] = []
    for name, doc in (*_GAUGES, *_AUTOSCALER_GAUGES):
        value = values[name]
        if value is None:
            continue
        gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["worker"])
        gauge.add_metric([sample.worker], float(value))
        families.append(gauge)
    for name, doc in _TASK_GAUGES:
        gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["worker", "task"])
        for task_name, task in sample.tasks.items():
            value = {
                "task_inflight": task.inflight,
                "task_waiting": task.waiting,
                "task_max_inputs": task.max_inputs,
                "task_target_inputs": task.target_inputs,
            }[name]
            if value is not None:
                gauge.add_metric([sample.worker, task_name], float(value))
        families.append(gauge)
    return families


def make_collector(worker: Any) -> Collector:
    """A Prometheus collector reading ``worker`` at each scrape."""
    from prometheus_client.registry import Collector

    class ConcurrentCollector(Collector):
        def collect(self) -> Iterator[Metric]:
            try:
                sample = read_sample(worker)
            except Exception:
                # Propagate: the scrape fails (HTTP 500, Prometheus marks up=0) instead of
                # reporting made-up numbers; log why, as prometheus_client does not.
                logger.exception("celery-concurrent metrics: reading the worker failed")
                raise
            yield from metric_families(sample)

    return ConcurrentCollector()


# Listening sockets of running metrics servers: children forked by the pool close their
# copy, so a child never holds the port (and never outlives the parent holding it).
_SERVERS: weakref.WeakSet[Any] = weakref.WeakSet()


def _close_servers_in_child() -> None:
    for server in list(_SERVERS):
        with contextlib.suppress(Exception):
            server.socket.close()
    _SERVERS.clear()


os.register_at_fork(after_in_child=_close_servers_in_child)


class MetricsStep(bootsteps.StartStopStep):
    """Worker bootstep: serve Prometheus metrics from the worker's main process.

    Inert unless ``concurrent_metrics_port`` / ``CELERY_CONCURRENT_METRICS_PORT`` is set.
    """

    label = "Metrics"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        self.endpoint = metrics_endpoint(w.app)
        self.enabled = self.endpoint is not None
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.registry: CollectorRegistry | None = None
        if self.enabled:
            _require_prometheus()  # fail at start-up, naming the pip command

    def create(self, w: Any) -> MetricsStep:
        return self

    def start(self, w: Any) -> None:
        if self.endpoint is None:
            return
        prometheus_client = _require_prometheus()
        address, port = self.endpoint
        self.registry = prometheus_client.CollectorRegistry(auto_describe=False)
        self.registry.register(make_collector(w))
        try:
            started = prometheus_client.start_http_server(
                port, addr=address, registry=self.registry
            )
        except OSError as exc:
            raise ConcurrencyConfigError(
                f"Cannot serve Prometheus metrics on {address}:{port}: {exc}. Give each "
                f"worker on a host its own port ({ENV_PORT} or concurrent_metrics_port), "
                "or 0 for any free port"
            ) from exc
        if isinstance(started, tuple):  # prometheus_client >= 0.17 returns (server, thread)
            self.server, self.thread = started
            _SERVERS.add(self.server)
            port = int(self.server.server_address[1])
        logger.info("Prometheus metrics on http://%s:%d/metrics", address, port)

    def stop(self, w: Any) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        _SERVERS.discard(server)
        with contextlib.suppress(Exception):
            server.shutdown()
            server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)
            self.thread = None

    def terminate(self, w: Any) -> None:
        self.stop(w)

    def info(self, w: Any) -> dict[str, Any]:
        if self.endpoint is None:
            return {}
        address, port = self.endpoint
        if self.server is not None:
            port = int(self.server.server_address[1])
        return {"metrics": {"address": address, "port": port, "path": "/metrics"}}
