"""Where a celery-concurrent worker's time per input goes, parent and child.

    python -m bench.profile [--scenario async-io|trivial|all] [--inputs 3000] [--rate 200]

Starts a private Redis (``REDIS_URL`` to override), a celery-concurrent worker (``-c 1``,
``max_inputs`` as in the benchmark's scenario: 500 for async-io, 100 for trivial) and its
producer, warms up, then runs one burst under ``py-spy record
--subprocesses`` (``bench/.tools/bin/py-spy``; ``scripts/bench.sh --profile`` installs it) while
psutil reads every thread's CPU time before and after. Each thread's CPU time per input is
then split in the proportions of its py-spy samples over the categories below (a sample goes
to the first category whose marker appears anywhere in its stack). ``--mode gil`` (default)
keeps the samples of the thread holding the GIL, i.e. where CPU goes; ``--mode wall`` keeps
every sample, waits included, i.e. where the thread's wall time goes. Writes
``bench/results/profile-<scenario>[-wall].txt`` and ``.json``; the raw stacks stay under
``bench/results/logs/profile``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.measure import ProcessTree
from bench.report import add_output_options, output_dir, where_note
from bench.scenarios import IO_SCENARIOS
from bench.systems import ROOT, SYSTEMS, Driver, one_worker
from celery_concurrent.testing.devserver import redis_url_or_private

PY_SPY_LOCAL = ROOT / "bench" / ".tools" / "bin" / "py-spy"
WARMUP_INPUTS = 300
SCENARIOS = {s.name: s for s in IO_SCENARIOS}

#: (category, markers): a sample belongs to the first category with a marker in its stack.
PARENT_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("kombu builds a redis.Redis client per QoS call (redis-py 8 Redis.__init__)",
     ("Channel._create_client",)),
    ("kombu QoS.append: record the delivery as unacked (Redis pipeline)", ("QoS.append (",)),
    ("kombu ack: QoS.ack (Redis pipeline)", ("Message.ack (",)),
    ("batched acks: one pipeline per loop iteration (redis_acks.ack_batch)", ("ack_batch",)),
    ("ConcurrentPool.on_apply: choose a child, pickle, write the pipe",
     ("ConcurrentPool.on_apply",)),
    ("Celery strategy + Request (message -> request, events, revoked check)",
     ("on_task_received",)),
    ("kombu BRPOP: read + parse the message", ("_brpop_read", "_brpop_start")),
    ("ConcurrentPool._on_readable: read child pipe, unpickle, Celery callbacks",
     ("ConcurrentPool._on_readable",)),
    ("kombu hub loop, timers, other", ("",)),
]  # fmt: skip
CHILD_LOOP_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("result store: GET current meta (Celery reads before it writes)", ("_get_task_meta_for",)),
    ("result store: SET + PUBLISH pipeline", ("mark_as_done", "store_result")),
    ("task body (bench/workload.py)", ("bench/workload.py", "bench/tasks_celery.py")),
    ("Celery tracer (signals, request context, states)", ("trace_task",)),
    ("bridge: greenlet switch, ChildRuntime._start/_finish",
     ("GreenletTrace", "ChildRuntime._start", "ChildRuntime._run_async",
      "ChildRuntime._finish")),
    ("send ACCEPTED/DONE frames to the parent", ("ChildRuntime._flush", "ChildRuntime._send")),
    ("asyncio event loop, other", ("",)),
]  # fmt: skip
WHOLE_THREAD: list[tuple[str, tuple[str, ...]]] = [("whole thread", ("",))]
#: --mode -> py-spy flags: GIL holders (where CPU goes) or all samples (where wall time goes).
MODES = {"gil": ("--gil",), "wall": ("--idle",)}

_THREAD = re.compile(r"^thread \((\d+)\): (.*)$")
_PROCESS = re.compile(r"^process (\d+):")


def find_py_spy() -> str | None:
    if PY_SPY_LOCAL.exists():
        return str(PY_SPY_LOCAL)
    return shutil.which("py-spy")


@dataclass
class Samples:
    """py-spy samples of one thread: total and per category."""

    total: int = 0
    by_category: Counter[str] | None = None


def _categories(role: str, thread: str) -> list[tuple[str, tuple[str, ...]]]:
    if role == "parent" and thread == "MainThread":
        return PARENT_CATEGORIES
    if role == "child" and thread == "MainThread":
        return CHILD_LOOP_CATEGORIES
    return WHOLE_THREAD


def parse_raw(path: Path, parent_pid: int) -> dict[tuple[str, int, str], Counter[str]]:
    """(role, tid, thread name) -> category -> samples, from py-spy's raw output."""
    out: dict[tuple[str, int, str], Counter[str]] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        pids = [int(m.group(1)) for f in frames if (m := _PROCESS.match(f))]
        threads = [m for f in frames if (m := _THREAD.match(f))]
        if not pids or not threads:
            continue
        role = "parent" if pids[-1] == parent_pid else "child"
        tid, name = int(threads[-1].group(1)), threads[-1].group(2)
        for category, markers in _categories(role, name):
            if any(marker in frame for marker in markers for frame in frames):
                out[(role, tid, name)][category] += int(count_text)
                break
    return out


def thread_cpu(tree: ProcessTree) -> dict[tuple[int, int], float]:
    """(pid, tid) -> user + system CPU seconds of every thread in the tree."""
    cpu: dict[tuple[int, int], float] = {}
    for process in tree.processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            for thread in process.threads():
                cpu[(process.pid, thread.id)] = thread.user_time + thread.system_time
    return cpu


def drive(driver: Driver, task: str, args: list[Any], n: int) -> dict[str, Any]:
    return driver.run(task, args, n, timeout_s=300)


def profile(
    scenario: str,
    n: int,
    rate: int,
    py_spy: str,
    redis_url: str,
    log_dir: Path,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    task, args = {"async-io": ("sleep_async", [0.1]), "trivial": ("noop", [])}[scenario]
    system, level = SYSTEMS["celery-concurrent"], SCENARIOS[scenario].level
    with one_worker(system, redis_url, level, log_dir, f"profile-{scenario}") as (worker, driver):
        drive(driver, task, args, WARMUP_INPUTS)
        raw_path = log_dir / f"py-spy-{scenario}.txt"
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(worker.process.pid), "--subprocesses",
             "--threads", "--format", "raw", "--nolineno", "--rate", str(rate), *extra,
             "--output", str(raw_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)  # py-spy attaches to every process of the tree
        cpu_before = thread_cpu(worker.tree)
        started = time.time()
        result = drive(driver, task, args, n)
        wall_s = time.time() - started
        cpu_after = thread_cpu(worker.tree)
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    samples = parse_raw(raw_path, worker.process.pid)
    completed = sum(1 for end in result["end"] if end is not None)
    threads = []
    for (role, tid, name), categories in sorted(samples.items(), key=lambda kv: kv[0][:2]):
        cpu_s = sum(
            after - cpu_before.get(key, 0.0) for key, after in cpu_after.items() if key[1] == tid
        )
        total = sum(categories.values())
        threads.append(
            {
                "role": role,
                "thread": name,
                "cpu_s": cpu_s,
                "us_per_input": cpu_s / max(completed, 1) * 1e6,
                "samples": total,
                "categories": {
                    c: {
                        "share": k / total,
                        "cpu_us_per_input": cpu_s * k / total / max(completed, 1) * 1e6,
                        "wall_us_per_input": wall_s * k / total / max(completed, 1) * 1e6,
                    }
                    for c, k in categories.most_common()
                },
            }
        )
    return {
        "scenario": scenario,
        "inputs": n,
        "completed": completed,
        "wall_s": wall_s,
        "tasks_per_s": completed / wall_s if wall_s else None,
        "rate_hz": rate,
        "threads": threads,
    }


def format_profile(report: dict[str, Any]) -> str:
    lines = [
        f"celery-concurrent -c 1 x max_inputs={SCENARIOS[report['scenario']].level}, "
        f"{report['scenario']}: "
        f"{report['completed']} inputs in {report['wall_s']:.1f} s "
        f"({report['tasks_per_s']:.0f}/s, including the producer's sending)",
        (
            "CPU per input by thread (psutil), split by the samples of that thread holding "
            "the GIL (py-spy --gil); us = CPU per input"
            if report["mode"] == "gil"
            else "CPU per input by thread (psutil); categories split that thread's wall time "
            "(py-spy --idle: waits included); us = wall time per input"
        ),
    ]
    total = sum(t["us_per_input"] for t in report["threads"])
    for thread in report["threads"]:
        lines.append(
            f"\n{thread['role']} / {thread['thread']}: {thread['us_per_input']:.0f} us per input "
            f"({thread['us_per_input'] / total:.0%} of the worker's CPU; "
            f"{thread['samples']} samples)"
        )
        for category, figures in thread["categories"].items():
            us = figures["cpu_us_per_input" if report["mode"] == "gil" else "wall_us_per_input"]
            lines.append(f"  {figures['share']:6.1%}  {us:7.0f} us  {category}")
    lines.append(f"\nworker total: {total:.0f} us CPU per input")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--scenario", choices=["async-io", "trivial", "all"], default="all")
    parser.add_argument("--inputs", type=int, default=3000)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    add_output_options(parser, "profile-*.txt and .json")
    parser.add_argument(
        "--mode",
        choices=list(MODES),
        default="gil",
        help="gil: samples holding the GIL (CPU); wall: every sample, idle included",
    )
    args = parser.parse_args(argv)
    py_spy = find_py_spy()
    if py_spy is None:
        print(
            f"py-spy not found: pip install --target {PY_SPY_LOCAL.parent.parent} py-spy "
            "(or run scripts/bench.sh --profile)"
        )
        return 2
    scenarios = ["async-io", "trivial"] if args.scenario == "all" else [args.scenario]
    out = output_dir(args)
    log_dir = out / "logs" / "profile"
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        redis_url = redis_url_or_private(stack)
        for scenario in scenarios:
            extra = MODES[args.mode]
            report = profile(scenario, args.inputs, args.rate, py_spy, redis_url, log_dir, extra)
            report["date"] = time.strftime("%Y-%m-%d")
            report["mode"] = args.mode
            text = format_profile(report)
            print(text + "\n")
            stem = f"profile-{scenario}" + ("" if args.mode == "gil" else f"-{args.mode}")
            (out / f"{stem}.txt").write_text(text + "\n")
            (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
            print(f"wrote {out / stem}.txt, .json {where_note(out)}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
