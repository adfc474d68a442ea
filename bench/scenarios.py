"""The scenarios and how big each run of them is (full and ``--quick``).

I/O scenarios run ``waves x concurrency`` inputs, so every system gets the same number of
rounds of its own concurrency (prefork at 8 runs 8 x waves inputs, the others 100 x waves):
the ideal wall time is ``waves x 0.1 s`` for all. ``trivial`` runs a fixed number of inputs
that do nothing: the per-message overhead ceiling. The memory scenarios hold ``level``
inputs in flight at once on a gate and measure the worker's RSS growth.

``async-io`` is the scenario the goals are about, so it is sized the way they are stated:
celery-concurrent, arq and taskiq hold 500 inputs at once, enough that 0.1 s of waiting is
fully hidden behind the per-message cost (500 / 0.1 s = 5,000/s, several times any system's
ceiling here), while stock threads run at 100 threads and prefork at 8 processes. At 100 in
flight no system could exceed 1,000/s, which on a fast machine is below the per-message
ceiling the goals compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

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
