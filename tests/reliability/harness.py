"""Brokers, workers and faults for the reliability scenarios, usable with or without pytest.

- :class:`PrivateRedisServer`: a ``redis-server`` of our own (``appendonly yes``), to kill
  client connections on or to restart; never the shared one.
- :class:`PrivateRabbit`: a private RabbitMQ node (own node name, ports and directories).
- :class:`Harness`: one scenario's queue, broker, pool and workers; sends inputs by task name,
  counts executions (the tasks in :mod:`tests.reliability.app` write them to the shared Redis)
  and cleans up everything it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
from celery import Celery
from celery.result import AsyncResult
from kombu import Connection

from celery_concurrent.testing import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
SHARED_REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
APP = "tests.reliability.app"
POOLS = ("concurrent", "prefork")
FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


class ScenarioError(AssertionError):
    """A scenario could not reach the point where its fault is injected."""


class BrokerUnavailable(Exception):
    """A private broker cannot be started on this machine (the reason says why)."""


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``predicate`` until truthy and return its value; ScenarioError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ScenarioError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- private brokers -------------------------------------------------------------------------


class PrivateRedisServer:
    """A private ``redis-server`` with persistence on (``appendonly yes``), for restarts."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BrokerUnavailable("redis-server is not on PATH (apt-get install redis-server)")
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="rel-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> PrivateRedisServer:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "",
        ]  # fmt: skip
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        client = self.client()

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ScenarioError(f"redis-server exited: {(self.dir / 'server.log').read_text()}")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_until(answers, 10, f"private redis-server on port {self.port}")
        finally:
            client.close()
        return self

    def stop(self) -> None:
        """SIGTERM (redis-server writes its append-only file) and wait for the exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> float:
        """Stop and start again on the same port and data; returns seconds it was down."""
        started = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - started

    def kill_clients(self, addr: str | None = None) -> int:
        """``CLIENT KILL TYPE normal`` (or ``ADDR addr``): drops connections; returns how many."""
        client = self.client()
        try:
            if addr:
                return int(client.execute_command("CLIENT", "KILL", "ADDR", addr))
            return int(client.execute_command("CLIENT", "KILL", "TYPE", "normal"))
        finally:
            client.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRabbit:
    """A private RabbitMQ node: its own node name, ports, mnesia and log directories."""

    def __init__(self) -> None:
        for tool in ("rabbitmq-server", "rabbitmqctl"):
            if shutil.which(tool) is None:
                raise BrokerUnavailable(f"{tool} is not on PATH (apt-get install rabbitmq-server)")
        self.node = f"rel{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="rel-rabbit-"))
        self.dir.chmod(0o777)  # as root, the scripts run the node as the rabbitmq user
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        for name in ("rabbitmq.conf", "enabled_plugins", "rabbitmq-env.conf"):
            (self.dir / name).chmod(0o666)
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.dir / "node.pid"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _ctl(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            env=self.env, capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip

    def start(self, timeout_s: float = 90) -> PrivateRabbit:
        subprocess.run(
            ["rabbitmq-server", "-detached"], env=self.env, capture_output=True, timeout=60,
            check=False,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:  # the node registers with epmd a moment after -detached returns
            done = self._ctl("await_startup", "--timeout", "30")
            if done.returncode == 0 and self._answers():
                return self
            if time.monotonic() > deadline:
                raise BrokerUnavailable(
                    f"private RabbitMQ node {self.node} did not start within {timeout_s:g}s: "
                    f"{(done.stdout + done.stderr).strip()[-400:]}"
                )
            time.sleep(0.5)

    def _answers(self) -> bool:
        try:
            with Connection(self.url, connect_timeout=3) as conn:
                conn.ensure_connection(max_retries=1)
        except Exception:
            return False
        return True

    def stop(self) -> None:
        self._ctl("stop", timeout_s=60)

    def restart(self) -> float:
        """Stop the node and start it again (same data); returns seconds it was down."""
        started = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - started

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- workers ---------------------------------------------------------------------------------


class RelWorker:
    """One ``celery worker`` of a scenario: a :class:`WorkerProcess` plus its broker client."""

    def __init__(self, handle: WorkerProcess, client: Celery, children: int = 1) -> None:
        self.handle = handle
        self.client = client
        self.expected_children = children
        self.hostname = handle.hostname
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.handle.pid

    def log(self) -> str:
        return self.handle.log_text()

    def alive(self) -> bool:
        return self.handle.alive()

    def wait_ready(self, timeout_s: float = 60) -> None:
        def ready() -> bool:
            if not self.handle.alive():
                raise ScenarioError(f"worker exited before ready:\n{self.handle.tail(60)}")
            return " ready." in self.log()

        wait_until(ready, timeout_s, f"worker {self.hostname} to log ready")

    def child_pids(self) -> list[int]:
        """The pool's children: direct child processes of the worker's main process."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        return sorted(c.pid for c in children if _alive(c))

    def rss_kb(self) -> dict[str, int]:
        """Resident memory of the main process and of all its children together, in KB."""
        try:
            main = psutil.Process(self.pid)
            children = main.children(recursive=True)
            return {
                "main": main.memory_info().rss // 1024,
                "children": sum(c.memory_info().rss for c in children) // 1024,
            }
        except psutil.NoSuchProcess:
            return {"main": 0, "children": 0}

    def ping(self, timeout_s: float = 1.0) -> bool:
        return bool(self.client.control.ping(destination=[self.hostname], timeout=timeout_s))

    def inspect(self, timeout_s: float = 3.0) -> Any:
        return self.client.control.inspect([self.hostname], timeout=timeout_s)

    def reserved(self) -> int:
        return len((self.inspect().reserved() or {}).get(self.hostname, []))

    def send_signal(self, signum: int, *, group: bool = False) -> None:
        self.handle.send_signal(signum, group=group)

    def kill_child(self, pid: int | None = None, signum: int = signal.SIGKILL) -> int:
        """Signal one pool child (the first, unless ``pid``); returns its pid."""
        pid = pid or wait_until(self.child_pids, 10, "a pool child")[0]
        os.kill(pid, signum)
        return pid

    def wait_exit(self, timeout_s: float) -> int | None:
        return self.handle.wait_exit(timeout_s)

    def stop(self, timeout_s: float = 60) -> int:
        return self.handle.stop(timeout_s)

    def kill(self) -> None:
        """SIGKILL the worker and everything in its process group."""
        self.handle.kill(signal.SIGKILL, group=True)


@dataclass
class Input:
    """One input of a scenario: what was sent and what became of it."""

    name: str
    task: str
    result: AsyncResult
    executions: int = 0
    state: str = "PENDING"
    error: str = ""


@dataclass
class Outcome:
    """A scenario's inputs and what happened to each, plus figures for the report."""

    scenario: str
    pool: str
    inputs: dict[str, Input] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def sent(self) -> int:
        return len(self.inputs)

    @property
    def completed(self) -> int:
        return sum(i.state == "SUCCESS" for i in self.inputs.values())

    @property
    def lost(self) -> list[str]:
        """Inputs that never reached a final state."""
        return [n for n, i in self.inputs.items() if i.state not in FINAL_STATES]

    @property
    def twice(self) -> list[str]:
        return [n for n, i in self.inputs.items() if i.executions > 1]

    def states(self) -> dict[str, str]:
        return {n: i.state for n, i in self.inputs.items()}

    def executions(self) -> dict[str, int]:
        return {n: i.executions for n, i in self.inputs.items()}

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "pool": self.pool,
            "sent": self.sent,
            "completed": self.completed,
            "lost": len(self.lost),
            "twice": len(self.twice),
            "states": _tally(i.state for i in self.inputs.values()),
            "figures": self.figures,
            "error": self.error,
        }

    def __str__(self) -> str:
        return json.dumps(self.summary(), default=str)


def _tally(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return out


_clients: dict[str, Celery] = {}


def _no_subscription(*args: Any, **kwargs: Any) -> None:
    return None


def client_for(broker_url: str) -> Celery:
    """A Celery app that publishes to ``broker_url`` and reads results from the shared Redis."""
    if broker_url not in _clients:
        client = Celery("rel-client", broker=broker_url, backend=SHARED_REDIS_URL)
        client.conf.broker_connection_retry_on_startup = True
        # Scenarios read results from the backend's keys; skip the pub/sub subscription the
        # Redis backend makes per sent input (20,000 of them in the load test).
        client.backend.on_task_call = _no_subscription
        _clients[broker_url] = client
    return _clients[broker_url]


class Harness:
    """One scenario's world: a queue, a broker, a pool, the workers started for it.

    Args:
        pool: ``concurrent`` (ConcurrentPool) or ``prefork`` (stock Celery, the reference).
        broker_url: the broker the workers use (default: the shared Redis).
        log_dir: where worker logs go.
        env: extra environment for every worker (e.g. ``TEST_SYNC_BACKEND``).
    """

    def __init__(
        self,
        pool: str,
        *,
        broker_url: str | None = None,
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r} is not one of {POOLS}")
        self.pool = pool
        self.queue = f"r-{uuid.uuid4().hex[:10]}"
        self.broker_url = broker_url or SHARED_REDIS_URL
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.client = client_for(self.broker_url)
        self.store = redis.Redis.from_url(SHARED_REDIS_URL)
        self.workers: list[RelWorker] = []
        self.inputs: dict[str, Input] = {}

    def key(self, *parts: str) -> str:
        return ":".join([self.queue, *parts])

    # -- workers ----------------------------------------------------------------------------

    def pool_args(self, parallel: int, children: int = 1) -> tuple[list[str], dict[str, str]]:
        """Arguments for ``parallel`` inputs at once: ``children`` children with slots each
        (ConcurrentPool), or ``parallel`` processes (prefork)."""
        if self.pool == "prefork":
            return ["-P", "prefork", "-c", str(parallel)], {}
        return ["-c", str(children)], {"TEST_SLOTS": str(max(parallel // children, 1))}

    def start_worker(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        parallel: int | None = None,
        children: int = 1,
    ) -> RelWorker:
        """Start a worker on this scenario's queue; with ``parallel``, pool args as above."""
        full_env = {
            "REDIS_URL": SHARED_REDIS_URL,
            "BROKER_URL": self.broker_url,
            "TEST_QUEUE": self.queue,
            "TEST_POOL": self.pool,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        pool_args: list[str] = []
        expected = children
        if parallel is not None:
            expected = parallel if self.pool == "prefork" else children
            pool_args, pool_env = self.pool_args(parallel, children)
            full_env.update(pool_env)
        full_env.update(self.env)
        full_env.update(env or {})
        hostname = f"{self.queue}-{len(self.workers)}-{uuid.uuid4().hex[:4]}@rel"
        handle = WorkerProcess.start(
            APP,
            [*pool_args, "-l", "info", "--without-gossip", "--without-mingle", *args],
            queue=self.queue,
            log_path=self.log_dir / f"{self.queue}-{self.pool}-{len(self.workers)}.log",
            hostname=hostname,
            env=full_env,
            cwd=ROOT,
        )
        worker = RelWorker(handle, self.client, expected)
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    # -- inputs -----------------------------------------------------------------------------

    def send(self, task: str, name: str, *args: Any, **options: Any) -> Input:
        """Send input ``name`` of task ``rel.<task>``; its first argument is ``name``."""
        if name in self.inputs:
            raise ValueError(f"input name {name!r} was already sent in this scenario")
        options.setdefault("queue", self.queue)
        result = self.client.send_task(f"rel.{task}", (name, *args), **options)
        item = Input(name=name, task=task, result=result)
        self.inputs[name] = item
        return item

    def send_signature(self, name: str, sig: Any) -> Input:
        """Send a prepared signature (e.g. a stamped one) as input ``name``."""
        if name in self.inputs:
            raise ValueError(f"input name {name!r} was already sent in this scenario")
        item = Input(name=name, task=str(sig.task), result=sig.apply_async())
        self.inputs[name] = item
        return item

    def runs(self) -> dict[str, int]:
        """Executions per input name so far."""
        raw = self.store.hgetall(self.key("runs"))
        return {k.decode(): int(v) for k, v in raw.items()}

    def started(self, *names: str) -> bool:
        runs = self.runs()
        return all(runs.get(n, 0) >= 1 for n in names)

    def run_pid(self, name: str) -> int | None:
        raw = self.store.hget(self.key("pid"), name)
        return int(raw) if raw else None

    def ran_on(self, pid: int) -> set[str]:
        """The inputs whose body began in process ``pid`` (a rerun elsewhere does not erase it)."""
        return {m.decode() for m in self.store.smembers(self.key("ran-on", str(pid)))}

    def child_inits(self) -> int:
        """How many times ``worker_process_init`` started in a child."""
        return int(self.store.llen(self.key("init")))

    def states(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """Backend states, read in one round trip (no result objects kept)."""
        items = [self.inputs[n] for n in (names if names is not None else self.inputs)]
        backend = self.client.backend
        pipe = self.store.pipeline()
        for item in items:
            pipe.get(backend.get_key_for_task(item.result.id))
        out: dict[str, str] = {}
        for item, raw in zip(items, pipe.execute(), strict=True):
            out[item.name] = json.loads(raw)["status"] if raw else "PENDING"
        return out

    def wait_final(self, timeout_s: float, names: Sequence[str] | None = None) -> bool:
        """Wait until every input (or ``names``) reaches a final state; False on timeout."""
        deadline = time.monotonic() + timeout_s
        pending = list(names if names is not None else self.inputs)
        while pending:
            states = self.states(pending)
            pending = [n for n in pending if states[n] not in FINAL_STATES]
            if not pending:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(min(5.0, max(0.1, len(pending) / 4_000)))
        return True

    def collect(self, scenario: str) -> Outcome:
        """What became of every input: executions from the counters, states from the backend."""
        runs = self.runs()
        states = self.states()
        backend = self.client.backend
        outcome = Outcome(scenario=scenario, pool=self.pool)
        for name, item in self.inputs.items():
            item.executions = runs.get(name, 0)
            item.state = states[name]
            if item.state == "FAILURE":
                raw = self.store.get(backend.get_key_for_task(item.result.id))
                meta = json.loads(raw) if raw else {}
                result = meta.get("result") or {}
                if isinstance(result, dict):
                    item.error = f"{result.get('exc_type')}: {result.get('exc_message')}"
            outcome.inputs[name] = item
        return outcome

    def error_type(self, name: str) -> str:
        """The exception type name recorded for a failed input."""
        return self.inputs[name].error.split(":", 1)[0]

    # -- faults -----------------------------------------------------------------------------

    def publish_raw(self, body: bytes, content_type: str = "application/json") -> None:
        """Publish a message Celery cannot decode straight to the queue."""
        with Connection(self.broker_url) as conn:
            producer = conn.Producer()
            producer.publish(
                body,
                routing_key=self.queue,
                exchange="",
                content_type=content_type,
                content_encoding="utf-8",
                headers={},
                declare=[],
                retry=True,
            )

    def ping_during(self, worker: RelWorker, seconds: float, timeout_s: float = 1.0) -> PingProbe:
        """Ping ``worker`` continuously for ``seconds`` in a thread; see :class:`PingProbe`."""
        probe = PingProbe(worker, seconds, timeout_s)
        probe.start()
        return probe

    def reap_grandchildren(self) -> None:
        for raw in self.store.lrange(self.key("grandchildren"), 0, -1):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(raw), signal.SIGKILL)

    def close(self) -> None:
        """Kill every worker this scenario started and delete its keys."""
        for worker in self.workers:
            worker.kill()
        self.reap_grandchildren()
        for found in self.store.scan_iter(f"{self.queue}:*"):
            self.store.delete(found)
        if self.broker_url == SHARED_REDIS_URL:
            self.store.delete(self.queue)
        self.store.close()


class PingProbe(threading.Thread):
    """Pings a worker back to back; records how many went unanswered and the slowest reply."""

    def __init__(self, worker: RelWorker, seconds: float, timeout_s: float) -> None:
        super().__init__(daemon=True)
        self.worker = worker
        self.seconds = seconds
        self.timeout_s = timeout_s
        self.answered = 0
        self.unanswered = 0
        self.slowest_s = 0.0

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            ok = self.worker.ping(self.timeout_s)
            took = time.monotonic() - started
            if ok:
                self.answered += 1
                self.slowest_s = max(self.slowest_s, took)
            else:
                self.unanswered += 1
            time.sleep(0.05)

    def result(self) -> dict[str, Any]:
        self.join(self.seconds + 30)
        return {
            "pings_answered": self.answered,
            "pings_unanswered": self.unanswered,
            "slowest_ping_s": round(self.slowest_s, 3),
        }


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a child may exit between listing and this check)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
