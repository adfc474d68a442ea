"""The scenarios and how big each run of them is (full and ``--quick``).

I/O scenarios run ``waves x concurrency`` inputs, so every system gets the same number of
rounds of its own concurrency (prefork at 8 runs 8 x waves inputs, the others 100 x waves):
the ideal wall time is ``waves x 0.1 s`` for all. ``trivial`` runs a fixed number of inputs
that do nothing: the per-message overhead ceiling. The memory scenarios hold ``level``
inputs in flight at once on a gate and measure the worker's RSS growth.

``async-io`` is the scenario the goals are about, so it is sized the way they are stated:
celery-concurrent, arq and taskiq hold 500 inputs at once, enough that 0.1 s of waiting is
fully hidden behind the per-message cost (500 / 0.1 s = 5,000/s, several times any system's
ceiling here), while stock threads run at 100 threads (``celery-threads-500``: at 500 too)
and prefork at 8 processes. At 100 in flight no system could exceed 1,000/s, which on a fast
machine is below the per-message ceiling the goals compare against.

:class:`Arrivals` are the other kind of scenario, :mod:`bench.autoscale_scenario`'s: inputs
sent on a schedule (a rate over time) rather than as one burst.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

IO_DELAY_S = 0.1
IO_LEVEL = 100
#: async-io: inputs in flight for systems that run coroutines (stock threads keep IO_LEVEL).
ASYNC_LEVEL = 500
#: Kinds of System whose concurrency is a thread or greenlet per input.
THREAD_KINDS = ("threads", "gevent")
#: Input kinds that wait on the memory gate.
HOLD_KINDS = ("hold", "hold_sync")
#: The sync scenarios' larger level (issue: gevent vs threads at 100 and 1,000).
SYNC_WIDE_LEVEL = 1000


@dataclass(frozen=True)
class Scenario:
    """One kind of burst."""

    name: str
    task: str  # bench.workload input kind, see bench.systems.System.task_name
    level: int  # inputs the worker may run at once (its concurrency setting)
    description: str
    #: Inputs at once for stock threads/gevent, when it differs from ``level``.
    thread_level: int | None = None

    def level_for(self, kind: str) -> int:
        """The concurrency a system of ``kind`` gets in this scenario (before prefork's cap)."""
        if self.thread_level is not None and kind in THREAD_KINDS:
            return self.thread_level
        return self.level

    @property
    def phase(self) -> tuple[int, int | None]:
        """Scenarios with the same phase share one set of workers."""
        return (self.level, self.thread_level)

    @property
    def is_memory(self) -> bool:
        return self.task in HOLD_KINDS


@dataclass(frozen=True)
class Plan:
    """How much of everything one invocation runs."""

    name: str
    repeats: int
    waves: int
    trivial_inputs: int
    memory_levels: tuple[int, ...]

    def inputs(self, scenario: Scenario, concurrency: int) -> int:
        if scenario.is_memory:
            return scenario.level
        if scenario.task == "noop":
            return self.trivial_inputs
        return self.waves * concurrency

    def warmup_inputs(self, scenario: Scenario, concurrency: int) -> int:
        if scenario.is_memory:
            return 0
        return min(self.inputs(scenario, concurrency), 2 * concurrency)


FULL = Plan("full", repeats=3, waves=20, trivial_inputs=3000, memory_levels=(1000, 10000))
QUICK = Plan("quick", repeats=1, waves=10, trivial_inputs=1000, memory_levels=(1000,))

IO_SCENARIOS = [
    Scenario("trivial", "noop", IO_LEVEL, "an input that returns at once: per-message ceiling"),
    Scenario(
        "async-io",
        "sleep_async",
        ASYNC_LEVEL,
        "await asyncio.sleep(0.1); stock threads at 100",
        thread_level=IO_LEVEL,
    ),
    Scenario("sync-io", "sleep_sync", IO_LEVEL, "time.sleep(0.1) on a thread/greenlet"),
    Scenario("http", "http_get", IO_LEVEL, "GET a local aiohttp server that answers in 0.1 s"),
]


def memory_scenario(level: int) -> Scenario:
    return Scenario(
        f"memory-{level}-inflight", "hold", level, f"{level:,} async inputs waiting at once"
    )


#: Opt-in (``--scenarios``): sync inputs at 1,000 at once, for the sync backends against stock
#: threads and gevent (``--systems celery-concurrent,celery-concurrent-gevent,celery-threads,
#: celery-gevent``); ``sync-io`` is the same at 100.
SYNC_SCENARIOS = [
    Scenario(
        "sync-io-1000",
        "sleep_sync",
        SYNC_WIDE_LEVEL,
        "time.sleep(0.1) on a thread/greenlet, 1,000 at once",
    ),
    Scenario(
        f"memory-sync-{SYNC_WIDE_LEVEL}-inflight",
        "hold_sync",
        SYNC_WIDE_LEVEL,
        f"{SYNC_WIDE_LEVEL:,} sync inputs blocked at once (threads or greenlets)",
    ),
]


def scenarios_for(plan: Plan) -> list[Scenario]:
    """The default set of ``plan`` (the opt-in :data:`SYNC_SCENARIOS` are not in it)."""
    return [*IO_SCENARIOS, *(memory_scenario(level) for level in plan.memory_levels)]


def named_scenarios(names: list[str]) -> list[Scenario]:
    """Every scenario called by one of ``names``, in the default order, opt-in ones last."""
    return [s for s in [*scenarios_for(FULL), *SYNC_SCENARIOS] if s.name in names]


ALL_NAMES = [s.name for s in [*scenarios_for(FULL), *SYNC_SCENARIOS]]


# -- arrivals on a schedule (bench.autoscale_scenario) ---------------------------------------


@dataclass(frozen=True)
class Arrivals:
    """Arrivals as a piecewise-linear rate (inputs/s) over time, then a quiet tail.

    A segment whose two points share a time is a jump; ``bursts`` add ``count`` inputs spread
    evenly over ``[at, at + over_s)`` on top of the rate.
    """

    name: str
    description: str
    points: tuple[tuple[float, float], ...]  # (t seconds, inputs/s)
    bursts: tuple[tuple[float, float, int], ...] = ()  # (at, over_s, count)
    tail_s: float = 12.0

    @property
    def arrivals_end_s(self) -> float:
        ends = [self.points[-1][0], *(at + over for at, over, _ in self.bursts)]
        return max(ends)

    def rate_at(self, t: float) -> float:
        """Scheduled rate at ``t`` (bursts included), inputs/s."""
        rate = self._base_rate(t)
        for at, over, count in self.bursts:
            if at <= t < at + over:
                rate += count / over
        return rate

    def send_offsets(self) -> list[float]:
        """When each input is sent, seconds after the start: the rate's integral, inverted."""
        offsets: list[float] = []
        step = 0.0005
        acc = 0.0
        t = 0.0
        while t < self.points[-1][0]:
            acc += self._base_rate(t + step / 2) * step
            t += step
            while acc >= 1.0:
                acc -= 1.0
                offsets.append(t)
        for at, over, count in self.bursts:
            offsets.extend(at + over * i / count for i in range(count))
        return sorted(offsets)

    def _base_rate(self, t: float) -> float:
        for (t0, r0), (t1, r1) in itertools.pairwise(self.points):
            if t0 <= t < t1:
                return r0 + (r1 - r0) * (t - t0) / (t1 - t0)
        return 0.0

    def as_dict(self) -> dict[str, Any]:
        """What the autoscale report stores of it (``from_dict`` reads it back)."""
        return {
            "name": self.name,
            "description": self.description,
            "points": self.points,
            "bursts": self.bursts,
            "tail_s": self.tail_s,
            "arrivals_end_s": self.arrivals_end_s,
            "inputs": len(self.send_offsets()),
        }

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Arrivals:
        return cls(
            spec["name"],
            spec["description"],
            tuple((float(t), float(r)) for t, r in spec["points"]),
            tuple((float(a), float(o), int(c)) for a, o, c in spec.get("bursts") or ()),
            float(spec["tail_s"]),
        )


def arrivals_for(quick: bool) -> list[Arrivals]:
    """The autoscaler's ramp and spike (smaller and shorter with ``quick``)."""
    if quick:
        return [
            Arrivals(
                "ramp",
                "5 -> 100 inputs/s over 8 s, back to 5 over 4 s",
                ((0, 5), (8, 100), (12, 5)),
                tail_s=10.0,
            ),
            Arrivals(
                "spike",
                "10 inputs/s, a burst of 200 inputs in 1 s at t=4 s, 10/s to 9 s",
                ((0, 10), (9, 10)),
                bursts=((4.0, 1.0, 200),),
                tail_s=10.0,
            ),
        ]
    return [
        Arrivals(
            "ramp", "5 -> 160 inputs/s over 20 s, back to 5 over 10 s", ((0, 5), (20, 160), (30, 5))
        ),
        Arrivals(
            "spike",
            "10 inputs/s, a burst of 400 inputs in 1.5 s at t=10 s, 10/s to 21.5 s",
            ((0, 10), (21.5, 10)),
            bursts=((10.0, 1.5, 400),),
        ),
    ]
