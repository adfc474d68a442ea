"""The parent's handle on one child process: its pipes, its outbox, its state, its exit.

A child's death is seen from the process itself (a pidfd, where Linux has one; otherwise a
``waitpid`` poll), never from pipe EOF: a grandchild that inherited the pipes would hold
them open long after the child died.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import billiard

from . import protocol

if TYPE_CHECKING:
    from .job import Job

__all__ = ["ChildProcess", "ChildState", "describe_exit", "spawn_child"]


class ChildState(enum.Enum):
    """Lifecycle of a pool child."""

    STARTING = "starting"  # forked, in worker_process_init; gets no inputs yet
    READY = "ready"  # takes inputs
    DRAINING = "draining"  # finishes its inputs, gets no new ones, then exits
    EXITED = "exited"


@dataclass(eq=False)
class ChildProcess:
    """One child as the parent sees it."""

    process: Any
    pid: int
    jobs_fd: int  # parent -> child, non-blocking
    results_fd: int  # child -> parent, non-blocking
    pidfd: int | None
    index: int  # 1, 2, ... in start order (for names and logs)
    state: ChildState = ChildState.STARTING
    outbox: protocol.Outbox = field(default_factory=protocol.Outbox)
    reader: protocol.FrameReader = field(default_factory=protocol.FrameReader)
    inflight: dict[int, Job] = field(default_factory=dict)
    per_task: Counter[str] = field(default_factory=Counter)
    started_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    dispatched: int = 0
    drain_reason: str | None = None
    drain_deadline: float | None = None
    kill_reason: str | None = None
    init_error: str | None = None
    results_open: bool = True

    @property
    def accepting(self) -> bool:
        """Takes new inputs (for dispatch: ready, not draining)."""
        return self.state is ChildState.READY

    @property
    def ready(self) -> bool:
        return self.state is ChildState.READY

    @property
    def running(self) -> int:
        """Inputs sent to this child and not finished."""
        return len(self.inflight)

    @property
    def alive(self) -> bool:
        return self.state is not ChildState.EXITED

    def send(self, message: tuple[Any, ...], tag: Any = None) -> bool:
        """Queue ``message`` and write what the pipe takes now; True if all is written."""
        self.outbox.append(protocol.encode(message), tag)
        return self.write_pending()

    def write_pending(self) -> bool:
        """Write queued frames without blocking; True when the outbox is empty."""
        try:
            return self.outbox.write_some(self.jobs_fd)
        except OSError:  # the child is gone; its exit is handled from its pidfd
            self.outbox.discard_unstarted()
            return True

    def read_messages(self) -> list[tuple[Any, ...]]:
        """Every complete message the pipe holds now (sets ``results_open`` on EOF)."""
        messages: list[tuple[Any, ...]] = []
        while self.results_open:
            try:
                data = os.read(self.results_fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self.results_open = False
                break
            messages.extend(self.reader.feed(data))
        return messages

    def exited(self) -> bool:
        """True once the process has exited (reaps it)."""
        return self.process.exitcode is not None

    def kill(self, signum: int = signal.SIGKILL, reason: str | None = None) -> None:
        if reason and self.kill_reason is None:
            self.kill_reason = reason
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def close(self) -> None:
        """Close the parent's fds of this child (after it exited)."""
        for fd in (self.results_fd, self.jobs_fd, self.pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def fds(self) -> list[int]:
        return [fd for fd in (self.jobs_fd, self.results_fd, self.pidfd) if fd is not None]


def spawn_child(
    target: Callable[..., None],
    args: tuple[Any, ...],
    *,
    index: int,
    inherited: Iterable[int],
) -> ChildProcess:
    """Fork a child running ``target(*args, jobs_fd, results_fd, close_fds)``.

    ``inherited`` are parent fds the child must close (other children's pipes and pidfds).
    """
    jobs_r, jobs_w = os.pipe()
    results_r, results_w = os.pipe()
    process = billiard.get_context("fork").Process(
        target=target,
        args=(*args, jobs_r, results_w, [jobs_w, results_r, *inherited]),
        name=f"ConcurrentPoolWorker-{index}",
    )
    process.start()
    os.close(jobs_r)
    os.close(results_w)
    for fd in (jobs_w, results_r):
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    pidfd: int | None
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: the pool polls waitpid instead
        pidfd = None
    return ChildProcess(
        process=process,
        pid=process.pid,
        jobs_fd=jobs_w,
        results_fd=results_r,
        pidfd=pidfd,
        index=index,
    )


def describe_exit(exitcode: int | None) -> str:
    """``exitcode 1`` / ``signal 9 (SIGKILL)`` / ``exit code unknown``."""
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown"
        return f"signal {-exitcode} ({name})"
    return f"exitcode {exitcode}"
