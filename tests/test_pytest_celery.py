"""celery_concurrent.testing.pytest_celery: pytest-celery's Docker worker, on ConcurrentPool.

No Docker engine runs here, so the image is never built or started. What is checked instead:
the node class runs what ``docker/pytest-celery/Dockerfile`` runs (command line, build
arguments, working directory, environment); the container's command, environment and
``/app`` volume, laid out on this machine as the image lays them out, start a real worker on
Redis that runs many inputs at once in its one child; and the fixtures replace pytest-celery's
default worker in a project that imports them. pytest-celery is an optional extra: those tests
skip without it, unless ``REQUIRE_DEPLOY_TOOLS=1`` (set by ``.ci/run``) makes it required.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import celery
import pytest
from celery import Celery

import celery_concurrent
from celery_concurrent.defaults import AUTOSCALER_PATH, POOL_PATH
from tests import pytest_celery_tasks
from tests.conftest import REDIS_URL, overlap, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "pytest-celery" / "Dockerfile"
REQUIRED = os.environ.get("REQUIRE_DEPLOY_TOOLS") == "1"
INSTALL = "pip install 'celery-concurrent[pytest-celery]'"


def _node() -> ModuleType:
    """celery_concurrent.testing.pytest_celery; skips (or fails, if required) without the extra."""
    if importlib.util.find_spec("pytest_celery") is None:
        reason = f"pytest-celery is not installed ({INSTALL})"
        if REQUIRED:
            pytest.fail(f"{reason}; REQUIRE_DEPLOY_TOOLS=1 makes it required")
        pytest.skip(reason)
    return importlib.import_module("celery_concurrent.testing.pytest_celery")


def _image() -> dict[str, Any]:
    """The Dockerfile's ARG defaults, final ENV, last WORKDIR and CMD."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    args = {k: v.strip('"') for k, v in re.findall(r"^ARG (\w+)=(.*)$", text, re.M)}
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", text, re.M):
        for pair in shlex.split(line):
            key, _, value = pair.partition("=")
            env[key] = value
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd is not None, "the image has no JSON CMD"
    return {
        "args": args,
        "env": env,
        "workdir": re.findall(r"^WORKDIR (\S+)", text, re.M)[-1],
        "cmd": json.loads(cmd.group(1)),
        "text": text,
    }


def test_without_pytest_celery_the_import_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['pytest_celery'] = None\n"
        "import celery_concurrent.testing.pytest_celery\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "ImportError: celery_concurrent.testing.pytest_celery needs pytest-celery" in (
        proc.stderr
    )
    assert INSTALL in proc.stderr


def test_the_extra_is_declared_and_the_image_installs_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["pytest-celery"]
    assert [spec.split(">")[0] for spec in extra] == ["pytest-celery"]
    assert '"./[pytest-celery]"' in _image()["text"]


def test_the_node_runs_what_the_image_runs() -> None:
    node = _node()
    worker = node.ConcurrentWorkerContainer
    image = _image()
    assert (ROOT / node.DOCKERFILE).resolve() == DOCKERFILE
    assert worker.command() == image["cmd"]
    assert worker.command()[:4] == ["celery", "-A", "app", "worker"]
    assert worker.command()[-2:] == ["-c", "1"]  # the pool comes from install(app), not -P
    assert "-P" not in worker.command() and "--pool" not in " ".join(worker.command())
    assert set(worker.buildargs()) <= set(image["args"])
    assert worker.buildargs()["CELERY_VERSION"] == celery.__version__
    assert image["args"]["CELERY_LOG_LEVEL"] == worker.log_level()
    assert image["args"]["CELERY_WORKER_NAME"] == worker.worker_name()
    assert image["args"]["CELERY_WORKER_QUEUE"] == worker.worker_queue()
    from pytest_celery.vendors.worker.defaults import DEFAULT_WORKER_VOLUME

    assert image["workdir"] == DEFAULT_WORKER_VOLUME["bind"] == "/app"
    env = worker.initial_env({"celery_broker_cluster_config": {"urls": ["redis://b:6379/0"]}})
    assert env["CELERY_BROKER_URL"] == "redis://b:6379/0"
    for key in ("PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"):
        assert image["env"][key] == env[key], key
    assert image["env"]["CELERY_CONCURRENT_METRICS_ADDRESS"] == "0.0.0.0"


def test_a_subclass_changes_the_pool_arguments_and_keeps_debugpy() -> None:
    node = _node()

    class Autoscaled(node.ConcurrentWorkerContainer):  # type: ignore[name-defined]
        @classmethod
        def pool_args(cls) -> tuple[str, ...]:
            return ("--autoscale=4,1",)

    assert Autoscaled.command("-E")[-2:] == ["--autoscale=4,1", "-E"]
    debug = Autoscaled.command(debugpy=True)
    assert debug[:3] == ["python", "-m", "debugpy"] and "--autoscale=4,1" in debug


# -- the container, laid out on this machine -------------------------------------------------


def _volume(node: ModuleType, root: Path, worker_app: Celery | None = None) -> Path:
    """The worker's ``/app`` as pytest-celery fills it, and a site holding the library.

    Returns the site directory. The repository root stays off the path, as in the image, so
    the task module is the copy in the volume.
    """
    content = node.ConcurrentWorkerContainer.initial_content(
        worker_tasks={pytest_celery_tasks}, worker_app=worker_app
    )
    for name, data in content.items():
        path = root / "app" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    site = root / "site"
    site.mkdir()
    (site / "celery_concurrent").symlink_to(Path(celery_concurrent.__file__).parent)
    return site


def _env(node: ModuleType, root: Path, site: Path, env: dict[str, str]) -> dict[str, str]:
    """The container's environment, with ``/app`` and the image's site moved here."""
    assert env["PYTHONPATH"] == "/app"
    others = [p for p in sys.path if p and Path(p).resolve() != ROOT]
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "PYTEST_"))},
        **env,
        "PYTHONPATH": os.pathsep.join([str(root / "app"), str(site), *others]),
    }


def test_the_app_module_selects_the_pool_and_keeps_the_test_config(tmp_path: Path) -> None:
    node = _node()
    test_app = Celery("celery_test_app")
    test_app.conf.result_expires = 123
    site = _volume(node, tmp_path, worker_app=test_app)
    env = _env(node, tmp_path, site, node.ConcurrentWorkerContainer.initial_env({}))
    code = (
        "import json, app\n"
        "c = app.app.conf\n"
        "print(json.dumps([c.worker_pool, c.worker_autoscaler, c.result_expires,\n"
        "                  c.worker_prefetch_multiplier, sorted(app.app.tasks)]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path / "app",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    pool, autoscaler, expires, prefetch, tasks = json.loads(proc.stdout.splitlines()[-1])
    assert (pool, autoscaler, expires, prefetch) == (POOL_PATH, AUTOSCALER_PATH, 123, 1)
    assert "tests.pytest_celery_tasks.nap" in tasks


@pytest.fixture
def container_worker(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """The container's command on this machine: (queue, hostname, log) of a running worker."""
    node = _node()
    queue = f"pc-{uuid.uuid4().hex[:10]}"

    class OnThisQueue(node.ConcurrentWorkerContainer):  # type: ignore[name-defined]
        @classmethod
        def worker_name(cls) -> str:
            return queue

        @classmethod
        def worker_queue(cls) -> str:
            return queue

    site = _volume(node, tmp_path)
    config = {
        "celery_broker_cluster_config": {"urls": [REDIS_URL]},
        "celery_backend_cluster_config": {"urls": [REDIS_URL]},
    }
    env = _env(node, tmp_path, site, OnThisQueue.initial_env(config))
    command = OnThisQueue.command()
    assert command[0] == "celery"
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", *command[1:]],
            cwd=tmp_path / "app",
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        hostname = command[command.index("-n") + 1].replace("%h", os.uname().nodename)
        yield queue, hostname, log
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.timeout(120)
def test_the_container_command_runs_many_inputs_in_one_child(
    container_worker: tuple[str, str, Path],
) -> None:
    queue, hostname, log = container_worker
    ready_prompt = "ready."  # what pytest-celery waits for in the container's log
    wait_for(lambda: ready_prompt in log.read_text(errors="replace"), 60, f"{hostname} ready")
    client = Celery("client", broker=REDIS_URL, backend=REDIS_URL)
    try:
        stats = client.control.inspect([hostname], timeout=5).stats() or {}
        assert stats, f"no stats from {hostname}:\n{log.read_text()[-3000:]}"
        pool = stats[hostname]["pool"]
        assert len(pool["processes"]) == 1, pool
        started = time.monotonic()
        results = [
            client.send_task("tests.pytest_celery_tasks.nap", (1.0,), queue=queue)
            for _ in range(10)
        ]
        runs = [r.get(timeout=60) for r in results]
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert len({r["pid"] for r in runs}) == 1  # one child ran them all
    assert overlap(runs) >= 8, runs  # ... at once: ConcurrentPool, not one at a time
    assert elapsed < 8.0  # one at a time would take 10 s


# -- the fixtures, in a project that imports them ----------------------------------------------

CONFTEST = """
from celery_concurrent.testing.pytest_celery import *  # noqa: F403
"""

FIXTURE_TEST = """
from celery_concurrent.testing import pytest_celery as node


def _active(request, name):
    return request._fixturemanager.getfixturedefs(name, request.node)[-1]


def test_fixtures(request, default_worker_container_cls, default_worker_container_session_cls,
                  default_worker_command, default_worker_app_module, default_worker_tasks,
                  default_worker_celery_version, concurrent_worker_image_context):
    assert default_worker_container_cls is node.ConcurrentWorkerContainer
    assert default_worker_container_session_cls is node.ConcurrentWorkerContainer
    assert default_worker_command == node.ConcurrentWorkerContainer.command()
    assert default_worker_app_module.__name__ == "celery_concurrent.testing.pytest_celery_app"
    assert default_worker_celery_version == node.ConcurrentWorkerContainer.version()
    assert (node.Path(concurrent_worker_image_context) / node.DOCKERFILE).is_file()
    image = _active(request, "celery_base_worker_image").func.__doc__
    assert "dockerfile: " + node.DOCKERFILE in image and node.IMAGE_TAG in image, image
    container = _active(request, "default_worker_container").func
    assert container.__globals__["wrapper_class"] is node.ConcurrentWorkerContainer
"""


NO_CHECKOUT_TEST = """
from pathlib import Path

import pytest

from celery_concurrent.testing import pytest_celery as node


def test_no_checkout(request):
    node._CHECKOUT = Path("/nonexistent")
    with pytest.raises(pytest.UsageError, match="override the concurrent_worker_image_context"):
        request.getfixturevalue("concurrent_worker_image_context")
"""


def _project_pytest(tmp_path: Path, test: str) -> str:
    """pytest in a subprocess, in a project whose conftest imports the fixtures; its output."""
    _node()
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_it.py").write_text(textwrap.dedent(test))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_it.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    return f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"


@pytest.mark.timeout(180)
def test_the_fixtures_replace_pytest_celerys_default_worker(tmp_path: Path) -> None:
    output = _project_pytest(tmp_path, FIXTURE_TEST)
    assert output.startswith("exit 0") and "1 passed" in output, output


@pytest.mark.timeout(180)
def test_without_a_checkout_the_image_context_says_what_to_override(tmp_path: Path) -> None:
    output = _project_pytest(tmp_path, NO_CHECKOUT_TEST)
    assert output.startswith("exit 0") and "1 passed" in output, output
