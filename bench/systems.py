"""The benchmarked systems: how each one's worker and producer start, and what they run.

Every system gets its own queue (and key namespace) on the same Redis, one worker process
(plus that worker's own pool children) started as ``python -m ...`` in a new session, and
one long-lived producer, :mod:`bench.driver`. ``level`` is the number of inputs the worker
may run at once: 100 for the I/O scenarios, 500 for ``async-io``, 1,000 / 10,000 for the
memory scenarios (see :meth:`System.level_in`). Every worker logs at ``-l warning`` unless
the system pins another level or the runner is given ``--loglevel``.

=======================  ===============================================================
system                   worker
=======================  ===============================================================
celery-concurrent        ConcurrentPool ``-c 1``, ``@concurrent(max_inputs=level)``: one
                         child; our Redis consumer step on (``install()``'s defaults)
celery-concurrent-info   the same at ``-l info``; ``async-io`` only
celery-concurrent2       ConcurrentPool ``-c 2``, ``max_inputs=level/2`` per child (opt-in)
celery-concurrent-       celery-concurrent with ``concurrent_redis_fast_acks = False``:
kombu-acks               kombu's own ack path (opt-in)
celery-concurrent-       celery-concurrent with ``concurrent_result_writer = True``:
writer                   result writes on a writer thread per child (opt-in)
celery-concurrent-       celery-concurrent with ``concurrent_sync_backend = "gevent"``
gevent                   (opt-in)
celery-prefork           stock prefork ``-c 8`` whatever the level (one input per process)
celery-prefork+acks      the same with our Redis consumer step
                         (:class:`celery_concurrent.redis_acks.RedisFastAcks`: fast acks
                         and batch fetch), the only part of celery-concurrent it gets
celery-threads           stock threads ``-c level`` (100 in ``async-io``)
celery-threads+acks      the same with our Redis consumer step
celery-threads-500       stock threads at the full level: ``-c 500`` in ``async-io``, the
                         in-flight count of celery-concurrent, arq and taskiq; ``async-io``
                         only
celery-gevent            stock gevent ``-c level``
celery-gevent+acks       the same with our Redis consumer step (opt-in)
arq                      arq 0.28 ``max_jobs=level``
taskiq                   taskiq 0.13 + taskiq-redis stream broker, ``--workers 1
                         --max-async-tasks level --max-threadpool-threads level``
=======================  ===============================================================

:data:`AUTOSCALE_SYSTEMS` are the workers of :mod:`bench.autoscale_scenario`, built from
the same :class:`System` and started by the same :class:`Worker`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import redis
from celery import Celery

from bench.measure import ProcessTree
from bench.scenarios import THREAD_KINDS, Scenario

ROOT = Path(__file__).resolve().parent.parent
ARQ_SITE = ROOT / "bench" / ".arq-site"
PREFORK_PROCESSES = 8
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
#: taskiq-redis 1.2.4's stream broker keeps polling after a SIGTERM/SIGINT and never exits.
TASKIQ_STOP_TIMEOUT_S = 3.0
#: Open files one ``asyncio.run`` loop holds (epoll + self-pipe), for the threads pool check.
FDS_PER_LOOP = 3

#: Every worker's log level unless its system pins one (``--loglevel`` changes it).
DEFAULT_LOGLEVEL = "warning"
LOGLEVELS = ("debug", "info", "warning", "error")
CELERY_FLAGS = ["--without-gossip", "--without-mingle", "--without-heartbeat"]


@dataclass(frozen=True)
class System:
    """One worker setup under test."""

    name: str
    kind: str  # concurrent | prefork | threads | gevent | arq | taskiq
    driver: str  # bench.driver --kind
    children: int = 1  # ConcurrentPool children
    #: Task (``bench.workload`` input kind) -> the name this system registers it under.
    task_names: dict[str, str] = field(default_factory=dict)
    #: Input kinds this system cannot run, with the reason shown in the report.
    unsupported: dict[str, str] = field(default_factory=dict)
    #: Extra environment for its worker.
    env: dict[str, str] = field(default_factory=dict)
    #: The worker's log level: ``-l`` (Celery), ``--log-level`` (taskiq), the root logger (arq).
    loglevel: str = DEFAULT_LOGLEVEL
    #: Whether ``loglevel`` is part of the system (``--loglevel`` then leaves it alone).
    pinned_loglevel: bool = False
    #: A thread or greenlet pool at the scenario's full level, not its ``thread_level``.
    full_level: bool = False
    #: The only scenarios it runs (empty: all); the others are left out of its rows.
    only: tuple[str, ...] = ()
    #: Inputs at once whatever the scenario (the autoscaler systems fix their own).
    fixed_level: int | None = None
    #: Extra worker arguments (Celery workers only), e.g. ``--autoscale=6,1``.
    worker_args: tuple[str, ...] = ()
    #: Celery app of the worker, when not the kind's ``bench.tasks_celery`` app.
    app: str | None = None

    def level_in(self, scenario: Scenario) -> int:
        """The inputs this system may run at once in ``scenario`` (before prefork's cap)."""
        if self.fixed_level is not None:
            return self.fixed_level
        if self.kind in THREAD_KINDS and not self.full_level:
            return scenario.level_for(self.kind)
        return scenario.level

    def runs(self, scenario: Scenario) -> bool:
        return not self.only or scenario.name in self.only

    def concurrency(self, level: int) -> int:
        """Inputs at once: ``level``, but prefork's 8 processes."""
        return PREFORK_PROCESSES if self.kind == "prefork" else level

    def processes(self, level: int) -> int:
        """The worker's ``-c``: its ConcurrentPool children, or the stock pool's size."""
        if self.kind == "concurrent":
            return self.children
        return self.concurrency(level)

    @property
    def autoscaled(self) -> bool:
        return any(arg.startswith("--autoscale") for arg in self.worker_args)

    @property
    def redis_step(self) -> bool:
        """Whether a stock worker runs our Redis consumer step (the ``+acks`` systems)."""
        return self.env.get("BENCH_REDIS_STEP") == "1"

    def with_loglevel(self, loglevel: str) -> System:
        """This system at ``loglevel``, unless it pins its own."""
        return self if self.pinned_loglevel else replace(self, loglevel=loglevel)

    def describe(self, level: int) -> str:
        """The worker in a few words, its log level included."""
        celery = self.kind not in ("arq", "taskiq")
        log = f", -l {self.loglevel}" if celery else f", log level {self.loglevel}"
        if self.env.get("BENCH_QUIET_INPUTS") == "1":
            log += " (per-input lines at warning)"
        size = " ".join(self.worker_args) if self.autoscaled else f"-c {self.processes(level)}"
        if self.kind == "concurrent":
            backend = self.env.get("BENCH_SYNC_BACKEND", "threads")
            acks = "kombu acks" if self.env.get("BENCH_FAST_ACKS") == "0" else "fast acks"
            return (
                f"ConcurrentPool {size} x max_inputs={level // self.children}, "
                f"sync on {backend}, {acks}{log}"
            )
        if self.kind in ("prefork", "threads", "gevent"):
            step = " + our Redis step" if self.redis_step else ""
            return f"stock {self.kind} {size}{step}{log}"
        if self.kind == "arq":
            return f"arq max_jobs={level}{log}"
        return f"taskiq --workers 1 --max-async-tasks {level}{log}"

    def task_name(self, task: str) -> str:
        return self.task_names.get(task, task)

    def why_not(self, task: str, level: int) -> str | None:
        """Why this system cannot run ``task`` at ``level`` in flight, or None if it can."""
        if task in self.unsupported:
            return self.unsupported[task]
        if self.kind == "threads" and task == "hold":
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            if level * FDS_PER_LOOP + 200 > soft:
                return (
                    f"{level} threads each in asyncio.run need ~{level * FDS_PER_LOOP} open "
                    f"files (an epoll fd and a self-pipe per loop); ulimit -n is {soft}"
                )
        return None


_GEVENT_NO_ASYNCIO = (
    "asyncio.run under gevent fails: RuntimeError: asyncio.run() cannot be called from a "
    "running event loop (greenlets share the thread's running loop)"
)

_PREFORK_NO_HOLD = {
    "hold": "one input per process: 1,000 in flight would take 1,000 processes",
    "hold_sync": "one input per process: 1,000 in flight would take 1,000 processes",
}
_GEVENT_TASKS = {"http_get": "http_get_blocking"}
_GEVENT_UNSUPPORTED = {"sleep_async": _GEVENT_NO_ASYNCIO, "hold": _GEVENT_NO_ASYNCIO}
#: Stock Celery with our Redis consumer step (see bench.tasks_celery).
_REDIS_STEP = {"BENCH_REDIS_STEP": "1"}

SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System("celery-concurrent", "concurrent", "celery-concurrent"),
        System(
            "celery-concurrent-info",
            "concurrent",
            "celery-concurrent",
            loglevel="info",
            pinned_loglevel=True,
            only=("async-io",),
        ),
        System("celery-concurrent2", "concurrent", "celery-concurrent", children=2),
        System(
            "celery-concurrent-kombu-acks",
            "concurrent",
            "celery-concurrent",
            env={"BENCH_FAST_ACKS": "0"},
        ),
        System(
            "celery-concurrent-writer",
            "concurrent",
            "celery-concurrent",
            env={"BENCH_RESULT_WRITER": "1"},
        ),
        System(
            "celery-concurrent-gevent",
            "concurrent",
            "celery-concurrent",
            env={"BENCH_SYNC_BACKEND": "gevent"},
        ),
        System("celery-prefork", "prefork", "celery-stock", unsupported=_PREFORK_NO_HOLD),
        System(
            "celery-prefork+acks",
            "prefork",
            "celery-stock",
            unsupported=_PREFORK_NO_HOLD,
            env=_REDIS_STEP,
        ),
        System("celery-threads", "threads", "celery-stock"),
        System("celery-threads+acks", "threads", "celery-stock", env=_REDIS_STEP),
        System(
            "celery-threads-500", "threads", "celery-stock", full_level=True, only=("async-io",)
        ),
        System(
            "celery-gevent",
            "gevent",
            "celery-stock",
            task_names=_GEVENT_TASKS,
            unsupported=_GEVENT_UNSUPPORTED,
        ),
        System(
            "celery-gevent+acks",
            "gevent",
            "celery-stock",
            task_names=_GEVENT_TASKS,
            unsupported=_GEVENT_UNSUPPORTED,
            env=_REDIS_STEP,
        ),
        System("arq", "arq", "arq"),
        System("taskiq", "taskiq", "taskiq"),
    )
}
DEFAULT_SYSTEMS = [
    "celery-concurrent",
    "celery-concurrent-info",
    "celery-prefork",
    "celery-prefork+acks",
    "celery-threads",
    "celery-threads+acks",
    "celery-threads-500",
    "celery-gevent",
    "arq",
    "taskiq",
]


# -- the autoscaler benchmark's workers (bench.autoscale_scenario) ---------------------------

#: @concurrent limits and pool budget of the autoscaler benchmark.
AUTOSCALE_MAX_INPUTS = 40
AUTOSCALE_TARGET_INPUTS = 20
AUTOSCALE_MAX_CHILDREN = 6
AUTOSCALE_MIN_CHILDREN = 1
AUTOSCALE_SCALEDOWN_WINDOW_S = 5.0
#: Input slots of the autoscaled pool at its max and min: stock gevent gets the same.
AUTOSCALE_MAX_SLOTS = AUTOSCALE_MAX_CHILDREN * AUTOSCALE_MAX_INPUTS
AUTOSCALE_MIN_SLOTS = AUTOSCALE_MIN_CHILDREN * AUTOSCALE_MAX_INPUTS

_AUTOSCALE_ENV = {
    # -l info for the scaling and child lines, without a line per input
    "BENCH_QUIET_INPUTS": "1",
    "BENCH_TARGET_INPUTS": str(AUTOSCALE_TARGET_INPUTS),
    "BENCH_SCALEDOWN_WINDOW": f"{AUTOSCALE_SCALEDOWN_WINDOW_S:g}",
    # stock Celery's autoscaler keepalive, the same as our scale-down window
    "AUTOSCALE_KEEPALIVE": f"{AUTOSCALE_SCALEDOWN_WINDOW_S:g}",
}
_CC_AUTOSCALE = f"--autoscale={AUTOSCALE_MAX_CHILDREN},{AUTOSCALE_MIN_CHILDREN}"


def _autoscale_system(name: str, kind: str, driver: str, **options: Any) -> System:
    env = {**_AUTOSCALE_ENV, **options.pop("env", {})}
    return System(
        name,
        kind,
        driver,
        env=env,
        loglevel="info",
        pinned_loglevel=True,
        **options,
    )


#: gevent cannot run asyncio.run: its wait is time.sleep, which gevent makes cooperative.
_GREEN_WAIT = {"sleep_async": "sleep_sync"}


#: The headline is ``cc-autoscale`` (1-6 children x 40 inputs: 240 slots at most) against
#: stock gevent with the same 240 slots (``stock-gevent-240``, fixed; ``stock-gevent``, its
#: autoscaler 40-240), with stock prefork's autoscaler (6 processes) beside them.
AUTOSCALE_SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        _autoscale_system(
            "cc-autoscale",
            "concurrent",
            "celery-concurrent",
            fixed_level=AUTOSCALE_MAX_INPUTS,
            worker_args=(_CC_AUTOSCALE,),
            env={"BENCH_AUTOSCALER": "1"},
        ),
        _autoscale_system(
            "cc-fixed-1",
            "concurrent",
            "celery-concurrent",
            children=AUTOSCALE_MIN_CHILDREN,
            fixed_level=AUTOSCALE_MIN_SLOTS,
        ),
        _autoscale_system(
            "cc-fixed-6",
            "concurrent",
            "celery-concurrent",
            children=AUTOSCALE_MAX_CHILDREN,
            fixed_level=AUTOSCALE_MAX_SLOTS,
        ),
        _autoscale_system(
            "stock-gevent-240",
            "gevent",
            "celery-stock",
            fixed_level=AUTOSCALE_MAX_SLOTS,
            task_names=_GREEN_WAIT,
        ),
        _autoscale_system(
            "stock-gevent",
            "gevent",
            "celery-stock",
            fixed_level=AUTOSCALE_MAX_SLOTS,
            task_names=_GREEN_WAIT,
            worker_args=(f"--autoscale={AUTOSCALE_MAX_SLOTS},{AUTOSCALE_MIN_SLOTS}",),
        ),
        _autoscale_system(
            "stock-prefork",
            "prefork",
            "celery-stock",
            fixed_level=AUTOSCALE_MAX_CHILDREN,  # one input per process
            worker_args=(_CC_AUTOSCALE,),
        ),
    )
}


def _env(system: System, redis_url: str, queue_name: str, level: int) -> dict[str, str]:
    env = {
        **os.environ,
        "BENCH_REDIS_URL": redis_url,
        "BENCH_QUEUE": queue_name,
        "BENCH_MAX_INPUTS": str(max(level // system.children, 1)),
        "BENCH_LOGLEVEL": system.loglevel,
        "PYTHONUNBUFFERED": "1",
        **system.env,
    }
    paths = [str(ROOT)]
    if system.kind == "arq":
        paths.insert(0, str(ARQ_SITE))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _worker_command(system: System, level: int, queue_name: str, hostname: str) -> list[str]:
    py = [sys.executable, "-m"]
    if system.kind == "arq":
        return [*py, "bench.tasks_arq"]
    if system.kind == "taskiq":
        return [
            *py,
            "taskiq",
            "worker",
            "bench.tasks_taskiq:broker",
            "--workers",
            "1",
            "--max-async-tasks",
            str(level),
            "--max-threadpool-threads",
            str(level),
            "--log-level",
            system.loglevel.upper(),
        ]
    where = ["-Q", queue_name, "--hostname", hostname, "-l", system.loglevel, *CELERY_FLAGS]
    default_app = "concurrent" if system.kind == "concurrent" else "stock"
    app = system.app or f"bench.tasks_celery:{default_app}"
    pool = [] if system.kind == "concurrent" else ["-P", system.kind]
    if not system.autoscaled:
        pool += ["-c", str(system.processes(level))]
    return [*py, "celery", "-A", app, "worker", *pool, *system.worker_args, *where]


class Worker:
    """One system's worker process (and its pool children), logging to a file."""

    def __init__(
        self,
        system: System,
        redis_url: str,
        level: int,
        log_dir: Path,
        tag: str,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.system = system
        self.level = level
        self.queue = f"bench-{system.name}-{tag}-{uuid.uuid4().hex[:6]}"
        self.hostname = f"{self.queue}@bench"
        self.redis_url = redis_url
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{system.name}-{tag}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                _worker_command(system, level, self.queue, self.hostname),
                cwd=ROOT,
                env={**_env(system, redis_url, self.queue, level), **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.tree = ProcessTree(self.process.pid)

    def is_ready(self, store: redis.Redis[bytes], control: Celery) -> bool:
        """Whether the worker consumes its queue yet."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.system.name} worker exited with {self.process.returncode}:\n{self.tail()}"
            )
        kind = self.system.kind
        if kind == "arq":
            return bool(store.exists(f"{self.queue}:health-check"))
        if kind == "taskiq":
            # The stream broker's group starts at "$": inputs sent before it exists are lost.
            with contextlib.suppress(redis.ResponseError):
                return bool(store.xinfo_groups(self.queue))
            return False
        return bool(control.control.ping([self.hostname], timeout=0.5))

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (warm shutdown), then SIGKILL the worker's process group."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            timeout_s = TASKIQ_STOP_TIMEOUT_S if self.system.kind == "taskiq" else STOP_TIMEOUT_S
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        # Pool children outliving their parent would be orphans: end the whole group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def cleanup_keys(self, store: redis.Redis[bytes]) -> None:
        """Delete this worker's queue keys (the result keys go as the driver reads them)."""
        keys = [self.queue, f"{self.queue}:health-check", f"arq:queue:{self.queue}"]
        keys += [k.decode() for k in store.scan_iter(match=f"{self.queue}*", count=1000)]
        with contextlib.suppress(redis.RedisError):
            store.delete(*keys)


class Driver:
    """The system's producer, :mod:`bench.driver`, as a JSON-lines subprocess."""

    def __init__(self, worker: Worker, log_dir: Path) -> None:
        system = worker.system
        self.name = system.name
        env = _env(system, worker.redis_url, worker.queue, worker.level)
        self._log = open(log_dir / f"{system.name}-driver.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.driver",
                "--kind",
                system.driver,
                "--queue",
                worker.queue,
                "--redis",
                worker.redis_url,
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        assert self.process.stdout is not None
        self._reader = threading.Thread(
            target=self._read,
            args=(self.process.stdout,),
            name=f"driver-{system.name}",
            daemon=True,
        )
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with contextlib.suppress(json.JSONDecodeError):
                self.messages.put(json.loads(line))
        self.messages.put(None)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        message = self.next(timeout_s)
        if not message or not message.get("ready"):
            raise RuntimeError(f"the {self.name} driver did not start: {message!r}")

    def next(self, timeout_s: float) -> dict[str, Any] | None:
        """The next message; None when the driver exited; raises queue.Empty on timeout."""
        return self.messages.get(timeout=timeout_s)

    def run(
        self,
        task: str,
        args: list[Any],
        n: int,
        timeout_s: float = 300.0,
        *,
        worker: Worker | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Send one burst and wait for its result (progress messages are dropped).

        ``extra`` goes into the command, e.g. ``t0`` and ``offsets`` (see :mod:`bench.driver`).
        With ``worker``, raises as soon as that worker exits instead of waiting it out.
        """
        command = {"op": "run", "task": task, "args": args, "n": n, "timeout_s": timeout_s}
        self.send({**command, **extra})
        deadline = time.monotonic() + timeout_s + 60 + max(extra.get("offsets") or [0.0])
        while True:
            try:
                message = self.next(1.0)
            except queue.Empty:
                if worker is not None and worker.process.poll() is not None:
                    raise RuntimeError(
                        f"{worker.system.name} worker exited with {worker.process.returncode}:"
                        f"\n{worker.tail()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {self.name} driver did not answer") from None
                continue
            if message is None:
                raise RuntimeError(f"the {self.name} driver exited; see its log")
            if "result" in message:
                result: dict[str, Any] = message["result"]
                return result

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send({"op": "quit"})
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@contextlib.contextmanager
def one_worker(
    system: System,
    redis_url: str,
    level: int,
    log_dir: Path,
    tag: str,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[tuple[Worker, Driver]]:
    """Start ``system``'s worker and its producer; stop both and delete their keys after."""
    store = redis.Redis.from_url(redis_url)
    control = Celery(f"bench-{tag}", broker=redis_url)
    worker = Worker(system, redis_url, level, log_dir, tag, extra_env)
    driver: Driver | None = None
    try:
        wait_until_ready([worker], store, control)
        driver = Driver(worker, log_dir)
        driver.wait_ready()
        yield worker, driver
    finally:
        if driver is not None:
            driver.stop()
        worker.stop()
        worker.cleanup_keys(store)
        store.close()
        control.close()


def wait_until_ready(workers: list[Worker], store: redis.Redis[bytes], control: Celery) -> None:
    """Wait until every worker consumes its queue."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = list(workers)
    while pending:
        pending = [w for w in pending if not w.is_ready(store, control)]
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(w.system.name for w in pending)
            raise RuntimeError(f"workers not ready after {READY_TIMEOUT_S:g}s: {names}")
        time.sleep(0.3)
