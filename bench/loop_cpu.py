"""CPU per input on the child's loop thread, with the result writer on and off.

    python -m bench.loop_cpu [--inputs 5000] [--inflight 500] [--runs 3] [--publish]

Issue 11 item 4: Celery's result store and publishes run on the thread that calls them, so
for an async input they run on the child's loop thread, beside every other input of that
child. With ``concurrent_result_writer`` they go to a writer thread per child. This script
runs the same bursts with the setting off and on, alternating (off, on, off, on, ...) so
drift on a shared machine hits both alike, each burst on a fresh ``celery-concurrent``
worker (``-c 1``, ``-l warning``, ``max_inputs=--inflight``), and reports per input:

- **loop thread**: user + system CPU of the child's main thread, which runs the loop
  (psutil, as :mod:`bench.profile` reads threads);
- **child**: all the child's threads (loop, reader, writer, result writer);
- **main process**: the worker's main process (consumer, acks, dispatch);
- throughput from the first enqueue to the last result.

Medians over ``--runs``. Uses a private Redis unless REDIS_URL is set. Writes
``loop-cpu.json`` to bench/results/local/ (git-ignored), or with ``--publish`` to
bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report
from bench.measure import ProcessTree
from bench.profile import thread_cpu
from bench.run import harness
from bench.scenarios import FULL, IO_DELAY_S
from bench.systems import SYSTEMS, one_worker

SYSTEM = SYSTEMS["celery-concurrent"]
#: (label, task, args) of each workload.
WORKLOADS = (
    ("trivial async", "noop", []),
    (f"async sleep {IO_DELAY_S:g} s", "sleep_async", [IO_DELAY_S]),
)
MODES = ("off", "on")


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by the loop thread, the whole child and the main process."""

    loop_s: float
    child_s: float
    main_s: float

    @classmethod
    def of(cls, main_pid: int) -> CpuSample:
        cpu = thread_cpu(ProcessTree(main_pid))  # (pid, thread id) -> CPU seconds
        children = {pid for pid, _ in cpu} - {main_pid}
        if len(children) != 1:
            raise RuntimeError(f"expected one pool child, found {len(children)}")
        (child,) = children
        return cls(
            loop_s=cpu[(child, child)],  # the child's main thread runs its loop
            child_s=sum(s for (pid, _), s in cpu.items() if pid == child),
            main_s=sum(s for (pid, _), s in cpu.items() if pid == main_pid),
        )

    def minus(self, before: CpuSample) -> CpuSample:
        return CpuSample(
            self.loop_s - before.loop_s, self.child_s - before.child_s, self.main_s - before.main_s
        )


def burst(h: Any, mode: str, task: str, args: list[Any], n: int, inflight: int) -> dict[str, float]:
    """One burst of ``n`` inputs on a fresh worker with the writer ``mode``; figures per input."""
    env = {"BENCH_RESULT_WRITER": "1" if mode == "on" else "0"}
    tag = f"loopcpu-{mode}-{task}"
    with one_worker(SYSTEM, h.redis_url, inflight, h.log_dir, tag, env) as (worker, driver):
        warm = driver.run(task, args, min(n, 2 * inflight), timeout_s=120)
        if len([e for e in warm["end"] if e is not None]) < min(n, 2 * inflight):
            raise RuntimeError(f"{tag}: warm-up inputs did not finish")
        before = CpuSample.of(worker.process.pid)
        raw = driver.run(task, args, n, timeout_s=120 + n / 20)
        used = CpuSample.of(worker.process.pid).minus(before)
    ends = [e for e in raw["end"] if e is not None]
    if len(ends) < n:
        raise RuntimeError(f"{tag}: {n - len(ends)} of {n} inputs did not finish")
    return {
        "loop_us": used.loop_s / n * 1e6,
        "child_us": used.child_s / n * 1e6,
        "main_us": used.main_s / n * 1e6,
        "per_s": n / (max(ends) - min(raw["enqueued"])),
    }


def row_of(rows: list[dict[str, Any]], workload: str, writer: str) -> dict[str, Any]:
    return next(r for r in rows if r["workload"] == workload and r["writer"] == writer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=5000)
    parser.add_argument("--inflight", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    report.add_output_options(parser, "loop-cpu.json")
    args = parser.parse_args(argv)
    out = report.output_dir(args)
    rows: list[dict[str, Any]] = []
    with harness(FULL, out / "logs" / "loop-cpu", progress=False) as h:
        for label, task, task_args in WORKLOADS:
            runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
            for _ in range(args.runs):
                for mode in MODES:
                    runs[mode].append(burst(h, mode, task, task_args, args.inputs, args.inflight))
            for mode in MODES:
                medians = {k: statistics.median(r[k] for r in runs[mode]) for k in runs[mode][0]}
                rows.append({"workload": label, "writer": mode, **medians, "runs": runs[mode]})
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}",
        "method": f"{args.inputs} inputs, {args.inflight} in flight, one child, -l warning, "
        f"a fresh worker per burst, off/on alternating, medians of {args.runs}",
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = Path(out) / "loop-cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(result["method"])
    print(f"{'workload':<22} {'writer':<6} {'loop us':>8} {'child us':>9} {'main us':>8} {'/s':>7}")
    for row in rows:
        print(
            f"{row['workload']:<22} {row['writer']:<6} {row['loop_us']:>8.0f} "
            f"{row['child_us']:>9.0f} {row['main_us']:>8.0f} {row['per_s']:>7.0f}"
        )
    for label, _, _ in WORKLOADS:
        off, on = (row_of(rows, label, mode) for mode in MODES)
        print(
            f"{label}: loop thread on/off {on['loop_us'] / off['loop_us']:.2f}x, "
            f"child {on['child_us'] / off['child_us']:.2f}x, "
            f"throughput {on['per_s'] / off['per_s']:.2f}x"
        )
    print(f"\nwrote {path} {report.where_note(out)}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
