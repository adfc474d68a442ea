"""Prometheus metrics of a worker: children, desired children, inputs, backlog, per task.

A worker bootstep (:class:`MetricsStep`, added by :func:`celery_concurrent.install`) serves
the Prometheus text format from the worker's main process when ``concurrent_metrics_port``
(or the environment variable ``CELERY_CONCURRENT_METRICS_PORT``) is set, on loopback unless
``concurrent_metrics_address`` / ``CELERY_CONCURRENT_METRICS_ADDRESS`` says otherwise.
Gauges are read at scrape time from the pool (``ConcurrentPool.snapshot()``) and the autoscaler
(``info()``): there is no polling thread. The broker backlog is re-read by the scrape when
the autoscaler's last reading is older than its poll interval.
``celery_concurrent_desired_children`` is the signal to scale worker replicas on (KEDA /
HPA, see ``autoscale/``).

Per-task outcome counters and run/wait histograms come from :data:`INPUT_STATS`, an
:class:`InputStats` the pool feeds as inputs start and finish.

``prometheus_client`` is optional: ``pip install 'celery-concurrent[prometheus]'``.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import bootsteps
from celery.exceptions import Retry, SoftTimeLimitExceeded, Terminated, TimeLimitExceeded
from celery.utils.log import get_logger

from .defaults import setting
from .exceptions import ConcurrencyConfigError
from .load import BacklogProbe

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry

__all__ = [
    "BUCKETS_S",
    "ENV_ADDRESS",
    "ENV_PORT",
    "INPUT_STATS",
    "OUTCOMES",
    "BacklogReader",
    "InputStats",
    "MetricsStep",
    "Sample",
    "TaskSample",
    "exported_names",
    "make_collector",
    "metrics_endpoint",
    "outcome_of",
    "read_sample",
]

logger = get_logger(__name__)

ENV_PORT = "CELERY_CONCURRENT_METRICS_PORT"
ENV_ADDRESS = "CELERY_CONCURRENT_METRICS_ADDRESS"
INSTALL_HINT = "pip install 'celery-concurrent[prometheus]'"
PREFIX = "celery_concurrent"

# -- per-input outcomes and durations ---------------------------------------------------------

#: Values of the ``state`` label of ``celery_concurrent_inputs_total``.
OUTCOMES: tuple[str, ...] = ("succeeded", "failed", "retried", "revoked", "time-limited", "lost")

#: Upper bounds (seconds) of the run-time and wait-time histograms' buckets (+Inf implied).
BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
)  # fmt: skip


def outcome_of(failed: bool, retval: object) -> str:
    """Classify Celery's pool result ``(failed, retval, runtime)`` as one of :data:`OUTCOMES`.

    ``retval`` of a failed input is a billiard ``ExceptionInfo`` (a bare exception is
    accepted too): ``Retry`` -> ``"retried"``, ``TimeLimitExceeded`` or an uncaught
    ``SoftTimeLimitExceeded`` -> ``"time-limited"``, ``Terminated`` (``revoke(terminate=True)``)
    -> ``"revoked"``, ``WorkerLostError`` (its child died) -> ``"lost"``, anything else
    (``Reject`` and ``Ignore`` included) -> ``"failed"``.
    """
    if not failed:
        return "succeeded"
    exc = getattr(retval, "exception", retval)
    while isinstance(exc, ExceptionWithTraceback):  # ExceptionInfo wraps every exception
        exc = exc.exc
    if isinstance(exc, Retry):
        return "retried"
    if isinstance(exc, (TimeLimitExceeded, SoftTimeLimitExceeded)):
        return "time-limited"
    if isinstance(exc, Terminated):
        return "revoked"
    if isinstance(exc, WorkerLostError):
        return "lost"
    return "failed"


@dataclass(frozen=True)
class HistogramSnapshot:
    """One histogram's state: cumulative counts per bucket bound, sum and count."""

    buckets: tuple[tuple[float, int], ...]  # (upper bound, cumulative count); last is +Inf
    sum_s: float
    count: int


@dataclass(frozen=True)
class InputStatsSnapshot:
    """A consistent copy of :class:`InputStats` (what one scrape exports)."""

    outcomes: Mapping[tuple[str, str], int]  # (task, state) -> count
    durations: Mapping[str, HistogramSnapshot]  # task -> run time
    waits: Mapping[str, HistogramSnapshot]  # task -> received to started

    @property
    def tasks(self) -> list[str]:
        """Every task name seen, sorted."""
        names = {t for t, _ in self.outcomes} | set(self.durations) | set(self.waits)
        return sorted(names)


class _Histogram:
    __slots__ = ("counts", "sum_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_S) + 1)
        self.sum_s = 0.0

    def observe(self, value_s: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_S, value_s)] += 1
        self.sum_s += value_s

    def snapshot(self) -> HistogramSnapshot:
        running = 0
        buckets = []
        for bound, count in zip((*BUCKETS_S, math.inf), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return HistogramSnapshot(tuple(buckets), self.sum_s, running)


class InputStats:
    """Thread-safe counters of input outcomes and histograms of run and wait time, per task.

    The pool calls :meth:`observe_started` when an input starts and :meth:`observe_finished`
    when it ends; the metrics collector exports a :meth:`snapshot` at each scrape. Both
    calls are cheap (a lock, a dict lookup, a bisect) and never raise for a value they can
    clamp.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcomes: dict[tuple[str, str], int] = {}
        self._durations: dict[str, _Histogram] = {}
        self._waits: dict[str, _Histogram] = {}

    def observe_started(self, task: str, wait_s: float) -> None:
        """Record that an input of ``task`` started ``wait_s`` seconds after it was received."""
        wait_s = _seconds(wait_s)
        with self._lock:
            histogram = self._waits.get(task)
            if histogram is None:
                histogram = self._waits[task] = _Histogram()
            histogram.observe(wait_s)

    def observe_finished(self, task: str, outcome: str, run_s: float | None) -> None:
        """Record that an input of ``task`` ended as ``outcome`` after running ``run_s`` s.

        ``outcome`` is one of :data:`OUTCOMES` (see :func:`outcome_of`); ``run_s`` is None
        when the run time is unknown (for instance its child died): the outcome is counted
        and the run-time histogram left alone.
        """
        if outcome not in OUTCOMES:
            raise ValueError(
                f"InputStats.observe_finished: unknown outcome {outcome!r} for task {task!r}; "
                f"use one of {', '.join(OUTCOMES)} (outcome_of() classifies a pool result)"
            )
        duration = None if run_s is None else _seconds(run_s)
        with self._lock:
            key = (task, outcome)
            self._outcomes[key] = self._outcomes.get(key, 0) + 1
            if duration is not None:
                histogram = self._durations.get(task)
                if histogram is None:
                    histogram = self._durations[task] = _Histogram()
                histogram.observe(duration)

    def snapshot(self) -> InputStatsSnapshot:
        """A consistent copy of every counter and histogram."""
        with self._lock:
            return InputStatsSnapshot(
                outcomes=dict(self._outcomes),
                durations={t: h.snapshot() for t, h in self._durations.items()},
                waits={t: h.snapshot() for t, h in self._waits.items()},
            )

    def clear(self) -> None:
        """Forget everything (a new worker process starts from zero)."""
        with self._lock:
            self._outcomes.clear()
            self._durations.clear()
            self._waits.clear()

    def _after_fork_in_child(self) -> None:
        # A child forked while a scrape held the lock must not inherit it locked.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        with self._lock:
            finished = sum(self._outcomes.values())
            started = sum(sum(h.counts) for h in self._waits.values())
        return f"<InputStats started={started} finished={finished}>"


def _seconds(value: float) -> float:
    """A duration as a finite float >= 0 (clock skew between processes can make it negative)."""
    number = float(value)
    return number if math.isfinite(number) and number > 0 else 0.0


#: What the worker's metrics export; the pool records into it.
INPUT_STATS = InputStats()


# -- gauges ---------------------------------------------------------------------------------


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
    backlog_age_s: float | None = None  # seconds since ``backlog`` was read from the broker
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
    # The structured snapshots (the flat info() of stats/Flower is for display).
    read_pool = getattr(pool, "snapshot", None)
    info: dict[str, Any] = dict(read_pool() if read_pool is not None else pool._get_info())
    autoscaler = getattr(worker, "autoscaler", None)
    scaler: dict[str, Any] = {}
    read_scaler = getattr(autoscaler, "snapshot", None) or getattr(autoscaler, "info", None)
    if read_scaler is not None:
        # snapshot() only reads attributes; holding the pool's lock keeps its cache of
        # task limits (filled by limits_for) consistent with the pool's own readers.
        lock = getattr(pool, "_lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            scaler = dict(read_scaler())

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
    (
        "backlog_age_seconds",
        "Seconds since backlog was read from the broker (a scrape re-reads it when older "
        "than concurrent_backlog_poll_interval).",
    ),
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
        "backlog_age_seconds": sample.backlog_age_s,
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


_INPUTS_DOC = (
    "Inputs that ended, by outcome (state: succeeded, failed, retried, revoked, time-limited, "
    "lost)."
)
_DURATION_DOC = "Run time of inputs, started to finished."
_WAIT_DOC = "Wait of inputs, received by the worker to started in a child."


def input_families(snapshot: InputStatsSnapshot, worker: str) -> list[Metric]:
    """The outcome counter and the two histograms of ``snapshot``, labelled ``worker``.

    Every task seen gets all of :data:`OUTCOMES`, zeros included, so ``rate()`` and
    dashboards see a series before its first failure.
    """
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    counter = CounterMetricFamily(
        f"{PREFIX}_inputs", _INPUTS_DOC, labels=["worker", "task", "state"]
    )
    tasks = snapshot.tasks
    for task in tasks:
        for state in OUTCOMES:
            counter.add_metric([worker, task, state], snapshot.outcomes.get((task, state), 0))
    families: list[Metric] = [counter]
    for name, doc, histograms in (
        ("input_duration_seconds", _DURATION_DOC, snapshot.durations),
        ("input_wait_seconds", _WAIT_DOC, snapshot.waits),
    ):
        family = HistogramMetricFamily(f"{PREFIX}_{name}", doc, labels=["worker", "task"])
        for task in sorted(histograms):
            histogram = histograms[task]
            buckets = [(_le(bound), count) for bound, count in histogram.buckets]
            family.add_metric([worker, task], buckets, sum_value=histogram.sum_s)
        families.append(family)
    return families


class BacklogReader:
    """The freshest broker backlog of a worker with a TargetAutoscaler, for a scrape.

    The autoscaler reads the backlog on its own tick, in the worker's event loop. When its
    last reading is older than its poll interval (``concurrent_backlog_poll_interval``), the
    scrape reads the broker again, through a probe and a connection of its own (kombu
    connections are not shared between threads), so the gauge never stays stale.
    """

    def __init__(self, worker: Any) -> None:
        self._worker = worker
        self._lock = threading.Lock()
        self._probe: BacklogProbe | None = None

    def read(self) -> tuple[int, float] | None:
        """``(backlog, seconds since it was read)``, or None without a TargetAutoscaler."""
        autoscaler = getattr(self._worker, "autoscaler", None)
        theirs = getattr(autoscaler, "backlog", None)
        if not isinstance(theirs, BacklogProbe):
            return None
        with self._lock:
            value = _int(getattr(getattr(autoscaler, "last_load", None), "backlog", 0))
            read_at = theirs.last_read_at
            now = time.monotonic()
            if read_at is None or now - read_at >= theirs.interval_s:
                own = self._own_probe(autoscaler, theirs.interval_s)
                own_value = own.read()
                own_at = own.last_read_at
                if own_at is not None and (read_at is None or own_at > read_at):
                    value, read_at = own_value, own_at
                now = time.monotonic()
        return value, 0.0 if read_at is None else max(now - read_at, 0.0)

    def _own_probe(self, autoscaler: Any, interval_s: float) -> BacklogProbe:
        if self._probe is None:
            queues = getattr(autoscaler, "_consumed_queues", None)
            self._probe = BacklogProbe(
                connect=self._worker.app.connection_for_read,
                queues=queues if callable(queues) else _no_queues,
                interval_s=interval_s,
            )
        return self._probe

    def close(self) -> None:
        """Close the scrape's own broker connection, if it opened one."""
        with self._lock:
            if self._probe is not None:
                self._probe.close()
                self._probe = None


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it: ``0.005``, ``1.0``, ``+Inf``."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _no_queues() -> Iterable[str]:
    return ()


def make_collector(
    worker: Any,
    *,
    stats: InputStats | None = None,
    backlog: BacklogReader | None = None,
) -> Collector:
    """A Prometheus collector reading ``worker`` at each scrape.

    ``stats`` defaults to :data:`INPUT_STATS`; ``backlog`` (default: a new
    :class:`BacklogReader`) refreshes the backlog gauge when it is stale.
    """
    from prometheus_client.registry import Collector

    input_stats = INPUT_STATS if stats is None else stats
    reader = BacklogReader(worker) if backlog is None else backlog

    class ConcurrentCollector(Collector):
        def collect(self) -> Iterator[Metric]:
            try:
                sample = read_sample(worker)
                if sample.backlog is not None:
                    reading = reader.read()
                    if reading is not None:
                        sample = replace(sample, backlog=reading[0], backlog_age_s=reading[1])
            except Exception:
                # Propagate: the scrape fails (HTTP 500, Prometheus marks up=0) instead of
                # reporting made-up numbers; log why, as prometheus_client does not.
                logger.exception("celery-concurrent metrics: reading the worker failed")
                raise
            yield from metric_families(sample)
            yield from input_families(input_stats.snapshot(), sample.worker)

    return ConcurrentCollector()


def exported_names() -> frozenset[str]:
    """Every sample name a worker's ``/metrics`` can carry (``_total``, ``_bucket``... included).

    Built by exporting one sample with every optional value set, so it cannot drift from
    what :func:`metric_families` and :func:`input_families` emit. Needs ``prometheus_client``.
    """
    sample = Sample(
        worker="w", children=1, desired_children=1, demand_children=1.0,
        draining_children=0, inflight_inputs=0, waiting_inputs=0, input_slots=1,
        backlog=0, backlog_age_s=0.0, autoscale_max=1, autoscale_min=1,
        tasks={"t": TaskSample(max_inputs=1, target_inputs=1)},
    )  # fmt: skip
    stats = InputStats()
    stats.observe_started("t", 0.0)
    stats.observe_finished("t", "succeeded", 0.0)
    families = [*metric_families(sample), *input_families(stats.snapshot(), "w")]
    return frozenset(s.name for family in families for s in family.samples)


# Listening sockets of running metrics servers: children forked by the pool close their
# copy, so a child never holds the port (and never outlives the parent holding it).
_SERVERS: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for server in list(_SERVERS):
        with contextlib.suppress(Exception):
            server.socket.close()
    _SERVERS.clear()
    INPUT_STATS._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
        self.backlog: BacklogReader | None = None
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
        self.backlog = BacklogReader(w)
        self.registry.register(make_collector(w, backlog=self.backlog))
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
        if server is not None:
            _SERVERS.discard(server)
            with contextlib.suppress(Exception):
                server.shutdown()
                server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)
            self.thread = None
        if self.backlog is not None:  # after the server: no scrape uses it any more
            self.backlog.close()
            self.backlog = None

    def terminate(self, w: Any) -> None:
        self.stop(w)

    def info(self, w: Any) -> dict[str, Any]:
        if self.endpoint is None:
            return {}
        address, port = self.endpoint
        if self.server is not None:
            port = int(self.server.server_address[1])
        return {"metrics": {"address": address, "port": port, "path": "/metrics"}}
