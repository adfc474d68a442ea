"""ConcurrentPool: a Celery pool whose children each run many inputs at once.

The parent only consumes and dispatches: it hands each input to a child over a pipe and
relays the child's ``ACCEPTED``/``DONE`` messages to Celery's request callbacks, in the
worker's own event loop. Children trace inputs and store results themselves, in parallel
(see :mod:`celery_concurrent.child`).

``num_processes`` reports input slots (children x slots per child), so Celery's prefetch
(``num_processes x worker_prefetch_multiplier``) reserves only what the children can start.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import itertools
import os
import select
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import billiard
from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery.concurrency.base import BasePool
from celery.utils.log import get_logger
from celery.worker import state as worker_state

from . import (
    control,  # noqa: F401  (registers pool_grow/pool_shrink that know input slots)
    protocol,
)
from .child import ChildOptions, run_child
from .decorator import settings_for
from .defaults import UNDECORATED_MAX_INPUTS, setting
from .dispatch import Limits, choose_child
from .exceptions import ConcurrencyConfigError
from .prefetch import install_prefetch_step

__all__ = ["ChildState", "ConcurrentPool"]

logger = get_logger(__name__)


class ChildState(enum.Enum):
    """Lifecycle of a pool child."""

    STARTING = "starting"  # forked, initialising (inputs may already be queued to it)
    RUNNING = "running"
    DRAINING = "draining"  # told to stop: finishes its inputs, gets no new ones
    EXITED = "exited"


@dataclass(eq=False, slots=True)
class Job:
    """One input handed to the pool by Celery."""

    id: int
    task_name: str
    task_id: str
    target: Callable[..., Any]
    args: tuple[Any, ...]
    soft_timeout_s: float | None
    timeout_s: float | None
    callback: Callable[..., Any] | None
    error_callback: Callable[..., Any] | None
    accept_callback: Callable[..., Any] | None
    child: Child | None = None
    accepted: bool = False
    qos_lent: int = 0

    @property
    def request(self) -> Any:
        """Celery's Request this job came from, when Celery's worker sent it."""
        return getattr(self.accept_callback, "__self__", None)


@dataclass(eq=False)
class Child:
    """The parent's view of one child process."""

    process: Any
    pid: int
    jobs_fd: int
    results_fd: int
    state: ChildState = ChildState.STARTING
    reader: protocol.FrameReader = field(default_factory=protocol.FrameReader)
    inflight: dict[int, Job] = field(default_factory=dict)
    per_task: Counter[str] = field(default_factory=Counter)
    started_at: float = field(default_factory=time.monotonic)

    @property
    def accepting(self) -> bool:
        return self.state in (ChildState.STARTING, ChildState.RUNNING)

    @property
    def running(self) -> int:
        return len(self.inflight)

    @property
    def ready(self) -> bool:
        return self.state is ChildState.RUNNING


class ConcurrentPool(BasePool):
    """Celery pool of children that each run up to ``max_inputs`` inputs per task at once.

    Select it with ``worker_pool = "celery_concurrent.pool:ConcurrentPool"`` (what
    :func:`celery_concurrent.install` sets) or ``-P custom`` with
    ``CELERY_CUSTOM_WORKER_POOL``. ``-c N`` is the number of children.
    """

    uses_semaphore = False
    signal_safe = False
    task_join_will_block = True

    def __init__(self, limit: int | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(limit, *args, **kwargs)
        self._children: dict[int, Child] = {}  # by results fd
        self._waiting: deque[Job] = deque()
        self._job_ids = itertools.count(1)
        self._lock = threading.RLock()
        self._hub: Any = None
        self._reader_thread: threading.Thread | None = None
        self._closing = False
        self._limits: dict[str, Limits] = {}
        self._consumer: Any = None
        if limit is not None and (isinstance(limit, bool) or int(limit) < 0):
            raise ConcurrencyConfigError(
                f"ConcurrentPool needs a child count >= 1, got {limit!r}: use -c 1 or more, "
                "or --autoscale=MAX,MIN"
            )
        # --autoscale=MAX (min 0) starts at one child: a worker keeps one to see demand.
        self.desired_children = max(int(limit or 0), 1)
        self._slots_per_child: int | None = None
        self.children_started = 0
        if self.app is not None:
            _check_settings(self.app)
            install_prefetch_step(self.app)

    # -- Celery's pool interface ------------------------------------------------------------

    @property
    def slots_per_child(self) -> int:
        """Inputs one child runs at once, all tasks together."""
        if self._slots_per_child is None:
            self._slots_per_child = self._compute_slots_per_child()
        return self._slots_per_child

    def on_start(self) -> None:
        self._warn_unenforceable_limits()
        logger.info(
            "ConcurrentPool starting %d children x %d input slots",
            self.desired_children,
            self.slots_per_child,
        )
        for _ in range(self.desired_children):
            self._spawn()

    def register_with_event_loop(self, loop: Any) -> None:
        with self._lock:
            self._hub = loop
            for child in self._children.values():
                loop.add_reader(child.results_fd, self._on_readable, child)

    def on_apply(
        self,
        target: Callable[..., Any],
        args: Any = None,
        kwargs: Any = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        error_callback: Callable[..., Any] | None = None,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        correlation_id: str | None = None,
        **_: Any,
    ) -> None:
        args = tuple(args or ())
        job = Job(
            id=next(self._job_ids),
            task_name=str(args[0]) if args else "",
            task_id=correlation_id or (str(args[1]) if len(args) > 1 else ""),
            target=target,
            args=args,
            soft_timeout_s=soft_timeout,
            timeout_s=timeout,
            callback=callback,
            error_callback=error_callback,
            accept_callback=accept_callback,
        )
        with self._lock:
            self._ensure_reader()
            if not self._place(job):
                self._waiting.append(job)

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        """Cancel the revoked inputs running on child ``pid`` (not the whole child)."""
        with self._lock:
            for child in self._children.values():
                if child.pid != pid:
                    continue
                for job in list(child.inflight.values()):
                    if job.task_id in worker_state.revoked:
                        self._send(child, (protocol.CANCEL, job.id, int(signal or 15)))

    def on_stop(self) -> None:
        """Warm shutdown: requeue waiting inputs, let in-flight ones finish, then stop."""
        timeout_s = float(setting(self.app, "concurrent_shutdown_timeout"))
        with self._lock:
            self._closing = True
            self._requeue_waiting()
            for child in list(self._children.values()):
                self._drain(child)
        deadline = time.monotonic() + timeout_s
        while self._children and time.monotonic() < deadline:
            self._poll_once(min(0.2, max(deadline - time.monotonic(), 0.0)))
        if self._children:
            logger.warning(
                "Warm shutdown timed out after %.1fs with %d inputs in flight; stopping the "
                "children (acks_late inputs return to the broker)",
                timeout_s,
                sum(c.running for c in self._children.values()),
            )
            self._kill_all(signal.SIGKILL)

    def on_terminate(self) -> None:
        """Cold shutdown: kill the children now."""
        with self._lock:
            self._closing = True
        self._kill_all(signal.SIGKILL)

    def on_close(self) -> None:
        with self._lock:
            self._closing = True

    def grow(self, n: int = 1) -> None:
        """Start ``n`` more children; prefetch grows by their input slots."""
        if n < 1:
            raise ValueError(f"cannot grow the pool by {n}: give a number of children >= 1")
        with self._lock:
            self.desired_children += n
            for _ in range(n):
                self._spawn()
            self._resize_prefetch(n)
            self._dispatch_waiting()

    def shrink(self, n: int = 1) -> None:
        """Drain the ``n`` least loaded children: they finish their inputs, then exit."""
        with self._lock:
            accepting = sorted(
                (c for c in self._children.values() if c.accepting), key=lambda c: c.running
            )
            if n < 1:
                raise ValueError(f"cannot shrink the pool by {n}: give a number >= 1")
            if n > len(accepting) - 1:
                raise ValueError(
                    f"cannot shrink by {n}: the pool has {len(accepting)} accepting children "
                    "and keeps at least one"
                )
            for child in accepting[:n]:
                self._drain(child)
            self.desired_children -= n
            self._resize_prefetch(-n)

    def _resize_prefetch(self, children_delta: int) -> None:
        consumer = self._consumer
        if consumer is not None and getattr(consumer, "qos", None) is not None:
            consumer._update_prefetch_count(children_delta * self.slots_per_child)

    @property
    def children(self) -> int:
        """Children that take new inputs (draining ones excluded)."""
        return self.desired_children

    @property
    def inflight(self) -> int:
        """Inputs running in all children."""
        return sum(c.running for c in self._children.values())

    @property
    def num_processes(self) -> int:
        """Input slots: children x slots per child (Celery's prefetch is based on this)."""
        return self.desired_children * self.slots_per_child

    def _get_info(self) -> dict[str, Any]:
        with self._lock:
            children = list(self._children.values())
            info: dict[str, Any] = {
                "implementation": f"{type(self).__module__}:{type(self).__name__}",
                "max-concurrency": self.num_processes,
                "processes": [c.pid for c in children if c.accepting],
                "max-tasks-per-child": None,
                "put-guarded-by-semaphore": False,
                "timeouts": [self.options.get("soft_timeout"), self.options.get("timeout")],
                "slots-per-child": self.slots_per_child,
                "children": [
                    {"pid": c.pid, "state": c.state.value, "inflight": c.running} for c in children
                ],
                "inflight": sum(c.running for c in children),
                "waiting": len(self._waiting),
                "tasks": self._task_info(children),
            }
        return info

    def attach_consumer(self, consumer: Any) -> None:
        """Let the pool lend prefetch back while early-acked inputs run (see ``_on_accepted``)."""
        self._consumer = consumer

    # -- placing inputs --------------------------------------------------------------------

    def limits_for(self, task_name: str) -> Limits:
        """The per-child limits of ``task_name`` (undecorated tasks: one at a time)."""
        limits = self._limits.get(task_name)
        if limits is None:
            task = self.app.tasks.get(task_name) if self.app is not None else None
            settings = settings_for(task) if task is not None else None
            if settings is None:
                limits = Limits(UNDECORATED_MAX_INPUTS, UNDECORATED_MAX_INPUTS)
            else:
                limits = Limits(settings.max_inputs, settings.target_inputs)
            self._limits[task_name] = limits
        return limits

    def _place(self, job: Job) -> bool:
        if self._closing:
            return False
        child = choose_child(
            self._children.values(),
            job.task_name,
            self.limits_for(job.task_name),
            self.slots_per_child,
        )
        if child is None:
            return False
        job.child = child
        child.inflight[job.id] = job
        child.per_task[job.task_name] += 1
        self._send(
            child,
            (protocol.RUN, job.id, job.target, job.args, job.soft_timeout_s, job.timeout_s),
        )
        return True

    def _dispatch_waiting(self) -> None:
        """Start waiting inputs where a slot is free, in order, skipping capped tasks."""
        if not self._waiting or self._closing:
            return
        still_waiting: deque[Job] = deque()
        while self._waiting:
            job = self._waiting.popleft()
            if _revoked_while_waiting(job):
                continue
            if not self._place(job):
                still_waiting.append(job)
        self._waiting = still_waiting

    def _requeue_waiting(self) -> None:
        while self._waiting:
            job = self._waiting.popleft()
            request = job.request
            try:
                if request is not None and hasattr(request, "reject"):
                    request.reject(requeue=True)
            except Exception as exc:  # the broker redelivers unacked messages anyway
                logger.warning("Could not requeue %s[%s]: %r", job.task_name, job.task_id, exc)

    # -- children --------------------------------------------------------------------------

    def _spawn(self) -> Child:
        jobs_r, jobs_w = os.pipe()
        results_r, results_w = os.pipe()
        others = [fd for c in self._children.values() for fd in (c.jobs_fd, c.results_fd)]
        options = ChildOptions(
            hostname=self._hostname(),
            slots=self.slots_per_child,
            loop_block_warning_s=float(setting(self.app, "concurrent_loop_block_warning")),
            soft_timeout_s=self.options.get("soft_timeout"),
            timeout_s=self.options.get("timeout"),
        )
        process = billiard.get_context("fork").Process(
            target=_child_main,
            args=(self.app, jobs_r, results_w, options, [jobs_w, results_r, *others]),
            name=f"ConcurrentPoolWorker-{self.children_started + 1}",
        )
        process.start()
        os.close(jobs_r)
        os.close(results_w)
        flags = fcntl.fcntl(results_r, fcntl.F_GETFL)
        fcntl.fcntl(results_r, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        child = Child(process=process, pid=process.pid, jobs_fd=jobs_w, results_fd=results_r)
        self._children[results_r] = child
        self.children_started += 1
        if self._hub is not None:
            self._hub.add_reader(results_r, self._on_readable, child)
        logger.info("Child %d started (%d children)", child.pid, len(self._children))
        return child

    def _drain(self, child: Child) -> None:
        if child.state in (ChildState.DRAINING, ChildState.EXITED):
            return
        child.state = ChildState.DRAINING
        self._send(child, (protocol.STOP,))
        logger.info("Child %d draining (%d inputs in flight)", child.pid, child.running)

    def _send(self, child: Child, message: tuple[Any, ...]) -> None:
        try:
            protocol.write_all(child.jobs_fd, protocol.encode(message))
        except OSError as exc:  # it died; its exit is handled when its pipe closes
            logger.debug("Could not write to child %d: %r", child.pid, exc)

    def _on_readable(self, child: Child) -> None:
        with self._lock:
            if child.state is ChildState.EXITED:
                return
            try:
                data = os.read(child.results_fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._on_child_exit(child)
                return
            for message in child.reader.feed(data):
                self._handle(child, message)
            self._dispatch_waiting()

    def _handle(self, child: Child, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == protocol.DONE:
            job = child.inflight.pop(message[1], None)
            if job is None:
                return
            child.per_task[job.task_name] -= 1
            self._return_prefetch(job)
            _call(job.callback, message[2])
        elif kind == protocol.ACCEPTED:
            job = child.inflight.get(message[1])
            if job is not None:
                self._on_accepted(job, message[2], message[3])
        elif kind == protocol.DRAINING and child.accepting:
            child.state = ChildState.DRAINING
            logger.warning("Child %d is draining after a signal", child.pid)
            if not self._closing:
                self._spawn()
        elif kind == protocol.READY and child.state is ChildState.STARTING:
            child.state = ChildState.RUNNING
            logger.debug("Child %d ready in %.2fs", child.pid, time.monotonic() - child.started_at)

    def _on_accepted(self, job: Job, pid: int, time_accepted: float) -> None:
        """Tell Celery the input started; if that acked it, shrink prefetch by one.

        Brokers count only unacknowledged messages against prefetch, so an input acked
        at start would let the broker deliver one more than the children can start.
        Lending that prefetch back until the input ends keeps running + reserved within
        the input slots (Celery's QoS never goes below 1, so a full worker holds one extra).
        """
        job.accepted = True
        _call(job.accept_callback, pid, time_accepted)
        request = job.request
        qos = getattr(self._consumer, "qos", None)
        if qos is not None and getattr(request, "acknowledged", False):
            before = qos.value
            job.qos_lent = before - qos.decrement_eventually()

    def _return_prefetch(self, job: Job) -> None:
        if job.qos_lent:
            qos = getattr(self._consumer, "qos", None)
            if qos is not None:
                qos.increment_eventually(job.qos_lent)
            job.qos_lent = 0

    def _on_child_exit(self, child: Child) -> None:
        expected = child.state is ChildState.DRAINING
        child.state = ChildState.EXITED
        self._children.pop(child.results_fd, None)
        if self._hub is not None:
            self._hub.remove_reader(child.results_fd)
        for fd in (child.results_fd, child.jobs_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        child.process.join(5)
        exitcode = child.process.exitcode
        lost = [job for job in child.inflight.values() if job.accepted]
        unstarted = [job for job in child.inflight.values() if not job.accepted]
        child.inflight.clear()
        if expected and not lost:
            logger.info("Child %d exited after draining", child.pid)
        else:
            logger.error(
                "Child %d exited unexpectedly (%s) with %d inputs running; %d not yet started "
                "go to other children",
                child.pid,
                _describe_exit(exitcode),
                len(lost),
                len(unstarted),
            )
        self._waiting.extendleft(reversed(unstarted))
        for job in unstarted:
            job.child = None
        for job in lost:
            self._return_prefetch(job)
            error = WorkerLostError(
                f"Worker exited prematurely: {_describe_exit(exitcode)} Job: {job.task_id}."
            )
            _call(job.error_callback, _einfo_of(error))
        if not expected and not self._closing:
            self._spawn()
        self._dispatch_waiting()

    def _kill_all(self, signum: int) -> None:
        with self._lock:
            for child in list(self._children.values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signum)
        deadline = time.monotonic() + 10
        while self._children and time.monotonic() < deadline:
            self._poll_once(0.2)

    # -- reading without Celery's event loop -----------------------------------------------

    def _poll_once(self, timeout_s: float) -> None:
        fds = list(self._children)
        if not fds:
            return
        readable, _, _ = select.select(fds, [], [], timeout_s)
        for fd in readable:
            child = self._children.get(fd)
            if child is not None:
                self._on_readable(child)

    def _ensure_reader(self) -> None:
        """Without a hub (threaded worker), read children's messages on a thread."""
        if self._hub is not None or self._reader_thread is not None:
            return

        def read_forever() -> None:
            while not (self._closing and not self._children):
                if self._hub is not None:
                    return
                if self._children:
                    self._poll_once(0.2)
                else:
                    time.sleep(0.05)

        self._reader_thread = threading.Thread(
            target=read_forever, name="concurrent-pool-reader", daemon=True
        )
        self._reader_thread.start()

    # -- configuration ---------------------------------------------------------------------

    def _compute_slots_per_child(self) -> int:
        configured = setting(self.app, "concurrent_slots_per_child")
        if configured is not None:
            return int(configured)
        limits = [self.limits_for(name).max_inputs for name in self.app.tasks]
        return max([UNDECORATED_MAX_INPUTS, *limits])

    def _warn_unenforceable_limits(self) -> None:
        for name, task in self.app.tasks.items():
            settings = settings_for(task)
            if settings is None or settings.is_async:
                continue
            if task.soft_time_limit or task.time_limit:
                logger.warning(
                    "Task %s is a sync @concurrent task with time limits; its inputs run on "
                    "threads, which cannot be interrupted, so soft_time_limit/time_limit are "
                    "not enforced for it. Make it async def, or run it on a prefork worker.",
                    name,
                )

    def _hostname(self) -> str:
        initargs: tuple[Any, ...] = tuple(self.options.get("initargs") or ())
        return str(initargs[1]) if len(initargs) > 1 else "celery@localhost"

    def _task_info(self, children: list[Child]) -> dict[str, Any]:
        inflight: Counter[str] = Counter()
        for child in children:
            inflight.update(child.per_task)
        waiting = Counter(job.task_name for job in self._waiting)
        tasks: dict[str, Any] = {}
        for name in sorted(set(self._limits) | set(inflight)):
            limits = self.limits_for(name)
            tasks[name] = {
                "max_inputs": limits.max_inputs,
                "target_inputs": limits.target_inputs,
                "inflight": inflight[name],
                "waiting": waiting[name],
            }
        return tasks

    def __repr__(self) -> str:
        running = sum(c.running for c in self._children.values())
        return (
            f"<ConcurrentPool children={len(self._children)} running={running}/"
            f"{self.num_processes} waiting={len(self._waiting)}>"
        )


def _check_settings(app: Any) -> None:
    """Refuse settings the pool cannot work with, naming the fix."""
    slots = setting(app, "concurrent_slots_per_child")
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise ConcurrencyConfigError(
            f"concurrent_slots_per_child must be a whole number >= 1, got {slots!r}: "
            "e.g. app.conf.concurrent_slots_per_child = 100, or leave it unset to use the "
            "largest max_inputs"
        )
    for name in ("concurrent_shutdown_timeout", "concurrent_loop_block_warning"):
        value = setting(app, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConcurrencyConfigError(
                f"{name} must be a number of seconds >= 0, got {value!r}: e.g. app.conf.{name} = 30"
            )


def _child_main(
    app: Any, jobs_fd: int, results_fd: int, options: ChildOptions, close_fds: list[int]
) -> None:
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    run_child(app, jobs_fd, results_fd, options)


def _revoked_while_waiting(job: Job) -> bool:
    request = job.request
    revoked = getattr(request, "revoked", None)
    return bool(revoked()) if callable(revoked) else False


def _call(callback: Callable[..., Any] | None, *args: Any) -> None:
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        logger.exception("Pool callback %r raised", callback)


def _einfo_of(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown"
        return f"signal {-exitcode} ({name})"
    return f"exitcode {exitcode}"
