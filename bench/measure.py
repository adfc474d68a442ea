"""Measuring a worker from outside: its process tree's CPU and RSS, and the inputs' figures.

- :class:`ProcessTree`: a worker's main process and every descendant (pool children, taskiq's
  worker process). CPU is user + system of the live tree plus what the main process has
  collected from children that exited; RSS is summed over the tree (shared pages of forked
  children count once per process, as ``ps`` shows them; growth figures subtract a baseline).
- :class:`RssSampler`: samples the tree's RSS every :data:`SAMPLE_S` on a thread; keeps the peak.
- :func:`summarize`: throughput, latency percentiles and peak in-flight count of one burst,
  from the enqueue times the producer recorded and the ``start``/``end`` the inputs returned.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

SAMPLE_S = 0.1
KB = 2**10
MB = 2**20


class ProcessTree:
    """The process ``pid`` and its descendants."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)

    def processes(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        return sum(self.rss_split())

    def rss_split(self) -> tuple[int, int]:
        """RSS of the main process and the sum over its descendants (bytes)."""
        root = others = 0
        for process in self.processes():
            try:
                rss = process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            if process is self.root:
                root = rss
            else:
                others += rss
        return root, others

    def cpu_s(self) -> float:
        total = 0.0
        for process in self.processes():
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
            if process is self.root:
                total += times.children_user + times.children_system
        return total

    def count(self) -> int:
        return len(self.processes())


class RssSampler:
    """Samples one tree's RSS every :data:`SAMPLE_S` seconds while it is attached."""

    def __init__(self) -> None:
        self._tree: ProcessTree | None = None
        self._peak = 0
        self._last = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def attach(self, tree: ProcessTree) -> None:
        """Sample ``tree`` from now on, with the peak reset to its current RSS."""
        rss = tree.rss_bytes()
        with self._lock:
            self._tree = tree
            self._peak = self._last = rss

    def detach(self) -> int:
        """Stop sampling; return the peak seen since :meth:`attach` (bytes)."""
        with self._lock:
            tree, self._tree = self._tree, None
            peak = self._peak
        if tree is not None:
            peak = max(peak, tree.rss_bytes())
        return peak

    @property
    def last(self) -> int:
        return self._last

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            with self._lock:
                tree = self._tree
            if tree is None:
                continue
            rss = tree.rss_bytes()
            with self._lock:
                if self._tree is tree:
                    self._last = rss
                    self._peak = max(self._peak, rss)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (nan when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def peak_in_flight(starts: Sequence[float], ends: Sequence[float]) -> int:
    """Most inputs running at once (sweep line; an end at t closes before a start at t)."""
    events = sorted([(s, 1) for s in starts] + [(e, -1) for e in ends])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


@dataclass(frozen=True)
class BurstFigures:
    """What one burst of inputs measured, from the inputs' own timestamps."""

    completed: int
    tasks_per_s: float
    p50_ms: float
    p99_ms: float
    wall_s: float
    fill_s: float
    peak_inflight: int


def summarize(
    enqueued: Sequence[float], starts: Sequence[float | None], ends: Sequence[float | None]
) -> BurstFigures:
    """Throughput = completed / (last end - first enqueue); latency = end - enqueue."""
    done = [
        (q, s, e)
        for q, s, e in zip(enqueued, starts, ends, strict=True)
        if s is not None and e is not None
    ]
    if not done or not enqueued:
        return BurstFigures(0, 0.0, math.nan, math.nan, math.nan, math.nan, 0)
    first = min(enqueued)
    wall_s = max(e for _, _, e in done) - first
    latencies = [(e - q) * 1000 for q, _, e in done]
    return BurstFigures(
        completed=len(done),
        tasks_per_s=len(done) / wall_s if wall_s > 0 else math.nan,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        wall_s=wall_s,
        fill_s=max(s for _, s, _ in done) - first,
        peak_inflight=peak_in_flight([s for _, s, _ in done], [e for _, _, e in done]),
    )
