"""``celery_concurrent.testing.WorkerProcess``: a real worker subprocess, started and stopped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from celery_concurrent.testing import WorkerProcess
from tests import app
from tests.conftest import REDIS_URL, ROOT, process_gone, wait_for

QUIET = ["-l", "info", "--without-gossip", "--without-mingle", "--without-heartbeat"]


def _start(queue: str, log_path: Path, *args: str, **env: str) -> WorkerProcess:
    return WorkerProcess.start(
        "tests.app",
        [*args, *QUIET],
        queue=queue,
        log_path=log_path,
        env={"TEST_QUEUE": queue, "REDIS_URL": REDIS_URL, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
    )


@pytest.mark.timeout(120)
def test_starts_answers_and_stops_warm(queue_name, store, tmp_path):
    worker = _start(queue_name, tmp_path / "worker.log", "-c", "2")
    try:
        assert worker.wait_until_ready(app.app, 60), worker.tail()
        assert worker.hostname.startswith(f"{queue_name}@")
        assert app.async_add.apply_async((2, 3), queue=queue_name).get(timeout=30) == 5
    finally:
        code = worker.stop(60)
    assert code == 0
    assert worker.tail(200).startswith("$ ")  # the command line heads the log
    assert process_gone(worker.proc.pid, group=True)  # the pool's children went with it


@pytest.mark.timeout(60)
def test_a_worker_that_exits_is_not_ready(tmp_path):
    worker = WorkerProcess.start(
        "tests.no_such_app",
        ["-l", "info"],
        queue="t-missing",
        log_path=tmp_path / "w.log",
        cwd=ROOT,
    )
    assert worker.wait_until_ready(app.app, 30) is False
    assert worker.stop(5) != 0
    assert "no_such_app" in worker.tail()


@pytest.mark.timeout(120)
def test_a_worker_that_hangs_on_shutdown_is_killed_with_its_children(queue_name, store, tmp_path):
    worker = _start(queue_name, tmp_path / "worker.log", "-c", "1", TEST_SHUTDOWN_TIMEOUT="60")
    assert worker.wait_until_ready(app.app, 60), worker.tail()
    app.async_sleep.apply_async((30,), queue=queue_name)
    wait_for(lambda: "received" in worker.tail(), 20, "the input to arrive")
    started = time.monotonic()
    code = worker.stop(timeout_s=2)  # the warm shutdown would wait 60 s for the input
    assert time.monotonic() - started < 15
    assert code != 0
    assert process_gone(worker.proc.pid, group=True)
