"""The core pool's headline figures: one child, many inputs.

    python -m bench.core [--runs 3] [--inflight 10000,20000] [--publish]

1. Wall time of 400 x 0.5 s async inputs with max_inputs=200 on one child (ideal 1.0 s),
   and the same for sync inputs on threads; median of ``--runs``, measured from the first
   enqueue to the last result.
2. Async inputs in flight at once in one child, at each ``--inflight`` level, and the RSS
   they cost: a **fresh worker per level** (an allocator keeps what an earlier burst made
   it take), warmed up, its RSS taken, then every input waits on the gate until all are in
   flight, so the count is exact. RSS counts the worker's main process and its child
   together, as the ``memory-*`` scenarios of :mod:`bench.run` do (the same code).

The workers are :mod:`bench.systems`' ``celery-concurrent`` (``-c 1``, ``-l warning``).
Uses a private Redis unless REDIS_URL is set. Writes ``core.json`` to bench/results/local/
(git-ignored), or with ``--publish`` to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.run import Harness, harness, measure, memory_baseline
from bench.scenarios import FULL, memory_scenario
from bench.systems import SYSTEMS, one_worker

SYSTEM = SYSTEMS["celery-concurrent"]
WALL_INPUTS = 400
WALL_DELAY_S = 0.5
WALL_LEVEL = 200


def wall_time(h: Harness, task: str, runs: int) -> dict[str, Any]:
    """``WALL_INPUTS`` x 0.5 s inputs at ``max_inputs=200``: wall and start spread per run."""
    walls: list[float] = []
    spreads: list[float] = []
    with one_worker(SYSTEM, h.redis_url, WALL_LEVEL, h.log_dir, f"core-{task}") as (_, driver):
        for _ in range(runs):
            raw = driver.run(task, [WALL_DELAY_S], WALL_INPUTS, timeout_s=120)
            starts = [s for s in raw["start"] if s is not None]
            ends = [e for e in raw["end"] if e is not None]
            if len(ends) < WALL_INPUTS:
                raise RuntimeError(f"{task}: {WALL_INPUTS - len(ends)} inputs did not finish")
            walls.append(max(ends) - min(raw["enqueued"]))
            spreads.append(max(starts) - min(starts))
    kind = "async" if task == "sleep_async" else "sync"
    return {
        "figure": f"{WALL_INPUTS} x {WALL_DELAY_S:g} s {kind} inputs, "
        f"max_inputs={WALL_LEVEL}, one child",
        "median_s": statistics.median(walls),
        "start_spread_s": statistics.median(spreads),
        "runs_s": walls,
    }


def inflight_level(h: Harness, level: int) -> dict[str, Any]:
    """Hold ``level`` async inputs in one child of a fresh worker; RSS, main + child."""
    scenario = memory_scenario(level)
    with one_worker(SYSTEM, h.redis_url, level, h.log_dir, f"core-m{level}") as (worker, driver):
        base = memory_baseline(h, worker, driver)
        record = measure(h, worker, driver, scenario, 0, base)
    held = record["peak_inflight"]
    return {
        "figure": f"{level} async inputs in flight in one child (fresh worker)",
        "inflight": held,
        "rss_base_mb": record.get("rss_base_mb", math.nan),
        "rss_full_mb": record.get("rss_full_mb", math.nan),
        **{
            figure: record.get(figure, math.nan)
            for figure in (
                "rss_growth_kb_per_inflight",
                "rss_growth_main_kb_per_inflight",
                "rss_growth_children_kb_per_inflight",
            )
        },
        "errors": record["errors"],
        "timed_out": record["timed_out"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--inflight", default="10000,20000")
    report.add_output_options(parser, "core.json")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.inflight.split(",") if x]
    out = report.output_dir(args)
    rows: list[dict[str, Any]] = []
    with harness(FULL, out / "logs" / "core", progress=False) as h:
        for task in ("sleep_async", "sleep_sync"):
            rows.append(wall_time(h, task, args.runs))
        for level in levels:
            rows.append(inflight_level(h, level))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}",
        "method": "memory: a fresh worker per level; RSS of the main process + its child",
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = Path(out) / "core.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        figures = {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in row.items()
            if k not in ("figure", "runs_s")
        }
        print(f"{row['figure']:<62} {figures}")
    print(f"\nwrote {path} {report.where_note(out)}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
