"""Result writes and publishes of async inputs, off the child's loop thread.

Celery's tracer stores results and publishes messages synchronously. For an async input it
runs on the child's loop thread, so every store (a ``GET``, then ``SET``/``SETEX`` and
``PUBLISH`` in a ``MULTI``) and every publish (a retry's new message, a ``.delay()`` in the
body, a chain's next step) blocks every input of the child, for as long as Redis takes to
answer: through a whole outage.

With the Redis result backend, each child has one **result writer**: a real OS thread (also
in a gevent child) with its own Redis client and, for publishes, producers of its own from
the app's producer pool. Calls made from an async input's greenlet go to its queue, and the
greenlet waits (:func:`~celery_concurrent.bridge.block_on`) while the loop runs the other
inputs. The writer takes everything waiting in its queue and sends the Redis commands of the
whole batch in one pipeline round trip, then the batch's publishes.

Intercepted, on the child's backend and app only, and only when called from an async input:

- ``RedisBackend.set``: the write (``SETEX``/``SET`` + ``PUBLISH``, as ``RedisBackend._set``
  does), retried as a batch under the backend's own retry policy (``retry_policy``,
  ``connection_errors``, ``on_connection_error``: what ``RedisBackend.ensure`` uses);
- ``RedisBackend.get`` while the input is inside ``_store_result`` (the read Celery makes
  first, so that nothing overwrites a SUCCESS); it rides in the same pipelines, so it gets
  the write's retry policy too (stock Celery retries it only with redis-py's retries);
- ``RedisBackend._sleep`` (``result_backend_always_retry`` backing off): a loop timer;
- ``app.producer_or_acquire``: the input gets a stand-in producer whose ``publish`` goes to
  the writer. It is replaced here and not at ``app.amqp.send_task_message`` because the
  producer is acquired from the pool before that is called: an input holding a pool
  producer while it waits would let ``broker_pool_limit`` (10) waiting inputs deadlock the
  loop. ``send_task_message`` itself (routing, ``before_task_publish`` and
  ``after_task_publish``, sent events) still runs in the input's greenlet, so signal
  receivers see ``current_task`` as before.

Everything else of Celery's store and publish logic is Celery's, unchanged, and the tracer
goes on only once its write is done: the ``DONE`` frame (hence the ack of an ``acks_late``
input) follows the result and any publish, writes of one key keep their order (one FIFO
queue, one thread), and an error the backend's retries did not cure is raised where Celery
called ``set`` or ``publish``, so the tracer handles it exactly as a failed store or
publish. Sync inputs keep Celery's path: they write from their own thread (or greenlet) and
never block the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import greenlet
from celery import Celery
from celery.utils.log import get_logger
from kombu.utils.functional import retry_over_time

from .bridge import InputGreenlet, block_on
from .defaults import setting
from .sync_backend import OsQueue, OsThread, start_os_thread

__all__ = ["ResultWriter", "current", "install"]

logger = get_logger(__name__)

#: Operations the writer runs.
GET, SET, PUBLISH = "get", "set", "publish"
#: At most this many operations go in one batch (one pipeline).
MAX_BATCH = 1000

#: Set while an async input is inside ``_store_result``: its ``get`` goes to the writer.
_storing: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "celery_concurrent_storing", default=False
)
_writer: ResultWriter | None = None


class _Waiter(asyncio.Future[None]):
    """The future an input waits on: it refuses cancellation, so the write always ends first."""

    def cancel(self, msg: Any | None = None) -> bool:
        return False


@dataclass(eq=False, slots=True)
class _Op:
    kind: str
    args: tuple[Any, ...]
    waiter: _Waiter
    value: Any = None
    error: BaseException | None = None


@dataclass
class WriterStats:
    """Live counters of one child's writer."""

    gets: int = 0
    sets: int = 0
    publishes: int = 0
    batches: int = 0
    largest_batch: int = 0
    failed: int = 0
    retried_batches: int = 0

    def count(self, op: _Op) -> None:
        if op.kind == GET:
            self.gets += 1
        elif op.kind == SET:
            self.sets += 1
        else:
            self.publishes += 1
        if op.error is not None:
            self.failed += 1


def _in_async_input() -> bool:
    return isinstance(greenlet.getcurrent(), InputGreenlet)


class ResultWriter:
    """One child's writer thread: batches of Redis result commands and of publishes."""

    def __init__(self, app: Celery, backend: Any) -> None:
        self.app = app
        self.backend = backend
        self.stats = WriterStats()
        self._queue: OsQueue[_Op] = OsQueue()
        self._thread: OsThread | None = None
        self._client: Any = None
        self._connection: Any = None  # a never-connected Connection for the stand-in producer
        self._own_producers: Any = None  # gevent children only, see _producers

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<ResultWriter child {os.getpid()}: {s.sets} sets, {s.gets} gets, "
            f"{s.publishes} publishes in {s.batches} batches (largest {s.largest_batch}), "
            f"{s.failed} failed, {self._queue.qsize()} queued>"
        )

    # -- the input's side (loop thread, inside an input's greenlet) ------------------------

    def run(self, kind: str, *args: Any) -> Any:
        """Queue one operation and suspend the calling input until it is done."""
        waiter = _Waiter(loop=asyncio.get_running_loop())
        op = _Op(kind, args, waiter)
        if self._thread is None:
            self._thread = start_os_thread(self._run, "concurrent-result-writer")
        self._queue.put(op)
        block_on(waiter)
        if op.error is not None:
            raise op.error
        return op.value

    def install(self) -> None:
        """Route the child's backend and app calls made by async inputs through this writer."""
        backend, app = self.backend, self.app
        stock_set, stock_get = backend.set, backend.get
        stock_store, stock_sleep = backend._store_result, backend._sleep
        stock_producer = app.producer_or_acquire
        too_large = backend._MAX_STR_VALUE_SIZE

        def set(key: Any, value: Any, expires: Any = None, **retry_policy: Any) -> Any:
            if retry_policy or not _in_async_input():
                return stock_set(key, value, expires, **retry_policy)
            if isinstance(value, str) and len(value) > too_large:
                from celery.exceptions import BackendStoreError

                raise BackendStoreError("value too large for Redis backend")
            return self.run(SET, key, value, backend.expires if expires is None else expires)

        def get(key: Any) -> Any:
            if _storing.get() and _in_async_input():
                return self.run(GET, key)
            return stock_get(key)

        def _store_result(*args: Any, **kwargs: Any) -> Any:
            token = _storing.set(True)
            try:
                return stock_store(*args, **kwargs)
            finally:
                _storing.reset(token)

        def _sleep(amount: float) -> None:
            if not _in_async_input():
                stock_sleep(amount)
                return
            waiter = _Waiter(loop=asyncio.get_running_loop())
            waiter.get_loop().call_later(amount, _resolve, waiter)
            block_on(waiter)

        def producer_or_acquire(producer: Any = None) -> Any:
            if producer is not None or not _in_async_input():
                return stock_producer(producer)
            return self._stand_in_producer()

        backend.set, backend.get = set, get
        backend._store_result, backend._sleep = _store_result, _sleep
        app.producer_or_acquire = producer_or_acquire

    @contextlib.contextmanager
    def _stand_in_producer(self) -> Iterator[_WriterProducer]:
        if self._connection is None:
            self._connection = self.app.connection_for_write()
        # A chain's next step is sent by AMQP._retry_publish, which marks the context so that
        # send_task_message retries it with its own loop (sleeping between tries). That loop
        # runs on the writer instead (see _publish); send_task_message sees a plain publish.
        flag = _callback_flag()
        callback = flag is not None and flag.get()
        token = flag.set(False) if callback and flag is not None else None
        try:
            yield _WriterProducer(self, self._connection, callback)
        finally:
            if token is not None and flag is not None:
                flag.reset(token)

    # -- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                batch = [self._queue.get()]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except Exception:  # queue.Empty
                        break
                self._execute(batch)
                _wake(batch)
        except BaseException:
            logger.critical("child %d: result writer failed; exiting", os.getpid(), exc_info=True)
            os._exit(70)  # child.EXIT_INTERNAL_ERROR: its inputs are reported lost

    def _execute(self, batch: list[_Op]) -> None:
        stats = self.stats
        stats.batches += 1
        stats.largest_batch = max(stats.largest_batch, len(batch))
        redis_ops = [op for op in batch if op.kind != PUBLISH]
        if redis_ops:
            self._pipeline(redis_ops)
        publishes = [op for op in batch if op.kind == PUBLISH]
        if publishes:
            self._publish(publishes)
        for op in batch:
            stats.count(op)

    def _pipeline(self, ops: list[_Op]) -> None:
        """Every Redis command of ``ops`` in one round trip, retried as ``ensure`` would."""
        backend = self.backend
        policy = dict(backend.retry_policy)
        attempts = [0]

        def send() -> list[Any]:
            attempts[0] += 1
            if self._client is None:
                self._client = backend._create_client(**backend.connparams)
            pipe = self._client.pipeline(transaction=False)
            for op in ops:
                if op.kind == GET:
                    pipe.get(op.args[0])
                else:  # as RedisBackend._set
                    key, value, expires = op.args
                    if expires:
                        pipe.setex(key, expires, value)
                    else:
                        pipe.set(key, value)
                    pipe.publish(key, value)
            return list(pipe.execute(raise_on_error=False))

        try:
            replies = retry_over_time(  # type: ignore[no-untyped-call]
                send,
                backend.connection_errors,
                (),
                {},
                partial(backend.on_connection_error, policy.get("max_retries")),
                **policy,
            )
        except Exception as exc:
            keys = ", ".join(_text(op.args[0]) for op in ops[:5])
            logger.error(
                "child %d: the result backend did not take %d operations (%s%s) after its "
                "retry policy: %r; each is raised where Celery stored the result, as a "
                "failed store",
                os.getpid(),
                len(ops),
                keys,
                ", ..." if len(ops) > 5 else "",
                exc,
            )
            for op in ops:
                op.error = exc
            return
        finally:
            if attempts[0] > 1:
                self.stats.retried_batches += 1
        index = 0
        for op in ops:
            count = 1 if op.kind == GET else 2
            mine = replies[index : index + count]
            index += count
            errors = [r for r in mine if isinstance(r, Exception)]
            if errors:
                op.error = errors[0]
                logger.error(
                    "child %d: Redis refused the result %s of %s: %r",
                    os.getpid(),
                    op.kind,
                    _text(op.args[0]),
                    errors[0],
                )
            else:
                op.value = mine[0]

    def _publish(self, ops: list[_Op]) -> None:
        """Publish with a producer of the writer's own from the app's producer pool."""
        try:
            acquired = self._producers()
            producer = acquired.__enter__()
        except Exception as exc:  # no producer: the pool's acquire timed out, ...
            logger.error(
                "child %d: no producer to publish %d messages: %r", os.getpid(), len(ops), exc
            )
            for op in ops:
                op.error = exc
            return
        try:
            for op in ops:
                body, kwargs, callback = op.args
                try:
                    op.value = _publish_one(self.app, producer, body, kwargs, callback)
                except Exception as exc:
                    op.error = exc
                    logger.error(
                        "child %d: publishing %s failed: %r",
                        os.getpid(),
                        (kwargs.get("headers") or {}).get("task", "a message"),
                        exc,
                    )
        finally:
            acquired.__exit__(None, None, None)


    def _producers(self) -> Any:
        """A producer for this thread: from the app's pool, or in a gevent child its own.

        In a monkeypatched child a connection's sockets belong to the gevent hub of the
        thread that opened them, so the writer's connections must never go back to the
        app's pool, where a sync greenlet on the main thread would take one.
        """
        if not _gevent_patched():
            return self.app.producer_or_acquire()
        if self._own_producers is None:
            from kombu import pools

            connections = self.app.connection_for_write().Pool(limit=1)
            self._own_producers = pools.ProducerPool(  # type: ignore[no-untyped-call]
                connections, limit=1, Producer=self.app.amqp.Producer
            )
        return self._own_producers.acquire(block=True)


class _WriterProducer:
    """Stands in for a pool producer inside an async input: ``publish`` runs on the writer.

    ``connection`` is a Connection of the app's broker that is never connected: Celery reads
    its error classes (``_reraise_as_library_errors``); the writer publishes on its own.
    """

    def __init__(self, writer: ResultWriter, connection: Any, callback: bool) -> None:
        self._writer = writer
        self.connection = connection
        self._callback = callback
        self.serializer = None

    def publish(self, body: Any, **kwargs: Any) -> Any:
        return self._writer.run(PUBLISH, body, kwargs, self._callback)

    def revive(self, channel: Any) -> None:
        """Nothing to revive: the writer's producers are its own."""


def _publish_one(
    app: Celery, producer: Any, body: Any, kwargs: dict[str, Any], callback: bool
) -> Any:
    """``producer.publish``, or for a chain's next step the retry loop Celery gives it.

    The loop is ``send_task_message``'s own for ``AMQP._retry_publish`` (Celery 5.7): retry
    only this message, as its policy says, reviving the producer between tries.
    """
    if not (callback and kwargs.get("retry")):
        return producer.publish(body, **kwargs)
    from celery.app import amqp

    policy = kwargs.get("retry_policy") or {}
    name = (kwargs.get("headers") or {}).get("task")
    max_retries = amqp._callback_publish_max_retries(
        policy, app.conf.task_publish_retry_policy or {}
    )
    conn = producer.connection

    def on_retry(exc: BaseException, intervals: Iterator[float], retries: int) -> float:
        producer.revive(conn)
        wait = next(intervals)
        logger.warning(
            "Retrying refused callback publish for %r (%s/%s, waiting %ss): %r",
            name,
            retries + 1,
            max_retries,
            wait,
            exc,
        )
        return wait

    try:
        return retry_over_time(  # type: ignore[no-untyped-call]
            producer.publish,
            amqp._publish_retry_errors(policy, conn),
            args=(body,),
            kwargs=dict(kwargs, retry=False),
            errback=on_retry,
            max_retries=max_retries,
            interval_start=policy.get("interval_start", 0),
            interval_step=policy.get("interval_step", 0.2),
            interval_max=policy.get("interval_max", 1),
        )
    except Exception as exc:
        logger.warning("Giving up refused callback publish for %r: %r", name, exc)
        raise


def _callback_flag() -> contextvars.ContextVar[bool] | None:
    from celery.app import amqp

    flag = getattr(amqp, "_callback_publish_retry", None)
    return flag if isinstance(flag, contextvars.ContextVar) else None


def _gevent_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def _resolve(waiter: _Waiter) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _wake(batch: list[_Op]) -> None:
    """Wake the batch's inputs with one callback per loop (one child: one loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Waiter]] = {}
    for op in batch:
        by_loop.setdefault(op.waiter.get_loop(), []).append(op.waiter)
    for loop, waiters in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(_resolve_all, waiters)


def _resolve_all(waiters: list[_Waiter]) -> None:
    for waiter in waiters:
        _resolve(waiter)


def _text(key: Any) -> str:
    return key.decode(errors="replace") if isinstance(key, bytes) else str(key)


def current() -> ResultWriter | None:
    """This child's writer, or None (off, another backend, or not in a child)."""
    return _writer


def install(app: Celery) -> ResultWriter | None:
    """In a freshly started child: put a writer between async inputs and the Redis backend.

    Only for Celery's own ``RedisBackend`` (not a subclass such as Sentinel's) and with
    ``concurrent_result_writer`` on; otherwise nothing changes.
    """
    global _writer
    from celery.backends.redis import RedisBackend

    if not setting(app, "concurrent_result_writer"):
        logger.debug("child %d: concurrent_result_writer is off", os.getpid())
        return None
    backend = app.backend
    if type(backend) is not RedisBackend:
        logger.debug(
            "child %d: no result writer for %s (only RedisBackend)",
            os.getpid(),
            type(backend).__name__,
        )
        return None
    writer = ResultWriter(app, backend)
    writer.install()
    _writer = writer
    return writer
