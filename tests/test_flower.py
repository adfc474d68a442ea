"""Flower sees the pool and the autoscaler, and its autoscale form drives TargetAutoscaler."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REDIS_URL, ROOT, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def flower(queue_name: str, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "REDIS_URL": REDIS_URL,
        "TEST_QUEUE": queue_name,
        "FLOWER_UNAUTHENTICATED_API": "true",
    }
    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            "--inspect_timeout=5000",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError):
        return None


def _post(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.timeout(120)
def test_flower_shows_pool_and_autoscaler_and_drives_autoscale(start_worker, flower):
    worker = start_worker("--autoscale=3,1", "-E", env={"TEST_SLOTS": "50"})

    def worker_stats() -> dict[str, Any] | None:
        workers = _get(f"{flower}/api/workers?refresh=1") or {}
        info = workers.get(worker.hostname) or {}
        return info.get("stats") or None

    stats = wait_for(worker_stats, 60, "Flower to list the worker's stats")
    assert stats["pool"]["implementation"] == "celery_concurrent.pool:ConcurrentPool"
    assert stats["pool"]["slots-per-child"] == 50
    autoscaler = stats["autoscaler"]
    assert autoscaler["target_inputs"]["tests.app.async_recorded"] == 25
    assert {"desired", "load", "backlog", "last_decision"} <= set(autoscaler)

    name = worker.hostname
    with urllib.request.urlopen(f"{flower}/worker/{name}", timeout=20) as response:
        page = response.read().decode()
    assert "Autoscaler options" in page
    assert "ConcurrentPool" in page
    assert "tests.app.async_recorded" in page  # per-task target/max shown on the page

    status, body = _post(f"{flower}/api/worker/pool/autoscale/{name}?min=2&max=4")
    assert status == 200, body
    wait_for(lambda: worker.stats()["autoscaler"]["current"] == 2, 20, "2 children")

    status, body = _post(f"{flower}/api/worker/pool/autoscale/{name}?min=5&max=2")
    assert status == 403
    assert "min=5 is above max=2" in body
