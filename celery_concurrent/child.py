"""The runtime inside one pool child: one persistent event loop plus a thread pool.

The parent sends ``RUN`` messages over a pipe; a reader thread hands them to the loop.
Async inputs run as asyncio tasks (see :mod:`celery_concurrent.bridge`), sync inputs on
threads. Each input is acknowledged (``ACCEPTED``) when it starts and reported (``DONE``)
with Celery's ``(failed, retval, runtime)`` tuple when it ends; writes are batched once per
loop iteration.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Celery
from celery.app.trace import build_tracer
from celery.concurrency.prefork import process_destructor, process_initializer
from celery.exceptions import SoftTimeLimitExceeded, Terminated, TimeLimitExceeded
from celery.utils.log import get_logger

from . import protocol
from .bridge import GreenletTrace, make_sync_facade, running_on_loop, set_current_input_id
from .decorator import settings_for

logger = get_logger(__name__)

TraceResult = tuple[int, Any, float]

#: Header values that repeat from one input to the next (the rest are ids, args, ...).
_REPEATED_VALUES = frozenset({"lang", "task", "origin", "hostname", "reply_to"})


def _share_strings(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Intern the request's header names and repeated values.

    Every input's request (Celery's headers plus delivery info) arrives freshly unpickled
    with its own copy of ~25 key strings, and the tracer keeps it for as long as the input
    runs; sharing them saves ~1.3 KB per in-flight input.
    """
    if len(args) < 3 or not isinstance(args[2], dict):
        return args
    request = {}
    for name, value in args[2].items():
        if isinstance(name, str):
            name = sys.intern(name)
        if name in _REPEATED_VALUES and isinstance(value, str):
            value = sys.intern(value)
        elif name == "delivery_info" and isinstance(value, dict):
            value = {
                sys.intern(k) if isinstance(k, str) else k: (
                    sys.intern(v) if isinstance(v, str) else v
                )
                for k, v in value.items()
            }
        request[name] = value
    return (args[0], args[1], request, *args[3:])


@dataclass(eq=False, slots=True)
class _Input:
    job_id: int
    label: str
    is_async: bool
    task: asyncio.Task[None] | None = None
    trace: GreenletTrace | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    terminated_by: int | None = None


@dataclass(frozen=True)
class ChildOptions:
    """What the parent tells a child at fork time."""

    hostname: str
    slots: int
    loop_block_warning_s: float
    soft_timeout_s: float | None
    timeout_s: float | None


class ChildRuntime:
    """Runs inputs for the parent until told to stop; one per child process."""

    def __init__(self, app: Celery, jobs_fd: int, results_fd: int, options: ChildOptions):
        self.app = app
        self.jobs_fd = jobs_fd
        self.results_fd = results_fd
        self.options = options
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.executor = ThreadPoolExecutor(
            max_workers=max(options.slots, 1), thread_name_prefix="concurrent-input"
        )
        self._async_tasks: dict[str, bool] = {}
        self._inputs: dict[int, _Input] = {}
        self._outbox: list[bytes] = []
        self._flush_scheduled = False
        self._stopping = False
        self._done = asyncio.Event()
        self._last_tick = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------

    def main(self) -> int:
        """Entry point in the child process; returns the exit code."""
        asyncio.set_event_loop(self.loop)
        process_initializer(self.app, self.options.hostname)
        self._prepare_tasks()
        threading.Thread(target=self._read_jobs, name="concurrent-reader", daemon=True).start()
        if self.options.loop_block_warning_s > 0:
            self._start_watchdog()
        self.loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        self._send((protocol.READY, self.pid))
        try:
            self.loop.run_until_complete(self._done.wait())
            self._flush()
        finally:
            self.executor.shutdown(wait=True)
            process_destructor(self.pid, 0)
            self.loop.close()
        return 0

    def _prepare_tasks(self) -> None:
        """Decide which tasks run on the loop; plain ``async def`` tasks are bridged too."""
        for name, task in self.app.tasks.items():
            settings = settings_for(task)
            if settings is not None:
                self._async_tasks[name] = settings.is_async
            elif inspect.iscoroutinefunction(task.run):
                task.run = make_sync_facade(task.run)
                task.__trace__ = build_tracer(
                    name, task, self.app.loader, self.options.hostname, app=self.app
                )
                self._async_tasks[name] = True
            else:
                self._async_tasks[name] = False

    def _read_jobs(self) -> None:
        reader = protocol.FrameReader()
        while True:
            try:
                data = os.read(self.jobs_fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                self.loop.call_soon_threadsafe(self._on_parent_gone)
                return
            messages = reader.feed(data)
            if messages:
                self.loop.call_soon_threadsafe(self._on_messages, messages)

    def _on_parent_gone(self) -> None:
        logger.warning(
            "child %d: the pool closed its pipe; cancelling %d inputs", self.pid, len(self._inputs)
        )
        for item in self._inputs.values():
            if item.task is not None:
                item.task.cancel()
        self._stopping = True
        self._maybe_finish()

    def _on_sigterm(self) -> None:
        """SIGTERM (e.g. to the whole process group) drains instead of killing inputs."""
        if not self._stopping:
            logger.info("child %d got SIGTERM: draining %d inputs", self.pid, len(self._inputs))
            self._stopping = True
            self._send((protocol.DRAINING, self.pid))
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._stopping and not self._inputs:
            self._done.set()

    # -- messages from the parent ----------------------------------------------------------

    def _on_messages(self, messages: list[tuple[Any, ...]]) -> None:
        for message in messages:
            kind = message[0]
            if kind == protocol.RUN:
                self._start(*message[1:])
            elif kind == protocol.CANCEL:
                self._cancel(message[1], message[2])
            elif kind == protocol.STOP:
                self._stopping = True
                self._maybe_finish()

    def _start(
        self,
        job_id: int,
        target: Callable[..., TraceResult],
        args: tuple[Any, ...],
        soft_timeout_s: float | None,
        timeout_s: float | None,
    ) -> None:
        args = _share_strings(args)
        name, task_id = args[0], args[1]
        is_async = self._async_tasks.get(name, False)
        item = _Input(job_id, f"{name}[{task_id}]", is_async)
        self._inputs[job_id] = item
        self._send((protocol.ACCEPTED, job_id, self.pid, time.monotonic()))
        if not is_async:
            future = self.executor.submit(_run_sync, target, args, task_id)
            future.add_done_callback(
                lambda f: self.loop.call_soon_threadsafe(self._sync_done, job_id, f)
            )
            return
        item.trace = GreenletTrace(target, args, task_id, item.label)
        item.task = self.loop.create_task(self._run_async(item))
        soft = soft_timeout_s or self.options.soft_timeout_s
        hard = timeout_s or self.options.timeout_s
        if soft:
            item.timers.append(self.loop.call_later(soft, self._soft_limit, item, soft))
        if hard:
            item.timers.append(self.loop.call_later(hard, self._hard_limit, item, hard))

    def _cancel(self, job_id: int, signum: int) -> None:
        item = self._inputs.get(job_id)
        if item is None:
            return
        if item.task is None:
            logger.warning(
                "Cannot terminate %s: it is a sync input running on a thread, and threads "
                "cannot be interrupted; it will run to completion",
                item.label,
            )
            return
        item.terminated_by = signum
        item.task.cancel()

    def _soft_limit(self, item: _Input, seconds: float) -> None:
        logger.warning("Soft time limit (%ss) exceeded for %s", seconds, item.label)
        if item.trace is not None and item.task is not None:
            item.trace.interrupt_with(SoftTimeLimitExceeded(seconds))
            item.task.cancel()

    def _hard_limit(self, item: _Input, seconds: float) -> None:
        logger.error("Hard time limit (%ss) exceeded for %s", seconds, item.label)
        if item.trace is not None and item.task is not None:
            item.trace.cancel_as(TimeLimitExceeded(seconds))
            item.task.cancel()

    # -- running inputs --------------------------------------------------------------------

    async def _run_async(self, item: _Input) -> None:
        assert item.trace is not None
        try:
            result: TraceResult = await item.trace
        except asyncio.CancelledError:
            result = (1, _einfo_of(Terminated(item.terminated_by or 0)), 0.0)
        except BaseException:  # the tracer itself failed; report like prefork would
            result = (1, ExceptionInfo(), 0.0)
        self._finish(item.job_id, result)

    def _sync_done(self, job_id: int, future: Future[TraceResult]) -> None:
        try:
            result = future.result()
        except BaseException:
            result = (1, ExceptionInfo(), 0.0)
        self._finish(job_id, result)

    def _finish(self, job_id: int, result: TraceResult) -> None:
        item = self._inputs.pop(job_id, None)
        if item is not None:
            for timer in item.timers:
                timer.cancel()
        self._send(_done_message(job_id, result))
        self._maybe_finish()

    # -- output ----------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        self._outbox.append(protocol.encode(message))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._outbox:
            data = b"".join(self._outbox)
            self._outbox.clear()
            protocol.write_all(self.results_fd, data)

    # -- blocked-loop watchdog -------------------------------------------------------------

    def _start_watchdog(self) -> None:
        threshold = self.options.loop_block_warning_s
        tick_s = threshold / 4

        def tick() -> None:
            self._last_tick = time.monotonic()
            self.loop.call_later(tick_s, tick)

        def watch() -> None:
            warned_at: float | None = None
            while not self._done.is_set():
                time.sleep(tick_s)
                last = self._last_tick
                lag = time.monotonic() - last
                if lag > threshold and warned_at != last:
                    warned_at = last
                    culprit = running_on_loop() or "code outside any input"
                    logger.warning(
                        "Event loop of child %d blocked for %.2fs by %s: a blocking call "
                        "inside an async def task stalls every input on this child; await "
                        "an async client or use asyncio.to_thread()",
                        self.pid,
                        lag,
                        culprit,
                    )

        self.loop.call_soon(tick)
        threading.Thread(target=watch, name="concurrent-watchdog", daemon=True).start()


def _run_sync(target: Callable[..., TraceResult], args: tuple[Any, ...], task_id: str) -> Any:
    set_current_input_id(task_id)
    try:
        return target(*args)
    finally:
        set_current_input_id(None)


def _einfo_of(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


def _done_message(job_id: int, result: TraceResult) -> tuple[Any, ...]:
    message = (protocol.DONE, job_id, result)
    try:
        protocol.encode(message)
    except Exception as exc:  # an exception that cannot be pickled
        _failed, _, runtime = result
        stand_in = RuntimeError(f"the task's outcome could not be sent to the pool: {exc!r}")
        return (protocol.DONE, job_id, (1, _einfo_of(stand_in), runtime))
    return message


def run_child(app: Celery, jobs_fd: int, results_fd: int, options: ChildOptions) -> None:
    """Process target: run a :class:`ChildRuntime` and exit with its code."""
    code = ChildRuntime(app, jobs_fd, results_fd, options).main()
    os._exit(code)
