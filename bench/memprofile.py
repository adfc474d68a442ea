"""Where a celery-concurrent worker's memory per in-flight async input goes (tracemalloc).

    python -m bench.memprofile [--inflight 1000] [--top 15] [--process child|main]

Starts a private Redis (``REDIS_URL`` to override) and a celery-concurrent worker (``-c 1``,
``max_inputs`` = ``--inflight``) that traces allocations (``tracemalloc``, 12 frames) in its
child, or with ``--process main`` in its main process (which reserves every input). Sends
``--inflight`` inputs that wait on a gate (:func:`bench.workload.hold`); snapshots are taken
when the first one arrives and when all of them wait (the child dumps its own; the main
process dumps one on SIGUSR2). Prints that process's RSS growth (psutil) next to what
tracemalloc saw allocated in between, grouped by source line, per input. Tracing slows the
worker down and adds its own overhead: read the split, not the total. Writes
``bench/results/memprofile[-main].txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench.profile import drive
from bench.report import add_output_options, output_dir, where_note
from bench.systems import SYSTEMS, Driver, Worker, one_worker
from celery_concurrent.testing.devserver import redis_url_or_private

FILL_TIMEOUT_S = 300.0


def measure(
    redis_url: str, inflight: int, snapshots: Path, log_dir: Path, process: str
) -> tuple[int, int]:
    """Hold ``inflight`` inputs; return the traced process's RSS at the first input and full."""
    tracing = {"BENCH_TRACEMALLOC_DIR": str(snapshots)}
    if process == "main":
        tracing["BENCH_TRACEMALLOC_MAIN"] = "1"
    system = SYSTEMS["celery-concurrent"]
    gate = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    try:
        with one_worker(system, redis_url, inflight, log_dir, "memprofile", tracing) as pair:
            worker, driver = pair
            return _hold(worker, driver, inflight, gate, snapshots, process)
    finally:
        shutil.rmtree(gate, ignore_errors=True)


def _hold(
    worker: Worker, driver: Driver, inflight: int, gate: Path, snapshots: Path, process: str
) -> tuple[int, int]:
    """Hold ``inflight`` inputs at ``gate``; RSS at the first input's arrival and when full."""
    drive(driver, "noop", [], 50)
    traced = worker.tree.processes()[0 if process == "main" else -1]
    driver.send(
        {"op": "run", "task": "hold", "args": [str(gate), inflight], "n": inflight,
         "timeout_s": FILL_TIMEOUT_S + 120}
    )  # fmt: skip
    rss_first = 0
    deadline = time.monotonic() + FILL_TIMEOUT_S
    while not (gate / "ready").exists():
        if not rss_first and list(snapshots.glob("first-*")):
            rss_first = traced.memory_info().rss
            if process == "main":
                traced.send_signal(signal.SIGUSR2)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{inflight} inputs did not all start; see {worker.log_path}")
        time.sleep(0.01)
    rss_full = traced.memory_info().rss
    if process == "main":
        traced.send_signal(signal.SIGUSR2)
        _wait_for_file(snapshots, "main-full-*")
    (gate / "open").touch()
    while True:
        message = driver.next(FILL_TIMEOUT_S)
        if message is None or "result" in message:
            break
    return rss_first, rss_full


def _wait_for_file(directory: Path, pattern: str, timeout_s: float = 120.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while not (found := sorted(directory.glob(pattern))):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {pattern} in {directory} after {timeout_s:g}s")
        time.sleep(0.1)
    time.sleep(1.0)  # let the dump finish writing
    return found[0]


def report(snapshots: Path, inflight: int, rss: tuple[int, int], top: int, process: str) -> str:
    prefix = "main-" if process == "main" else ""
    first = tracemalloc.Snapshot.load(str(_wait_for_file(snapshots, f"{prefix}first-*")))
    full = tracemalloc.Snapshot.load(str(_wait_for_file(snapshots, f"{prefix}full-*")))
    noise = (
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    )
    stats = full.filter_traces(noise).compare_to(first.filter_traces(noise), "lineno")
    traced = sum(s.size_diff for s in stats)
    lines = [
        f"celery-concurrent {'main process' if process == 'main' else 'child'}, {inflight:,} "
        f"async inputs waiting on one loop (between the first input's arrival and the last "
        f"one's)",
        f"RSS growth (psutil): {(rss[1] - rss[0]) / inflight:,.0f} B per input; "
        f"traced by tracemalloc: {traced / inflight:,.0f} B per input",
        f"{'B/input':>8} {'objs/input':>10}  where (allocating line)",
    ]
    for stat in stats[:top]:
        frame = stat.traceback[0]
        where = f"{_short(frame.filename)}:{frame.lineno}"
        lines.append(
            f"{stat.size_diff / inflight:8.0f} {stat.count_diff / inflight:10.2f}  {where}"
        )
    return "\n".join(lines)


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3.", "/work/main/"):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3." else tail
    return filename


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memprofile", description=__doc__)
    parser.add_argument("--inflight", type=int, default=1000)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--process", choices=["child", "main"], default="child")
    add_output_options(parser, "memprofile*.txt")
    args = parser.parse_args(argv)
    out = output_dir(args)
    log_dir = out / "logs" / "memprofile"
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        redis_url = redis_url_or_private(stack)
        snapshots = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-mem-")))
        rss = measure(redis_url, args.inflight, snapshots, log_dir, args.process)
        text = report(snapshots, args.inflight, rss, args.top, args.process)
    print(text)
    suffix = "-main" if args.process == "main" else ""
    path = out / f"memprofile{suffix}.txt"
    path.write_text(text + "\n")
    print(f"wrote {path} {where_note(out)}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
