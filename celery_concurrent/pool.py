"""ConcurrentPool: a Celery pool whose children each run many inputs at once.

The parent only consumes, dispatches and supervises. It hands each input to a child over
a non-blocking pipe written from Celery's event loop (the hub), relays the child's
``ACCEPTED``/``DONE`` messages to Celery's request callbacks, and watches each child's
process (:mod:`celery_concurrent.process`). Children trace inputs and store results
themselves, in parallel (:mod:`celery_concurrent.child`).

What the parent guarantees (the README's *Guarantees* section has the table):

- it never blocks on a child: frames wait in a per-child outbox, and a child gets no input
  before it is ready;
- an input that had started when its child died is reported once (``WorkerLostError``, or
  requeued under ``reject_on_worker_lost``); one that had not started goes to another child;
- limits a child cannot enforce (a blocked loop, a swallowed cancel, a sync thread) are
  enforced by replacing the child;
- after a lost connection it drops what it holds for the dead channel; on shutdown it keeps
  Celery's event loop turning, so acks and heartbeats go out while it drains.

``num_processes`` reports input slots (children x slots per child), and prefetch is
computed from the pool's state (:mod:`celery_concurrent.prefetch`).
"""

from __future__ import annotations

import contextlib
import heapq
import inspect
import itertools
import os
import select
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery.concurrency.base import BasePool
from celery.exceptions import Terminated, TimeLimitExceeded
from celery.utils import log as celery_log
from celery.utils.log import get_logger
from celery.worker import state as worker_state

from . import (
    control,  # noqa: F401  (registers pool_grow/pool_shrink that know input slots)
    protocol,
)
from . import inspect as _inspect  # noqa: F401  (registers `inspect concurrent_snapshot`)
from .child import ChildOptions, run_child
from .decorator import settings_for
from .defaults import UNDECORATED_MAX_INPUTS, setting
from .dispatch import Limits, choose_child
from .exceptions import ConcurrencyConfigError, ConcurrentError
from .info import pool_info
from .job import Job
from .metrics import INPUT_STATS, outcome_of
from .parking import return_to_queue
from .prefetch import PrefetchState, apply_prefetch, install_prefetch_step, prefetch_count
from .process import ChildProcess, ChildState, describe_exit, spawn_child
from .sync_backend import GEVENT, THREADS, check_backend

__all__ = ["ChildState", "ConcurrentPool", "PoolStartError"]

logger = get_logger(__name__)

#: How often the pool checks deadlines (time limits, start and drain timeouts, respawns).
TICK_S = 0.1
#: A child gets no new input while this many bytes wait in its outbox.
OUTBOX_LIMIT_BYTES = 1 << 20
#: Start failures (no child ever ready) after which the worker gives up at start-up.
MAX_START_FAILURES = 3
#: Longest wait between attempts to start a child that keeps failing.
MAX_RESTART_BACKOFF_S = 10.0
#: After a child drains on SIGTERM, wait this long before replacing it: a SIGTERM to the
#: whole process group reaches the parent too, and a shutting-down worker forks nothing.
SIGTERM_REPLACE_DELAY_S = 1.0
#: Parked inputs handed back in a row (nothing started in between) after which the pool
#: fetches nothing more until an input ends: the queue holds only capped tasks' inputs.
RETURNS_BEFORE_HOLDING = 8
#: Cold shutdown: how long cancelled inputs get to end before the children are killed.
COLD_SHUTDOWN_GRACE_S = 1.0


class PoolStartError(ConcurrentError):
    """No child of the pool could start (``worker_process_init`` failed or hung)."""


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
        if limit is not None and (isinstance(limit, bool) or int(limit) < 0):
            raise ConcurrencyConfigError(
                f"ConcurrentPool needs a child count >= 1, got {limit!r}: use -c 1 or more, "
                "or --autoscale=MAX,MIN"
            )
        self._children: dict[int, ChildProcess] = {}  # by pid
        self._waiting: deque[Job] = deque()
        self._parked = 0
        self._capped_tasks: set[str] = set()
        #: True after RETURNS_BEFORE_HOLDING parked inputs went back to the broker in a
        #: row: fetch nothing more until an input ends (see :mod:`celery_concurrent.parking`).
        self.holding = False
        self._returned_in_a_row = 0
        self._running_early_acked = 0
        self._job_ids = itertools.count(1)
        self._deadline_seq = itertools.count()
        self._deadlines: list[tuple[float, int, Job, str]] = []
        self._lock = threading.RLock()
        self._hub: Any = None
        self._tick_entry: Any = None
        self._fallback_thread: threading.Thread | None = None
        self._closing = False
        self._limits: dict[str, Limits] = {}
        self._is_async: dict[str, bool] = {}
        self._consumer: Any = None
        # --autoscale=MAX (min 0) starts at one child: a worker keeps one to see demand.
        self.desired_children = max(int(limit or 0), 1)
        self._slots_per_child: int | None = None
        self.children_started = 0
        self._start_failures = 0
        self._ever_ready = False
        self._respawn_at = 0.0
        self._last_start_error: str | None = None
        self.max_tasks_per_child: int | None = self.options.get("maxtasksperchild") or None
        self.max_memory_per_child_kb: int | None = (
            self.options.get("max_memory_per_child") or None
        )
        self._sync_backend = THREADS
        if self.app is not None:
            _check_settings(self.app)
            self._sync_backend = str(setting(self.app, "concurrent_sync_backend"))
            install_prefetch_step(self.app)

    # -- Celery's pool interface ------------------------------------------------------------

    @property
    def slots_per_child(self) -> int:
        """Inputs one child runs at once, all tasks together."""
        if self._slots_per_child is None:
            self._slots_per_child = slots_per_child_of(self.app)
        return self._slots_per_child

    def on_start(self) -> None:
        """Start the children; return once one is ready (raise if none can start)."""
        self._log_limit_enforcement()
        logger.info(
            "ConcurrentPool starting %d children x %d input slots",
            self.desired_children,
            self.slots_per_child,
        )
        with self._lock:
            self._maintain()
        while not self._ever_ready:
            if self._start_failures >= MAX_START_FAILURES:
                self._closing = True
                self._kill_all(signal.SIGKILL)
                raise PoolStartError(
                    f"no pool child could start: {self._start_failures} children failed "
                    f"before they were ready; last failure:\n{self._last_start_error}\n"
                    "Fix the worker_process_init handler (or loop_init), or raise "
                    "worker_proc_alive_timeout if the children need longer to start."
                )
            self._poll_once(TICK_S)

    def register_with_event_loop(self, loop: Any) -> None:
        with self._lock:
            self._hub = loop
            for child in self._children.values():
                self._watch(child)
            self._tick_entry = loop.call_repeatedly(TICK_S, self._tick)

    def on_apply(
        self,
        target: Callable[..., Any],
        args: Any = None,
        kwargs: Any = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        error_callback: Callable[..., Any] | None = None,
        timeout_callback: Callable[..., Any] | None = None,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        correlation_id: str | None = None,
        **_: Any,
    ) -> Job:
        args = tuple(args or ())
        task_name = str(args[0]) if args else ""
        job = Job(
            id=next(self._job_ids),
            task_name=task_name,
            task_id=correlation_id or (str(args[1]) if len(args) > 1 else ""),
            target=target,
            args=args,
            soft_timeout_s=soft_timeout,
            timeout_s=timeout,
            callback=callback,
            error_callback=error_callback,
            accept_callback=accept_callback,
            timeout_callback=timeout_callback,
            is_async=self._task_is_async(task_name),
            pool=self,
        )
        with self._lock:
            self._ensure_fallback_loop()
            if self._closing:
                _requeue(job)
            elif self._waiting or not self._place(job):
                self._waiting.append(job)
                self._dispatch_waiting()
                self._return_excess_parked()
        return job

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        """Celery's per-process terminate: a no-op here, as every caller also terminates
        the input through the handle ``on_apply`` returned (:meth:`terminate_input`)."""
        logger.debug("terminate_job(%s, %s): handled per input", pid, signal)

    def terminate_input(self, job: Job, signum: int) -> None:
        """Stop one input: cancel it in its child, or replace the child if it must."""
        with self._lock:
            if job.finished:
                return
            child = job.child
            if child is None:  # waiting in the parent: revoked ones are dropped there
                self._dispatch_waiting()
                return
            if not job.accepted:
                return  # Celery terminates it again once it is accepted
            if signum == signal.SIGKILL:
                self._replace_child_for(job, _einfo_of(Terminated(signum)), "revoked with SIGKILL")
                return
            logger.info("Terminating %s (signal %d)", job.label, signum)
            self._send(child, (protocol.CANCEL, job.id, signum))
            self._set_deadline(job, time.monotonic() + self._grace_s(), f"terminate:{signum}")

    def flush(self) -> None:
        """Connection lost: drop what waits here (the broker redelivers it)."""
        with self._lock:
            dropped = len(self._waiting)
            self._waiting.clear()
            for child in self._children.values():
                for job_id in child.outbox.discard_unstarted():
                    job = child.inflight.pop(job_id, None)
                    if job is not None:
                        child.per_task[job.task_name] -= 1
                        dropped += 1
            self._parked = 0
            if dropped:
                logger.info(
                    "Broker connection lost: %d inputs not yet started are left to the "
                    "broker, which redelivers them",
                    dropped,
                )
            self.update_prefetch()

    def on_stop(self) -> None:
        """Warm shutdown: requeue waiting inputs, let in-flight ones finish, then stop."""
        with self._lock:
            self._closing = True
            self._requeue_waiting()
            for child in list(self._children.values()):
                self._drain(child, "worker shutdown")
        if _in_signal_handler():
            return  # cold shutdown from a signal handler: on_terminate finishes the job
        timeout_s = float(setting(self.app, "concurrent_shutdown_timeout"))
        deadline = time.monotonic() + timeout_s
        drive_hub = self._hub is not None and not worker_state.should_terminate
        while self._children and time.monotonic() < deadline:
            if drive_hub:
                self._run_hub_once()
            else:
                self._poll_once(min(TICK_S, max(deadline - time.monotonic(), 0.0)))
        if self._children:
            self._stop_with_timeout(f"Warm shutdown timed out after {timeout_s:g}s")

    def on_terminate(self) -> None:
        """Cold shutdown: give cancelled inputs a moment, then kill the children."""
        with self._lock:
            self._closing = True
            self._requeue_waiting()
            for child in list(self._children.values()):
                self._drain(child, "cold shutdown")
        deadline = time.monotonic() + COLD_SHUTDOWN_GRACE_S
        while self._children and time.monotonic() < deadline:
            self._poll_once(TICK_S)
        if self._children:
            self._stop_with_timeout("Cold shutdown")

    def on_close(self) -> None:
        with self._lock:
            self._closing = True

    def grow(self, n: int = 1) -> None:
        """Start ``n`` more children; prefetch grows by their input slots."""
        if n < 1:
            raise ValueError(f"cannot grow the pool by {n}: give a number of children >= 1")
        with self._lock:
            if self._closing:
                return
            self.desired_children += n
            self._maintain()
            self.update_prefetch()

    def shrink(self, n: int = 1) -> None:
        """Drain the ``n`` least loaded children: they finish their inputs, then exit."""
        with self._lock:
            accepting = sorted(
                (c for c in self._children.values() if c.state in _COUNTED),
                key=lambda c: (c.state is ChildState.READY, c.running),
            )
            if n < 1:
                raise ValueError(f"cannot shrink the pool by {n}: give a number >= 1")
            if n > len(accepting) - 1:
                raise ValueError(
                    f"cannot shrink by {n}: the pool has {len(accepting)} accepting children "
                    "and keeps at least one"
                )
            self.desired_children -= n
            for child in accepting[:n]:
                self._drain(child, "scale-down")
            self.update_prefetch()

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

    def attach_consumer(self, consumer: Any) -> None:
        """Let the pool set prefetch from its state (see :mod:`celery_concurrent.prefetch`)."""
        self._consumer = consumer

    def prefetch_state(self) -> PrefetchState:
        """The counts the prefetch value is computed from, now."""
        consumer = self._consumer
        return PrefetchState(
            slots=self.num_processes,
            multiplier=int(getattr(consumer, "prefetch_multiplier", 1) or 1),
            running_early_acked=self._running_early_acked,
            scheduled=len(worker_state.scheduled_requests),
            parked=self._parked,
            max_parked=int(setting(self.app, "concurrent_max_parked")),
        )

    def update_prefetch(self) -> None:
        """Set the consumer's prefetch to what the pool's state calls for."""
        consumer = self._consumer
        if consumer is None or not getattr(consumer, "initial_prefetch_count", 0):
            return  # not attached, or prefetch unlimited by configuration
        if self.holding:  # exactly what is held now: the broker sends nothing more
            held = len(self._waiting) + sum(c.running for c in self._children.values())
            apply_prefetch(consumer, max(1, held - self._running_early_acked))
            return
        apply_prefetch(consumer, prefetch_count(self.prefetch_state()))

    def _get_info(self) -> dict[str, Any]:
        """``inspect stats`` / Flower's view of :meth:`snapshot` (see :mod:`.info`)."""
        return pool_info(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """The pool's live state, structured (children, tasks, prefetch as nested values)."""
        with self._lock:
            children = list(self._children.values())
            consumer_qos = getattr(self._consumer, "qos", None)
            state = self.prefetch_state()
            info: dict[str, Any] = {
                "implementation": f"{type(self).__module__}:{type(self).__name__}",
                "max-concurrency": self.num_processes,
                "processes": [c.pid for c in children if c.state in _COUNTED],
                "max-tasks-per-child": self.max_tasks_per_child,
                "max-memory-per-child": self.max_memory_per_child_kb,
                "put-guarded-by-semaphore": False,
                "timeouts": [self.options.get("soft_timeout"), self.options.get("timeout")],
                "slots-per-child": self.slots_per_child,
                "children": [
                    {"pid": c.pid, "state": c.state.value, "inflight": c.running} for c in children
                ],
                "inflight": sum(c.running for c in children),
                "waiting": len(self._waiting),
                "parked": self._parked,
                "holding": self.holding,
                "prefetch": {
                    "value": getattr(consumer_qos, "value", None),
                    "expected": prefetch_count(state),
                    "slots": state.slots,
                    "multiplier": state.multiplier,
                    "running-early-acked": state.running_early_acked,
                    "scheduled": state.scheduled,
                    "parked": state.parked,
                    "max-parked": state.max_parked,
                },
                "children-started": self.children_started,
                "tasks": self._task_info(children),
            }
        return info

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

    def _task_is_async(self, task_name: str) -> bool:
        known = self._is_async.get(task_name)
        if known is None:
            task = self.app.tasks.get(task_name) if self.app is not None else None
            settings = settings_for(task) if task is not None else None
            if settings is not None:
                known = settings.is_async
            else:
                known = task is not None and inspect.iscoroutinefunction(task.run)
            self._is_async[task_name] = known
        return known

    def _dispatchable(self) -> list[ChildProcess]:
        return [
            c
            for c in self._children.values()
            if c.accepting and c.outbox.pending_bytes < OUTBOX_LIMIT_BYTES
        ]

    def _place(self, job: Job, candidates: Iterable[ChildProcess] | None = None) -> bool:
        child = choose_child(
            self._dispatchable() if candidates is None else candidates,
            job.task_name,
            self.limits_for(job.task_name),
            self.slots_per_child,
        )
        if child is None:
            return False
        job.child = child
        self._returned_in_a_row = 0
        child.inflight[job.id] = job
        child.per_task[job.task_name] += 1
        child.dispatched += 1
        self._send(
            child,
            (protocol.RUN, job.id, job.target, job.args, job.soft_timeout_s, job.timeout_s),
            tag=job.id,
        )
        if self.max_tasks_per_child and child.dispatched >= self.max_tasks_per_child:
            self._drain(child, f"max-tasks-per-child={self.max_tasks_per_child}")
            self._maintain()
        return True

    def _dispatch_waiting(self) -> None:
        """Start waiting inputs where a slot is free, in order, skipping capped tasks;
        then set prefetch from the new state (called after every batch of events).

        Also counts the *parked* inputs: those that wait only because their own task is at
        its cap while other tasks could still start.
        """
        if not self._waiting:
            self._parked = 0
            self.update_prefetch()
            return
        still_waiting: deque[Job] = deque()
        capped: set[str] = set()
        candidates = self._dispatchable()
        slots = self.slots_per_child
        while self._waiting:
            job = self._waiting.popleft()
            if _revoked_while_waiting(job):
                job.finished = True
                INPUT_STATS.observe_finished(job.task_name, "revoked", None)
                continue
            if job.task_name in capped or not candidates:
                still_waiting.append(job)
                continue
            if not self._place(job, candidates):
                capped.add(job.task_name)
                still_waiting.append(job)
                candidates = [c for c in candidates if c.running < slots and c.accepting]
        self._waiting = still_waiting
        self._capped_tasks = capped
        has_free_slots = any(c.running < slots for c in self._dispatchable())
        parked = (
            sum(1 for job in still_waiting if job.task_name in capped) if has_free_slots else 0
        )
        self._parked = parked
        self.update_prefetch()

    def _return_excess_parked(self) -> None:
        """Hand the newest parked inputs beyond ``concurrent_max_parked`` back to the broker."""
        excess = self._parked - int(setting(self.app, "concurrent_max_parked"))
        if excess <= 0:
            return
        kept: list[Job] = []
        while self._waiting and excess > 0:
            job = self._waiting.pop()
            if job.task_name in self._capped_tasks and return_to_queue(job, self.app):
                excess -= 1
                self._parked -= 1
                self._returned_in_a_row += 1
                self.holding = self._returned_in_a_row >= RETURNS_BEFORE_HOLDING
                logger.debug("Parked %s handed back to the broker (%d parked)", job.label,
                             self._parked)  # fmt: skip
            else:
                kept.append(job)
        self._waiting.extend(reversed(kept))
        self.update_prefetch()

    def _requeue_waiting(self) -> None:
        while self._waiting:
            _requeue(self._waiting.popleft())
        self._parked = 0

    # -- children --------------------------------------------------------------------------

    def _maintain(self) -> None:
        """Start children until the wanted number take inputs (respecting the backoff)."""
        if self._closing or worker_state.should_stop or worker_state.should_terminate:
            return
        counted = sum(1 for c in self._children.values() if c.state in _COUNTED)
        missing = self.desired_children - counted
        if missing <= 0 or time.monotonic() < self._respawn_at:
            return
        for _ in range(missing):
            self._spawn()

    def _spawn(self) -> ChildProcess:
        inherited = [fd for c in self._children.values() for fd in c.fds()]
        options = ChildOptions(
            hostname=self._hostname(),
            slots=self.slots_per_child,
            loop_block_warning_s=float(setting(self.app, "concurrent_loop_block_warning")),
            soft_timeout_s=self.options.get("soft_timeout"),
            timeout_s=self.options.get("timeout"),
            max_memory_per_child_kb=self.max_memory_per_child_kb,
            sync_backend=self._sync_backend,
        )
        self.children_started += 1
        child = spawn_child(
            _child_main, (self.app, options), index=self.children_started, inherited=inherited
        )
        self._children[child.pid] = child
        self._watch(child)
        logger.info("Child %d started (%d children)", child.pid, len(self._children))
        return child

    def _drain(self, child: ChildProcess, reason: str) -> None:
        """Stop giving ``child`` inputs; it exits once its own are done."""
        if child.state in (ChildState.DRAINING, ChildState.EXITED):
            return
        was_starting = child.state is ChildState.STARTING
        child.state = ChildState.DRAINING
        child.drain_reason = reason
        child.drain_deadline = time.monotonic() + float(
            setting(self.app, "concurrent_shutdown_timeout")
        )
        if was_starting:  # nothing to finish; don't wait for its init
            child.kill(signal.SIGKILL, reason=f"{reason} before it was ready")
            return
        self._send(child, (protocol.STOP,))
        logger.info("Child %d draining (%s; %d inputs in flight)", child.pid, reason, child.running)

    def _send(self, child: ChildProcess, message: tuple[Any, ...], tag: Any = None) -> None:
        if not child.send(message, tag) and self._hub is not None:
            self._hub.add_writer(child.jobs_fd, self._on_writable, child)

    def _watch(self, child: ChildProcess) -> None:
        hub = self._hub
        if hub is None:
            return
        hub.add_reader(child.results_fd, self._on_results, child)
        if child.pidfd is not None:
            hub.add_reader(child.pidfd, self._on_pidfd, child)
        if child.outbox:
            hub.add_writer(child.jobs_fd, self._on_writable, child)

    def _unwatch(self, child: ChildProcess) -> None:
        hub = self._hub
        if hub is None:
            return
        for fd in (child.results_fd, child.pidfd):
            if fd is not None:
                hub.remove_reader(fd)
        hub.remove_writer(child.jobs_fd)

    # -- events from children --------------------------------------------------------------

    def _on_writable(self, child: ChildProcess) -> None:
        with self._lock:
            if child.write_pending() and self._hub is not None:
                self._hub.remove_writer(child.jobs_fd)
                self._dispatch_waiting()

    def _on_results(self, child: ChildProcess) -> None:
        with self._lock:
            if child.state is ChildState.EXITED:
                return
            for message in child.read_messages():
                self._handle(child, message)
            if not child.results_open:
                if self._hub is not None:
                    self._hub.remove_reader(child.results_fd)
                if child.pidfd is None and child.exited():
                    self._on_child_exit(child)
            self._dispatch_waiting()

    def _on_pidfd(self, child: ChildProcess) -> None:
        with self._lock:
            self._on_child_exit(child)

    def _handle(self, child: ChildProcess, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == protocol.DONE:
            self._on_done(child, message[1], message[2])
        elif kind == protocol.ACCEPTED:
            self._on_accepted(child, message[1], message[2], message[3])
        elif kind == protocol.READY:
            if child.state is ChildState.STARTING:
                child.state = ChildState.READY
            child.ready_at = time.monotonic()
            self._ever_ready = True
            self._start_failures = 0
            logger.debug("Child %d ready in %.2fs", child.pid, child.ready_at - child.started_at)
        elif kind == protocol.DRAINING:
            reason = message[2] if len(message) > 2 else "signal"
            if child.state is ChildState.READY:
                if reason == "SIGTERM":
                    self._respawn_at = max(
                        self._respawn_at, time.monotonic() + SIGTERM_REPLACE_DELAY_S
                    )
                self._drain(child, reason)
                self._maintain()
        elif kind == protocol.INIT_FAILED:
            child.init_error = message[2]

    def _on_accepted(self, child: ChildProcess, job_id: int, pid: int, at: float) -> None:
        job = child.inflight.get(job_id)
        if job is None or job.finished:
            return
        job.accepted_at = at
        INPUT_STATS.observe_started(job.task_name, max(at - job.received_at, 0.0))
        _call(job.accept_callback, pid, at)  # Celery acks here unless acks_late
        if getattr(job.request, "acknowledged", False) and not job.finished:
            job.early_acked = True
            self._running_early_acked += 1
        limit = job.timeout_s or self.options.get("timeout")
        if limit and not job.finished:
            # An async input (or a gevent greenlet) is stopped by its child at the limit; this
            # is the backstop. A thread cannot be stopped in a C call: the limit is the deadline.
            stoppable = job.is_async or self._sync_backend == GEVENT
            grace = self._grace_s() if stoppable else 0.0
            self._set_deadline(job, at + float(limit) + grace, "time-limit")

    def _on_done(self, child: ChildProcess, job_id: int, result: tuple[Any, Any, float]) -> None:
        job = child.inflight.pop(job_id, None)
        self.holding = False
        if job is None:
            return
        self._forget(child, job)
        if job.finished:
            return  # already reported by the parent (a limit it enforced)
        job.finished = True
        failed, retval, runtime = result
        INPUT_STATS.observe_finished(job.task_name, outcome_of(bool(failed), retval), runtime)
        _call(job.callback, result)

    def _forget(self, child: ChildProcess, job: Job) -> None:
        child.per_task[job.task_name] -= 1
        if job.early_acked:
            job.early_acked = False
            self._running_early_acked -= 1

    def _on_child_exit(self, child: ChildProcess) -> None:
        if child.state is ChildState.EXITED:
            return
        for message in child.read_messages():  # what it wrote before dying
            self._handle(child, message)
        previous = child.state
        child.state = ChildState.EXITED
        self._unwatch(child)
        child.process.join(1)
        child.close()
        self._children.pop(child.pid, None)
        exit_text = describe_exit(child.process.exitcode)
        lost = [job for job in child.inflight.values() if job.accepted and not job.finished]
        unstarted = [job for job in child.inflight.values() if not job.accepted]
        for job in child.inflight.values():
            self._forget(child, job)
        child.inflight.clear()
        if child.ready_at is None and previous is not ChildState.DRAINING:
            self._on_start_failure(child, exit_text)
        elif previous is ChildState.DRAINING and not lost and child.kill_reason is None:
            logger.info("Child %d exited after draining (%s)", child.pid, child.drain_reason)
        else:
            logger.error(
                "Child %d exited unexpectedly (%s%s) with %d inputs running%s; %d not yet "
                "started go to other children",
                child.pid,
                exit_text,
                f"; {child.kill_reason}" if child.kill_reason else "",
                len(lost),
                f" ({', '.join(j.label for j in lost[:10])})" if lost else "",
                len(unstarted),
            )
        for job in reversed(unstarted):
            job.child = None
            if self._closing:
                _requeue(job)
            else:
                self._waiting.appendleft(job)
        for job in lost:
            job.finished = True
            INPUT_STATS.observe_finished(job.task_name, "lost", None)
            error = WorkerLostError(f"Worker exited prematurely: {exit_text} Job: {job.task_id}.")
            _call(job.error_callback, _einfo_of(error))
        self._maintain()
        self._dispatch_waiting()

    def _on_start_failure(self, child: ChildProcess, exit_text: str) -> None:
        if self._closing:
            return
        self._start_failures += 1
        delay = min(0.1 * 2 ** (self._start_failures - 1), MAX_RESTART_BACKOFF_S)
        self._respawn_at = time.monotonic() + delay
        why = child.init_error or child.kill_reason or "no error reported"
        self._last_start_error = f"child {child.pid} ({exit_text}): {why}"
        logger.error(
            "Child %d failed to start (%s); starting another in %.1fs (failure %d in a row):\n%s",
            child.pid,
            exit_text,
            delay,
            self._start_failures,
            why,
        )

    # -- limits the parent enforces --------------------------------------------------------

    def _grace_s(self) -> float:
        return float(setting(self.app, "concurrent_cancel_grace"))

    def _set_deadline(self, job: Job, at: float, kind: str) -> None:
        heapq.heappush(self._deadlines, (at, next(self._deadline_seq), job, kind))

    def _tick(self) -> None:
        """Deadlines: time limits, unanswered cancels, start and drain timeouts, respawns."""
        now = time.monotonic()
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, job, kind = heapq.heappop(self._deadlines)
                if job.finished or job.child is None or not job.child.alive:
                    continue
                if kind == "time-limit":
                    self._enforce_time_limit(job)
                else:
                    signum = int(kind.partition(":")[2])
                    self._replace_child_for(
                        job,
                        _einfo_of(Terminated(signum)),
                        f"did not stop within {self._grace_s():g}s of its terminate",
                    )
            alive_timeout_s = float(self.app.conf.worker_proc_alive_timeout or 4.0)
            for child in list(self._children.values()):
                if child.pidfd is None and child.exited():
                    self._on_child_exit(child)
                elif (
                    child.state is ChildState.STARTING
                    and now - child.started_at > alive_timeout_s
                    and child.kill_reason is None
                ):
                    child.kill(
                        reason=f"not ready within worker_proc_alive_timeout={alive_timeout_s:g}s"
                    )
                elif (
                    child.state is ChildState.DRAINING
                    and child.drain_deadline is not None
                    and now > child.drain_deadline
                    and child.kill_reason is None
                ):
                    child.kill(reason=f"still running {child.running} inputs after draining for "
                               "concurrent_shutdown_timeout")  # fmt: skip
            self._maintain()

    def _enforce_time_limit(self, job: Job) -> None:
        limit = float(job.timeout_s or self.options.get("timeout") or 0)
        exc = TimeLimitExceeded(limit)
        self._replace_child_for(job, _einfo_of(exc), f"hard time limit ({limit:g}s) exceeded")
        _call(job.timeout_callback, False, limit)

    def _replace_child_for(self, job: Job, outcome: ExceptionInfo, reason: str) -> None:
        """Report ``outcome`` for ``job`` now and kill its child; the child's other inputs
        are lost as in any child crash (the documented blast radius)."""
        child = job.child
        if child is None or job.finished:
            return
        child.inflight.pop(job.id, None)
        self._forget(child, job)
        job.finished = True
        others = child.running
        logger.error(
            "%s %s: replacing child %d (its %d other inputs are lost with it)",
            job.label,
            reason,
            child.pid,
            others,
        )
        INPUT_STATS.observe_finished(job.task_name, outcome_of(True, outcome), None)
        _call(job.error_callback, outcome)
        if child.state is not ChildState.DRAINING:
            child.state = ChildState.DRAINING
            child.drain_reason = reason
        child.kill(signal.SIGKILL, reason=f"{job.label} {reason}")
        self._maintain()

    # -- shutdown --------------------------------------------------------------------------

    def _stop_with_timeout(self, what: str) -> None:
        """Kill the remaining children; acks_late inputs go back to the broker unacked,
        early-acked ones fail with WorkerLostError (their message is already gone)."""
        with self._lock:
            running = [
                job
                for child in self._children.values()
                for job in child.inflight.values()
                if job.accepted and not job.finished
            ]
            back = [job for job in running if job.acks_late]
            for job in back:
                job.finished = True  # no outcome: the message stays unacked and is redelivered
            failing = [job for job in running if not job.acks_late]
            logger.warning(
                "%s with %d inputs running: stopping the children. %d acks_late inputs go "
                "back to the broker (redelivered): %s. %d early-acked inputs fail with "
                "WorkerLostError: %s.",
                what,
                len(running),
                len(back),
                ", ".join(j.label for j in back[:20]) or "none",
                len(failing),
                ", ".join(j.label for j in failing[:20]) or "none",
            )
        self._kill_all(signal.SIGKILL)

    def _kill_all(self, signum: int) -> None:
        with self._lock:
            for child in list(self._children.values()):
                child.kill(signum, reason="worker shutdown")
        deadline = time.monotonic() + 10
        while self._children and time.monotonic() < deadline:
            self._poll_once(TICK_S)

    def _run_hub_once(self) -> None:
        try:
            self._hub.run_once()
        except Exception:
            logger.exception("Error in the event loop while draining")
            self._poll_once(TICK_S)

    # -- reading without Celery's event loop -----------------------------------------------

    def _poll_once(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the children's fds and handle what is ready."""
        with self._lock:
            readers: dict[int, tuple[Callable[[ChildProcess], None], ChildProcess]] = {}
            writers: dict[int, ChildProcess] = {}
            for child in self._children.values():
                if child.results_open:
                    readers[child.results_fd] = (self._on_results, child)
                if child.pidfd is not None:
                    readers[child.pidfd] = (self._on_pidfd, child)
                if child.outbox:
                    writers[child.jobs_fd] = child
        if readers or writers:
            try:
                readable, writable, _ = select.select(list(readers), list(writers), [], timeout_s)
            except (OSError, ValueError):  # an fd closed meanwhile
                readable, writable = [], []
            for fd in readable:
                handler, child = readers[fd]
                handler(child)
            for fd in writable:
                with self._lock:
                    writers[fd].write_pending()
        else:
            time.sleep(timeout_s)
        self._tick()

    def _ensure_fallback_loop(self) -> None:
        """Without a hub (a worker without an event loop), run the pool's loop on a thread."""
        if self._hub is not None or self._fallback_thread is not None:
            return

        def run() -> None:
            while not (self._closing and not self._children):
                if self._hub is not None:
                    return
                self._poll_once(TICK_S)

        self._fallback_thread = threading.Thread(
            target=run, name="concurrent-pool-loop", daemon=True
        )
        self._fallback_thread.start()

    # -- configuration ---------------------------------------------------------------------

    def _log_limit_enforcement(self) -> None:
        """Say, per task with time limits, how each limit is enforced."""
        worker_soft = self.options.get("soft_timeout")
        worker_hard = self.options.get("timeout")
        on_gevent = self._sync_backend == GEVENT
        for name, task in sorted(self.app.tasks.items()):
            if name.startswith("celery."):
                continue
            soft = task.soft_time_limit or worker_soft
            hard = task.time_limit or worker_hard
            if not (soft or hard):
                continue
            if self._task_is_async(name):
                logger.info(
                    "Task %s (async): soft_time_limit=%s raises SoftTimeLimitExceeded at its "
                    "current await; time_limit=%s cancels it, and replaces its child if it "
                    "does not stop within concurrent_cancel_grace",
                    name,
                    soft,
                    hard,
                )
            elif on_gevent:
                logger.info(
                    "Task %s (sync, on gevent): soft_time_limit=%s raises "
                    "SoftTimeLimitExceeded in its greenlet at once, also inside a cooperative "
                    "sleep or socket read; time_limit=%s kills its greenlet with "
                    "TimeLimitExceeded, and replaces its child if the greenlet does not stop "
                    "within concurrent_cancel_grace (CPU-bound code never yields)",
                    name,
                    soft,
                    hard,
                )
            else:
                logger.warning(
                    "Task %s (sync, on threads): soft_time_limit=%s raises "
                    "SoftTimeLimitExceeded in its thread at the next Python bytecode (not "
                    "inside a blocking C call such as time.sleep or a socket read); "
                    "time_limit=%s is enforced by replacing its child, whose other inputs "
                    "then fail with WorkerLostError",
                    name,
                    soft,
                    hard,
                )

    def _hostname(self) -> str:
        initargs: tuple[Any, ...] = tuple(self.options.get("initargs") or ())
        return str(initargs[1]) if len(initargs) > 1 else "celery@localhost"

    def _task_info(self, children: list[ChildProcess]) -> dict[str, Any]:
        inflight: Counter[str] = Counter()
        for child in children:
            inflight.update(child.per_task)
        waiting = Counter(job.task_name for job in self._waiting)
        tasks: dict[str, Any] = {}
        for name in sorted(set(self._limits) | set(inflight)):
            if name.startswith("celery."):
                continue
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
            f"{self.num_processes} waiting={len(self._waiting)} parked={self._parked}>"
        )


#: Child states that count toward the wanted number of children.
_COUNTED = (ChildState.STARTING, ChildState.READY)


def slots_per_child_of(app: Any) -> int:
    """Input slots of each child: ``concurrent_slots_per_child``, else the largest max_inputs."""
    configured = setting(app, "concurrent_slots_per_child")
    if configured is not None:
        return int(configured)
    limits = [found.max_inputs for found in map(settings_for, app.tasks.values()) if found]
    return max([UNDECORATED_MAX_INPUTS, *limits])


def _check_settings(app: Any) -> None:
    """Refuse settings the pool cannot work with, naming the fix."""
    slots = setting(app, "concurrent_slots_per_child")
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise ConcurrencyConfigError(
            f"concurrent_slots_per_child must be a whole number >= 1, got {slots!r}: "
            "e.g. app.conf.concurrent_slots_per_child = 100, or leave it unset to use the "
            "largest max_inputs"
        )
    for name in (
        "concurrent_shutdown_timeout",
        "concurrent_loop_block_warning",
        "concurrent_cancel_grace",
    ):
        value = setting(app, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConcurrencyConfigError(
                f"{name} must be a number of seconds >= 0, got {value!r}: e.g. app.conf.{name} = 30"
            )
    check_backend(setting(app, "concurrent_sync_backend"))
    parked = setting(app, "concurrent_max_parked")
    if isinstance(parked, bool) or not isinstance(parked, int) or parked < 0:
        raise ConcurrencyConfigError(
            f"concurrent_max_parked must be a whole number >= 0, got {parked!r}: e.g. "
            "app.conf.concurrent_max_parked = 100 (0: parked inputs hold prefetch)"
        )


def _child_main(
    app: Any, options: ChildOptions, jobs_fd: int, results_fd: int, close_fds: list[int]
) -> None:
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    run_child(app, jobs_fd, results_fd, options)


def _in_signal_handler() -> bool:
    """True inside Celery's shutdown signal handlers (the main thread was interrupted
    anywhere, possibly inside the pool: don't drive the event loop from there)."""
    return bool(getattr(celery_log, "_in_sighandler", False))


def _requeue(job: Job) -> None:
    """Hand a job that never started back to the broker."""
    job.finished = True
    request = job.request
    try:
        if request is not None and hasattr(request, "reject"):
            request.reject(requeue=True)
    except Exception as exc:  # the broker redelivers unacked messages anyway
        logger.warning("Could not requeue %s: %r", job.label, exc)


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
