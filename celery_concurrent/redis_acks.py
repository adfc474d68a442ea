"""Cheaper ack bookkeeping on a Redis broker: one client, and one round trip per batch.

kombu's Redis transport records every delivered message as unacked (``QoS.append``) and
removes it on ack (``QoS.ack``, one ``ZREM`` + ``HDEL`` pipeline). Two costs are not the
protocol's:

- each of those calls builds a throw-away ``redis.Redis`` client on the channel's pool
  (``Channel.conn_or_acquire`` -> ``_create_client``), about 55 us with redis-py 8; and
- each ack is its own blocking round trip, although acks come in bunches: Celery schedules
  them with ``hub.call_soon``, and the event loop runs everything scheduled during one
  iteration together at the top of the next.

This consumer step gives the task channel one cached synchronous client per connection pool,
and runs each loop iteration's scheduled callbacks inside :func:`ack_batch`: the acks made
there are queued on one pipeline and sent when the callbacks are done, before the loop polls
again. Same commands, same keys, same guarantees: a message leaves the unacked set only once
its ack is sent; if the worker dies first it is redelivered, as it would be if it died just
before an unbatched ack.

Turn it off with ``concurrent_redis_fast_acks = False``. Other transports are untouched.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import bootsteps
from celery.utils.log import get_logger

from .defaults import setting
from .redis_fetch import batch_fetch_channel

__all__ = ["RedisFastAcks", "ack_batch", "batch_loop_callbacks", "speed_up_channel"]

logger = get_logger(__name__)

_PATCHED = "_celery_concurrent_fast_acks"
_local = threading.local()  # .pipes: dict[QoS, Pipeline] while a batch is open on this thread


class _Queued:
    """What a deferred ``_remove_from_indices`` returns: ``.execute()`` waits for the batch."""

    @staticmethod
    def execute() -> list[Any]:
        return []


_QUEUED = _Queued()


def speed_up_channel(channel: Any) -> bool:
    """Give a kombu Redis ``channel`` a cached sync client and batchable acks.

    Returns True when the channel was (or already is) patched, False for other transports.
    """
    if getattr(channel, _PATCHED, False):
        return True
    create_client = getattr(channel, "_create_client", None)
    qos: Any = getattr(channel, "qos", None) if hasattr(channel, "conn_or_acquire") else None
    remove_from_indices = getattr(qos, "_remove_from_indices", None)
    if create_client is None or remove_from_indices is None:
        return False
    cached: dict[str, Any] = {}

    def create(asynchronous: bool = False) -> Any:
        if asynchronous:
            return create_client(asynchronous=True)
        pool = channel.pool  # the channel replaces its pool after a disconnect
        if cached.get("pool") is not pool:
            cached["client"] = create_client()
            cached["pool"] = pool
        return cached["client"]

    channel._create_client = create

    def remove(delivery_tag: Any, pipe: Any = None) -> Any:
        pipes: dict[Any, Any] | None = getattr(_local, "pipes", None)
        if pipe is not None or pipes is None:
            return remove_from_indices(delivery_tag, pipe)
        if qos not in pipes:
            pipes[qos] = create().pipeline()
        remove_from_indices(delivery_tag, pipes[qos])
        return _QUEUED

    qos._remove_from_indices = remove
    setattr(channel, _PATCHED, True)
    return True


@contextmanager
def ack_batch() -> Iterator[None]:
    """Send the Redis ack bookkeeping of acks made inside the block in one round trip.

    Only acks on this thread, on channels patched by :func:`speed_up_channel`, are batched;
    nesting is allowed (the outermost block sends).
    """
    if getattr(_local, "pipes", None) is not None:
        yield
        return
    _local.pipes = {}
    try:
        yield
    finally:
        pipes, _local.pipes = _local.pipes, None
        failure: BaseException | None = None
        for pipe in pipes.values():
            try:
                pipe.execute()
            except BaseException as exc:  # send the other channels' acks, then raise
                failure = failure or exc
        if failure is not None:
            raise failure


def batch_loop_callbacks(hub: Any) -> bool:
    """Make a kombu ``hub`` run each iteration's ready callbacks inside :func:`ack_batch`.

    Returns False when the hub does not look like kombu 5.7's (nothing is changed then).
    """
    if getattr(hub, _PATCHED, False):
        return True
    pop_ready = getattr(hub, "_pop_ready", None)
    if pop_ready is None:
        return False

    def pop_ready_batched() -> Any:
        ready = pop_ready()
        if len(ready) < 2:
            return ready
        return (functools.partial(_run_batched, ready),)

    hub._pop_ready = pop_ready_batched
    setattr(hub, _PATCHED, True)
    return True


def _run_batched(callbacks: Iterable[Any]) -> None:
    with ack_batch():
        for callback in callbacks:
            if callback:
                callback()


class RedisFastAcks(bootsteps.StartStopStep):
    """Consumer step: patch the task channel after every (re)connection."""

    name = "celery_concurrent.redis_fast_acks"
    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c: Any) -> None:
        if c.connection is None or c.connection.transport.driver_type != "redis":
            return
        channel = c.connection.default_channel
        if setting(c.app, "concurrent_redis_batch_fetch") and batch_fetch_channel(channel):
            logger.info("Redis fetch: up to the free prefetch per round trip")
        if not setting(c.app, "concurrent_redis_fast_acks"):
            return
        if not speed_up_channel(channel):
            return
        if c.hub is not None and batch_loop_callbacks(c.hub):
            logger.info("Redis acks: one client, one round trip per batch of inputs")
        else:
            logger.info("Redis acks: one client")
