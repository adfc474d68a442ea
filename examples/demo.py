"""End-to-end demo: a burst of async and sync inputs through one concurrent worker.

Run it from the repository root (``scripts/demo.sh`` creates the venv first)::

    python -m examples.demo [--async-inputs 720] [--sync-inputs 80] [--delay 3]
                            [--autoscale 4,1 | --concurrency N] [--timeout 120] [--json PATH]
                            [--broker amqp://guest:guest@127.0.0.1:5672//]

It uses ``$REDIS_URL`` as broker and result backend when set, otherwise a private
Redis-compatible server that lives only as long as the demo. ``--broker URL`` takes the
broker elsewhere, e.g. ``--broker amqp://guest:guest@127.0.0.1:5672//`` for RabbitMQ; results
stay on the Redis server. It starts a real
``celery -A examples.app worker`` (log in a temp file), enqueues ``fetch`` (async) and
``resize`` (sync) inputs interleaved, waits for them with a progress bar, prints a
summary (throughput, latency percentiles, peak inputs in flight against the slots the
burst can use, wall time against the ideal for those slots, child pids) and stops the worker.

The default burst is sized so the pool's slots bound it, not the machine's message rate:
800 inputs of 3 s on up to 4 children of 100 slots is two full waves (ideal 6 s) at about
133 inputs/s. Short inputs (``--delay 0.2``) show the per-message ceiling instead, and the
summary says so. Inputs go to a queue of the demo's own, so a shared server's other
queues are left alone; on a shared server the demo also deletes its queue and results (on
RabbitMQ, always its queue).

Exits 0 when every input succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from celery.utils.nodenames import gethostname

from celery_concurrent.testing import WorkerProcess
from celery_concurrent.testing.devserver import redis_url_or_private

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
STATS_TIMEOUT = 2.0
LOG_TAIL_LINES = 40
BROKER_ENV = "CELERY_BROKER_URL"
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp")


# -- command line ------------------------------------------------------------------------


def _autoscale_arg(value: str) -> str:
    parts = value.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected MAX,MIN (e.g. 4,1), got {value!r}")
    high, low = (int(p) for p in parts)
    if high < 1 or low < 1 or low > high:
        raise argparse.ArgumentTypeError(f"need MAX >= MIN >= 1, got {value!r}")
    return f"{high},{low}"


def _broker_arg(value: str) -> str:
    scheme = value.partition("://")[0]
    if "://" not in value or scheme not in BROKER_SCHEMES:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a broker URL this demo runs on; give one of "
            f"{', '.join(s + '://' for s in BROKER_SCHEMES)}, "
            "e.g. --broker amqp://guest:guest@127.0.0.1:5672//"
        )
    return value


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value!r}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value!r}")
    return number


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the demo's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo",
        description="Run a burst of async and sync inputs through one concurrent worker.",
    )
    parser.add_argument(
        "--async-inputs",
        type=_non_negative_int,
        default=720,
        metavar="N",
        help="fetch (async def) inputs to enqueue (default: 720)",
    )
    parser.add_argument(
        "--sync-inputs",
        type=_non_negative_int,
        default=80,
        metavar="N",
        help="resize (sync def, threaded) inputs to enqueue (default: 80)",
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how long each input sleeps (default: 3)",
    )
    parser.add_argument(
        "--autoscale",
        type=_autoscale_arg,
        default="4,1",
        metavar="MAX,MIN",
        help="worker children bounds for the autoscaler (default: 4,1)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        metavar="N",
        help="fixed number of worker children; replaces --autoscale",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="give up waiting for results after this long (default: 120)",
    )
    parser.add_argument(
        "--broker",
        type=_broker_arg,
        default=None,
        metavar="URL",
        help="broker URL, e.g. amqp://guest:guest@127.0.0.1:5672// for RabbitMQ "
        "(default: the Redis server, which also holds the results)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the summary's figures to PATH as JSON",
    )
    args = parser.parse_args(argv)
    if args.async_inputs + args.sync_inputs == 0:
        parser.error("nothing to do: --async-inputs and --sync-inputs are both 0")
    if args.delay < 0:
        parser.error("--delay must be >= 0")
    return args


# -- the worker --------------------------------------------------------------------------


def start_worker(redis_url: str, broker_url: str, pool_args: list[str]) -> WorkerProcess:
    """Start ``celery -A examples.app worker`` consuming a queue of its own.

    ``examples.app`` reads ``REDIS_URL`` (results, and the broker by default);
    ``CELERY_BROKER_URL``, which Celery prefers to the app's own, moves the broker.
    """
    name = f"demo-{uuid.uuid4().hex[:8]}"
    fd, log_name = tempfile.mkstemp(prefix="celery-concurrent-demo-", suffix=".log")
    os.close(fd)
    return WorkerProcess.start(
        "examples.app",
        [*pool_args, "-E", "-l", "info"],
        queue=name,
        hostname=f"{name}@{gethostname()}",  # what --hostname NAME@%h expands to
        log_path=Path(log_name),
        env={"REDIS_URL": redis_url, BROKER_ENV: broker_url},
        cwd=REPO_ROOT,
    )


def query_stats(app: Celery, hostname: str) -> dict[str, Any] | None:
    """``inspect().stats()`` of one worker, or None if it did not reply."""
    replies = app.control.inspect([hostname], timeout=STATS_TIMEOUT).stats() or {}
    stats: dict[str, Any] | None = replies.get(hostname)
    return stats


class StatsProbe:
    """Query the worker's stats once, in the background, while inputs are running."""

    def __init__(self, app: Celery, hostname: str) -> None:
        self._app = app
        self._hostname = hostname
        self._thread: threading.Thread | None = None
        self.stats: dict[str, Any] | None = None
        self.error: str | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stats-probe", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self.stats = query_stats(self._app, self._hostname)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def result(self) -> dict[str, Any] | None:
        if self._thread is None:
            self.start()
        assert self._thread is not None
        self._thread.join(STATS_TIMEOUT + 5.0)
        return self.stats


# -- the burst ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """What came back for the burst."""

    kinds: dict[str, str] = field(default_factory=dict)  # task id -> "async" | "sync"
    enqueued: dict[str, float] = field(default_factory=dict)  # id -> time.time() before send
    returned: dict[str, dict[str, Any]] = field(default_factory=dict)  # successes
    failed: dict[str, str] = field(default_factory=dict)  # task id -> error
    started: float = 0.0  # time.monotonic() before the first send
    finished: float = 0.0  # time.monotonic() when the last result arrived (or gave up)

    @property
    def timed_out(self) -> int:
        return len(self.kinds) - len(self.returned) - len(self.failed)


def interleave(n_async: int, n_sync: int) -> Iterator[str]:
    """Yield ``"async"``/``"sync"`` so the sync inputs are spread evenly through the burst."""
    total = n_async + n_sync
    for i in range(total):
        is_sync = (i + 1) * n_sync // total > i * n_sync // total
        yield "sync" if is_sync else "async"


def enqueue(
    app: Celery, tasks: dict[str, Any], args: argparse.Namespace, queue: str, outcome: Outcome
) -> list[AsyncResult]:
    """Send the burst, noting each input in ``outcome``; return the results in send order."""
    results: list[AsyncResult] = []
    outcome.started = time.monotonic()
    with app.producer_or_acquire() as producer:  # one producer for the burst: ~10% faster
        for kind in interleave(args.async_inputs, args.sync_inputs):
            task_id = str(uuid.uuid4())
            outcome.kinds[task_id] = kind
            outcome.enqueued[task_id] = time.time()
            result = tasks[kind].apply_async(
                (args.delay,), task_id=task_id, queue=queue, producer=producer
            )
            results.append(result)
    return results


def collect(
    results: list[AsyncResult], outcome: Outcome, timeout: float, probe: StatsProbe
) -> None:
    """Wait for results in completion order (Redis pub/sub, no polling), with a progress bar.

    Starts ``probe`` once half the inputs are done, so the stats show the pool under load.
    """
    from celery.exceptions import TimeoutError as CeleryTimeoutError
    from celery.result import ResultSet
    from tqdm import tqdm

    total = len(results)
    remaining = timeout - (time.monotonic() - outcome.started)
    with tqdm(total=total, unit="input", desc="completed", dynamic_ncols=True) as bar:
        try:
            stream = ResultSet(results).iter_native(timeout=max(remaining, 0.1), interval=0.5)
            for task_id, meta in stream:
                record(outcome, task_id, meta)
                bar.update(1)
                if bar.n * 2 >= total:
                    probe.start()
        except (CeleryTimeoutError, TimeoutError):
            bar.write(f"timed out after {timeout:g}s with {outcome.timed_out} inputs pending")
    outcome.finished = time.monotonic()


def record(outcome: Outcome, task_id: str, meta: dict[str, Any]) -> None:
    """File one ready result as a success or a failure."""
    value = meta.get("result")
    if meta.get("status") == "SUCCESS" and isinstance(value, dict):
        outcome.returned[task_id] = value
    else:
        outcome.failed[task_id] = f"{meta.get('status')}: {value!r}"


# -- the numbers -------------------------------------------------------------------------


#: At least this share of the usable slots in flight at once means slots bound the run.
SLOT_BOUND_SHARE = 0.8


@dataclass(frozen=True)
class Capacity:
    """What the burst could use at most: children, each child's slots, each kind's cap."""

    children: int  # the most children the worker may run (-c N, or the autoscaler's max)
    slots_per_child: int
    caps: dict[str, int]  # kind -> that task's max_inputs per child

    def usable_slots(self, counts: dict[str, int]) -> int:
        """Slots the burst's inputs can fill at once: per child, its slots or the caps' sum."""
        caps = sum(self.caps[kind] for kind, n in counts.items() if n)
        return self.children * min(self.slots_per_child, caps)

    def ideal_wall_s(self, counts: dict[str, int], delay_s: float) -> float:
        """Wall time with every usable slot busy from the first send: full waves of inputs."""
        waves = math.ceil(sum(counts.values()) / self.usable_slots(counts))
        for kind, n in counts.items():
            per_wave = self.children * min(self.slots_per_child, self.caps[kind])
            waves = max(waves, math.ceil(n / per_wave))
        return waves * delay_s


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def peak_in_flight(intervals: Sequence[tuple[float, float]]) -> int:
    """Most intervals open at once (sweep line; an end at t closes before a start at t)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def latencies_ms(outcome: Outcome, kind: str | None = None) -> list[float]:
    """Enqueue -> task's own ``end`` timestamp, in ms, sorted."""
    return sorted(
        (float(value["end"]) - outcome.enqueued[task_id]) * 1000.0
        for task_id, value in outcome.returned.items()
        if kind is None or outcome.kinds[task_id] == kind
    )


def _latency_cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    p50, p95, p99 = (percentile(values, p) for p in (50, 95, 99))
    return f"{p50:8.1f} {p95:8.1f} {p99:8.1f}"


def figures(outcome: Outcome, args: argparse.Namespace, capacity: Capacity) -> dict[str, Any]:
    """The run's figures: what the summary prints and ``--json`` writes."""
    counts = {"async": args.async_inputs, "sync": args.sync_inputs}
    done = len(outcome.returned)
    wall = max(outcome.finished - outcome.started, 1e-9)
    intervals = [(float(v["start"]), float(v["end"])) for v in outcome.returned.values()]
    usable = capacity.usable_slots(counts)
    ideal = capacity.ideal_wall_s(counts, args.delay)
    peak = peak_in_flight(intervals)
    latencies = latencies_ms(outcome)
    return {
        "inputs": sum(counts.values()),
        "async_inputs": args.async_inputs,
        "sync_inputs": args.sync_inputs,
        "delay_s": args.delay,
        "completed": done,
        "failed": len(outcome.failed),
        "timed_out": outcome.timed_out,
        "wall_s": round(wall, 3),
        "inputs_per_s": round(done / wall, 1),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "max_children": capacity.children,
        "slots_per_child": capacity.slots_per_child,
        "usable_slots": usable,
        "peak_in_flight": peak,
        "peak_share": round(peak / usable, 3),
        "ideal_wall_s": round(ideal, 3),
        "wall_vs_ideal": round(wall / ideal, 2) if ideal else None,
        # To keep every usable slot busy the worker must start usable/delay inputs a second.
        "needed_inputs_per_s": round(usable / args.delay, 1) if args.delay else None,
        "slot_bound": peak >= SLOT_BOUND_SHARE * usable,
        "child_pids": sorted({int(v["pid"]) for v in outcome.returned.values()}),
    }


def bound_line(fig: dict[str, Any]) -> str:
    """Which limit the run met: the slots, or the rate at which messages are handled."""
    if fig["slot_bound"]:
        return f"slots ({fig['peak_share']:.0%} of the usable slots were in flight at once)"
    needed = fig["needed_inputs_per_s"]
    wanted = f"{needed:g}/s" if needed is not None else "an unbounded rate"
    return (
        f"messages per second, not slots: {fig['inputs_per_s']:g} inputs/s came through, and "
        f"keeping {fig['usable_slots']} slots busy with {fig['delay_s']:g}s inputs takes "
        f"{wanted} (longer inputs, e.g. --delay 3, show the concurrency)"
    )


def summary_lines(outcome: Outcome, args: argparse.Namespace, fig: dict[str, Any]) -> list[str]:
    """The summary table, one line per row."""
    total, done, wall, pids = fig["inputs"], fig["completed"], fig["wall_s"], fig["child_pids"]
    until = "gave up waiting" if outcome.timed_out else "last result"
    ratio = fig["wall_vs_ideal"]
    against_ideal = (
        f", {ratio}x the ideal {fig['ideal_wall_s']:g} s for those slots" if ratio else ""
    )
    lines = [
        ("inputs", f"{total} ({args.async_inputs} async fetch + {args.sync_inputs} sync "
                   f"resize, {args.delay:g}s each)"),
        ("completed", f"{done} of {total} inputs"),
        ("failures", f"{len(outcome.failed)} failed, {outcome.timed_out} timed out"),
        ("wall time", f"{wall:.2f} s (first enqueue -> {until}){against_ideal}"),
        ("throughput", f"{fig['inputs_per_s']:.1f} inputs/s"),
        ("latency ms", "     p50      p95      p99  (enqueue -> task end)"),
        ("  all", _latency_cell(latencies_ms(outcome))),
        ("  async", _latency_cell(latencies_ms(outcome, "async"))),
        ("  sync", _latency_cell(latencies_ms(outcome, "sync"))),
        ("usable slots", f"{fig['usable_slots']} ({fig['max_children']} children x "
                         f"{fig['usable_slots'] // fig['max_children']} of "
                         f"{fig['slots_per_child']} slots each)"),
        ("peak in flight", f"{fig['peak_in_flight']} inputs at once, {fig['peak_share']:.0%} of "
                           "the usable slots"),
        ("bound by", bound_line(fig)),
        ("child pids", f"{len(pids)} ({', '.join(map(str, pids))})"),
    ]  # fmt: skip
    return [f"  {label:<15} {value}" for label, value in lines]


def pool_lines(stats: dict[str, Any] | None, error: str | None) -> list[str]:
    """The pool's view from ``inspect().stats()`` taken mid-run."""
    if stats is None:
        return [f"  {'pool':<15} (no stats reply{': ' + error if error else ''})"]
    pool = stats.get("pool", {})
    processes = pool.get("processes", [])
    lines = [
        f"  {'pool':<15} max-concurrency={pool.get('max-concurrency')} "
        f"processes={len(processes)} {processes}",
    ]
    if "autoscaler" in stats:
        lines += _mapping_lines("autoscaler", stats["autoscaler"])
    return lines


def _mapping_lines(label: str, info: Any) -> list[str]:
    """``key=value`` pairs on one line; nested mappings each on a line of their own."""
    if not isinstance(info, dict):
        return [f"  {label:<15} {info}"]
    flat = " ".join(f"{k}={v}" for k, v in info.items() if not isinstance(v, dict))
    lines = [f"  {label:<15} {flat}"]
    for key, value in info.items():
        if isinstance(value, dict):
            pairs = " ".join(f"{k}={v}" for k, v in value.items())
            lines.append(f"  {'':<15}   {key}: {pairs}")
    return lines


def print_summary(
    outcome: Outcome, args: argparse.Namespace, fig: dict[str, Any], probe: StatsProbe
) -> None:
    """Print the summary table and the first few failures."""
    print("\nsummary")
    print("\n".join(summary_lines(outcome, args, fig)))
    print("\n".join(pool_lines(probe.result(), probe.error)))
    for task_id, error in list(outcome.failed.items())[:5]:
        print(f"  failed {outcome.kinds[task_id]} {task_id}: {error}")


# -- cleanup on a shared server ----------------------------------------------------------


def forget_results(app: Celery, task_ids: Sequence[str]) -> None:
    """Delete the demo's results from a Redis server that is not ours alone."""
    backend = app.backend
    keys = [backend.get_key_for_task(task_id) for task_id in task_ids]
    for start in range(0, len(keys), 1000):
        backend.client.delete(*keys[start : start + 1000])


def delete_queue(app: Celery, queue: str) -> None:
    """Delete the demo's queue from a broker that is not ours alone."""
    declared = app.amqp.queues[queue]  # the queue apply_async(queue=...) routed to
    with app.connection_for_write() as conn:
        bound = declared.bind(conn.default_channel)
        bound.declare()  # so the channel knows the binding it must remove
        bound.delete()


# -- main --------------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: stop worker and server


def load_app(redis_url: str, broker_url: str) -> Any:
    """Import ``examples.app`` (it reads ``REDIS_URL`` at import time) on ``broker_url``."""
    os.environ["REDIS_URL"] = redis_url
    os.environ[BROKER_ENV] = broker_url  # Celery prefers it to the app's broker argument
    from examples import app as example_app

    return example_app


def _masked(url: str) -> str:
    """``url`` with its password hidden, as Celery logs it."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def max_children(args: argparse.Namespace) -> int:
    if args.concurrency is not None:
        return int(args.concurrency)
    return int(args.autoscale.split(",")[0])


def capacity_of(example: Any, stats: dict[str, Any] | None, args: argparse.Namespace) -> Capacity:
    """The worker's slots per child (from its stats) and the example tasks' caps."""
    from celery_concurrent.decorator import settings_for
    from celery_concurrent.pool import slots_per_child_of

    caps = {}
    for kind, task in (("async", example.fetch), ("sync", example.resize)):
        limits = settings_for(task)
        assert limits is not None, f"{task.name} is not a @concurrent task"
        caps[kind] = limits.max_inputs
    slots = (stats or {}).get("pool", {}).get("slots-per-child")
    if not isinstance(slots, int):  # no stats reply: the pool's own rule
        slots = slots_per_child_of(example.app)
    return Capacity(children=max_children(args), slots_per_child=slots, caps=caps)


def pool_args(args: argparse.Namespace) -> list[str]:
    """Worker options choosing fixed children (``-c``) or the autoscaler."""
    if args.concurrency is not None:
        return ["-c", str(args.concurrency)]
    return ["--autoscale", args.autoscale]


def run(args: argparse.Namespace) -> int:
    """Broker, worker, burst, summary; always stops what it started."""
    with contextlib.ExitStack() as stack:
        shared = bool(os.environ.get("REDIS_URL"))
        redis_url = redis_url_or_private(stack)
        where = "from REDIS_URL" if shared else "private server"
        broker_url = args.broker or redis_url
        if args.broker:
            print(f"broker: {_masked(broker_url)} (--broker); results: {redis_url} ({where})")
        else:
            print(f"broker: {redis_url} ({where})")
        example = load_app(redis_url, broker_url)
        app: Celery = example.app
        worker = start_worker(redis_url, broker_url, pool_args(args))
        print(f"worker: {worker.hostname} {' '.join(pool_args(args))}, log: {worker.log_path}")
        outcome = Outcome()
        try:
            return run_burst(app, example, worker, args, outcome)
        finally:
            code = worker.stop(STOP_TIMEOUT)
            print(f"worker stopped (exit status {code}), log: {worker.log_path}")
            # After the worker stopped: it requeues what it had not finished.
            if shared:
                forget_results(app, list(outcome.kinds))
            if shared or args.broker:
                delete_queue(app, worker.queue)
    return 1  # unreachable; keeps type checkers happy


def run_burst(
    app: Celery, example: Any, worker: WorkerProcess, args: argparse.Namespace, outcome: Outcome
) -> int:
    """Wait for the worker, send the burst, collect and report it."""
    if not worker.wait_until_ready(app, READY_TIMEOUT):
        code = worker.proc.poll()
        why = f"exited with status {code}" if code is not None else "did not answer ping"
        print(f"worker {why} within {READY_TIMEOUT:g}s of starting; log tail:")
        print(worker.tail(LOG_TAIL_LINES))
        return 1
    capacity = capacity_of(example, query_stats(app, worker.hostname), args)
    print(f"worker ready; enqueuing {args.async_inputs + args.sync_inputs} inputs")
    tasks = {"async": example.fetch, "sync": example.resize}
    probe = StatsProbe(app, worker.hostname)
    results = enqueue(app, tasks, args, worker.queue, outcome)
    print(f"enqueued in {time.monotonic() - outcome.started:.2f} s")
    collect(results, outcome, args.timeout, probe)
    fig = figures(outcome, args, capacity)
    print_summary(outcome, args, fig, probe)
    if args.json is not None:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")
    ok = not outcome.failed and outcome.timed_out == 0
    if not ok:
        print(f"FAILED: see the worker log {worker.log_path}")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m examples.demo``."""
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
