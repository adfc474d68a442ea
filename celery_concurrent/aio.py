"""The async client: send tasks and wait for results without blocking the caller's loop.

:func:`install_async_client` (called by :func:`celery_concurrent.install`) adds

- ``await task.adelay(*args, **kwargs)`` and ``await task.aapply_async(args, kwargs,
  **options)`` to tasks, and ``adelay``/``aapply_async`` to signatures (``group``,
  ``chain``, ``chord``), returning the same results as ``delay``/``apply_async``;
- ``await result.aget(timeout=None, propagate=True)`` to ``AsyncResult`` and to
  ``ResultSet``/``GroupResult``, returning what ``get()`` returns.

Publishing runs Celery's own ``apply_async`` on one thread per process and app
(:class:`_Publisher`), over one broker connection of its own, so routing, serializers,
retries of the publish and signals are Celery's; the caller's loop only waits for a future.
Each job runs with the caller's result backend (Celery keeps one per thread), so the
results are what ``apply_async`` in the caller's thread would have returned. Measured on a
loaded 2-core machine: ``adelay`` costs the loop 50-160 us of CPU (a future and a wake-up)
where ``delay()`` on it costs 450-900 us; an asyncio broker client would keep building and
serializing each message on the loop, and would need one client per broker transport.

Waiting needs the Redis result backend, which publishes each stored result on a channel
named by its key (``celery-task-meta-<id>``, ``RedisBackend._set``). One
:class:`_ResultListener` per event loop and backend keeps a ``redis.asyncio`` pub/sub
connection: it subscribes to the keys being waited for (all keys asked for in one loop
iteration in one ``SUBSCRIBE``), and each time Redis confirms a subscription it reads the
stored values once (one ``MGET``), so a result stored before the subscription is not
missed; after that it only reads what Redis pushes. No poll per result.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import redis
import redis.asyncio
from celery import Celery, states
from celery.app.task import Task
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.canvas import Signature
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, EagerResult, ResultSet
from celery.utils.log import get_logger
from kombu.utils.url import maybe_sanitize_url

from .exceptions import ConcurrencyConfigError

__all__ = ["install_async_client"]

logger = get_logger(__name__)

_installed: weakref.WeakSet[Celery] = weakref.WeakSet()
_patch_lock = threading.Lock()
_patched = False

#: Channels per SUBSCRIBE/UNSUBSCRIBE command; keys per MGET (each read result is decoded on
#: the loop, so a smaller batch keeps one step short); messages read before yielding.
_BATCH = 1000
_MGET_BATCH = 100
_READ_BATCH = 64
#: Done keys are unsubscribed together, this long after the first of them was done.
_UNSUBSCRIBE_DELAY_S = 0.1
#: Group members handled per loop step in GroupResult.aget.
_STEP_BATCH = 100
#: Redis errors after which the listener reconnects (with backoff) instead of failing waiters.
_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
_BACKOFF_S = (0.1, 2.0)


def install_async_client(app: Celery) -> None:
    """Give the tasks and results of ``app`` the async methods (idempotent)."""
    global _patched
    _installed.add(app)
    with _patch_lock:
        if _patched:
            return
        # Additive only: these names do not exist in Celery 5.7.
        Task.adelay = _task_adelay
        Task.aapply_async = _task_aapply_async
        Signature.adelay = _signature_adelay
        Signature.aapply_async = _signature_aapply_async
        AsyncResult.aget = _result_aget
        ResultSet.aget = _resultset_aget
        _patched = True


# -- sending ----------------------------------------------------------------------------------


async def _task_adelay(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``await task.adelay(*args, **kwargs)``: ``delay`` without blocking the loop."""
    return await _task_aapply_async(self, args, kwargs)


async def _task_aapply_async(
    self: Any,
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> Any:
    """``await task.aapply_async(args, kwargs, **options)``: ``apply_async`` off the loop.

    Takes every option ``apply_async`` takes. The message is published when the await
    returns; cancelling the await does not unpublish it.
    """
    app = self._get_app()
    _require_installed(app, f"{self.name}.aapply_async")
    return await _publish(app, lambda **extra: self.apply_async(args, kwargs, **extra), options)


async def _signature_adelay(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``await sig.adelay(*args, **kwargs)``: ``sig.delay`` without blocking the loop."""
    return await _signature_aapply_async(self, args, kwargs)


async def _signature_aapply_async(
    self: Any,
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> Any:
    """``await sig.aapply_async(...)`` for signatures, groups, chains and chords."""
    app = self.app
    _require_installed(app, "aapply_async")
    return await _publish(
        app, lambda **extra: self.apply_async(args or (), kwargs or {}, **extra), options
    )


def _require_installed(app: Celery, what: str) -> None:
    if app not in _installed:
        raise ConcurrencyConfigError(
            f"{what} needs celery_concurrent.install(app) on the task's app {app.main!r}; "
            "call it where the app is created"
        )


async def _publish(app: Celery, send: Callable[..., Any], options: dict[str, Any]) -> Any:
    """Run ``send(**options)`` (an ``apply_async``) on the app's publisher thread."""
    # The thread has no current task: take the parent's ids here, where the caller runs.
    parent = app.current_worker_task
    add_to_parent = options.pop("add_to_parent", True)
    if parent is not None:
        request = parent.request
        options.setdefault("root_id", request.root_id or request.id)
        options.setdefault("parent_id", request.id)
        if app.conf.task_inherit_parent_priority:
            options.setdefault("priority", (request.delivery_info or {}).get("priority"))
    # The results are made with the caller's backend (Celery's backends are per thread), so
    # they behave as if apply_async had run here: get() and GroupResult.get() work too.
    backend = app.backend
    _skip_early_subscription(backend)
    result = await _publisher_for(app).submit(send, options, backend)
    if add_to_parent and parent is not None:
        parent.add_trail(result)
    return result


_in_publisher = threading.local()


def _skip_early_subscription(backend: Any) -> None:
    """Make the Redis backend's ``on_task_call`` a no-op on publisher threads only.

    On every send it SUBSCRIBEs the sync result consumer to the task's channel so that a
    later ``get()`` cannot miss it; nobody drains that connection for results awaited with
    ``aget``, and each result's ``__del__`` would send an UNSUBSCRIBE from the loop thread.
    ``get()`` and ``aget()`` both subscribe when they wait and then read the stored value,
    so skipping it loses nothing. Other threads keep Celery's behaviour.
    """
    if not isinstance(backend, RedisBackend) or getattr(backend, _QUIET, False):
        return
    on_task_call = backend.on_task_call

    def skipped_on_publisher_threads(producer: Any, task_id: str) -> None:
        if not getattr(_in_publisher, "active", False):
            on_task_call(producer, task_id)

    backend.on_task_call = skipped_on_publisher_threads
    setattr(backend, _QUIET, True)


_QUIET = "_celery_concurrent_quiet_on_task_call"


class _Publisher:
    """One thread per process and app that runs ``apply_async`` for every loop of it.

    The thread holds one broker connection and producer for its whole life, so a publish
    costs what a warm ``apply_async`` costs, and publishes keep their submission order.
    """

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._jobs: queue.SimpleQueue[
            tuple[Callable[..., Any], dict[str, Any], Any, asyncio.AbstractEventLoop, Any] | None
        ] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._open = True
        self._thread = threading.Thread(
            target=self._run, name=f"celery-concurrent-publisher[{app.main}]", daemon=True
        )
        self._thread.start()

    @property
    def open(self) -> bool:
        """Whether the thread still takes jobs (it stops at exit, or if it crashed)."""
        return self._open

    def submit(
        self, send: Callable[..., Any], options: dict[str, Any], backend: Any
    ) -> asyncio.Future[Any]:
        """Queue ``send(producer=..., **options)`` with the caller's ``backend``.

        The returned future resolves on the caller's loop.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if not self._open:
                raise RuntimeError(f"the publisher thread of app {self._app.main!r} stopped")
            self._jobs.put((send, options, backend, loop, future))
        return future

    def stop(self, timeout_s: float = 5.0) -> None:
        """Finish the queued publishes, then close the connection."""
        self._jobs.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        app = self._app
        _in_publisher.active = True
        try:
            with app.connection_for_write() as connection:
                producer = app.amqp.Producer(connection)
                while (job := self._jobs.get()) is not None:
                    self._publish_one(app, producer, *job)
                producer.release()
        except BaseException:
            logger.exception("The async client's publisher thread of app %r failed", app.main)
            raise
        finally:
            self._close_queue()

    def _close_queue(self) -> None:
        """Take no more jobs; fail the ones still queued (they were never published)."""
        with self._lock:
            self._open = False
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _send, _options, _backend, loop, future = job
                error = RuntimeError("not published: the async client's publisher stopped")
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle, future, None, error)

    @staticmethod
    def _publish_one(
        app: Celery,
        producer: Any,
        send: Callable[..., Any],
        options: dict[str, Any],
        backend: Any,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
    ) -> None:
        mine = {} if "producer" in options or "connection" in options else {"producer": producer}
        value: Any = None
        error: BaseException | None = None
        app._local.backend = backend  # app.backend is per thread: the caller's, for this job
        try:
            value = send(add_to_parent=False, **mine, **options)
        except BaseException as exc:  # handed to the awaiting caller
            error = exc
        finally:
            app._local.backend = None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
            loop.call_soon_threadsafe(_settle, future, value, error)


def _settle(future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


_publishers: dict[int, _Publisher] = {}
_publishers_pid = os.getpid()
_publishers_lock = threading.Lock()


def _publisher_for(app: Celery) -> _Publisher:
    global _publishers_pid
    with _publishers_lock:
        if _publishers_pid != os.getpid():  # forked: the parent's threads are not here
            _publishers.clear()
            _publishers_pid = os.getpid()
        publisher = _publishers.get(id(app))
        if publisher is None or publisher._app is not app or not publisher.open:
            publisher = _publishers[id(app)] = _Publisher(app)
        return publisher


@atexit.register
def _stop_publishers() -> None:
    if _publishers_pid == os.getpid():
        for publisher in list(_publishers.values()):
            publisher.stop()


# -- waiting ----------------------------------------------------------------------------------


async def _result_aget(self: Any, timeout: float | None = None, propagate: bool = True) -> Any:
    """``await result.aget(timeout=None, propagate=True)``: ``get()`` without blocking.

    Waits on a Redis pub/sub subscription, never by polling. Returns the task's return
    value; re-raises its exception when ``propagate`` (else returns it). Like ``get()``,
    with ``propagate`` it also raises the error of a failed parent (a chain's earlier
    step), as soon as that parent fails.

    Raises:
        celery.exceptions.TimeoutError: no result within ``timeout`` seconds.
        NotImplementedError: the result backend is not Redis.
    """
    if isinstance(self, EagerResult):
        return self.get(timeout=timeout, propagate=propagate)
    if self.ignored:
        return None
    if self._cache is None:
        parents = [
            node
            for node in (self._parents() if propagate else ())
            if isinstance(node, AsyncResult) and not isinstance(node, EagerResult)
        ]
        for parent in parents:
            if parent._cache is not None:
                parent.maybe_throw()  # a parent known to have failed raises at once
        waits = _Waits(timeout)
        try:
            waits.watch([self, *(p for p in parents if not p.ignored)])
            await waits.wait(self, parents)
        finally:
            waits.close()
    return self.maybe_throw(propagate=propagate)


async def _resultset_aget(
    self: Any, timeout: float | None = None, propagate: bool = True
) -> list[Any]:
    """``await group_result.aget(...)``: the members' values in order, like ``join()``.

    All members are subscribed at once and ``timeout`` covers them all; with ``propagate``
    the first failed member (in order) raises once it and the members before it are done.
    """
    waits = _Waits(timeout)
    try:
        leaves = list(_leaves(self))
        for start in range(0, len(leaves), _STEP_BATCH):
            if start:
                await asyncio.sleep(0)  # a big group: keep each loop step short
            waits.watch(leaves[start : start + _STEP_BATCH])
        return await _join(self, waits, propagate)
    finally:
        waits.close()


async def _join(results: Any, waits: _Waits, propagate: bool) -> list[Any]:
    values: list[Any] = []
    for index, member in enumerate(results.results):
        if index and index % _STEP_BATCH == 0:
            await asyncio.sleep(0)  # members already done do not suspend: let others run
        if isinstance(member, ResultSet):
            values.append(await _join(member, waits, propagate))
            continue
        if isinstance(member, EagerResult):
            values.append(member.get(propagate=propagate))
            continue
        if member.ignored:
            values.append(None)
            continue
        if member._cache is None:
            await waits.wait(member)
        values.append(member.maybe_throw(propagate=propagate))
    return values


def _leaves(results: Any) -> Iterator[Any]:
    for member in results.results:
        if isinstance(member, ResultSet):
            yield from _leaves(member)
        elif not isinstance(member, EagerResult) and not member.ignored:
            yield member


class _Waits:
    """The subscriptions one ``aget`` holds, with one timer for its whole ``timeout``.

    When the timer fires it cancels the futures still pending (the listener skips done
    futures), and :meth:`wait` turns that into Celery's ``TimeoutError``.
    """

    def __init__(self, timeout: float | None) -> None:
        self._timeout = timeout
        self._held: list[tuple[_ResultListener, bytes, asyncio.Future[Any]]] = []
        self._by_id: dict[str, asyncio.Future[Any]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    def watch(self, results: list[Any]) -> None:
        todo = [r for r in results if r._cache is None and r.id not in self._by_id]
        for result in todo:  # check every backend first: fail before subscribing to any
            _require_redis(result.backend)
        for result in todo:
            listener = _listener_for(result.backend)
            key = result.backend.get_key_for_task(result.id)
            future = listener.watch(key)
            self._held.append((listener, key, future))
            self._by_id[result.id] = future
        if self._timeout is not None and self._timer is None and self._held:
            self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)

    def _expire(self) -> None:
        self._expired = True
        for _, _, future in self._held:
            future.cancel()

    async def wait(self, result: Any, parents: list[Any] | None = None) -> None:
        """Wait for ``result``'s stored meta, then cache it on ``result``.

        A failed one of ``parents`` raises its error as soon as it is known.
        """
        future = self._by_id[result.id]
        watching = {self._by_id[p.id]: p for p in parents or () if p.id in self._by_id}
        try:
            while watching and not future.done():
                done, _ = await asyncio.wait(
                    [future, *watching], return_when=asyncio.FIRST_COMPLETED
                )
                for finished in done - {future}:
                    parent = watching.pop(finished)
                    if not finished.cancelled():
                        parent._maybe_set_cache(finished.result())
                        parent.maybe_throw()  # raises if that step failed
            meta = await future
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._expired or (current is not None and current.cancelling()):
                raise  # the caller was cancelled, not timed out
            raise CeleryTimeoutError(
                f"The operation timed out: task {result.id} has no result after "
                f"{self._timeout}s (aget(timeout={self._timeout!r}))"
            ) from None
        result._maybe_set_cache(meta)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for listener, key, future in self._held:
            listener.unwatch(key, future)
        self._held.clear()


def _require_redis(backend: Any) -> None:
    if isinstance(backend, RedisBackend) and not isinstance(backend, SentinelBackend):
        return
    conf = backend.app.conf if getattr(backend, "app", None) is not None else None
    url = str(conf.result_backend) if conf is not None and conf.result_backend else None
    shown = maybe_sanitize_url(url) if url and "@" in url else url  # no password shown
    described = (
        f"{type(backend).__name__} ({shown})"
        if url
        else f"{type(backend).__name__} (result_backend is not set)"
    )
    raise NotImplementedError(
        f"aget needs the Redis result backend (redis:// or rediss://); this app uses "
        f"{described}. Use result.get() in asyncio.to_thread there, or set "
        "result_backend = 'redis://...'"
    )


_listeners: dict[tuple[int, int], _ResultListener] = {}


def _listener_for(backend: Any) -> _ResultListener:
    loop = asyncio.get_running_loop()
    listener = _listeners.get((id(loop), id(backend)))
    if listener is None or listener.loop is not loop or listener.backend is not backend:
        for stale_key, stale in list(_listeners.items()):
            if stale.loop.is_closed():
                del _listeners[stale_key]
        listener = _listeners[(id(loop), id(backend))] = _ResultListener(backend, loop)
    return listener


def _async_connection_class(sync_class: Any) -> Any:
    classes = {
        redis.SSLConnection: redis.asyncio.SSLConnection,
        redis.UnixDomainSocketConnection: redis.asyncio.UnixDomainSocketConnection,
        redis.Connection: redis.asyncio.Connection,
    }
    if sync_class not in classes:
        raise NotImplementedError(
            f"aget cannot use the Redis connection class {sync_class!r} of this result "
            "backend; supported: TCP (redis://), TLS (rediss://) and unix sockets (socket://)"
        )
    return classes[sync_class]


class _ResultListener:
    """Resolves waiters from one ``redis.asyncio`` pub/sub connection (one loop, one backend).

    ``watch(key)`` returns a future for the key's ready meta. Keys watched in one loop
    iteration go out in one ``SUBSCRIBE``; every subscription confirmation (including the
    ones redis-py sends again after a reconnect) queues a read of the stored value, so a
    result that landed before the subscription, or while the connection was down, is found.
    Keys nobody waits for any more are unsubscribed in batches.
    """

    def __init__(self, backend: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.loop = loop
        params = dict(backend.connparams)
        params["connection_class"] = _async_connection_class(
            params.pop("connection_class", redis.Connection)
        )
        # RESP2 unless the backend URL asks otherwise: redis-py 8 defaults to RESP3, whose
        # pub/sub path formats every pushed message for a debug log (str() of the payload).
        params.setdefault("protocol", 2)
        self._pool = redis.asyncio.ConnectionPool(**params)
        # Any: types-redis describes redis-py 4, not the 8.x API used here (aclose, ...)
        self._client: Any = redis.asyncio.Redis(connection_pool=self._pool)
        self._pubsub: Any = self._client.pubsub()
        self._waiters: dict[bytes, list[asyncio.Future[Any]]] = {}
        self._subscribed: set[bytes] = set()
        self._to_subscribe: set[bytes] = set()
        self._to_unsubscribe: set[bytes] = set()
        self._unsubscribe_due = False
        self._unsubscribe_timer: asyncio.TimerHandle | None = None
        self._to_check: set[bytes] = set()
        self._flushing = False
        self._reader: asyncio.Task[None] | None = None

    def watch(self, key: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()
        self._waiters.setdefault(key, []).append(future)
        if key in self._subscribed:
            self._to_check.add(key)  # a confirmation may have come already: read it now
        else:
            self._to_subscribe.add(key)
        self._schedule()
        return future

    def unwatch(self, key: bytes, future: asyncio.Future[Any]) -> None:
        waiting = self._waiters.get(key)
        if waiting is not None and future in waiting:
            waiting.remove(future)
            if not waiting:
                del self._waiters[key]
        if key not in self._waiters:
            self._to_subscribe.discard(key)
            if key in self._subscribed:
                self._to_unsubscribe.add(key)
                self._unsubscribe_later()

    def _unsubscribe_later(self) -> None:
        """Unsubscribe done keys in one batch a little later, not one command per result."""
        if self._unsubscribe_timer is None:
            self._unsubscribe_timer = self.loop.call_later(
                _UNSUBSCRIBE_DELAY_S, self._unsubscribe_now
            )

    def _unsubscribe_now(self) -> None:
        self._unsubscribe_timer = None
        self._unsubscribe_due = True
        self._schedule()

    def _schedule(self) -> None:
        if not self._flushing:
            self._flushing = True
            self.loop.create_task(self._flush(), name="celery-concurrent-aget-flush")

    async def _flush(self) -> None:
        """Send queued (un)subscriptions and read queued keys until nothing is queued."""
        delay_s = _BACKOFF_S[0]
        try:
            while self._to_subscribe or self._to_check or self._unsubscribe_due:
                try:
                    await self._flush_once()
                    delay_s = _BACKOFF_S[0]
                except _REDIS_DOWN as exc:
                    logger.warning(
                        "aget: Redis result backend unreachable (%r); retrying in %.1fs",
                        exc,
                        delay_s,
                    )
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, _BACKOFF_S[1])
        finally:
            self._flushing = False

    async def _flush_once(self) -> None:
        subscribe = [k for k in self._to_subscribe if k in self._waiters]
        self._to_subscribe.clear()
        try:
            for start in range(0, len(subscribe), _BATCH):
                chunk = subscribe[start : start + _BATCH]
                await self._pubsub.subscribe(*chunk)
                self._subscribed.update(chunk)
        except BaseException:
            self._to_subscribe.update(k for k in subscribe if k not in self._subscribed)
            raise
        if subscribe and self._reader is None:
            self._reader = self.loop.create_task(self._read(), name="celery-concurrent-aget")
        unsubscribe = []
        if self._unsubscribe_due:
            self._unsubscribe_due = False
            unsubscribe = [k for k in self._to_unsubscribe if k not in self._waiters]
            self._to_unsubscribe.clear()
        # Forgotten before the command goes out: a key watched again meanwhile is
        # subscribed again after it, never left waiting on a subscription being dropped.
        self._subscribed.difference_update(unsubscribe)
        try:
            while unsubscribe:
                await self._pubsub.unsubscribe(*unsubscribe[:_BATCH])
                del unsubscribe[:_BATCH]
        except BaseException:
            self._to_unsubscribe.update(unsubscribe)
            self._unsubscribe_due = bool(unsubscribe)
            raise
        check = [k for k in self._to_check if k in self._waiters]
        self._to_check.clear()
        try:
            while check:
                chunk = check[:_MGET_BATCH]
                for key, payload in zip(chunk, await self._client.mget(chunk), strict=True):
                    if payload is not None:
                        self._deliver(key, payload)
                del check[:_MGET_BATCH]
        except BaseException:
            self._to_check.update(check)
            raise

    async def _read(self) -> None:
        delay_s = _BACKOFF_S[0]
        read = 0
        try:
            while True:
                read += 1
                if read % _READ_BATCH == 0:
                    await asyncio.sleep(0)  # buffered messages do not suspend: let others run
                try:
                    message = await self._pubsub.get_message(timeout=None)
                except _REDIS_DOWN as exc:
                    logger.warning(
                        "aget: lost the Redis result backend's pub/sub (%r); reconnecting in %.1fs",
                        exc,
                        delay_s,
                    )
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, _BACKOFF_S[1])
                    continue
                delay_s = _BACKOFF_S[0]
                if not message:
                    continue
                key = message["channel"]
                if message["type"] == "message":
                    self._deliver(key, message["data"])
                elif message["type"] == "subscribe" and key in self._waiters:
                    self._to_check.add(key)
                    self._schedule()
        except Exception as exc:
            logger.exception("aget: the result listener failed; its waiters get the error")
            await self._close(exc)
        finally:
            await self._close(None)

    def _deliver(self, key: bytes, payload: bytes) -> None:
        waiting = self._waiters.get(key)
        if not waiting:
            return
        try:
            metas = [self.backend.decode(payload)]
        except Exception as exc:  # a payload this app cannot read: tell its waiters
            del self._waiters[key]
            for future in waiting:
                if not future.done():
                    future.set_exception(exc)
            return
        if metas[0].get("status") not in states.READY_STATES:
            return  # STARTED, RETRY, ...: the task is not done
        del self._waiters[key]
        # each waiter caches (and mutates) its own copy, as get() would
        metas += [self.backend.decode(payload) for _ in waiting[1:]]
        for future, meta in zip(waiting, metas, strict=True):
            if not future.done():
                future.set_result(meta)
        self._to_unsubscribe.add(key)
        self._unsubscribe_later()

    async def _close(self, error: BaseException | None) -> None:
        if _listeners.get((id(self.loop), id(self.backend))) is self:
            del _listeners[(id(self.loop), id(self.backend))]
        for waiting in self._waiters.values():
            for future in waiting:
                if future.done():
                    continue
                if error is None:
                    future.cancel()
                else:
                    future.set_exception(error)
        self._waiters.clear()
        self._to_subscribe.clear()
        self._to_check.clear()
        self._to_unsubscribe.clear()
        if self._unsubscribe_timer is not None:
            self._unsubscribe_timer.cancel()
            self._unsubscribe_timer = None
        if self._pubsub.connection is None:
            return
        try:
            await self._pubsub.aclose()
            await self._client.aclose()
            await self._pool.disconnect()
        except Exception:  # closing on the way out: nothing left to tell
            logger.debug("aget: error closing the result listener", exc_info=True)
