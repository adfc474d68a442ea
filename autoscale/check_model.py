"""Check :mod:`autoscale.simulate` against real workers: 3 workers, one queue, one Redis.

::

    python -m autoscale.check_model [--out autoscale/plots] [--name check] [--redis-url URL]
    python -m autoscale.check_model --replay autoscale/plots/check-run2-real.json --name check-run2

Starts 3 real ``celery worker`` processes of ``autoscale.check_model_tasks`` (ConcurrentPool +
TargetAutoscaler, ``--autoscale=4,1``, ``@concurrent(max_inputs=40, target_inputs=20)``,
``concurrent_scaledown_window`` = ``--window`` s) consuming one queue, and sends a small
trace of 0.5 s ``async`` inputs: a background rate, a burst, a plateau. It samples every
worker's ``inspect stats`` (``autoscaler.current``) every 0.5 s and the queue's Redis list
length every 0.1 s, then replays the inputs' own enqueue times through the simulation with
pods fixed at 3, and writes ``NAME.json`` and ``NAME.png`` (measured against simulated:
per-worker children, total children, queue, latency) and the raw run as ``NAME-real.json``.

A private Redis is started unless ``--redis-url`` is given (then a unique queue is used
and its keys are deleted afterwards). Takes about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import redis
from celery import Celery

from autoscale.simulate import (
    Result,
    SimConfig,
    Trace,
    read_manifests,
    simulate,
)
from bench.measure import percentile
from celery_concurrent.testing import WorkerProcess
from celery_concurrent.testing.devserver import PrivateRedis

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKERS = 3
MAX_CHILDREN, MIN_CHILDREN = 4, 1
MAX_INPUTS, TARGET_INPUTS = 40, 20
SERVICE_S = 0.5
TASK = "bench.autoscale.io_wait"
STATS_EVERY_S = 0.5
LLEN_EVERY_S = 0.1
QUIET = ("--without-gossip", "--without-mingle", "--without-heartbeat")

POLL_RESULTS_S = 0.5


class ResultPoller(threading.Thread):
    """Reads finished inputs straight from the result backend keys (one MGET per 0.5 s)."""

    def __init__(self, redis_url: str) -> None:
        super().__init__(name="result-poller", daemon=True)
        self._client = redis.Redis.from_url(redis_url)
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._halt = threading.Event()
        self.done: dict[str, dict[str, float]] = {}
        self.failed: dict[str, str] = {}

    def expect(self, task_id: str) -> None:
        with self._lock:
            self._pending.append(task_id)

    @property
    def outstanding(self) -> int:
        with self._lock:
            return len(self._pending)

    def run(self) -> None:
        while not self._halt.wait(POLL_RESULTS_S):
            self.poll()

    def poll(self) -> None:
        with self._lock:
            pending = list(self._pending)
        finished: set[str] = set()
        for start in range(0, len(pending), 2000):
            chunk = pending[start : start + 2000]
            raws = self._client.mget([f"celery-task-meta-{tid}" for tid in chunk])
            for task_id, raw in zip(chunk, raws, strict=True):
                if raw is None:
                    continue
                meta = json.loads(raw)
                status = meta.get("status")
                if status == "SUCCESS":
                    self.done[task_id] = meta["result"]
                elif status in ("FAILURE", "REVOKED"):
                    self.failed[task_id] = f"{status}: {meta.get('result')!r}"
                else:
                    continue
                finished.add(task_id)
        if finished:
            with self._lock:
                self._pending = [t for t in self._pending if t not in finished]

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.poll()
        self._client.close()


def forget(app: Celery, redis_url: str, queue: str, task_ids: Sequence[str]) -> None:
    """On a shared server: delete this run's results and queue."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [f"celery-task-meta-{tid}" for tid in task_ids]
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()
    declared = app.amqp.queues[queue]
    with app.connection_for_write() as conn:
        bound = declared.bind(conn.default_channel)
        bound.declare()
        bound.delete()


@dataclass(frozen=True)
class Schedule:
    """Background rate, one burst, one plateau (all inputs/s or counts)."""

    background_per_s: float = 10.0
    burst_at_s: float = 4.0
    burst_over_s: float = 1.5  # 200/s: what one producer keeps up with beside 3 workers here
    burst: int = 300
    plateau_from_s: float = 14.0
    plateau_to_s: float = 22.0
    plateau_per_s: float = 120.0
    end_s: float = 28.0

    def offsets(self) -> list[float]:
        """Send times, seconds after the start."""
        times = [i / self.background_per_s for i in range(int(self.end_s * self.background_per_s))]
        times += [self.burst_at_s + self.burst_over_s * i / self.burst for i in range(self.burst)]
        span = self.plateau_to_s - self.plateau_from_s
        count = int(span * self.plateau_per_s)
        times += [self.plateau_from_s + span * i / count for i in range(count)]
        return sorted(times)


# -- watching -----------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples a callable every ``every_s`` seconds into ``samples`` as (time, value)."""

    def __init__(self, name: str, every_s: float, read: Any) -> None:
        super().__init__(name=name, daemon=True)
        self.every_s, self.read = every_s, read
        self.samples: list[tuple[float, Any]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            began = time.monotonic()
            with contextlib.suppress(Exception):
                value = self.read()
                self.samples.append((time.time(), value))
            self._halt.wait(max(0.0, self.every_s - (time.monotonic() - began)))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def stats_reader(app: Celery, hosts: Sequence[str], mains: dict[str, psutil.Process]) -> Any:
    """Per worker: autoscaler current/desired/backlog/reserved and the child processes."""

    def read() -> dict[str, dict[str, Any]]:
        replies = app.control.inspect(list(hosts), timeout=1.0, limit=len(hosts)).stats() or {}
        out: dict[str, dict[str, Any]] = {}
        for host in hosts:
            scaler = (replies.get(host) or {}).get("autoscaler") or {}
            try:
                pids = [c.pid for c in mains[host].children(recursive=False)]
            except psutil.Error:
                pids = []
            out[host] = {
                "current": scaler.get("current"),
                "desired": scaler.get("desired"),
                "backlog": scaler.get("backlog"),
                "reserved": scaler.get("reserved"),
                "processes": len(pids),
                "pids": pids,
            }
        return out

    return read


@contextlib.contextmanager
def broker(url: str | None) -> Iterator[tuple[str, bool]]:
    """(redis URL, shared?): the given server, or a private one for the run."""
    if url:
        yield url, True
        return
    with PrivateRedis() as server:
        yield server.url, False


def wait_for(check: Any, timeout_s: float, every_s: float = 0.25) -> bool:
    """Poll ``check()`` until true or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return True
        time.sleep(every_s)
    return False


def run_real(
    url: str, shared: bool, schedule: Schedule, window_s: float, log_dir: Path
) -> dict[str, Any]:
    """Start the workers, play the schedule, return every sample and input."""
    queue = f"check-model-{uuid.uuid4().hex[:8]}"
    node = platform.node() or "localhost"
    env = {
        "REDIS_URL": url,
        "BENCH_QUEUE": queue,
        "BENCH_MAX_INPUTS": str(MAX_INPUTS),
        "BENCH_TARGET_INPUTS": str(TARGET_INPUTS),
        "BENCH_SCALEDOWN_WINDOW": f"{window_s:g}",
    }
    app = Celery("check-model", broker=url, backend=url)
    app.conf.task_default_queue = queue
    workers = [
        WorkerProcess.start(
            "autoscale.check_model_tasks",
            [f"--autoscale={MAX_CHILDREN},{MIN_CHILDREN}", "-l", "info", *QUIET],
            queue=queue,
            hostname=f"w{i + 1}-{queue}@{node}",
            log_path=log_dir / f"worker-{i + 1}.log",
            env=env,
            cwd=REPO_ROOT,
        )
        for i in range(WORKERS)
    ]
    hosts = [w.hostname for w in workers]
    client = redis.Redis.from_url(url)
    poller = ResultPoller(url)
    samplers: list[Sampler] = []
    sent: dict[str, float] = {}
    try:
        for w in workers:
            if not w.wait_until_ready(app, 60.0):
                raise RuntimeError(f"worker {w.hostname} did not start:\n{w.tail()}")
        warm = [app.send_task(TASK, (time.time(), 0.05), queue=queue) for _ in range(6)]
        for result in warm:
            result.get(timeout=30)
            result.forget()
        mains = {w.hostname: psutil.Process(w.proc.pid) for w in workers}
        read_stats = stats_reader(app, hosts, mains)
        idle = wait_for(
            lambda: all(v["current"] == MIN_CHILDREN for v in read_stats().values()),
            window_s + 15.0,
        )
        if not idle:
            print("  warning: not every worker back at 1 child before the start", file=sys.stderr)
        samplers = [
            Sampler("stats", STATS_EVERY_S, read_stats),
            Sampler("llen", LLEN_EVERY_S, lambda: int(client.llen(queue))),
        ]
        poller.start()
        t0 = time.time() + 0.5
        for s in samplers:
            s.start()
        behind = 0.0
        with app.producer_or_acquire() as producer:
            for offset in schedule.offsets():
                wait = t0 + offset - time.time()
                if wait > 0:
                    time.sleep(wait)
                else:
                    behind = max(behind, -wait)
                task_id = str(uuid.uuid4())
                enqueued = time.time()
                app.send_task(
                    TASK, (enqueued, SERVICE_S), task_id=task_id, queue=queue, producer=producer
                )
                sent[task_id] = enqueued
                poller.expect(task_id)
        # Run on until every input is back and the workers had a window to scale down.
        quiet_until = t0 + schedule.end_s + window_s + 4.0
        wait_for(lambda: not poller.outstanding and time.time() >= quiet_until, 90.0, 0.25)
        t_end = time.time()
    finally:
        for s in samplers:
            s.stop()
        for w in workers:
            w.stop(30.0)
        if poller.is_alive():
            poller.stop()
        if shared:
            forget(app, url, queue, list(sent))
        client.close()
        app.close()
    return {
        "schedule": schedule.__dict__,
        "t0": t0,
        "t_end": t_end,
        "producer_behind_s": round(behind, 3),
        "hosts": hosts,
        "sent": len(sent),
        "enqueued": sorted(round(e - t0, 4) for e in sent.values()),
        "inputs": sorted(
            [
                round(v["enq"] - t0, 4),
                round(v["start"] - t0, 4),
                round(v["end"] - t0, 4),
                int(v["pid"]),
            ]
            for v in poller.done.values()
        ),
        "failed": len(poller.failed),
        "stats": [[round(t - t0, 3), v] for t, v in samplers[0].samples],
        "llen": [[round(t - t0, 3), v] for t, v in samplers[1].samples],
        "logs": [str(w.log_path) for w in workers],
    }


# -- the model on the same trace ----------------------------------------------------------------


def hold_time_s(real: dict[str, Any]) -> float:
    """Seconds an input stays reserved in a worker, by Little's law over the plateau.

    Mean of the workers' summed ``reserved`` over the plateau's second half, divided by the
    arrival rate there: the service time the autoscaler's load reading actually sees.
    """
    schedule = Schedule(**real["schedule"])
    lo, hi = (schedule.plateau_from_s + schedule.plateau_to_s) / 2, schedule.plateau_to_s
    rate = sum(1 for q in real["enqueued"] if lo <= q < hi) / (hi - lo)
    totals = [
        sum(v["reserved"] or 0 for v in by_host.values())
        for t, by_host in real["stats"]
        if lo <= t < hi
    ]
    return sum(totals) / len(totals) / rate if totals and rate else SERVICE_S


def worker_of_input(real: dict[str, Any]) -> list[int | None]:
    """For each input, the index of the worker whose child ran it (None if unknown)."""
    owner: dict[int, int] = {}
    for _, by_host in real["stats"]:
        for index, host in enumerate(real["hosts"]):
            for pid in by_host[host].get("pids", []):
                owner[pid] = index
    return [owner.get(i[3]) if len(i) > 3 else None for i in real["inputs"]]


def run_model(
    real: dict[str, Any],
    window_s: float,
    service_s: float,
    split: str,
    label: str,
    pinned: bool = False,
) -> Result:
    """The simulation with pods fixed at 3, fed the real enqueue times.

    ``pinned`` replays which worker took each input (by its child's pid) instead of letting
    the model split the broker list.
    """
    fleet, worker = read_manifests()
    worker = replace(
        worker,
        max_inputs=MAX_INPUTS,
        target_inputs=TARGET_INPUTS,
        scaledown_window_s=window_s,
        min_children=MIN_CHILDREN,
        max_children=MAX_CHILDREN,
    )
    fleet = replace(fleet, fixed_pods=WORKERS)
    duration = real["t_end"] - real["t0"]
    if pinned:
        owners = worker_of_input(real)
        kept = [
            (i[0], owner)
            for i, owner in zip(real["inputs"], owners, strict=True)
            if owner is not None and i[0] >= 0
        ]
        kept.sort()
        trace = Trace(
            "check",
            "the real run's inputs, each on the worker that ran it",
            duration,
            times_s=tuple(t for t, _ in kept),
            pods_of=tuple(o for _, o in kept),
        )
    else:
        times = tuple(t for t in real["enqueued"] if t >= 0)
        trace = Trace("check", "the real run's enqueue times", duration, times_s=times)
    sim = SimConfig(dt_s=0.05, service_s=service_s, record_s=0.5, latency_window_s=2.0, split=split)
    return simulate(trace, fleet, worker, sim, label=label, per_pod=True)


Points = list[tuple[float, float]]


def _step_integral(points: Sequence[tuple[float, float]], end: float) -> float:
    total = 0.0
    for (t, v), (t_next, _) in zip(points, [*points[1:], (end, 0.0)], strict=True):
        total += v * max(0.0, min(t_next, end) - t)
    return total


def measured_children(real: dict[str, Any]) -> list[Points]:
    """Per worker: (t, autoscaler.current) samples."""
    out: list[Points] = []
    for host in real["hosts"]:
        out.append(
            [
                (t, float(v[host]["current"]))
                for t, v in real["stats"]
                if v[host]["current"] is not None
            ]
        )
    return out


def model_children(model: Result) -> list[Points]:
    """Per simulated pod: (t, accepting children)."""
    times, pods = model.series["t"], model.per_pod["children"]
    return [[(t, float(p[i])) for t, p in zip(times, pods, strict=True)] for i in range(WORKERS)]


def _total(per_worker: Sequence[Points]) -> Points:
    """Sum over workers, each held at its last sample."""
    times = sorted({t for points in per_worker for t, _ in points})
    total: Points = []
    for t in times:
        value = 0.0
        for points in per_worker:
            earlier = [v for when, v in points if when <= t]
            value += earlier[-1] if earlier else MIN_CHILDREN
        total.append((t, value))
    return total


def _mean_between(points: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    inside = [v for t, v in points if lo <= t < hi]
    return sum(inside) / len(inside) if inside else math.nan


def figures(
    schedule: Schedule,
    per_worker: Sequence[Points],
    queue: Points,
    latencies: Sequence[float],
    end: float,
) -> dict[str, Any]:
    """The numbers compared: children per worker (sorted), totals, queue, latency."""
    total = _total(per_worker)
    burst = (schedule.burst_at_s, schedule.plateau_from_s)
    plateau = (schedule.plateau_from_s + 2.0, schedule.plateau_to_s)
    above = [t for t, v in total if v > WORKERS * MIN_CHILDREN]
    return {
        "peak_children_per_worker": sorted(max((v for _, v in p), default=0) for p in per_worker),
        "child_seconds_per_worker": sorted(round(_step_integral(p, end), 1) for p in per_worker),
        "child_seconds_total": round(sum(_step_integral(p, end) for p in per_worker), 1),
        "burst_peak_children_total": max(
            (v for t, v in total if burst[0] <= t < burst[1]), default=0
        ),
        "plateau_mean_children_per_worker": sorted(
            round(_mean_between(p, *plateau), 2) for p in per_worker
        ),
        "plateau_mean_children_total": round(_mean_between(total, *plateau), 2),
        "last_above_min_s": round(max(above), 1) if above else math.nan,
        "max_queue": max((v for _, v in queue), default=0),
        "p50_s": round(percentile(list(latencies), 50), 3),
        "p99_s": round(percentile(list(latencies), 99), 3),
    }


def compare(real: dict[str, Any], models: Sequence[Result]) -> dict[str, Any]:
    """Measured and each model, side by side."""
    end = real["t_end"] - real["t0"]
    latencies = sorted(i[2] - i[0] for i in real["inputs"])
    schedule = Schedule(**real["schedule"])
    llen = [(t, float(v)) for t, v in real["llen"]]
    out: dict[str, Any] = {
        "measured": {
            **figures(schedule, measured_children(real), llen, latencies, end),
            "served": len(real["inputs"]),
        }
    }
    for model in models:
        queue = list(zip(model.series["t"], map(float, model.series["queue"]), strict=True))
        row = figures(schedule, model_children(model), queue, [], end)
        row["p50_s"], row["p99_s"] = model.summary["p50_s"], model.summary["p99_s"]
        out[model.label] = {**row, "served": model.summary["served"], "config": model.config["sim"]}
    return out


def plot(path: Path, real: dict[str, Any], models: Sequence[Result]) -> None:
    """Measured (solid) against the models: children per worker, total, queue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(5, 1, figsize=(10, 12), sharex=True)
    colours = ["tab:blue", "tab:orange", "tab:green"]
    styles = ["--", ":", "-."]
    enq = list(real["enqueued"])
    bins = [i * 0.25 for i in range(int(max(enq, default=0) / 0.25) + 2)]
    axes[0].hist(enq, bins=bins, color="grey", weights=[4.0] * len(enq))
    axes[0].set_ylabel("sent / s")
    measured = measured_children(real)
    for i, points in enumerate(measured):
        axes[1].step(
            [t for t, _ in points],
            [v + 0.05 * (i - 1) for _, v in points],
            where="post",
            color=colours[i],
            lw=1.3,
            label=f"worker {i + 1}",
        )
    calibrated = models[-1]  # the pinned replay when there is one
    for i, points in enumerate(model_children(calibrated)):
        axes[2].step(
            [t for t, _ in points],
            [v + 0.05 * (i - 1) for _, v in points],
            where="post",
            color=colours[i],
            lw=1.0,
            label=f"pod {i + 1}",
        )
    total = _total(measured)
    axes[3].step(
        [t for t, _ in total],
        [v for _, v in total],
        where="post",
        color="black",
        lw=1.4,
        label="measured: sum of autoscaler.current",
    )
    axes[4].plot(
        [t for t, _ in real["llen"]],
        [v for _, v in real["llen"]],
        color="black",
        lw=1.2,
        label="measured LLEN",
    )
    for style, model in zip(styles, models, strict=False):
        mt = _total(model_children(model))
        axes[3].step(
            [t for t, _ in mt],
            [v for _, v in mt],
            where="post",
            color="tab:red",
            lw=1.0,
            ls=style,
            label=model.label,
        )
        axes[4].plot(
            model.series["t"],
            model.series["queue"],
            color="tab:red",
            lw=1.0,
            ls=style,
            label=model.label,
        )
    axes[1].set_ylabel("children per worker\n(measured)")
    axes[3].set_ylim(bottom=0)
    axes[2].set_ylabel("children per pod\n(model, last run below)")
    axes[2].set_title(calibrated.label, fontsize=8)
    axes[3].set_ylabel("children, 3 workers")
    axes[4].set_ylabel("broker queue")
    axes[4].set_xlabel("seconds")
    for ax in axes[1:]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right", ncol=2, framealpha=0.6)
    fig.suptitle(
        f"3 real workers (--autoscale=4,1, window {real['window_s']:g} s) on one Redis queue"
        " vs the model (3 pods)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: one real run, the model on its trace, check.json and check.png."""
    parser = argparse.ArgumentParser(prog="python -m autoscale.check_model")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "autoscale" / "plots")
    parser.add_argument("--redis-url", default=None, help="a shared server (unique queue)")
    parser.add_argument("--window", type=float, default=8.0, help="concurrent_scaledown_window")
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument(
        "--name", default="check", help="files: OUT/NAME.json, NAME.png, NAME-real.json"
    )
    parser.add_argument(
        "--replay",
        type=Path,
        default=None,
        help="compare again from a saved run (OUT/NAME-real.json), no workers",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="check-model-"))
    raw = args.out / f"{args.name}-real.json"
    if args.replay:
        real = json.loads(args.replay.read_text())
    else:
        with broker(args.redis_url) as (url, shared):
            load_before = list(os.getloadavg())
            started = time.time()
            real = run_real(url, shared, Schedule(), args.window, log_dir)
            real["wall_s"] = round(time.time() - started, 1)
            real["window_s"] = args.window
            real["loadavg_before"] = load_before
        raw.write_text(json.dumps(real) + "\n")  # the measurement, before any analysis
    hold = hold_time_s(real)
    owners = worker_of_input(real)
    known = sum(1 for o in owners if o is not None)
    models = [
        run_model(
            real,
            real["window_s"],
            SERVICE_S,
            "equal",
            f"model, nominal ({SERVICE_S:g} s, equal split)",
        ),
        run_model(
            real,
            real["window_s"],
            round(hold, 3),
            "random",
            f"model, calibrated ({hold:.2f} s held, random split)",
        ),
    ]
    if known:
        models.append(
            run_model(
                real,
                real["window_s"],
                round(hold, 3),
                "equal",
                f"model, measured intake per worker ({hold:.2f} s held)",
                pinned=True,
            )
        )
    result = compare(real, models)
    result["inputs_attributed_to_a_worker"] = [known, len(owners)]
    payload = {
        "hold_time_s": round(hold, 3),
        "figures": result,
        "real": {k: v for k, v in real.items() if k not in ("inputs", "enqueued", "stats", "llen")},
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(args.out / f"{args.name}.png", real, models)
    print(json.dumps(result, indent=1))
    print(
        f"sent {real['sent']}, failed {real['failed']}, "
        f"producer behind {real['producer_behind_s']} s, run {real['wall_s']} s; "
        f"load before {real.get('loadavg_before')}; logs in {log_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
