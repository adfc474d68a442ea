"""A real ``celery worker`` as a subprocess, for demos, benchmarks and integration tests.

::

    worker = WorkerProcess.start("proj", ["-c", "2", "-l", "info"], queue="q", log_path=log)
    if not worker.wait_until_ready(app):
        print(worker.tail())
    ...
    worker.stop()

The worker runs in a session of its own, so a terminal's Ctrl-C reaches only the caller,
which stops the worker itself, and :meth:`WorkerProcess.stop` can kill the whole process
group (the pool's children too) if a warm shutdown hangs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from celery import Celery

__all__ = ["WorkerProcess"]


@dataclass
class WorkerProcess:
    """A ``celery worker`` subprocess in its own session, logging to a file."""

    hostname: str
    queue: str
    log_path: Path
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(
        cls,
        app: str,
        args: Sequence[str],
        *,
        queue: str,
        log_path: Path,
        hostname: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> WorkerProcess:
        """Run ``celery -A app worker *args --hostname H -Q queue``; output goes to ``log_path``.

        ``hostname`` defaults to ``queue@<this host>``, what ``--hostname queue@%h`` gives.
        """
        hostname = hostname or f"{queue}@{socket.gethostname()}"
        command = [
            sys.executable, "-m", "celery", "-A", app, "worker", *args,
            "--hostname", hostname, "-Q", queue,
        ]  # fmt: skip
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                command,
                cwd=cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(hostname=hostname, queue=queue, log_path=log_path, proc=proc)

    @property
    def pid(self) -> int:
        """The worker's main process id (also its process group id)."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the worker's main process is still running."""
        return self.proc.poll() is None

    def send_signal(self, signum: int, *, group: bool = False) -> None:
        """Send ``signum`` to the main process, or with ``group`` to its whole process group.

        A process that already exited is not an error.
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(self.proc.pid, signum)
            else:
                self.proc.send_signal(signum)

    def kill(self, signum: int = signal.SIGKILL, *, group: bool = True) -> int | None:
        """Send ``signum`` (default SIGKILL, to the whole group); wait for SIGKILL to land.

        Returns the exit status once the main process is gone, else None.
        """
        self.send_signal(signum, group=group)
        if signum == signal.SIGKILL:
            return self.proc.wait()
        return self.proc.poll()

    def wait_exit(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` for the main process to exit; its status, or None."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        """The whole log so far (empty if it cannot be read)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the worker's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def wait_until_ready(self, app: Celery, timeout_s: float = 60.0) -> bool:
        """Ping until the worker answers; False if it exits or stays silent for ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if app.control.ping(destination=[self.hostname], timeout=0.5):
                return True
        return False

    def stop(self, timeout_s: float = 60.0) -> int:
        """Warm shutdown (SIGTERM); SIGKILL the process group if it hangs or leaves orphans.

        Returns the worker's exit status.
        """
        group = self.proc.pid  # start_new_session: the group id is the worker's pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                print(f"worker did not stop within {timeout_s:g}s; killing it", file=sys.stderr)
                _kill_group(group)
        code = self.proc.wait()
        deadline = time.monotonic() + 5.0
        while _group_alive(group):  # children that outlived the main process
            if time.monotonic() > deadline:
                _kill_group(group)
                break
            time.sleep(0.1)
        return code


def _kill_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
