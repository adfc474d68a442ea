"""The core pool's headline figures: one child, many inputs.

    python -m bench.core [--runs 3] [--inflight 10000,20000]

1. Wall time of 400 x 0.5 s async inputs with max_inputs=200 on one child (ideal 1.0 s),
   and the same for sync inputs on threads; median of ``--runs``, measured from the first
   enqueue to the last result.
2. Inputs in flight at once in one child, and the child's RSS at each level: every input
   waits on a gate until all are running, so the count is exact.

Uses a private Redis unless REDIS_URL is set. Writes bench/results/core.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from celery_concurrent.testing.devserver import redis_url_or_private

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


class Worker:
    """``celery -A bench.core_tasks worker -c 1`` on a private queue."""

    def __init__(self, redis_url: str, max_inputs: int) -> None:
        self.queue = f"core-{uuid.uuid4().hex[:8]}"
        self.hostname = f"{self.queue}@bench"
        env = {
            **os.environ,
            "BENCH_REDIS_URL": redis_url,
            "BENCH_QUEUE": self.queue,
            "BENCH_MAX_INPUTS": str(max_inputs),
        }
        self.log = open(os.devnull, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.core_tasks",
                "worker",
                "-c",
                "1",
                "-Q",
                self.queue,
                "--hostname",
                self.hostname,
                "-l",
                "warning",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        os.environ.update(env)
        from bench import core_tasks

        self.tasks = core_tasks
        deadline = time.monotonic() + 60
        while not core_tasks.app.control.ping([self.hostname], timeout=0.5):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the benchmark worker did not start")

    def child(self) -> psutil.Process:
        return psutil.Process(self.process.pid).children()[0]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def wall_time(worker: Worker, task: Any, count: int, delay_s: float) -> tuple[float, float]:
    """Wall time first enqueue to last result, and how long the inputs took to all start."""
    started = time.perf_counter()
    results = [task.apply_async((delay_s,), queue=worker.queue) for _ in range(count)]
    stamps = [result.get(timeout=120) for result in results]
    wall = time.perf_counter() - started
    starts = [s["start"] for s in stamps]
    return wall, max(starts) - min(starts)


def inflight_level(worker: Worker, count: int) -> dict[str, float]:
    from celery import group

    tasks = worker.tasks
    gate = uuid.uuid4().hex
    rss_before = worker.child().memory_info().rss
    waiting = group(tasks.wait_gate.s(gate).set(queue=worker.queue) for _ in range(count))()
    deadline = time.monotonic() + 600
    while True:
        stats = tasks.app.control.inspect([worker.hostname], timeout=5).stats() or {}
        inflight = stats.get(worker.hostname, {}).get("pool", {}).get("inflight", 0)
        if inflight >= count or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    rss_full = worker.child().memory_info().rss
    tasks.open_gate.apply_async((gate,), queue=worker.queue).get(timeout=60)
    waiting.join_native(timeout=300)
    return {
        "inflight": float(inflight),
        "child_rss_mb": rss_full / 2**20,
        "rss_growth_kb_per_input": (rss_full - rss_before) / 1024 / max(inflight, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--inflight", default="10000,20000")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.inflight.split(",") if x]
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        redis_url = redis_url_or_private(stack)
        worker = Worker(redis_url, 200)
        try:
            for name, task in (
                ("async", worker.tasks.async_sleep),
                ("sync", worker.tasks.sync_sleep),
            ):
                runs = [wall_time(worker, task, 400, 0.5) for _ in range(args.runs)]
                walls = [wall for wall, _ in runs]
                rows.append(
                    {
                        "figure": f"400 x 0.5 s {name} inputs, max_inputs=200, one child",
                        "median_s": statistics.median(walls),
                        "start_spread_s": statistics.median(spread for _, spread in runs),
                        "runs_s": walls,
                    }
                )
        finally:
            worker.stop()
        worker = Worker(redis_url, max(levels))
        try:
            for level in levels:
                row = inflight_level(worker, level)
                rows.append({"figure": f"{level} async inputs in flight in one child", **row})
        finally:
            worker.stop()
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}",
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "core.json").write_text(json.dumps(report, indent=2))
    for row in rows:
        figures = {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in row.items()
            if k not in ("figure", "runs_s")
        }
        print(f"{row['figure']:<58} {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
