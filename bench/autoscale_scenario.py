"""Autoscaler scenario benchmark: a ramp and a spike of arrivals against six worker setups.

Run it from the repository root::

    python -m bench.autoscale_scenario [--quick] [--repeat N] [--systems a,b]
                                       [--scenarios ramp] [--publish] [--plot-only]

Every input is one I/O-bound wait of ``--delay`` seconds (0.5): ``sleep_async`` of
:mod:`bench.tasks_celery` (``asyncio.run`` around it on stock prefork, ``time.sleep`` under
gevent). The producer, :mod:`bench.driver`, sends inputs on a schedule
(:class:`bench.scenarios.Arrivals`: inputs/s over time), records each enqueue time, and
every input returns its own start and end, so latency = end - enqueue and inputs in flight
over time come from the inputs themselves. A sampler counts the worker's pool processes
every 0.25 s (psutil, children of the worker's main process) and asks ``inspect stats`` for
the autoscaler's view once a second.

The systems are :data:`bench.systems.AUTOSCALE_SYSTEMS`, started by the same
:class:`bench.systems.Worker` as :mod:`bench.run`'s, in :func:`bench.run.harness`'s Redis,
at ``-l info`` with the per-input log lines off (the scaling lines are read from the log):

- ``cc-autoscale``: ConcurrentPool + TargetAutoscaler, ``--autoscale=6,1``,
  ``@concurrent(max_inputs=40, target_inputs=20)``, ``concurrent_scaledown_window = 5`` s;
- ``cc-fixed-1`` / ``cc-fixed-6``: ConcurrentPool with ``-c 1`` / ``-c 6``;
- ``stock-gevent-240``: stock gevent ``-c 240``, cc-autoscale's 240 slots at its max: the
  headline comparison;
- ``stock-gevent``: stock gevent ``--autoscale=240,40`` (the slots of 6 and 1 children);
- ``stock-prefork``: stock prefork ``--autoscale=6,1`` (one input per process), beside them.

Stock Celery's autoscalers run with ``AUTOSCALE_KEEPALIVE=5`` to match the scale-down window;
gevent's greenlets live in the one worker process, counted as 1 process.

With ``--repeat N`` every scenario is played N times per system (interleaved) and the table
shows medians, with the p99 range; the plot shows the first repeat. Writes ``autoscale.json``
and ``autoscale.png`` (``autoscale-quick.*`` with ``--quick``) and the worker logs under
``autoscale-logs/``, in bench/results/local/ (git-ignored) or with ``--publish`` in
bench/results/. Uses a private Redis unless ``REDIS_URL`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
from celery import Celery

from bench import autoscale_report, report
from bench.run import Harness, harness
from bench.scenarios import FULL, Arrivals, arrivals_for
from bench.systems import (
    AUTOSCALE_MAX_CHILDREN,
    AUTOSCALE_MAX_INPUTS,
    AUTOSCALE_MIN_CHILDREN,
    AUTOSCALE_SCALEDOWN_WINDOW_S,
    AUTOSCALE_SYSTEMS,
    AUTOSCALE_TARGET_INPUTS,
    ROOT,
    System,
    Worker,
    one_worker,
)

CHILD_SAMPLE_S = 0.25
STATS_SAMPLE_S = 1.0
WARMUP_INPUTS = 5
SETTLE_TIMEOUT_S = 20.0
#: Every system runs the async wait; gevent's System maps it to the cooperative time.sleep.
TASK = "sleep_async"

LOG_LINE = re.compile(r"^\[(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): (?P<level>\w+)/[^\]]*\] ")
SCALING = re.compile(r"(Scaling (up|down).*|Child \d+ (started|draining|exited).*)$")


# -- watching the run ----------------------------------------------------------------------------


class ProcessSampler(threading.Thread):
    """Every 0.25 s: the worker's pool processes (psutil) and machine CPU use."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(name="process-sampler", daemon=True)
        self._main = psutil.Process(worker.process.pid)
        self._green = worker.system.kind == "gevent"
        self._halt = threading.Event()
        self.samples: list[tuple[float, int, float]] = []  # (time, processes, cpu %)

    def run(self) -> None:
        psutil.cpu_percent(None)
        while not self._halt.wait(CHILD_SAMPLE_S):
            try:
                children = len(self._main.children(recursive=False))
            except psutil.Error:
                break
            processes = 1 if self._green else children
            self.samples.append((time.time(), processes, psutil.cpu_percent(None)))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


class StatsSampler(threading.Thread):
    """Once a second: ``inspect stats`` autoscaler info (current, desired, load, backlog)."""

    def __init__(self, redis_url: str, hostname: str) -> None:
        super().__init__(name="stats-sampler", daemon=True)
        self._app = Celery("bench-stats", broker=redis_url, backend=redis_url)
        self._hostname = hostname
        self._halt = threading.Event()
        self.samples: list[dict[str, Any]] = []
        self.misses = 0

    def run(self) -> None:
        while not self._halt.is_set():
            began = time.monotonic()
            try:
                inspect = self._app.control.inspect([self._hostname], timeout=1.0, limit=1)
                replies = inspect.stats() or {}
            except Exception:
                replies = {}
            stats = replies.get(self._hostname)
            if stats is None:
                self.misses += 1
            else:
                scaler = stats.get("autoscaler") or {}
                pool = stats.get("pool") or {}
                self.samples.append(
                    {
                        "t": time.time(),
                        "current": scaler.get("current"),
                        "desired": scaler.get("desired"),
                        "load": scaler.get("load", scaler.get("qty")),
                        "backlog": scaler.get("backlog"),
                        "processes": len(pool.get("processes") or []),
                        "prefetch": stats.get("prefetch_count"),
                    }
                )
            self._halt.wait(max(0.0, STATS_SAMPLE_S - (time.monotonic() - began)))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        with contextlib.suppress(Exception):
            self._app.close()


def level_of(system: System) -> int:
    """The inputs at once an autoscaler system is started with (each fixes its own)."""
    if system.fixed_level is None:
        raise ValueError(f"{system.name}: an autoscaler benchmark system needs a fixed_level")
    return system.fixed_level


def idle_processes(system: System) -> int | None:
    """Pool processes when idle, checked before the clock starts (None: not counted)."""
    if system.kind == "gevent":
        return None
    if system.autoscaled:
        return AUTOSCALE_MIN_CHILDREN
    return system.children


def settle(worker: Worker, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Wait until the warm-up's scale-up (stock prefork grows on 5 inputs) has gone again."""
    expected = idle_processes(worker.system)
    main = psutil.Process(worker.process.pid)
    deadline = time.monotonic() + timeout_s
    time.sleep(1.0)
    while expected is not None and time.monotonic() < deadline:
        if len(main.children(recursive=False)) == expected:
            return
        time.sleep(0.25)
    if expected is not None:
        print(f"  still {len(main.children())} processes after {timeout_s:g}s (want {expected})")


def scaling_events(log_path: Path, t0: float) -> list[list[Any]]:
    """``[t, line]`` for every scaling and child lifecycle line of the worker log."""
    events: list[list[Any]] = []
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return events
    for line in lines:
        head = LOG_LINE.match(line)
        found = SCALING.search(line)
        if head is None or found is None:
            continue
        stamp = datetime.strptime(head["ts"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        events.append([round(stamp - t0, 3), found.group(1)])
    return events


# -- one run -----------------------------------------------------------------------------------


def run_one(
    h: Harness,
    system: System,
    arrivals: Arrivals,
    delay_s: float,
    drain_timeout_s: float,
    repeat: int = 0,
) -> dict[str, Any]:
    """Start the system's worker, play the arrivals, collect everything; always stop it."""
    tag = f"{arrivals.name}-{repeat + 1}"
    level = level_of(system)
    head = {"system": system.name, "scenario": arrivals.name}
    load_before = os.getloadavg()
    try:
        with one_worker(system, h.redis_url, level, h.log_dir, tag) as (worker, driver):
            driver.run(system.task_name(TASK), [delay_s], WARMUP_INPUTS, 30, worker=worker)
            settle(worker)
            offsets = arrivals.send_offsets()
            sampler = ProcessSampler(worker)
            stats = StatsSampler(h.redis_url, worker.hostname)
            t0 = time.time() + 0.5
            sampler.start()
            stats.start()
            try:
                raw = driver.run(
                    system.task_name(TASK),
                    [delay_s],
                    len(offsets),
                    arrivals.arrivals_end_s + drain_timeout_s,
                    worker=worker,
                    t0=t0,
                    offsets=offsets,
                )
                quiet_until = t0 + arrivals.arrivals_end_s + arrivals.tail_s
                time.sleep(max(0.0, quiet_until - time.time()))
                t_end = time.time()
            finally:
                sampler.stop()
                stats.stop()
    except RuntimeError as exc:  # the worker did not start, or exited during the run
        print(f"  {exc}")
        return {**head, "error": str(exc).splitlines()[0], "log_tail": str(exc)}
    inputs = sorted(
        [round(q - t0, 4), round(s - t0, 4), round(e - t0, 4)]
        for q, s, e in zip(raw["enqueued"], raw["start"], raw["end"], strict=True)
        if s is not None and e is not None
    )
    return {
        **head,
        "label": system.describe(level),
        "t0": t0,
        "t_end": t_end,
        "arrivals_end_s": arrivals.arrivals_end_s,
        "exit_status": worker.process.returncode,
        "loadavg_before": [round(x, 2) for x in load_before],
        "producer_behind_s": round(raw["behind_s"], 3),
        "sent": len(raw["enqueued"]),
        "inputs": inputs,
        "failed": raw["error_count"],
        "failures": raw["errors"],
        "unfinished": raw["timed_out"],
        "processes": [[round(t - t0, 3), n] for t, n, _ in sampler.samples],
        "cpu_percent": [[round(t - t0, 3), c] for t, _, c in sampler.samples],
        "stats": [{**s, "t": round(s["t"] - t0, 3)} for s in stats.samples],
        "stats_misses": stats.misses,
        "scaling": scaling_events(worker.log_path, t0),
        "log": str(worker.log_path.relative_to(ROOT))
        if worker.log_path.is_relative_to(ROOT)
        else str(worker.log_path),
    }


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    keys = list(AUTOSCALE_SYSTEMS)
    parser = argparse.ArgumentParser(
        prog="python -m bench.autoscale_scenario",
        description="Ramp and spike arrivals against TargetAutoscaler, fixed pools and stock "
        "Celery (gevent at the same slots, prefork); writes a table, JSON and a PNG.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller, shorter scenarios")
    parser.add_argument(
        "--systems", default=",".join(keys), help=f"comma-separated subset of {','.join(keys)}"
    )
    parser.add_argument("--scenarios", default="ramp,spike", help="ramp, spike or both")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds each input waits")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="seconds after the last arrival to wait for results (default 400, 150 with --quick)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="play every scenario N times per system; the table shows medians (p99 range)",
    )
    report.add_output_options(parser, "autoscale.json, .png and autoscale-logs/")
    parser.add_argument(
        "--plot-only", action="store_true", help="re-draw the PNG and table from the existing JSON"
    )
    args = parser.parse_args(argv)
    unknown = set(args.systems.split(",")) - set(keys)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}; choose from {keys}")
    if args.drain_timeout is None:
        args.drain_timeout = 150.0 if args.quick else 400.0
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: stop the worker and the server


def report_paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    out = report.output_dir(args)
    stem = "autoscale-quick" if args.quick else "autoscale"
    return out / f"{stem}.json", out / f"{stem}.png", out / f"{stem}-logs"


def _new_report(args: argparse.Namespace, chosen: list[System], plays: list[Arrivals]) -> Any:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {
            "delay_s": args.delay,
            "max_inputs": AUTOSCALE_MAX_INPUTS,
            "target_inputs": AUTOSCALE_TARGET_INPUTS,
            "max_children": AUTOSCALE_MAX_CHILDREN,
            "min_children": AUTOSCALE_MIN_CHILDREN,
            "scaledown_window_s": AUTOSCALE_SCALEDOWN_WINDOW_S,
            "quick": args.quick,
        },
        "scenarios": [a.as_dict() for a in plays],
        "systems": {
            s.name: {
                "label": s.describe(level_of(s)),
                "loglevel": s.loglevel,
                "args": s.worker_args,
                "env": s.env,
            }
            for s in chosen
        },
        "runs": [],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    json_path, png_path, log_dir = report_paths(args)
    if args.plot_only:
        saved = json.loads(json_path.read_text())
        saved["summaries"] = autoscale_report.summarize_all(saved["runs"])
        saved["ratios"] = autoscale_report.ratios(saved["summaries"])
        autoscale_report.plot(saved, png_path)
        autoscale_report.print_report(saved)
        print(f"\nplot: {png_path}")
        return 0
    chosen = [AUTOSCALE_SYSTEMS[key] for key in args.systems.split(",")]
    plays = [a for a in arrivals_for(args.quick) if a.name in args.scenarios.split(",")]
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    result = _new_report(args, chosen, plays)
    try:
        with harness(FULL, log_dir, progress=False) as h:
            result["machine"] = report.machine_info(h.store)
            shared = "REDIS_URL" if os.environ.get("REDIS_URL") else "private server"
            print(f"broker: {h.redis_url} ({shared})")
            for repeat, arrivals, system in itertools.product(range(args.repeat), plays, chosen):
                print(
                    f"[{arrivals.name} #{repeat + 1}] {system.name}: "
                    f"{len(arrivals.send_offsets())} inputs over {arrivals.arrivals_end_s:g} s, "
                    f"loadavg {os.getloadavg()[0]:.2f} ...",
                    flush=True,
                )
                began = time.monotonic()
                run = run_one(h, system, arrivals, args.delay, args.drain_timeout, repeat)
                run["repeat"] = repeat
                run["summary"] = autoscale_report.summarize(run)
                result["runs"].append(run)
                print(f"  {time.monotonic() - began:.0f} s: {run['summary']}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    summaries = autoscale_report.summarize_all(result["runs"])
    result["summaries"] = summaries
    result["ratios"] = autoscale_report.ratios(summaries)
    autoscale_report.write_report(result, json_path)
    autoscale_report.plot(result, png_path)
    autoscale_report.print_report(result)
    note = report.where_note(json_path.parent)
    print(f"\nresults: {json_path} {note}".rstrip() + f"\nplot: {png_path}\nlogs: {log_dir}")
    failed = any(
        s.get("error") or s.get("failed") or s.get("unfinished")
        for by in summaries.values()
        for s in by.values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
