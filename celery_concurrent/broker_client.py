"""Reuse one Redis client for kombu's per-message ack bookkeeping.

kombu's Redis transport records every delivered message as unacked (``QoS.append``) and
removes it on ack (``QoS.ack``). Each of those builds a throw-away ``redis.Redis`` client on
the channel's connection pool (``Channel.conn_or_acquire`` -> ``_create_client``), which with
redis-py 8 costs about 55 us: two per message, 10-20% of a worker's main process per input.
A client holds no per-call state (connections come from the pool), so this consumer step
gives the task channel one cached synchronous client per connection pool. Nothing else in
the transport changes: same commands, same pool, same delivery guarantees.

Turn it off with ``concurrent_reuse_broker_client = False``. Other transports are untouched.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.utils.log import get_logger

from .defaults import setting

__all__ = ["ReuseBrokerClient", "reuse_sync_client"]

logger = get_logger(__name__)

_PATCHED = "_celery_concurrent_reuses_client"


def reuse_sync_client(channel: Any) -> bool:
    """Make a kombu Redis ``channel`` hand out one cached synchronous client.

    Returns True when the channel was (or already is) patched, False for other transports.
    """
    if getattr(channel, _PATCHED, False):
        return True
    create_client = getattr(channel, "_create_client", None)
    if create_client is None or not hasattr(channel, "conn_or_acquire"):
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
    setattr(channel, _PATCHED, True)
    return True


class ReuseBrokerClient(bootsteps.StartStopStep):
    """Consumer step: patch the task channel after every (re)connection."""

    name = "celery_concurrent.broker_client"
    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c: Any) -> None:
        if not setting(c.app, "concurrent_reuse_broker_client") or c.connection is None:
            return
        if c.connection.transport.driver_type != "redis":
            return
        if reuse_sync_client(c.connection.default_channel):
            logger.info("Redis channel reuses one client for ack bookkeeping")
