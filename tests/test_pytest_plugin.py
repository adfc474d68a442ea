"""The pytest plugin (celery_concurrent.testing.pytest_plugin), run as users run it:
``pytest`` in a subprocess, the plugin loaded through its entry point."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from celery_concurrent import defaults
from celery_concurrent.testing import pytest_plugin
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parent.parent


def _pytest(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run pytest in a subprocess without any broker in the environment; its output."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in {"CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "PYTEST_ADDOPTS"}
        and not k.startswith("PYTEST_")
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=240,
    )
    return f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"


def test_the_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    points = {e.name: e.value for e in importlib.metadata.entry_points(group="pytest11")}
    assert points.get("celery_concurrent") == "celery_concurrent.testing.pytest_plugin"
    assert pytest_plugin.POOL_PATH == defaults.POOL_PATH


@pytest.mark.timeout(300)
def test_the_example_passes_on_a_private_redis() -> None:
    """examples/test_with_plugin.py with no broker given: the plugin starts a private Redis."""
    output = _pytest("examples/test_with_plugin.py", cwd=ROOT, env={"REDIS_URL": ""})
    assert output.startswith("exit 0"), output
    assert "2 passed" in output, output


PROJECT = """
from __future__ import annotations

import asyncio
import os

from celery import Celery

from celery_concurrent import concurrent

# No celery_concurrent.install(app): the fixture selects the pool with -P custom.
app = Celery("userproj", broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/0")


@app.task
@concurrent(max_inputs=20)
async def hold(delay_s: float) -> int:
    await asyncio.sleep(delay_s)
    return os.getpid()
"""

USER_TEST = """
from __future__ import annotations

import os

from userproj import app, hold


def test_given_broker_reaches_the_worker(concurrent_worker):
    worker = concurrent_worker(app, "-c", "1")
    assert app.conf.broker_url == os.environ["EXPECTED_BROKER"]
    assert len({r.get(timeout=30) for r in [hold.delay(0.2) for _ in range(20)]}) == 1
    stats = app.control.inspect([worker.hostname], timeout=5).stats()[worker.hostname]
    assert stats["pool"]["implementation"].endswith("ConcurrentPool")


def test_a_worker_that_refuses_to_start_fails_the_test(concurrent_worker):
    concurrent_worker(app, "--concurrency", "many", ready_timeout_s=30)
"""


@pytest.mark.timeout(300)
def test_a_user_project_with_a_given_broker(tmp_path: Path) -> None:
    (tmp_path / "userproj.py").write_text(PROJECT)
    (tmp_path / "test_user.py").write_text(USER_TEST)
    output = _pytest(
        "--concurrent-broker-url",
        REDIS_URL,
        cwd=tmp_path,
        env={"EXPECTED_BROKER": REDIS_URL},
    )
    assert "1 failed, 1 passed" in output, output
    # The failing one names the worker, why it stopped, and shows its log.
    failure = output.split("test_a_worker_that_refuses_to_start_fails_the_test", 1)[1]
    assert "concurrent_worker: the worker for 'userproj:app' exited" in failure, output
    assert "Invalid value for '-c' / '--concurrency'" in failure, output


def test_an_app_that_no_module_holds_is_refused() -> None:
    from celery import Celery

    with pytest.raises(pytest.UsageError, match="cannot find a module holding"):
        pytest_plugin._resolve(Celery("nowhere", set_as_current=False))
    assert pytest_plugin._resolve("examples.app:app")[1] == "examples.app:app"
    from examples.app import app

    assert pytest_plugin._resolve(app)[1] == "examples.app:app"
    with pytest.raises(pytest.UsageError, match="is not a Celery app"):
        pytest_plugin._resolve("examples.app:fetch")


def test_the_user_test_above_is_well_formed() -> None:
    compile(textwrap.dedent(USER_TEST), "test_user.py", "exec")
    compile(textwrap.dedent(PROJECT), "userproj.py", "exec")
