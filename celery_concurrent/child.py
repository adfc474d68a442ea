"""The runtime inside one pool child: one persistent event loop plus a thread pool.

Threads and their jobs:

- the **loop thread** runs async inputs as asyncio tasks (see :mod:`celery_concurrent.bridge`)
  and does all bookkeeping;
- the **reader thread** reads the parent's messages and hands them to the loop;
- the **writer thread** writes the child's messages to the parent, so a slow parent never
  blocks the loop; the loop hands it one batch per loop iteration;
- sync inputs run on the child's sync backend (:mod:`celery_concurrent.sync_backend`):
  input threads, or gevent greenlets sharing the loop's thread.

An input starts only once its ``ACCEPTED`` message is in the pipe: if the child dies, the
parent knows exactly which inputs had started (they are lost, once) and which had not (they
go to another child), so a poison input cannot be re-dispatched from crash to crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Celery, signals
from celery.app.trace import build_tracer
from celery.concurrency.prefork import process_destructor, process_initializer
from celery.exceptions import SoftTimeLimitExceeded, Terminated, TimeLimitExceeded
from celery.utils.log import get_logger

from . import protocol, result_writer
from .bridge import (
    GreenletTrace,
    input_task_factory,
    make_sync_facade,
    running_on_loop,
    set_current_input_id,
)
from .decorator import settings_for
from .lifecycle import ChildLifecycle
from .sync_backend import (
    GEVENT,
    THREADS,
    GeventBackend,
    OsQueue,
    Outcome,
    make_backend,
    os_sleep,
    start_os_thread,
)

logger = get_logger(__name__)

TraceResult = tuple[int, Any, float]

#: Exit code of a child whose reader or writer thread failed (logged before exiting).
EXIT_INTERNAL_ERROR = 70
#: Exit code of a child whose ``worker_process_init``, ``loop_init`` or ``@enter`` failed.
EXIT_INIT_FAILED = 71

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


class InputCancelled(BaseException):
    """Raised inside a sync input's thread to stop it (terminate/revoke).

    A BaseException, so that Celery's tracer lets it through instead of recording a
    FAILURE over the REVOKED state the worker already stored.
    """


@dataclass(eq=False, slots=True)
class _Input:
    job_id: int
    label: str
    is_async: bool
    start: Callable[[], None] | None = None  # runs once ACCEPTED is written
    task: asyncio.Task[None] | None = None
    trace: GreenletTrace | None = None
    sync_handle: Any = None  # sync inputs: the thread or greenlet running it, once running
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    terminated_by: int | None = None
    finished: bool = False


@dataclass(frozen=True)
class ChildOptions:
    """What the parent tells a child at fork time."""

    hostname: str
    slots: int
    loop_block_warning_s: float
    soft_timeout_s: float | None
    timeout_s: float | None
    max_memory_per_child_kb: int | None = None
    sync_backend: str = THREADS


class _Writer:
    """Writes the child's frames to the parent on a thread of its own.

    The loop never waits for the pipe: it hands over a batch and goes on. After each batch
    is written, ``on_written`` runs on the loop with the batch's callbacks.
    """

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = fd
        self._loop = loop
        self._queue: OsQueue[tuple[bytes, list[Callable[[], None]]] | None] = OsQueue()
        self._thread: Any = None

    def start(self) -> None:
        self._thread = start_os_thread(self._run, "concurrent-writer")

    def put(self, data: bytes, after: list[Callable[[], None]]) -> None:
        self._queue.put((data, after))

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                data, after = item
                protocol.write_all(self._fd, data)
                if after:
                    self._loop.call_soon_threadsafe(_run_all, after)
        except BrokenPipeError:
            os._exit(0)  # the parent is gone: nobody is left to report to
        except BaseException:
            _die("writer thread failed")


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        callback()


def _die(what: str) -> None:
    """Log the current exception with its traceback and exit: a silent half-dead child
    would hold its inputs forever; a dead one is seen by the parent at once."""
    logger.critical("child %d: %s; exiting", os.getpid(), what, exc_info=True)
    os._exit(EXIT_INTERNAL_ERROR)


class ChildRuntime:
    """Runs inputs for the parent until told to stop; one per child process."""

    def __init__(self, app: Celery, jobs_fd: int, results_fd: int, options: ChildOptions):
        self.app = app
        self.jobs_fd = jobs_fd
        self.results_fd = results_fd
        self.options = options
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.loop.set_task_factory(input_task_factory)
        self.lifecycle = ChildLifecycle(app, self.loop)
        self.sync_backend = make_backend(options.sync_backend, options.slots)
        self.writer = _Writer(results_fd, self.loop)
        self._async_tasks: dict[str, bool] = {}
        self._inputs: dict[int, _Input] = {}
        self._outbox: list[bytes] = []
        self._after_write: list[Callable[[], None]] = []
        self._flush_scheduled = False
        self._stopping = False
        self._draining_sent = False
        self._done = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def main(self) -> int:
        """Entry point in the child process; returns the exit code."""
        asyncio.set_event_loop(self.loop)
        try:
            _initialize(self.app, self.options.hostname)
            self._prepare_tasks()
            self.lifecycle.start()
        except BaseException as exc:
            text = "".join(traceback.format_exception(exc))
            logger.error("child %d: start-up failed:\n%s", self.pid, text)
            with contextlib.suppress(OSError):
                protocol.write_all(
                    self.results_fd, protocol.encode((protocol.INIT_FAILED, self.pid, text))
                )
            return EXIT_INIT_FAILED
        self.writer.start()
        start_os_thread(self._read_jobs, "concurrent-reader")
        if self.options.loop_block_warning_s > 0:
            LoopWatchdog(
                self.loop,
                self.options.loop_block_warning_s,
                self._done,
                shares_thread=self.options.sync_backend == GEVENT,
            ).start()
        self.loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        self._send((protocol.READY, self.pid))
        try:
            self.loop.run_until_complete(self._done.wait())
            self.lifecycle.stop()
            self._flush()
            self.writer.close()
        finally:
            self.sync_backend.shutdown()
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
        try:
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
        except BaseException:
            _die("reader thread failed")

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
        self._stop_taking_inputs("SIGTERM")
        self._maybe_finish()

    def _stop_taking_inputs(self, reason: str) -> None:
        self._stopping = True
        if not self._draining_sent:
            self._draining_sent = True
            self._send((protocol.DRAINING, self.pid, reason))

    def _maybe_finish(self) -> None:
        if self._stopping and not self._inputs:
            self._done.set()

    # -- messages from the parent ----------------------------------------------------------

    def _on_messages(self, messages: list[tuple[Any, ...]]) -> None:
        for message in messages:
            kind = message[0]
            if kind == protocol.RUN:
                self._accept(*message[1:])
            elif kind == protocol.CANCEL:
                self._cancel(message[1], message[2])
            elif kind == protocol.STOP:
                self._stopping = True
                self._maybe_finish()

    def _accept(
        self,
        job_id: int,
        target: Callable[..., TraceResult],
        args: tuple[Any, ...],
        soft_timeout_s: float | None,
        timeout_s: float | None,
    ) -> None:
        """Record the input and send ACCEPTED; it starts once that is written."""
        args = _share_strings(args)
        name, task_id = args[0], args[1]
        is_async = self._async_tasks.get(name, False)
        item = _Input(job_id, f"{name}[{task_id}]", is_async)
        self._inputs[job_id] = item
        soft = soft_timeout_s or self.options.soft_timeout_s
        hard = timeout_s or self.options.timeout_s

        def start() -> None:
            if item.finished:
                return
            if item.terminated_by is not None:  # cancelled before it could start
                self._finish(item, (1, _einfo_of(Terminated(item.terminated_by)), 0.0))
                return
            context = self.lifecycle.context.copy()
            if is_async:
                item.trace = GreenletTrace(target, args, task_id, item.label, context)
                item.task = self.loop.create_task(self._run_async(item))
            else:

                def done(outcome: Outcome) -> None:
                    self.loop.call_soon_threadsafe(self._sync_done, item, outcome)

                self.sync_backend.submit(
                    lambda: context.run(self._run_sync, item, target, args, task_id), done
                )
            if soft:
                item.timers.append(self.loop.call_later(soft, self._soft_limit, item, soft))
            if hard:
                item.timers.append(self.loop.call_later(hard, self._hard_limit, item, hard))

        self._send((protocol.ACCEPTED, job_id, self.pid, time.monotonic()), after=start)

    def _cancel(self, job_id: int, signum: int) -> None:
        item = self._inputs.get(job_id)
        if item is None or item.finished:
            return
        item.terminated_by = signum
        if item.task is not None:
            item.task.cancel()
        elif item.sync_handle is not None:
            self.sync_backend.raise_in(item.sync_handle, InputCancelled)
        # else: not started yet; start() sees terminated_by

    def _soft_limit(self, item: _Input, seconds: float) -> None:
        logger.warning("Soft time limit (%ss) exceeded for %s", seconds, item.label)
        if item.trace is not None and item.task is not None:
            item.trace.interrupt_with(SoftTimeLimitExceeded(seconds))
            item.task.cancel()
        elif item.sync_handle is not None:
            self.sync_backend.raise_in(item.sync_handle, SoftTimeLimitExceeded)

    def _hard_limit(self, item: _Input, seconds: float) -> None:
        logger.error("Hard time limit (%ss) exceeded for %s", seconds, item.label)
        if item.trace is not None and item.task is not None:
            item.trace.cancel_as(TimeLimitExceeded(seconds))
            item.task.cancel()
        elif item.sync_handle is not None:
            # Threads: at the next bytecode; the parent replaces this child if that never comes.
            self.sync_backend.raise_in(item.sync_handle, TimeLimitExceeded)

    # -- running inputs --------------------------------------------------------------------

    async def _run_async(self, item: _Input) -> None:
        assert item.trace is not None
        try:
            result: TraceResult = await item.trace
        except asyncio.CancelledError:
            result = (1, _einfo_of(Terminated(item.terminated_by or 0)), 0.0)
        except BaseException:  # the tracer itself failed; report like prefork would
            result = (1, ExceptionInfo(), 0.0)
        self._finish(item, result)

    def _run_sync(
        self, item: _Input, target: Callable[..., TraceResult], args: tuple[Any, ...], task_id: str
    ) -> Any:
        item.sync_handle = self.sync_backend.handle()
        set_current_input_id(task_id)
        try:
            if item.terminated_by is not None:
                raise InputCancelled()
            return target(*args)
        except InputCancelled:
            return (1, _einfo_of(Terminated(item.terminated_by or signal.SIGTERM)), 0.0)
        finally:
            item.sync_handle = None
            set_current_input_id(None)
            self.sync_backend.clear_pending()  # a limit that fired as the input ended

    def _sync_done(self, item: _Input, outcome: Outcome) -> None:
        try:
            result = outcome()
        except BaseException:
            result = (1, ExceptionInfo(), 0.0)
        self._finish(item, result)

    def _finish(self, item: _Input, result: TraceResult) -> None:
        if item.finished:
            return
        item.finished = True
        self._inputs.pop(item.job_id, None)
        for timer in item.timers:
            timer.cancel()
        self._send_frame(_done_frame(item.job_id, result))
        self._check_memory()
        self._maybe_finish()

    def _check_memory(self) -> None:
        limit = self.options.max_memory_per_child_kb
        if limit and not self._draining_sent:
            used_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if used_kb > limit:
                logger.warning(
                    "child %d: %d KiB resident exceeds worker_max_memory_per_child=%d KiB; "
                    "finishing %d inputs, then a new child replaces this one",
                    self.pid,
                    used_kb,
                    limit,
                    len(self._inputs),
                )
                self._stop_taking_inputs("max-memory-per-child")

    # -- output ----------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...], after: Callable[[], None] | None = None) -> None:
        self._send_frame(protocol.encode(message), after)

    def _send_frame(self, frame: bytes, after: Callable[[], None] | None = None) -> None:
        self._outbox.append(frame)
        if after is not None:
            self._after_write.append(after)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand this iteration's frames to the writer thread (never blocks the loop)."""
        self._flush_scheduled = False
        if self._outbox:
            data = b"".join(self._outbox)
            after = self._after_write
            self._outbox = []
            self._after_write = []
            self.writer.put(data, after)


class LoopWatchdog:
    """Warns when the child's loop was blocked, with the block's real length.

    A heartbeat callback on the loop records, each time it runs, the time and how long the
    loop thread has waited for a CPU so far (``/proc/thread-self/schedstat``); a thread
    checks it. When the loop comes back after a gap over the threshold, the gap between the
    two heartbeats is measured in full and the CPU wait between them (the machine was busy:
    nothing blocked the loop) is subtracted; only a real block is reported, once.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold_s: float,
        done: asyncio.Event,
        *,
        shares_thread: bool = False,
    ) -> None:
        self.loop = loop
        self.shares_thread = shares_thread  # gevent: sync greenlets run on the loop's thread
        self.threshold_s = threshold_s
        self.tick_s = threshold_s / 4
        self._done = done
        #: (monotonic time, seconds waited for a CPU) at the last heartbeat, one tuple so
        #: the watchdog thread always reads a consistent pair.
        self._last_beat = (time.monotonic(), 0.0)
        self._culprit: str | None = None

    def start(self) -> None:
        self.loop.call_soon(self._tick)
        start_os_thread(self._watch, "concurrent-watchdog")

    def _tick(self) -> None:
        self._last_beat = (time.monotonic(), _cpu_wait_s())
        self.loop.call_later(self.tick_s, self._tick)

    def _watch(self) -> None:
        before: tuple[float, float] | None = None
        while not self._done.is_set():
            os_sleep(self.tick_s)
            beat = self._last_beat
            if before is None:
                if time.monotonic() - beat[0] > self.threshold_s:
                    before = beat
                    self._culprit = running_on_loop()
                continue
            if beat[0] > before[0]:  # the loop ran again: the block is over
                gap = beat[0] - before[0]
                waited = max(beat[1] - before[1], 0.0)
                self._report(gap - self.tick_s - waited)
                before = None

    def _report(self, blocked: float) -> None:
        if blocked <= self.threshold_s:
            return
        if self.shares_thread:
            logger.warning(
                "Event loop of child %d did not run for %.2fs (last on it: %s). Under "
                "the gevent backend the loop shares its thread with the sync "
                "greenlets: one that computes without yielding, or a blocking call "
                "gevent cannot patch, in any input stalls every input on this child",
                os.getpid(),
                blocked,
                self._culprit or "code outside any input",
            )
        else:
            logger.warning(
                "Event loop of child %d was blocked for %.2fs by %s: a blocking call "
                "inside an async def task stalls every input on this child; await "
                "an async client or use asyncio.to_thread()",
                os.getpid(),
                blocked,
                self._culprit or "code outside any input",
            )


def _cpu_wait_s() -> float:
    """Seconds the calling thread has spent runnable but not running (0 if unknown)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class ChildInitError(Exception):
    """A ``worker_process_init`` receiver raised: this child cannot take inputs."""


def _initialize(app: Celery, hostname: str) -> None:
    """Celery's child initialisation, failing when a ``worker_process_init`` receiver raises.

    Celery's signal dispatch logs a receiver's exception and carries on (prefork then runs
    inputs in a child whose set-up never happened); here the child fails to start instead,
    and the parent logs the traceback and starts another.
    """
    init_signal = signals.worker_process_init
    responses: list[tuple[Any, Any]] = []
    original_send = init_signal.send

    def send(sender: Any, **named: Any) -> Any:
        result = original_send(sender, **named)
        responses.extend(result)
        return result

    init_signal.send = send
    try:
        process_initializer(app, hostname)
    finally:
        del init_signal.send
    _wait_for_result_connections(app)
    result_writer.install(app)
    for receiver, response in responses:
        if isinstance(response, BaseException):
            name = getattr(receiver, "__qualname__", repr(receiver))
            raise ChildInitError(f"worker_process_init receiver {name} raised") from response


def _wait_for_result_connections(app: Celery) -> None:
    """Make the Redis result backend wait for a free connection instead of failing.

    redis-py's pool raises ``MaxConnectionsError`` past ``redis_max_connections`` (100 by
    default), and a result that cannot be stored leaves its caller waiting forever. A child
    with hundreds of sync inputs ending together (gevent, or many threads) would hit it, so
    the pool becomes redis-py's blocking one: an input waits for a connection (for up to
    its 20 s default, cooperatively under gevent), then stores its result.
    """
    from celery.backends.redis import RedisBackend

    backend = app.backend
    if type(backend) is not RedisBackend or backend._ConnectionPool is not None:
        return  # another backend, Sentinel, or a pool class the user chose
    import redis

    backend._ConnectionPool = redis.BlockingConnectionPool
    backend.__dict__.pop("client", None)  # built again, with that pool, on first use


def _einfo_of(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


def _done_frame(job_id: int, result: TraceResult) -> bytes:
    """The DONE frame, pickled once; a stand-in error if the outcome cannot be pickled."""
    try:
        return protocol.encode((protocol.DONE, job_id, result))
    except Exception as exc:
        _failed, _, runtime = result
        stand_in = RuntimeError(f"the task's outcome could not be sent to the pool: {exc!r}")
        return protocol.encode((protocol.DONE, job_id, (1, _einfo_of(stand_in), runtime)))


def run_child(app: Celery, jobs_fd: int, results_fd: int, options: ChildOptions) -> None:
    """Process target: run a :class:`ChildRuntime` and exit with its code."""
    try:
        if options.sync_backend == GEVENT:
            GeventBackend.patch()
        code = ChildRuntime(app, jobs_fd, results_fd, options).main()
    except BaseException:
        traceback.print_exc()
        code = EXIT_INTERNAL_ERROR
    os._exit(code)
