"""A discrete-time model of the two scaling levels: KEDA/HPA pods x TargetAutoscaler children.

Replays an arrival trace (inputs/s over time) against a fleet of worker pods::

    python -m autoscale.simulate --trace spike --out autoscale/plots
    python -m autoscale.simulate --trace all          # ramp, spike, diurnal
    python -m autoscale.simulate --sweep              # the settings table of autoscale/README.md

**Across pods**, the HPA that KEDA creates (or ``hpa.yaml``'s) runs every ``sync_s`` (15 s):
it reads ``sum(celery_concurrent_desired_children)`` as Prometheus last scraped it (every
``scrape_s``, 10 s, per pod), computes ``ceil(total / threshold)`` with the 10% tolerance
against the current replica count (:func:`external_replicas`; :func:`pods_metric_replicas`
for ``hpa.yaml``'s Pods metric), then applies the stabilisation windows and rate policies of
the manifests (:class:`Hpa`, the controller's ``normalizeDesiredReplicasWithBehaviors``).
New pods consume after ``pod_start_s``; removed pods stop consuming and finish their inputs.

**Inside a pod**, each worker runs the real decision of
:class:`celery_concurrent.autoscale.TargetAutoscaler`: :class:`~celery_concurrent.load.Load`
(running = reserved = inputs in the pod, backlog = the broker list length the pod last read,
every 1 s or 0.2 s when full), :func:`~celery_concurrent.load.demand_in_children` and
:func:`~celery_concurrent.load.desired_children`, at most every 0.2 s while messages arrive
and every 1 s otherwise; scale-up at once (a child takes ``child_start_s``), scale-down to the
highest wanted count of the last ``scaledown_window_s`` once a whole window has passed since
the last scale-up, draining the removed children. A pod holds at most its prefetch, children
x ``max_inputs`` (multiplier 1); pods with room share the broker list equally (Redis BRPOP).
Inputs placed on a child still starting wait for it; every input runs ``service_s``.

What is not modelled: per-message CPU in the worker's main process (a pod tops out near
600-850 messages/s on this machine, above the 320/s a full pod needs at the defaults),
node autoscaling (fold it into ``pod_start_s``), broker latency, failures.

Settings come from the manifests next to this file (:func:`read_manifests`); the worker's
from :mod:`celery_concurrent.defaults` and the bench task (``max_inputs=40``,
``target_inputs=20``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from celery_concurrent.autoscale import MIN_DECISION_GAP_S, TICK_S, TOLERANCE
from celery_concurrent.defaults import SETTINGS
from celery_concurrent.load import FRESH_INTERVAL_S, Load, demand_in_children, desired_children

__all__ = [
    "DOWN_1_POD",
    "DOWN_10_PERCENT",
    "TRACES",
    "FleetConfig",
    "Hpa",
    "Policy",
    "Result",
    "ScalingRules",
    "SimConfig",
    "Trace",
    "WorkerConfig",
    "before",
    "external_replicas",
    "main",
    "pods_metric_replicas",
    "read_manifests",
    "share_out",
    "simulate",
    "variants",
    "weighted_percentile",
    "worker_wants",
]

HERE = Path(__file__).resolve().parent
TASK = "bench.autoscale.io_wait"
Ints = npt.NDArray[np.int64]

FREE, PENDING, RUNNING, TERMINATING = 0, 1, 2, 3


# -- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """One HPA scaling policy: at most ``value`` pods (or percent) per ``period_s``."""

    kind: str  # "Pods" or "Percent"
    value: int
    period_s: float


@dataclass(frozen=True)
class ScalingRules:
    """``behavior.scaleUp`` or ``behavior.scaleDown`` of an HPA."""

    stabilization_s: float
    policies: tuple[Policy, ...]
    select: str = "Max"  # Max, Min or Disabled


#: Kubernetes' defaults when ``behavior`` leaves a direction out.
DEFAULT_UP = ScalingRules(0.0, (Policy("Percent", 100, 15.0), Policy("Pods", 4, 15.0)))
DEFAULT_DOWN = ScalingRules(300.0, (Policy("Percent", 100, 15.0),))


@dataclass(frozen=True)
class FleetConfig:
    """The pod level: KEDA / HPA."""

    min_pods: int
    max_pods: int
    threshold: float  # desired children per pod (the metric's target average value)
    up: ScalingRules
    down: ScalingRules
    source: str = "keda"  # keda: External AverageValue; hpa: Pods metric (hpa.yaml)
    metric: str = "desired"  # desired: sum(desired_children); exact: (inputs + backlog)/target
    tolerance: float = 0.1  # --horizontal-pod-autoscaler-tolerance
    sync_s: float = 15.0  # --horizontal-pod-autoscaler-sync-period
    scrape_s: float = 10.0  # podmonitor.yaml interval
    pod_start_s: float = 30.0  # replica count raised -> worker consuming
    fixed_pods: int | None = None  # no HPA: this many pods, all running from t=0


@dataclass(frozen=True)
class WorkerConfig:
    """The child level: one worker per pod with TargetAutoscaler."""

    max_inputs: int = 40  # slots per child (autoscale/check_model_tasks.py)
    target_inputs: int = 20
    min_children: int = 1  # --autoscale=MAX,MIN
    max_children: int = 4
    child_start_s: float = 0.2
    scaledown_window_s: float = float(SETTINGS["concurrent_scaledown_window"])
    backlog_poll_s: float = float(SETTINGS["concurrent_backlog_poll_interval"])
    fresh_poll_s: float = FRESH_INTERVAL_S
    tick_s: float = TICK_S
    decision_gap_s: float = MIN_DECISION_GAP_S
    tolerance: float = TOLERANCE


@dataclass(frozen=True)
class SimConfig:
    """The simulation itself."""

    dt_s: float = 0.1
    service_s: float = 0.5
    record_s: float = 1.0  # time-series resolution
    latency_window_s: float = 10.0  # p50/p99 per window of arrival time
    drain_limit_s: float = 1800.0  # after the trace, run on until empty, at most this long
    warmup_s: float = 30.0  # the HPA starts acting after this (the first scrapes settle)
    split: str = "equal"  # how pods with room share the broker list: equal or random
    seed: int = 1


def _duration_s(text: str | float | int) -> float:
    if isinstance(text, int | float):
        return float(text)
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


def _rules(raw: dict[str, Any] | None, default: ScalingRules) -> ScalingRules:
    if raw is None:
        return default
    policies = tuple(
        Policy(str(p["type"]), int(p["value"]), float(p["periodSeconds"]))
        for p in raw.get("policies") or ()
    )
    return ScalingRules(
        stabilization_s=float(raw.get("stabilizationWindowSeconds", default.stabilization_s)),
        policies=policies or default.policies,
        select=str(raw.get("selectPolicy", "Max")),
    )


def _load_one(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise ValueError(f"{path}: expected one YAML document, found {len(docs)}")
    return docs[0]


def read_manifests(
    directory: Path = HERE, source: str = "keda"
) -> tuple[FleetConfig, WorkerConfig]:
    """Fleet and worker settings as the manifests in ``directory`` configure them.

    ``source`` ``keda`` reads ``keda-scaledobject.yaml``, ``hpa`` reads ``hpa.yaml``; both
    read ``worker-deployment.yaml`` (``--autoscale``) and ``podmonitor.yaml`` (scrape).
    """
    deployment = _load_one(directory / "worker-deployment.yaml")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    autoscale = next((a for a in command if str(a).startswith("--autoscale=")), None)
    if autoscale is None:
        raise ValueError("worker-deployment.yaml: no --autoscale=MAX,MIN in the worker command")
    hi, lo = (int(x) for x in str(autoscale).partition("=")[2].split(","))
    monitor = _load_one(directory / "podmonitor.yaml")
    scrape_s = _duration_s(monitor["spec"]["podMetricsEndpoints"][0].get("interval", "30s"))
    if source == "keda":
        spec = _load_one(directory / "keda-scaledobject.yaml")["spec"]
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
        behavior = behavior.get("behavior", {})
        trigger = spec["triggers"][0]
        lo_pods, hi_pods = int(spec.get("minReplicaCount", 0)), int(spec["maxReplicaCount"])
        threshold = float(trigger["metadata"]["threshold"])
    elif source == "hpa":
        spec = _load_one(directory / "hpa.yaml")["spec"]
        behavior = spec.get("behavior", {})
        lo_pods, hi_pods = int(spec.get("minReplicas", 1)), int(spec["maxReplicas"])
        threshold = float(spec["metrics"][0]["pods"]["target"]["averageValue"])
    else:
        raise ValueError(f"source must be 'keda' or 'hpa', got {source!r}")
    fleet = FleetConfig(
        min_pods=max(lo_pods, 1),
        max_pods=hi_pods,
        threshold=threshold,
        up=_rules(behavior.get("scaleUp"), DEFAULT_UP),
        down=_rules(behavior.get("scaleDown"), DEFAULT_DOWN),
        source=source,
        scrape_s=scrape_s,
    )
    return fleet, WorkerConfig(min_children=lo, max_children=hi)


# -- the pod level: the HPA controller's arithmetic --------------------------------------------


def _within(ratio: float, tolerance: float) -> bool:
    return (1.0 - tolerance) <= ratio <= (1.0 + tolerance)


def external_replicas(total: float, target: float, current: int, tolerance: float = 0.1) -> int:
    """Replicas for an External metric with an AverageValue target (what KEDA gives the HPA).

    ``ceil(total / target)``, unless ``total / (target x current)`` is within tolerance of 1,
    which keeps ``current`` (GetExternalPerPodMetricReplicas).
    """
    if current > 0 and _within(total / (target * current), tolerance):
        return current
    return math.ceil(total / target - 1e-9)


def pods_metric_replicas(
    values: Sequence[float],
    unready: int,
    missing: int,
    target: float,
    current: int,
    tolerance: float = 0.1,
) -> int:
    """Replicas for a Pods metric with an AverageValue target (``hpa.yaml``).

    ``values`` are the pods that have a sample; ``unready`` pods are still Pending, ``missing``
    ones run but have no sample yet. Missing pods count as 0 on a scale-up and as the target
    on a scale-down; unready pods as 0 on a scale-up (calcPlainMetricReplicas).
    """
    if not values:
        return current
    ratio = sum(values) / (target * len(values))
    scale_up_with_unready = unready > 0 and ratio > 1.0
    if not scale_up_with_unready and missing == 0:
        if _within(ratio, tolerance):
            return current
        return math.ceil(ratio * len(values) - 1e-9)
    filled = list(values)
    if missing:
        filled += [target if ratio < 1.0 else 0.0] * missing
    if scale_up_with_unready:
        filled += [0.0] * unready
    new_ratio = sum(filled) / (target * len(filled))
    if (
        _within(new_ratio, tolerance)
        or (ratio > 1.0 and new_ratio < 1.0)
        or (ratio < 1.0 and new_ratio > 1.0)
    ):
        return current
    proposed = math.ceil(new_ratio * len(filled) - 1e-9)
    if (new_ratio < 1.0 and proposed > current) or (new_ratio > 1.0 and proposed < current):
        return current
    return proposed


@dataclass
class Hpa:
    """Stabilisation windows and rate policies (normalizeDesiredReplicasWithBehaviors)."""

    min_pods: int
    max_pods: int
    up: ScalingRules
    down: ScalingRules
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    up_events: list[tuple[float, int]] = field(default_factory=list)
    down_events: list[tuple[float, int]] = field(default_factory=list)

    @classmethod
    def of(cls, fleet: FleetConfig) -> Hpa:
        """The HPA of a fleet configuration."""
        return cls(fleet.min_pods, fleet.max_pods, fleet.up, fleet.down)

    def decide(self, now_s: float, current: int, proposed: int) -> int:
        """Replicas after one reconcile, given the metric's ``proposed`` count."""
        if current == 0:
            return current  # scaling disabled (KEDA activates 0 -> 1 itself)
        if current > self.max_pods:
            new = self.max_pods
        elif current < self.min_pods:
            new = self.min_pods
        else:
            stabilized = self.stabilize(now_s, current, proposed)
            new = self.limit_rate(now_s, current, stabilized)
        if new != current:
            events = self.up_events if new > current else self.down_events
            events.append((now_s, abs(new - current)))
            longest = max(p.period_s for p in (self.up.policies + self.down.policies))
            del events[: sum(1 for at, _ in events if at < now_s - longest)]
        return new

    def stabilize(self, now_s: float, current: int, proposed: int) -> int:
        """Hold ``current`` between the lowest recommendation of the scale-up window and the
        highest of the scale-down window (both including ``proposed``)."""
        up_cut = now_s - self.up.stabilization_s
        down_cut = now_s - self.down.stabilization_s
        up_rec = down_rec = proposed
        for at, rec in self.recommendations:
            if at > up_cut:
                up_rec = min(rec, up_rec)
            if at > down_cut:
                down_rec = max(rec, down_rec)
        oldest = min(up_cut, down_cut)
        self.recommendations = [(at, r) for at, r in self.recommendations if at > oldest]
        self.recommendations.append((now_s, proposed))
        return min(max(current, up_rec), down_rec)

    def limit_rate(self, now_s: float, current: int, desired: int) -> int:
        """Apply the scale-up / scale-down policies and the replica range."""
        if desired > current:
            limit = max(self._limit(now_s, current, self.up, +1), current)
            return min(desired, self.max_pods, limit)
        if desired < current:
            limit = min(self._limit(now_s, current, self.down, -1), current)
            return max(desired, self.min_pods, limit)
        return desired

    def _limit(self, now_s: float, current: int, rules: ScalingRules, sign: int) -> int:
        if rules.select == "Disabled":
            return current
        proposals = []
        for policy in rules.policies:
            cut = now_s - policy.period_s
            added = sum(n for at, n in self.up_events if at > cut)
            deleted = sum(n for at, n in self.down_events if at > cut)
            start = current - added + deleted
            if policy.kind == "Pods":
                proposals.append(start + sign * policy.value)
            elif sign > 0:
                proposals.append(math.ceil(start * (1 + policy.value / 100) - 1e-9))
            else:
                proposals.append(int(start * (1 - policy.value / 100)))
        # Max picks the biggest change: the highest limit up, the lowest limit down.
        biggest = rules.select != "Min"
        return (max if (sign > 0) == biggest else min)(proposals)


# -- the child level: the real TargetAutoscaler decision ---------------------------------------


def worker_wants(
    inflight: int, backlog: int, current: int, worker: WorkerConfig
) -> tuple[float, int]:
    """(demand in children, wanted children) of one worker, by the library's own functions."""
    load = Load(
        running=inflight,
        reserved=inflight,
        backlog=backlog,
        by_task={TASK: inflight} if inflight else {},
    )
    demand = demand_in_children(load, lambda _name: worker.target_inputs, worker.target_inputs)
    wanted = desired_children(
        demand, current, max(worker.min_children, 1), worker.max_children, worker.tolerance
    )
    return demand, wanted


def share_out(
    total: int, caps: Ints, rotate: int = 0, rng: np.random.Generator | None = None
) -> Ints:
    """Split ``total`` inputs over pods with room ``caps``, none above its room.

    Integer shares summing to ``min(total, caps.sum())``. Equal shares by default (the units
    left after the equal level go to pods in an order rotated by ``rotate``); with ``rng``,
    each input goes to a pod with room at random, as competing BRPOPs hand them out.
    """
    room = int(caps.sum())
    if total >= room:
        return caps.copy()
    if total <= 0:
        return np.zeros_like(caps)
    if rng is not None:
        drawn: Ints = np.zeros_like(caps)
        while total - int(drawn.sum()):
            open_ = caps > drawn
            draw = rng.multinomial(total - int(drawn.sum()), open_ / open_.sum())
            drawn = np.minimum(caps, drawn + draw)
        return drawn
    ordered = np.sort(caps)
    n = len(ordered)
    below = np.concatenate(([0], np.cumsum(ordered)[:-1]))  # room of the i smallest pods
    levels = (total - below) / (n - np.arange(n))
    first = int(np.argmax(levels <= ordered))  # first pod whose room exceeds the level
    level = math.floor(levels[first])
    shares: Ints = np.minimum(caps, level)
    left = total - int(shares.sum())
    if left:
        candidates = np.nonzero(caps > shares)[0]
        candidates = np.roll(candidates, -(rotate % len(candidates)))
        shares[candidates[:left]] += 1
    return shares


# -- traces ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """Arrivals as a rate over time (inputs/s), or as given arrival times."""

    name: str
    description: str
    duration_s: float
    rate: Callable[[float], float] | None = None
    times_s: tuple[float, ...] = ()  # exact arrival offsets (a replayed real run)
    pods_of: tuple[int, ...] = ()  # with times_s: the pod that took each input (pinned replay)

    def counts(self, dt_s: float) -> Ints:
        """Arrivals per step of ``dt_s`` (the rate's integral, with the remainder carried)."""
        steps = math.ceil(self.duration_s / dt_s - 1e-9)
        if self.times_s:
            index = np.minimum((np.asarray(self.times_s) / dt_s).astype(np.int64), steps - 1)
            return np.bincount(index, minlength=steps).astype(np.int64)
        if self.rate is None:
            raise ValueError(f"trace {self.name!r} has neither a rate nor arrival times")
        mids = (np.arange(steps) + 0.5) * dt_s
        expected = np.array([self.rate(float(t)) for t in mids]) * dt_s
        cumulative = np.floor(np.cumsum(expected) + 1e-9).astype(np.int64)
        return np.diff(np.concatenate(([0], cumulative)))

    def pod_counts(self, dt_s: float, pods: int) -> Ints:
        """Arrivals per step and pod, ``[steps, pods]``, for a pinned replay (``pods_of``)."""
        if len(self.pods_of) != len(self.times_s):
            raise ValueError(
                f"trace {self.name!r}: pods_of has {len(self.pods_of)} entries for "
                f"{len(self.times_s)} arrival times; give one pod index per arrival"
            )
        steps = math.ceil(self.duration_s / dt_s - 1e-9)
        index = np.minimum((np.asarray(self.times_s) / dt_s).astype(np.int64), steps - 1)
        out = np.zeros((steps, pods), np.int64)
        np.add.at(out, (index, np.asarray(self.pods_of, np.int64)), 1)
        return out

    def rate_at(self, t: float, dt_s: float = 1.0) -> float:
        """Inputs/s at ``t`` (for replayed times: over the ``dt_s`` around it)."""
        if self.rate is not None:
            return self.rate(t)
        return sum(1 for x in self.times_s if t <= x < t + dt_s) / dt_s


def _piecewise(points: Sequence[tuple[float, float]]) -> Callable[[float], float]:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]

    def rate(t: float) -> float:
        return float(np.interp(t, xs, ys))

    return rate


def _diurnal(period_s: float, low: float, high: float, seed: int) -> Callable[[float], float]:
    rng = np.random.default_rng(seed)
    knots = np.arange(0.0, period_s + 61.0, 60.0)
    noise = np.clip(1.0 + np.cumsum(rng.normal(0.0, 0.03, len(knots))), 0.8, 1.2)

    def rate(t: float) -> float:
        x = t / period_s
        shape = 0.55 * math.exp(-(((x - 0.38) / 0.09) ** 2)) + math.exp(-(((x - 0.72) / 0.08) ** 2))
        return (low + (high - low) * shape) * float(np.interp(t, knots, noise))

    return rate


def _traces() -> dict[str, Trace]:
    minute = 60.0
    return {
        "ramp": Trace(
            "ramp",
            "500 -> 20,000 inputs/s over 20 min, 10 min at 20,000/s, back to 500/s over 20 min",
            70 * minute,
            _piecewise(
                [
                    (0, 500),
                    (10 * minute, 500),
                    (30 * minute, 20000),
                    (40 * minute, 20000),
                    (60 * minute, 500),
                    (70 * minute, 500),
                ]
            ),
        ),
        "spike": Trace(
            "spike",
            "2,000 inputs/s; 20,000/s for 3 min at t = 5 min; 2,000/s again",
            25 * minute,
            _piecewise(
                [
                    (0, 2000),
                    (5 * minute, 2000),
                    (5 * minute + 1, 20000),
                    (8 * minute, 20000),
                    (8 * minute + 1, 2000),
                    (25 * minute, 2000),
                ]
            ),
        ),
        "diurnal": Trace(
            "diurnal",
            "a day compressed into 4 h: about 1,000/s at night, peaks of 7,000/s and "
            "12,000/s, a minute-scale random walk of up to +-20% on top",
            4 * 3600.0,
            _diurnal(4 * 3600.0, 1000.0, 15000.0, seed=7),
        ),
    }


TRACES: dict[str, Trace] = _traces()


# -- the fleet ----------------------------------------------------------------------------------


@dataclass
class Result:
    """One run: time series, latency windows and the summary."""

    trace: str
    label: str
    series: dict[str, list[float]]
    latency: dict[str, list[float]]
    summary: dict[str, float]
    config: dict[str, Any]
    per_pod: dict[str, list[list[int]]] = field(default_factory=dict)


def _steps(seconds: float, dt_s: float, least: int = 1) -> int:
    return max(least, round(seconds / dt_s))


class Fleet:
    """The state of every pod, as arrays indexed by pod slot."""

    def __init__(self, fleet: FleetConfig, worker: WorkerConfig, sim: SimConfig) -> None:
        self.fleet, self.worker, self.sim = fleet, worker, sim
        dt = sim.dt_s
        self.service = _steps(sim.service_s, dt)
        self.child_start = _steps(worker.child_start_s, dt)
        self.tick = _steps(worker.tick_s, dt)
        self.gap = _steps(worker.decision_gap_s, dt)
        self.poll = _steps(worker.backlog_poll_s, dt)
        self.fresh = _steps(worker.fresh_poll_s, dt)
        self.window = _steps(worker.scaledown_window_s, dt, least=0)
        self.bin = _steps(1.0, dt)
        self.window_bins = self.window // self.bin
        self.scrape = _steps(fleet.scrape_s, dt)
        self.sync = _steps(fleet.sync_s, dt)
        self.pod_start = _steps(fleet.pod_start_s, dt, least=0)
        self.warmup = _steps(sim.warmup_s, dt, least=0)
        self.ring_len = self.service + self.child_start + 1
        self.slots = worker.max_inputs
        self.rng = np.random.default_rng(sim.seed)
        self.hpa = Hpa.of(fleet)
        self.sync_phase = int(self.rng.integers(0, self.sync))
        self.queue: deque[list[int]] = deque()  # broker list: [arrival step, count], FIFO
        self.queued = 0
        self.served = 0
        self.arrived = 0
        self.metric_value = math.nan
        self.hpa_proposed = 0
        self.records: list[tuple[int, int, int]] = []  # (arrival step, start step, count)
        self.pods_created = 0
        self._cache: dict[tuple[int, int, int], int] = {}
        #: Pinned replay: per pod slot, its own FIFO of [arrival step, count] (None: shared).
        self.pinned: list[deque[list[int]]] | None = None
        self.pinned_len: Ints = np.zeros(0, np.int64)
        self._allocate(max(2 * (fleet.fixed_pods or fleet.max_pods) + 16, 32))

    # -- storage --

    def _allocate(self, n: int) -> None:
        c, d, w = self.worker.max_children, 2 * self.worker.max_children, self.window_bins + 1
        self.n = n
        self.state = np.zeros(n, np.int64)
        self.ready_at = np.zeros(n, np.int64)
        self.created = np.zeros(n, np.int64)
        self.n_acc = np.zeros(n, np.int64)
        self.child_ready = np.zeros((n, c), np.int64)
        self.pend = np.zeros((n, c), np.int64)
        self.ring = np.zeros((n, self.ring_len), np.int64)
        self.inflight = np.zeros(n, np.int64)
        self.drain_exit = np.full((n, d), -1, np.int64)
        self.desired = np.zeros(n, np.int64)
        self.last_dec = np.zeros(n, np.int64)
        self.backlog_seen = np.zeros(n, np.int64)
        self.backlog_read = np.zeros(n, np.int64)
        self.observing = np.zeros(n, np.int64)
        self.recent = np.zeros((n, w), np.int64)
        self.recent_bin = np.full((n, w), -1, np.int64)
        self.received = np.zeros(n, bool)
        self.scrape_phase = np.zeros(n, np.int64)
        self.s_desired = np.zeros(n, np.int64)
        self.s_inflight = np.zeros(n, np.int64)
        self.s_backlog = np.zeros(n, np.int64)
        self.s_ok = np.zeros(n, bool)

    def _grow_storage(self) -> None:
        old = {name: getattr(self, name) for name in vars(self) if _is_pod_array(self, name)}
        n = self.n
        self._allocate(2 * n)
        for name, array in old.items():
            getattr(self, name)[:n] = array

    def _free_slots(self, count: int) -> Ints:
        while int((self.state == FREE).sum()) < count:
            self._grow_storage()
        return np.nonzero(self.state == FREE)[0][:count]

    # -- pods --

    def add_pods(self, count: int, k: int, running: bool = False, children: int = 0) -> None:
        """Create ``count`` pods: Pending until ``pod_start_s`` (or running now)."""
        idx = self._free_slots(count)
        self.pods_created += count
        self.created[idx] = k
        if running:
            self._boot(idx, k, children)
        else:
            self.state[idx] = PENDING
            self.ready_at[idx] = k + self.pod_start

    def _boot(self, idx: Ints, k: int, children: int = 0) -> None:
        n_acc = max(children, self.worker.min_children, 1)
        self.state[idx] = RUNNING
        self.n_acc[idx] = n_acc
        self.child_ready[idx] = k  # the pool forks its children before the consumer starts
        self.pend[idx] = 0
        self.ring[idx] = 0
        self.inflight[idx] = 0
        self.drain_exit[idx] = -1
        self.desired[idx] = n_acc
        self.last_dec[idx] = k - self.tick
        self.backlog_seen[idx] = 0
        self.backlog_read[idx] = k - self.poll
        self.observing[idx] = k
        self.recent[idx] = 0
        self.recent_bin[idx] = -1
        self.received[idx] = False
        self.scrape_phase[idx] = self.rng.integers(0, self.scrape, len(idx))
        self.s_ok[idx] = False

    def remove_pods(self, count: int, k: int) -> None:
        """ReplicaSet scale-down: Pending pods first, then the newest running ones."""
        pending = np.nonzero(self.state == PENDING)[0]
        pending = pending[np.argsort(-self.created[pending], kind="stable")][:count]
        self.state[pending] = FREE
        count -= len(pending)
        if count <= 0:
            return
        running = np.nonzero(self.state == RUNNING)[0]
        victims = running[np.argsort(-self.created[running], kind="stable")][:count]
        for p in victims:  # warm shutdown: stop consuming, children finish their inputs
            self._drain(int(p), int(self.n_acc[p]), k)
            self.n_acc[p] = 0
            self.state[p] = TERMINATING

    def _drain(self, p: int, children: int, k: int) -> None:
        exit_at = k + (self.service + 1 if self.inflight[p] else 1)
        free = np.nonzero(self.drain_exit[p] <= k)[0][:children]
        self.drain_exit[p, free] = exit_at
        if len(free) < children:  # more draining children than columns: keep the latest
            self.drain_exit[p] = np.maximum(self.drain_exit[p], exit_at)

    # -- one step --

    def pin(self) -> None:
        """Give every pod its own input list (a replay of which worker took which input)."""
        self.pinned = [deque() for _ in range(self.n)]
        self.pinned_len = np.zeros(self.n, np.int64)

    def step(self, k: int, arrivals: int, per_pod: Ints | None = None) -> None:
        """Advance the fleet by one step of ``dt_s``."""
        slot = k % self.ring_len
        done = self.ring[:, slot]
        self.served += int(done.sum())
        self.inflight -= done
        self.ring[:, slot] = 0
        ready = self.child_ready <= k
        self.pend[ready] = 0
        gone = (self.state == TERMINATING) & (self.inflight == 0)
        gone &= (self.drain_exit <= k).all(axis=1)
        self.state[gone] = FREE
        booting = np.nonzero((self.state == PENDING) & (self.ready_at <= k))[0]
        if len(booting):
            self._boot(booting, k)
            ready = self.child_ready <= k
        if per_pod is not None and self.pinned is not None:
            for p in np.nonzero(per_pod)[0].tolist():
                self.pinned[p].append([k, int(per_pod[p])])
            self.pinned_len[: len(per_pod)] += per_pod
            arrivals = int(per_pod.sum())
            self.queued += arrivals
            self.arrived += arrivals
        elif arrivals:
            self.queue.append([k, arrivals])
            self.queued += arrivals
            self.arrived += arrivals
        self._pull(k, ready)
        self._decide(k)
        self._scrape(k)
        hpa_due = k >= self.warmup and (k - self.sync_phase) % self.sync == 0
        if self.fleet.fixed_pods is None and hpa_due:
            self._reconcile(k)

    def _pull(self, k: int, ready: npt.NDArray[np.bool_]) -> None:
        running = self.state == RUNNING
        accepting = np.arange(self.worker.max_children)[None, :] < self.n_acc[:, None]
        is_ready = accepting & ready
        starting = accepting & ~ready
        pend_total = (self.pend * starting).sum(axis=1)
        free_ready = np.clip(
            is_ready.sum(axis=1) * self.slots - (self.inflight - pend_total), 0, None
        )
        free_start = np.where(starting, self.slots - self.pend, 0)
        caps = np.where(running, free_ready + free_start.sum(axis=1), 0)
        if self.pinned is not None:
            alloc = np.minimum(caps, self.pinned_len)
        else:
            rng = self.rng if self.sim.split == "random" else None
            alloc = share_out(self.queued, caps, k, rng)
        total = int(alloc.sum())
        if not total:
            return
        now = np.minimum(alloc, free_ready)
        rest = alloc - now
        self.ring[:, (k + self.service) % self.ring_len] += now
        takes = []
        for j in range(self.worker.max_children):
            take = np.minimum(rest, free_start[:, j])
            rest = rest - take
            takes.append(take)
            rows = np.nonzero(take)[0]
            if not len(rows):
                continue
            self.pend[rows, j] += take[rows]
            starts = self.child_ready[rows, j]
            np.add.at(self.ring, (rows, (starts + self.service) % self.ring_len), take[rows])
        self.inflight += alloc
        self.received |= alloc > 0
        if self.pinned is None:
            self._pop(self._classes(k, now, takes, np.nonzero(alloc)[0]), self.queue)
            return
        for p in np.nonzero(alloc)[0].tolist():
            self._pop(self._classes(k, now, takes, np.array([p])), self.pinned[p])
            self.pinned_len[p] -= alloc[p]

    def _classes(self, k: int, now: Ints, takes: list[Ints], rows: Ints) -> dict[int, int]:
        """Start step -> inputs starting then, for the inputs just placed on ``rows``."""
        classes = {k: int(now[rows].sum())}
        for j, take in enumerate(takes):
            for start, count in zip(
                self.child_ready[rows, j].tolist(), take[rows].tolist(), strict=True
            ):
                if count:
                    classes[start] = classes.get(start, 0) + count
        return classes

    def _pop(self, classes: dict[int, int], queue: deque[list[int]]) -> None:
        """Take inputs off a list's head, oldest to the earliest start."""
        for start in sorted(classes):
            left = classes[start]
            while left:
                head = queue[0]
                take = min(left, head[1])
                self.records.append((head[0], start, take))
                head[1] -= take
                left -= take
                self.queued -= take
                if not head[1]:
                    queue.popleft()

    def _decide(self, k: int) -> None:
        since = k - self.last_dec
        due = (self.state == RUNNING) & (
            (since >= self.tick) | (self.received & (since >= self.gap))
        )
        idx = np.nonzero(due)[0]
        if not len(idx):
            return
        inflight, current = self.inflight[idx], self.n_acc[idx]
        full = inflight >= current * self.slots
        reread = k - self.backlog_read[idx] >= np.where(full, self.fresh, self.poll)
        self.backlog_seen[idx[reread]] = self.queued
        self.backlog_read[idx[reread]] = k
        wanted = self._wanted(inflight, self.backlog_seen[idx], current)
        self.desired[idx] = wanted
        b = k // self.bin
        col = b % (self.window_bins + 1)
        stale = self.recent_bin[idx, col] != b
        self.recent[idx[stale], col] = 0
        self.recent_bin[idx, col] = b
        self.recent[idx, col] = np.maximum(self.recent[idx, col], wanted)
        self.last_dec[idx] = k
        self.received[idx] = False
        up = wanted > current
        for p, have, want in zip(
            idx[up].tolist(), current[up].tolist(), wanted[up].tolist(), strict=True
        ):
            self.child_ready[p, have:want] = k + self.child_start
            self.n_acc[p] = want
            self.recent[p] = 0
            self.recent_bin[p] = -1
            self.observing[p] = k
        down = np.nonzero((wanted < current) & (k - self.observing[idx] >= self.window))[0]
        if not len(down):
            return
        rows = idx[down]
        valid = self.recent_bin[rows] >= b - self.window_bins
        floor = np.where(valid, self.recent[rows], 0).max(axis=1)
        for p, have, low in zip(rows.tolist(), current[down].tolist(), floor.tolist(), strict=True):
            low = max(low, 1)
            if low < have:
                self._drain(p, have - low, k)
                self.n_acc[p] = low

    def _wanted(self, inflight: Ints, backlog: Ints, current: Ints) -> Ints:
        out = np.empty(len(inflight), np.int64)
        for i, key in enumerate(
            zip(inflight.tolist(), backlog.tolist(), current.tolist(), strict=True)
        ):
            wanted = self._cache.get(key)
            if wanted is None:
                wanted = self._cache[key] = worker_wants(*key, self.worker)[1]
                if len(self._cache) > 200_000:
                    self._cache.clear()
            out[i] = wanted
        return out

    def _scrape(self, k: int) -> None:
        due = (self.state == RUNNING) & ((k - self.scrape_phase) % self.scrape == 0)
        self.s_desired[due] = self.desired[due]
        self.s_inflight[due] = self.inflight[due]
        self.s_backlog[due] = self.queued
        self.s_ok[due] = True

    def _reconcile(self, k: int) -> None:
        fleet = self.fleet
        running = self.state == RUNNING
        current = int(((self.state == PENDING) | running).sum())
        seen = running & self.s_ok
        if not seen.any():
            return  # no series: the trigger errors and the HPA holds its count
        if fleet.metric == "exact":
            backlog = int(self.s_backlog[seen].max())
            value = (int(self.s_inflight[seen].sum()) + backlog) / self.worker.target_inputs
        else:
            value = float(self.s_desired[seen].sum())
        self.metric_value = value
        if fleet.source == "hpa":
            proposed = pods_metric_replicas(
                [float(v) for v in self.s_desired[seen]],
                unready=int((self.state == PENDING).sum()),
                missing=int((running & ~self.s_ok).sum()),
                target=fleet.threshold,
                current=current,
                tolerance=fleet.tolerance,
            )
        else:
            proposed = external_replicas(value, fleet.threshold, current, fleet.tolerance)
        self.hpa_proposed = proposed
        new = self.hpa.decide(k * self.sim.dt_s, current, proposed)
        if new > current:
            self.add_pods(new - current, k)
        elif new < current:
            self.remove_pods(current - new, k)

    # -- readings --

    def snapshot(self, k: int) -> dict[str, float]:
        """The fleet now, for the time series."""
        running = self.state == RUNNING
        draining = int((self.drain_exit > k).sum())
        return {
            "pods": int(running.sum()),
            "pods_pending": int((self.state == PENDING).sum()),
            "pods_terminating": int((self.state == TERMINATING).sum()),
            "children": int(self.n_acc[running].sum()) + draining,
            "children_accepting": int(self.n_acc[running].sum()),
            "desired_sum": int(self.desired[running].sum()),
            "inflight": int(self.inflight.sum()),
            "queue": self.queued,
            "waiting_on_start": int(self.pend.sum()),
            "metric": self.metric_value,
        }


def _is_pod_array(fleet: Fleet, name: str) -> bool:
    value = getattr(fleet, name)
    return isinstance(value, np.ndarray) and value.shape[:1] == (fleet.n,)


def weighted_percentile(values: npt.NDArray[np.floating[Any]], weights: Ints, q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values`` each counted ``weights`` times."""
    if not len(values) or int(weights.sum()) == 0:
        return math.nan
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    rank = max(1, math.ceil(q / 100.0 * int(cumulative[-1])))
    return float(values[order][int(np.searchsorted(cumulative, rank))])


def simulate(
    trace: Trace,
    fleet: FleetConfig,
    worker: WorkerConfig,
    sim: SimConfig = SimConfig(),
    label: str = "",
    initial_pods: int | None = None,
    per_pod: bool = False,
) -> Result:
    """Replay ``trace``; run on after it until every input is served (or ``drain_limit_s``)."""
    dt = sim.dt_s
    counts = trace.counts(dt)
    state = Fleet(fleet, worker, sim)
    pinned: Ints | None = None
    if trace.pods_of:
        if fleet.fixed_pods is None:
            raise ValueError(
                f"trace {trace.name!r} pins inputs to pods (pods_of): give fixed_pods too"
            )
        pinned = trace.pod_counts(dt, fleet.fixed_pods)
        state.pin()
    if fleet.fixed_pods is not None:
        state.add_pods(fleet.fixed_pods, 0, running=True)
    else:
        first = float(counts[: _steps(60.0, dt)].sum()) / 60.0
        children = first * sim.service_s / worker.target_inputs
        pods = initial_pods or max(fleet.min_pods, math.ceil(children / fleet.threshold))
        pods = min(pods, fleet.max_pods)
        each = min(worker.max_children, max(1, math.ceil(children / pods)))
        state.add_pods(pods, 0, running=True, children=each)
    record = _steps(sim.record_s, dt)
    series: dict[str, list[float]] = {"t": [], "arrivals_per_s": [], "served_per_s": []}
    pods_series: list[list[int]] = []
    last_arrived = last_served = 0
    limit = len(counts) + _steps(sim.drain_limit_s, dt)
    k = 0
    started = time.perf_counter()
    last_t = 0.0

    def sample(k: int) -> None:
        nonlocal last_arrived, last_served, last_t
        span = k * dt - last_t if k else 1.0
        series["t"].append(round(k * dt, 3))
        series["arrivals_per_s"].append((state.arrived - last_arrived) / span)
        series["served_per_s"].append((state.served - last_served) / span)
        series.setdefault("arrived_total", []).append(state.arrived)
        series.setdefault("served_total", []).append(state.served)
        last_arrived, last_served, last_t = state.arrived, state.served, k * dt
        for name, value in state.snapshot(k).items():
            series.setdefault(name, []).append(value)
        if per_pod:
            live = np.nonzero(state.state == RUNNING)[0]
            pods_series.append(state.n_acc[live].tolist())

    while k < len(counts) or (k < limit and (state.queued or state.inflight.sum())):
        arrivals = int(counts[k]) if k < len(counts) else 0
        state.step(k, arrivals, None if pinned is None or k >= len(pinned) else pinned[k])
        if k % record == 0:
            sample(k)
        k += 1
    if (k - 1) % record:
        sample(k - 1)
    wall_s = time.perf_counter() - started
    latency, summary = _summarize(state, series, trace, fleet, worker, sim, k)
    summary["wall_s"] = round(wall_s, 2)
    config = {
        "fleet": asdict(fleet),
        "worker": asdict(worker),
        "sim": asdict(sim),
        "trace": {"name": trace.name, "description": trace.description},
    }
    return Result(
        trace.name,
        label,
        series,
        latency,
        summary,
        config,
        per_pod={"children": pods_series} if per_pod else {},
    )


def _summarize(
    state: Fleet,
    series: dict[str, list[float]],
    trace: Trace,
    fleet: FleetConfig,
    worker: WorkerConfig,
    sim: SimConfig,
    steps: int,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    dt = sim.dt_s
    rec = np.array(state.records, np.int64).reshape(-1, 3)
    arrival, start, count = rec[:, 0], rec[:, 1], rec[:, 2]
    lat = (start - arrival) * dt + sim.service_s
    windows = (arrival * dt // sim.latency_window_s).astype(np.int64)
    order = np.argsort(windows, kind="stable")
    windows, lat_w, count_w = windows[order], lat[order], count[order]
    latency: dict[str, list[float]] = {"t": [], "p50_s": [], "p99_s": []}
    ids, starts = np.unique(windows, return_index=True)
    ends = [*starts[1:].tolist(), len(windows)]
    for w, lo, hi in zip(ids.tolist(), starts.tolist(), ends, strict=True):
        latency["t"].append(round((w + 0.5) * sim.latency_window_s, 3))
        latency["p50_s"].append(round(weighted_percentile(lat_w[lo:hi], count_w[lo:hi], 50), 3))
        latency["p99_s"].append(round(weighted_percentile(lat_w[lo:hi], count_w[lo:hi], 99), 3))
    record_s = _steps(sim.record_s, dt) * dt
    pods = np.array(series["pods"]) + np.array(series["pods_pending"])
    pods = pods + np.array(series["pods_terminating"])
    children = np.array(series["children"], float)
    ideal = np.array(series["arrivals_per_s"]) * sim.service_s / worker.target_inputs
    queue = np.array(series["queue"], float)
    summary = {
        "arrived": state.arrived,
        "served": state.served,
        "dispatched": int(count.sum()),  # taken off the broker list (each input once)
        "unserved": state.arrived - state.served,
        "p50_s": round(weighted_percentile(lat, count, 50), 3),
        "p99_s": round(weighted_percentile(lat, count, 99), 3),
        "max_s": round(float(lat.max()) if len(lat) else math.nan, 3),
        "max_queue": int(queue.max()),
        "queue_s": round(float((queue > 0).sum()) * record_s, 1),
        "max_pods": int(pods.max()),
        "pod_hours": round(float(pods.sum()) * record_s / 3600.0, 2),
        "max_children": int(children.max()),
        "child_hours": round(float(children.sum()) * record_s / 3600.0, 2),
        "ideal_child_hours": round(float(ideal.sum()) * record_s / 3600.0, 2),
        "pods_created": state.pods_created,
        "duration_s": round(steps * dt, 1),
    }
    summary["child_efficiency"] = round(
        summary["ideal_child_hours"] / summary["child_hours"] if summary["child_hours"] else 0, 3
    )
    return latency, summary


# -- variants, output ----------------------------------------------------------------------------


#: Scale-down policy candidate: one pod or 10% per minute, whichever is more.
DOWN_10_PERCENT = ScalingRules(300.0, (Policy("Pods", 1, 60.0), Policy("Percent", 10, 60.0)))

#: Scale-down of the manifests before they took the model's settings: one pod per minute.
DOWN_1_POD = ScalingRules(300.0, (Policy("Pods", 1, 60.0),))


def before(fleet: FleetConfig, max_pods: int = 20) -> FleetConfig:
    """The manifests before they took the model's settings, pinned for comparison.

    Threshold 3, ``maxReplicaCount`` 20 (or ``max_pods``), scale-down 1 pod per 60 s after
    300 s; the rest (scale-up, scrape, pod start) as ``fleet`` has it.
    """
    return replace(fleet, threshold=3.0, max_pods=max_pods, down=DOWN_1_POD)


def variants(
    base_fleet: FleetConfig, base_worker: WorkerConfig, max_pods: int, recommended_max_pods: int
) -> dict[str, tuple[FleetConfig, WorkerConfig]]:
    """The runs each trace gets: the manifests, the former manifests pinned (as they were and
    with room), and the exact metric for a queue with one task."""
    down = "down 10%" if base_fleet.down == DOWN_10_PERCENT else "down as set"
    return {
        f"manifests: threshold {base_fleet.threshold:g}, max {base_fleet.max_pods}, {down}": (
            base_fleet,
            base_worker,
        ),
        "before: threshold 3, max 20": (before(base_fleet), base_worker),
        f"before, max {max_pods}": (before(base_fleet, max_pods), base_worker),
        f"exact, threshold 3, max {recommended_max_pods}, down 10%": (
            replace(
                base_fleet,
                metric="exact",
                threshold=3.0,
                max_pods=recommended_max_pods,
                down=DOWN_10_PERCENT,
            ),
            base_worker,
        ),
    }


SWEEP: dict[str, Callable[[FleetConfig, WorkerConfig], tuple[FleetConfig, WorkerConfig]]] = {
    "baseline": lambda f, w: (f, w),
    "threshold 2": lambda f, w: (replace(f, threshold=2.0), w),
    "threshold 3.5": lambda f, w: (replace(f, threshold=3.5), w),
    "metric exact": lambda f, w: (replace(f, metric="exact"), w),
    "hpa.yaml (Pods metric)": lambda f, w: (replace(f, source="hpa"), w),
    "pod start 90 s": lambda f, w: (replace(f, pod_start_s=90.0), w),
    "pod start 10 s": lambda f, w: (replace(f, pod_start_s=10.0), w),
    "HPA down window 60 s": lambda f, w: (
        replace(f, down=replace(f.down, stabilization_s=60.0)),
        w,
    ),
    "HPA down window 900 s": lambda f, w: (
        replace(f, down=replace(f.down, stabilization_s=900.0)),
        w,
    ),
    "HPA down 10%/60 s": lambda f, w: (
        replace(f, down=replace(f.down, policies=(Policy("Percent", 10, 60.0),))),
        w,
    ),
    "HPA down max(1 pod, 10%)/60 s": lambda f, w: (replace(f, down=DOWN_10_PERCENT), w),
    "metric exact, maxReplicas 200": lambda f, w: (replace(f, metric="exact", max_pods=200), w),
    "threshold 2, down max(1, 10%)": lambda f, w: (
        replace(f, threshold=2.0, down=DOWN_10_PERCENT),
        w,
    ),
    "worker window 10 s": lambda f, w: (f, replace(w, scaledown_window_s=10.0)),
    "worker window 300 s": lambda f, w: (f, replace(w, scaledown_window_s=300.0)),
}


COLUMNS = (
    ("variant", "variant", "{}"),
    ("p50_s", "p50 s", "{:.2f}"),
    ("p99_s", "p99 s", "{:.2f}"),
    ("max_s", "max s", "{:.1f}"),
    ("max_queue", "max queue", "{:,}"),
    ("queue_s", "queue>0 s", "{:.0f}"),
    ("max_pods", "max pods", "{}"),
    ("pod_hours", "pod-h", "{:.1f}"),
    ("max_children", "max children", "{}"),
    ("child_hours", "child-h", "{:.1f}"),
    ("child_efficiency", "ideal/child-h", "{:.2f}"),
    ("pods_created", "pods created", "{}"),
    ("unserved", "unserved", "{:,}"),
)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of summaries (each with a ``variant`` key)."""
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if i == 0 else "--:" for i in range(len(COLUMNS))) + "|"
    lines = [head, rule]
    for row in rows:
        cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _thin(series: dict[str, list[float]], most: int = 1500) -> dict[str, list[float]]:
    n = len(series["t"])
    step = max(1, math.ceil(n / most))
    return {name: values[::step] for name, values in series.items()}


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, floats keep 4 significant decimals."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, trace: Trace, results: Sequence[Result]) -> None:
    """Summaries, configurations and (thinned) time series of a trace's runs."""
    payload = {
        "trace": {"name": trace.name, "description": trace.description},
        "runs": [
            {
                "label": r.label,
                "summary": r.summary,
                "config": r.config,
                "series": _thin(r.series),
                "latency": _thin(r.latency),
            }
            for r in results
        ],
    }
    path.write_text(json.dumps(_clean(payload), separators=(",", ":"), default=float) + "\n")


def plot(path: Path, trace: Trace, results: Sequence[Result], service_s: float) -> None:
    """Arrivals, pods, children, queue and latency over time, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(5, 1, figsize=(11, 13), sharex=True)
    colours = ["#888888", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    first = results[0]
    minutes = np.array(first.series["t"]) / 60.0
    axes[0].plot(minutes, first.series["arrivals_per_s"], color="black", lw=0.8, label="arrivals")
    for colour, r in zip(colours, results, strict=False):
        t = np.array(r.series["t"]) / 60.0
        axes[0].plot(
            t,
            r.series["served_per_s"],
            color=colour,
            lw=0.7,
            alpha=0.8,
            label=f"served ({r.label})",
        )
        pods = np.array(r.series["pods"])
        axes[1].plot(t, pods, color=colour, lw=1.2, label=f"{r.label}: running")
        pending = pods + np.array(r.series["pods_pending"])
        axes[1].plot(t, pending, color=colour, lw=0.7, ls=":")
        axes[2].plot(t, r.series["children"], color=colour, lw=1.2, label=r.label)
        axes[2].plot(t, r.series["desired_sum"], color=colour, lw=0.6, ls=":")
        axes[3].plot(t, r.series["queue"], color=colour, lw=1.0, label=r.label)
        lt = np.array(r.latency["t"]) / 60.0
        axes[4].plot(lt, r.latency["p99_s"], color=colour, lw=1.2, label=f"{r.label}: p99")
        axes[4].plot(lt, r.latency["p50_s"], color=colour, lw=0.7, ls="--")
    ideal = np.array(first.series["arrivals_per_s"]) * service_s
    worker = first.config["worker"]
    fleet = first.config["fleet"]
    axes[2].plot(
        minutes,
        ideal / worker["target_inputs"],
        color="black",
        lw=0.6,
        ls="--",
        label="ideal: arrivals x service / target_inputs",
    )
    axes[1].plot(
        minutes,
        ideal / worker["target_inputs"] / fleet["threshold"],
        color="black",
        lw=0.6,
        ls="--",
        label="ideal: ideal children / threshold",
    )
    axes[0].set_ylabel("inputs/s")
    axes[1].set_ylabel("pods\n(dotted: incl. pending)")
    axes[2].set_ylabel("children\n(dotted: sum desired)")
    axes[3].set_ylabel("broker queue")
    axes[4].set_ylabel("latency s\n(p99; dashed p50)")
    axes[4].set_yscale("log")
    axes[4].set_xlabel("minutes")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{trace.name}: {trace.description}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _configs(args: argparse.Namespace) -> tuple[FleetConfig, WorkerConfig, SimConfig]:
    fleet, worker = read_manifests(HERE, args.source)
    fleet = replace(fleet, pod_start_s=args.pod_start)
    worker = replace(
        worker,
        max_inputs=args.max_inputs,
        target_inputs=args.target_inputs,
        child_start_s=args.child_start,
    )
    if args.scaledown_window is not None:
        worker = replace(worker, scaledown_window_s=args.scaledown_window)
    sim = SimConfig(dt_s=args.dt, service_s=args.service, split=args.split)
    return fleet, worker, sim


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the traces, write <trace>.png and <trace>.json, print tables."""
    parser = argparse.ArgumentParser(
        prog="python -m autoscale.simulate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--trace", default="all", help=f"one of {', '.join(TRACES)} or all")
    parser.add_argument("--out", type=Path, default=HERE / "plots")
    parser.add_argument("--source", choices=("keda", "hpa"), default="keda")
    parser.add_argument(
        "--max-pods",
        type=int,
        default=300,
        help="maxReplicaCount of the pinned former manifests with room (the sweep's baseline)",
    )
    parser.add_argument(
        "--recommended-max-pods",
        type=int,
        default=200,
        help="maxReplicaCount of the exact-metric run (1.2 x the peak's pods at target)",
    )
    parser.add_argument("--pod-start", type=float, default=30.0, help="seconds, pod to consuming")
    parser.add_argument("--child-start", type=float, default=0.2)
    parser.add_argument("--service", type=float, default=0.5, help="seconds per input")
    parser.add_argument("--max-inputs", type=int, default=40)
    parser.add_argument("--target-inputs", type=int, default=20)
    parser.add_argument(
        "--scaledown-window",
        type=float,
        default=None,
        help="concurrent_scaledown_window (default: the library's 60 s)",
    )
    parser.add_argument("--dt", type=float, default=0.1)
    parser.add_argument(
        "--split",
        choices=("equal", "random"),
        default="equal",
        help="how pods with room share the broker list",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="one-change-at-a-time variants on ramp and spike -> sweep.json",
    )
    args = parser.parse_args(argv)
    names = list(TRACES) if args.trace == "all" else [args.trace]
    unknown = [n for n in names if n not in TRACES]
    if unknown:
        parser.error(f"unknown trace {unknown[0]!r}: choose from {', '.join(TRACES)} or all")
    args.out.mkdir(parents=True, exist_ok=True)
    fleet, worker, sim = _configs(args)
    if args.sweep:
        return _sweep(args, fleet, worker, sim, [n for n in names if n != "diurnal"] or names)
    for name in names:
        trace = TRACES[name]
        results = []
        runs = variants(fleet, worker, args.max_pods, args.recommended_max_pods)
        for label, (f, w) in runs.items():
            results.append(simulate(trace, f, w, sim, label=label))
        write_json(args.out / f"{name}.json", trace, results)
        plot(args.out / f"{name}.png", trace, results, sim.service_s)
        print(f"\n## {name}: {trace.description}\n")
        print(table([{"variant": r.label, **r.summary} for r in results]))
        print(
            f"\nwrote {args.out / (name + '.png')} and .json "
            f"({sum(r.summary['wall_s'] for r in results):.1f} s)"
        )
    return 0


def _sweep(
    args: argparse.Namespace,
    fleet: FleetConfig,
    worker: WorkerConfig,
    sim: SimConfig,
    names: Sequence[str],
) -> int:
    roomy = before(fleet, args.max_pods)  # the baseline stays the former manifests, with room
    out: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        rows = []
        for label, change in SWEEP.items():
            f, w = change(roomy, worker)
            r = simulate(TRACES[name], f, w, sim, label=label)
            rows.append({"variant": label, **r.summary})
        out[name] = rows
        print(f"\n## sweep, {name}: {TRACES[name].description}\n")
        print(table(rows))
    (args.out / "sweep.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
