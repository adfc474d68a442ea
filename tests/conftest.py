"""Fixtures: real Redis (and RabbitMQ), real ``celery worker`` subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_concurrent.testing import WorkerProcess
from tests import app as test_app

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
_clients: dict[str, Celery] = {}
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


class _LocalHTTPServer(ThreadingHTTPServer):
    # Hundreds of connections arrive at once: socketserver's backlog of 5 would drop SYNs,
    # and their retransmissions (1, 2, 4, ... s) outlast a loaded machine's patience. It is
    # read by listen() in __init__, so it is set on the class.
    request_queue_size = 1024
    daemon_threads = True


@contextlib.contextmanager
def local_http_server(body_of: Callable[[str], bytes], delay_s: float = 0.0) -> Iterator[str]:
    """Serve ``GET path`` with ``body_of(path)`` after ``delay_s``; yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if delay_s:
                time.sleep(delay_s)
            body = body_of(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = _LocalHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Worker:
    """A ``celery worker`` subprocess serving one private queue.

    A thin wrapper around :class:`celery_concurrent.testing.WorkerProcess` (which runs the
    worker in its own session) that knows the test app and the test's broker.
    """

    def __init__(
        self,
        queue: str,
        args: list[str],
        env: dict[str, str],
        log: Path,
        broker_url: str | None = None,
        app: str = "tests.app",
    ) -> None:
        self.queue = queue
        self.broker_url = broker_url
        self.hostname = f"{queue}-{uuid.uuid4().hex[:6]}@test"
        self.log_path = log
        self.handle = WorkerProcess.start(
            app,
            ["-l", "info", "--without-gossip", "--without-mingle", *args],
            queue=queue,
            log_path=log,
            hostname=self.hostname,
            env=env,
            cwd=ROOT,
        )
        self.process = self.handle.proc

    @property
    def pid(self) -> int:
        return self.handle.pid

    def log(self) -> str:
        return self.handle.log_text()

    def wait_ready(self, timeout_s: float = 60) -> None:
        def ready() -> bool:
            if not self.handle.alive():
                raise AssertionError(f"worker exited early:\n{self.log()[-4000:]}")
            return " ready." in self.log()

        wait_for(ready, timeout_s, f"worker {self.hostname} to be ready")

    def send(self, task: Any, *args: Any, **options: Any) -> Any:
        if self.broker_url:
            return self.client.send_task(task.name, args, queue=self.queue, **options)
        return task.apply_async(args, queue=self.queue, **options)

    @property
    def client(self) -> Celery:
        """The app that talks to this worker's broker (tests.app itself, or one for AMQP)."""
        if not self.broker_url:
            return test_app.app
        if self.broker_url not in _clients:
            _clients[self.broker_url] = Celery("tests", broker=self.broker_url, backend=REDIS_URL)
        return _clients[self.broker_url]

    def inspect(self, timeout_s: float = 5.0) -> Any:
        return self.client.control.inspect([self.hostname], timeout=timeout_s)

    def stats(self) -> dict[str, Any]:
        replies = self.inspect().stats() or {}
        return dict(replies[self.hostname])

    def child_pids(self) -> list[int]:
        return [int(pid) for pid in self.stats()["pool"]["processes"]]

    def send_signal(self, signum: int, *, group: bool = False) -> None:
        """Send ``signum`` to the worker (or its whole process group)."""
        self.handle.send_signal(signum, group=group)

    def stop(self, timeout_s: float = 60) -> int:
        """Warm shutdown (SIGTERM); returns the exit code."""
        return self.handle.stop(timeout_s)

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """SIGKILL the worker and its children (teardown), or send another signal to it."""
        if signum == signal.SIGKILL:
            self.handle.kill(signal.SIGKILL, group=True)
        else:
            self.handle.send_signal(signum)


@pytest.fixture
def queue_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store(queue_name: str) -> Iterator[redis.Redis]:
    """Redis for observations; routes this test's keys under its queue name."""
    previous = test_app.QUEUE
    test_app.QUEUE = queue_name
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    test_app.QUEUE = previous
    for found in client.scan_iter(f"{queue_name}:*"):
        client.delete(found)
    client.close()


@pytest.fixture
def start_worker(
    queue_name: str, store: redis.Redis, tmp_path: Path
) -> Iterator[Callable[..., Worker]]:
    """Factory: ``start_worker("-c", "2", env={...})`` starts a worker on this test's queue."""
    workers: list[Worker] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        broker: str | None = None,
        wait: bool = True,
        app: str = "tests.app",
    ) -> Worker:
        full_env = {**os.environ, "REDIS_URL": REDIS_URL, "TEST_QUEUE": queue_name}
        full_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), full_env.get("PYTHONPATH")])
        )
        if broker:
            full_env["BROKER_URL"] = broker
        full_env.update(env or {})
        log = tmp_path / f"worker-{len(workers)}.log"
        worker = Worker(queue_name, list(args), full_env, log, broker_url=broker, app=app)
        workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in workers:
        worker.kill()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """RabbitMQ for the AMQP prefetch and ack paths: skipped when absent unless REQUIRE_AMQP=1."""
    from kombu import Connection

    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        if os.environ.get("REQUIRE_AMQP") == "1":
            pytest.fail(
                f"RabbitMQ is not answering at {AMQP_URL} ({exc!r}) and REQUIRE_AMQP=1; "
                "start it: rabbitmq-server -detached"
            )
        pytest.skip(f"RabbitMQ is not answering at {AMQP_URL} (set REQUIRE_AMQP=1 to fail)")
    return AMQP_URL


def worker_refused_to_start(args: list[str], env: dict[str, str]) -> str:
    """Run ``celery worker`` expecting it to refuse its configuration; return its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.app", "worker", "-l", "info", *args],
        cwd=ROOT,
        env={**os.environ, "TEST_QUEUE": "bad-config", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def process_gone(pid: int, *, group: bool = False) -> bool:
    """True when no process ``pid`` (or, with ``group``, no process in group ``pid``) exists."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return True
    return False


def overlap(stamps: list[dict[str, Any]]) -> int:
    """Most inputs running at the same instant, from their start/end timestamps."""
    events = [(s["start"], 1) for s in stamps] + [(s["end"], -1) for s in stamps]
    running = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        running += delta
        peak = max(peak, running)
    return peak


@pytest.fixture
def tmp_log_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


#: Opt-in markers: deselected unless ``-m`` names them (``-m load``, ``-m soak``).
OPT_IN_MARKERS = ("load", "soak")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "load: opt-in load test (100,000 inputs); run with -m load")
    config.addinivalue_line("markers", "soak: opt-in 10-minute soak; run with -m soak")
    config.addinivalue_line(
        "markers", "reliability: fault-injection scenario against real workers (tests/reliability)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect ``load``/``soak`` tests unless the ``-m`` expression names their marker."""
    markexpr = config.getoption("markexpr", "") or ""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        opt_in = [m for m in OPT_IN_MARKERS if item.get_closest_marker(m) is not None]
        if opt_in and not any(m in markexpr for m in opt_in):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
