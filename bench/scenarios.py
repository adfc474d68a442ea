"""The scenarios and how big each run of them is (full and ``--quick``).

I/O scenarios run ``waves x concurrency`` inputs, so every system gets the same number of
rounds of its own concurrency (prefork at 8 runs 8 x waves inputs, the others 100 x waves):
the ideal wall time is ``waves x 0.1 s`` for all. ``trivial`` runs a fixed number of inputs
that do nothing: the per-message overhead ceiling. The memory scenarios hold ``level``
inputs in flight at once on a gate and measure the worker's RSS growth.
"""

from __future__ import annotations

from dataclasses import dataclass

IO_DELAY_S = 0.1
IO_LEVEL = 100


@dataclass(frozen=True)
class Scenario:
    """One kind of burst."""

    name: str
    task: str  # bench.workload input kind, see bench.systems.System.task_name
    level: int  # inputs the worker may run at once (its concurrency setting)
    description: str

    @property
    def is_memory(self) -> bool:
        return self.task == "hold"


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
    Scenario("async-io", "sleep_async", IO_LEVEL, "await asyncio.sleep(0.1)"),
    Scenario("sync-io", "sleep_sync", IO_LEVEL, "time.sleep(0.1) on a thread/greenlet"),
    Scenario("http", "http_get", IO_LEVEL, "GET a local aiohttp server that answers in 0.1 s"),
]


def memory_scenario(level: int) -> Scenario:
    return Scenario(
        f"memory-{level}-inflight", "hold", level, f"{level:,} async inputs waiting at once"
    )


def scenarios_for(plan: Plan) -> list[Scenario]:
    return [*IO_SCENARIOS, *(memory_scenario(level) for level in plan.memory_levels)]


ALL_NAMES = [s.name for s in scenarios_for(FULL)]
