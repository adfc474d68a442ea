"""Benchmark celery-concurrent against stock Celery pools, arq and taskiq.

    python -m bench.run [--quick] [--systems a,b] [--scenarios a,b] [--repeats N] [--name N]

Starts a private Redis (``REDIS_URL`` to use another), a local HTTP server with injected
latency, and for each phase (I/O scenarios at 100 in flight; async-io at 500, stock threads
at 100; each memory level) one worker and one producer per system. Every repetition runs
every scenario on every system, so each ratio compares figures from the same repetition; the
order of the systems rotates from one repetition to the next. Prints a table and writes
``<name>.json`` (rows), ``<name>-runs.json`` (every repetition), ``<name>-goals.json``
(ratios and goals) and ``<name>.png`` to ``bench/results/local/`` (git-ignored); with
``--publish`` (the default systems and scenarios only) or ``--name`` to ``bench/results/``.
``--quick`` runs one repetition of smaller bursts (``quick``), the default the full set
(``full``); see ``bench/README.md`` for the method.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from celery import Celery
from tqdm import tqdm

from bench import report
from bench.httpserver import HttpServer
from bench.measure import KB, MB, ProcessTree, RssSampler, summarize
from bench.scenarios import (
    ALL_NAMES,
    FULL,
    HOLD_KINDS,
    IO_DELAY_S,
    QUICK,
    Plan,
    Scenario,
    named_scenarios,
    scenarios_for,
)
from bench.systems import (
    ARQ_SITE,
    DEFAULT_LOGLEVEL,
    DEFAULT_SYSTEMS,
    LOGLEVELS,
    SYSTEMS,
    Driver,
    System,
    Worker,
    wait_until_ready,
)
from celery_concurrent.testing.devserver import redis_url_or_private

POLL_S = 0.05
FULL_RSS_SAMPLES = 5
MEMORY_WARMUP_INPUTS = 50


@dataclass
class Harness:
    """What every run of a phase shares."""

    plan: Plan
    redis_url: str
    store: redis.Redis[bytes]
    control: Celery
    sampler: RssSampler
    bar: tqdm[Any]
    log_dir: Path
    http: HttpServer | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def harness(
    plan: Plan, log_dir: Path, *, total: int = 0, http: bool = False, progress: bool = True
) -> Iterator[Harness]:
    """A Redis (``REDIS_URL`` or a private one), a control app, an RSS sampler, a progress
    bar over ``total`` inputs and, with ``http``, the latency-injecting HTTP server.

    :func:`main` runs in one; so do the other benchmarks that send bursts (``bench.core``).
    """
    with contextlib.ExitStack() as stack:
        redis_url = redis_url_or_private(stack)
        store = stack.enter_context(redis.Redis.from_url(redis_url))
        control = Celery("bench-control", broker=redis_url)
        stack.callback(control.close)
        sampler = RssSampler()
        stack.callback(sampler.close)
        server = stack.enter_context(HttpServer()) if http else None
        bar = stack.enter_context(
            tqdm(total=total, unit="input", dynamic_ncols=True, disable=not progress)
        )
        yield Harness(plan, redis_url, store, control, sampler, bar, log_dir, server)


# -- one burst -------------------------------------------------------------------------------


def _task_args(h: Harness, kind: str, gate: Path | None, n: int) -> list[Any]:
    if kind in ("sleep_async", "sleep_sync"):
        return [IO_DELAY_S]
    if kind == "http_get":
        assert h.http is not None
        return [h.http.url(IO_DELAY_S)]
    if kind in HOLD_KINDS:
        return [str(gate), n]
    return []


def _timeout_s(kind: str, n: int) -> float:
    return _fill_timeout_s(n) + 120 if kind in HOLD_KINDS else 120 + n / 20


def _fill_timeout_s(n: int) -> float:
    return 20 + n / 100


def _full_rss(tree: ProcessTree) -> tuple[int, int]:
    """Largest of a few RSS samples while every input is held: (main process, children)."""
    peak = (0, 0)
    for _ in range(FULL_RSS_SAMPLES):
        split = tree.rss_split()
        if sum(split) > sum(peak):
            peak = split
        time.sleep(0.1)
    return peak


def burst(h: Harness, worker: Worker, driver: Driver, kind: str, n: int) -> dict[str, Any]:
    """Send ``n`` inputs of ``kind`` and wait for them; return the raw measurements.

    For ``hold`` inputs, once all ``n`` wait on the gate (or the fill timeout passed) the
    worker's RSS is sampled (``full_rss``) and the gate opened.
    """
    gate = Path(tempfile.mkdtemp(prefix="bench-gate-")) if kind in HOLD_KINDS else None
    try:
        h.sampler.attach(worker.tree)
        cpu_before = worker.tree.cpu_s()
        sent_at = time.monotonic()
        driver.send(
            {
                "op": "run",
                "task": worker.system.task_name(kind),
                "args": _task_args(h, kind, gate, n),
                "n": n,
                "timeout_s": _timeout_s(kind, n),
            }
        )
        full_rss: tuple[int, int] | None = None
        reported = 0
        while True:
            try:
                message = driver.next(POLL_S)
            except queue.Empty:
                message = {}
            if message is None:
                raise RuntimeError(f"the {driver.name} driver exited; see its log")
            if "done" in message:
                h.bar.update(max(int(message["done"]) - reported, 0))
                reported = max(reported, int(message["done"]))
            if "result" in message:
                h.bar.update(n - reported)
                result: dict[str, Any] = message["result"]
                break
            if gate is not None and full_rss is None:
                filled = (gate / "ready").exists()
                if filled or time.monotonic() - sent_at > _fill_timeout_s(n):
                    full_rss = _full_rss(worker.tree)
                    (gate / "open").touch()
        cpu_after = worker.tree.cpu_s()
        result["peak_rss"] = h.sampler.detach()
        result["cpu_s"] = cpu_after - cpu_before
        result["full_rss"] = full_rss
        return result
    finally:
        if gate is not None:
            shutil.rmtree(gate, ignore_errors=True)


def measure(
    h: Harness,
    worker: Worker,
    driver: Driver,
    scenario: Scenario,
    repetition: int,
    baseline_rss: tuple[int, int] | None,
) -> dict[str, Any]:
    """One measured burst of ``scenario`` on ``worker``'s system, as a run record."""
    system = worker.system
    level = system.level_in(scenario)
    concurrency = system.concurrency(level)
    n = h.plan.inputs(scenario, concurrency)
    raw = burst(h, worker, driver, scenario.task, n)
    figures = summarize(raw["enqueued"], raw["start"], raw["end"])
    record: dict[str, Any] = {
        "system": system.name,
        "scenario": scenario.name,
        "repetition": repetition,
        "pool": system.describe(level),
        "loglevel": system.loglevel,
        "concurrency": concurrency,
        "inputs": n,
        "completed": figures.completed,
        "errors": raw["error_count"],
        "timed_out": raw["timed_out"],
        "error_samples": raw["errors"],
        "tasks_per_s": figures.tasks_per_s,
        "p50_ms": figures.p50_ms,
        "p99_ms": figures.p99_ms,
        "wall_s": figures.wall_s,
        "fill_s": figures.fill_s,
        "peak_inflight": figures.peak_inflight,
        "peak_rss_mb": raw["peak_rss"] / MB,
        "cpu_us_per_input": raw["cpu_s"] / max(figures.completed, 1) * 1e6,
        "worker_processes": worker.tree.count(),
    }
    if scenario.is_memory and raw["full_rss"] is not None and baseline_rss is not None:
        record.update(_memory_figures(baseline_rss, raw["full_rss"], figures.peak_inflight))
    return record


def _memory_figures(base: tuple[int, int], full: tuple[int, int], held: int) -> dict[str, float]:
    """RSS while ``held`` inputs wait, and its growth over the baseline, per input and per 1,000.

    ``base`` and ``full`` are (main process, children) of the same fresh worker: the baseline
    just before the burst, the full RSS while every input waits. The totals count both.
    """
    per_1000 = 1000 / held / MB if held else math.nan
    per_input = 1 / held / KB if held else math.nan
    return {
        "rss_base_mb": sum(base) / MB,
        "rss_full_mb": sum(full) / MB,
        "rss_growth_kb_per_inflight": (sum(full) - sum(base)) * per_input,
        "rss_growth_main_kb_per_inflight": (full[0] - base[0]) * per_input,
        "rss_growth_children_kb_per_inflight": (full[1] - base[1]) * per_input,
        "rss_growth_mb_per_1000_inflight": (sum(full) - sum(base)) * per_1000,
        "rss_growth_main_mb_per_1000": (full[0] - base[0]) * per_1000,
        "rss_growth_children_mb_per_1000": (full[1] - base[1]) * per_1000,
    }


# -- a phase: one worker per system at one level ----------------------------------------------


def _rotated(items: list[System], by: int) -> list[System]:
    if not items:
        return items
    by %= len(items)
    return items[by:] + items[:by]


@contextlib.contextmanager
def started(
    h: Harness, systems: list[System], scenario: Scenario, tag: str
) -> Iterator[dict[str, tuple[Worker, Driver]]]:
    """Start a worker and a driver per system at its level in ``scenario``; stop them all.

    Every scenario of a phase gives each system the same level, so any of them will do.
    """
    workers: list[Worker] = []
    drivers: list[Driver] = []
    try:
        for system in systems:
            level = system.level_in(scenario)
            workers.append(Worker(system, h.redis_url, level, h.log_dir, tag))
        h.bar.set_description_str(f"starting {len(workers)} workers ({tag})")
        wait_until_ready(workers, h.store, h.control)
        for worker in workers:
            drivers.append(Driver(worker, h.log_dir))
        for driver in drivers:
            driver.wait_ready()
        yield {w.system.name: (w, d) for w, d in zip(workers, drivers, strict=True)}
    finally:
        for driver in drivers:
            driver.stop()
        for worker in workers:
            worker.stop()
            worker.cleanup_keys(h.store)


def run_phase(h: Harness, systems: list[System], scenarios: list[Scenario]) -> None:
    """Every repetition of every scenario of one phase, on every system that can run it.

    I/O scenarios share one set of workers for all repetitions (warmed up before the first).
    Memory scenarios start fresh workers for each repetition: an allocator keeps what a
    previous burst made it take, so only a fresh worker shows what holding inputs costs.
    """
    first = scenarios[0]  # every scenario of a phase gives a system the same level
    level = first.level
    runnable: dict[str, list[System]] = {}
    for scenario in scenarios:
        runnable[scenario.name] = []
        for system in systems:
            if not system.runs(scenario):
                continue
            reason = system.why_not(scenario.task, system.level_in(scenario))
            if reason is None:
                runnable[scenario.name].append(system)
            else:
                h.runs.append(
                    {
                        "system": system.name,
                        "scenario": scenario.name,
                        "pool": system.describe(system.level_in(scenario)),
                        "loglevel": system.loglevel,
                        "skipped": reason,
                    }
                )
    needed = [s for s in systems if any(s in runnable[sc.name] for sc in scenarios)]
    if not needed:
        return
    if not any(sc.is_memory for sc in scenarios):
        with started(h, needed, first, f"io{level}") as pairs:
            for repetition in range(h.plan.repeats):
                run_repetition(h, pairs, scenarios, runnable, repetition, {})
        return
    for repetition in range(h.plan.repeats):
        tag = f"m{level}-r{repetition + 1}"
        with started(h, needed, first, tag) as pairs:
            baselines: dict[str, tuple[int, int]] = {}
            for system in needed:
                worker, driver = pairs[system.name]
                h.bar.set_description_str(f"warm-up {system.name} ({tag})")
                baselines[system.name] = memory_baseline(h, worker, driver)
            run_repetition(h, pairs, scenarios, runnable, repetition, baselines)


def memory_baseline(h: Harness, worker: Worker, driver: Driver) -> tuple[int, int]:
    """RSS (main process, children) of a fresh worker after a small warm-up, before a hold.

    The worker must be fresh: one that held inputs before keeps the memory its allocator
    took, so a baseline taken after an earlier burst would hide the cost of holding more.
    """
    burst(h, worker, driver, "noop", MEMORY_WARMUP_INPUTS)
    time.sleep(0.5)
    return worker.tree.rss_split()


def run_repetition(
    h: Harness,
    pairs: dict[str, tuple[Worker, Driver]],
    scenarios: list[Scenario],
    runnable: dict[str, list[System]],
    repetition: int,
    baselines: dict[str, tuple[int, int]],
) -> None:
    """One measured burst of each scenario on each system (warm-ups before the first)."""
    for scenario in scenarios:
        for system in _rotated(runnable[scenario.name], repetition):
            worker, driver = pairs[system.name]
            if repetition == 0:
                level = system.level_in(scenario)
                warm = h.plan.warmup_inputs(scenario, system.concurrency(level))
                if warm:
                    h.bar.set_description_str(f"warm-up {scenario.name} {system.name}")
                    burst(h, worker, driver, scenario.task, warm)
            h.bar.set_description_str(
                f"{scenario.name} {system.name} {repetition + 1}/{h.plan.repeats}"
            )
            record = measure(h, worker, driver, scenario, repetition, baselines.get(system.name))
            h.runs.append(record)
            if record["errors"] or record["timed_out"]:
                h.bar.write(
                    f"{system.name} {scenario.name}: {record['errors']} failed, "
                    f"{record['timed_out']} timed out: {record['error_samples'][:1]}"
                )


def planned_inputs(plan: Plan, systems: list[System], scenarios: list[Scenario]) -> int:
    total = 0
    for scenario in scenarios:
        for system in systems:
            level = system.level_in(scenario)
            if not system.runs(scenario) or system.why_not(scenario.task, level) is not None:
                continue
            concurrency = system.concurrency(level)
            total += plan.inputs(scenario, concurrency) * plan.repeats
            total += plan.warmup_inputs(scenario, concurrency)
            total += MEMORY_WARMUP_INPUTS * plan.repeats if scenario.is_memory else 0
    return total


# -- command line ----------------------------------------------------------------------------


def _names(value: str, known: list[str], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {known}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="one repetition, smaller bursts")
    parser.add_argument(
        "--systems",
        type=lambda v: _names(v, list(SYSTEMS), "systems"),
        default=None,
        help=f"comma-separated, default {','.join(DEFAULT_SYSTEMS)}; also: "
        f"{','.join(s for s in SYSTEMS if s not in DEFAULT_SYSTEMS)}",
    )
    parser.add_argument(
        "--scenarios",
        type=lambda v: _names(v, ALL_NAMES, "scenarios"),
        default=None,
        help=f"comma-separated subset of {','.join(ALL_NAMES)}",
    )
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per figure")
    parser.add_argument(
        "--loglevel",
        choices=LOGLEVELS,
        default=DEFAULT_LOGLEVEL,
        help="every worker's log level, except systems that pin theirs "
        f"(celery-concurrent-info); default {DEFAULT_LOGLEVEL}",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="results file name, written to bench/results/ (default: quick/full, written to "
        "bench/results/local/ unless --publish)",
    )
    report.add_output_options(parser, "<quick|full>.*")
    parser.add_argument(
        "--report",
        action="store_true",
        help="run nothing: redo the table, ratios, goals and chart from <name>-runs.json",
    )
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    return parser.parse_args(argv)


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _partial(args: argparse.Namespace) -> list[str]:
    """The options that make this run other than the default set."""
    given = {
        "--systems": args.systems,
        "--scenarios": args.scenarios,
        "--repeats": args.repeats,
        "--loglevel": None if args.loglevel == DEFAULT_LOGLEVEL else args.loglevel,
    }
    return [option for option, value in given.items() if value is not None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.publish and args.name is None and not args.report and _partial(args):
        print(
            f"--publish writes bench/results/{plan.name}.*, the default set's files; with "
            f"{', '.join(_partial(args))} name the run instead: --name NAME",
            file=sys.stderr,
        )
        return 2
    if args.repeats is not None:
        plan = Plan(
            plan.name, max(args.repeats, 1), plan.waves, plan.trivial_inputs, plan.memory_levels
        )
    scenarios = named_scenarios(args.scenarios) if args.scenarios else scenarios_for(plan)
    systems = [
        SYSTEMS[name].with_loglevel(args.loglevel) for name in args.systems or DEFAULT_SYSTEMS
    ]
    name = args.name or plan.name
    out = report.output_dir(args, asked=args.name is not None)
    if args.report:
        saved = json.loads((out / f"{name}-runs.json").read_text())
        report.publish(saved["runs"], saved["meta"], out, name, args.markdown)
        return 0
    if any(s.kind == "arq" for s in systems) and not (ARQ_SITE / "arq").is_dir():
        print(
            "arq is not installed in bench/.arq-site: run scripts/bench.sh, or\n  pip install "
            f"--target {ARQ_SITE} 'arq==0.28.0' 'redis[hiredis]>=4.2,<6'",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    started_at = time.time()
    log_dir = out / "logs" / name
    shutil.rmtree(log_dir, ignore_errors=True)
    total = planned_inputs(plan, systems, scenarios)
    http = any(s.task == "http_get" for s in scenarios)
    with harness(plan, log_dir, total=total, http=http) as h:
        machine = report.machine_info(h.store)
        for phase in sorted({s.phase for s in scenarios}, key=lambda p: (p[0], p[1] or 0)):
            run_phase(h, systems, [s for s in scenarios if s.phase == phase])
        h.bar.set_description_str("done")
    machine["load_after"] = report.load_average()
    meta = {
        **machine,
        "date": time.strftime("%Y-%m-%d", time.localtime(started_at)),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
        "duration_s": round(time.time() - started_at, 1),
        "plan": plan.name,
        "repeats": plan.repeats,
        "redis": "REDIS_URL" if os.environ.get("REDIS_URL") else "private",
        "systems": [s.name for s in systems],
        "loglevels": {s.name: s.loglevel for s in systems},
        "scenarios": [s.name for s in scenarios],
    }
    report.publish(h.runs, meta, out, name, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
