"""Fetch messages from a Redis broker in batches, recorded as unacked in the same step.

kombu's Redis consumer takes one message per ``BRPOP`` and then records it as unacked
(``QoS.append``: a ``ZADD`` + ``HSET`` pipeline), two round trips per message before the
next fetch. After each ``BRPOP`` this module tops up to the free prefetch with one Lua script
that pops further messages from the same queues (in kombu's priority order) and records each
as unacked atomically, exactly as ``QoS.append`` would (same keys, same
``[message, exchange, routing_key]`` value), so kombu's visibility-timeout restore, its restore
at shutdown and acks work on them unchanged. Messages the script cannot read (not kombu's
JSON) are pushed back and left to kombu's own path.

Turn it off with ``concurrent_redis_batch_fetch = False``. It leaves alone channels that use a
``global_keyprefix``, run without ``ack_emulation``, or that are not kombu 5.7 Redis channels.
"""

from __future__ import annotations

import json
from typing import Any

from celery.utils.log import get_logger
from kombu.transport import virtual

__all__ = ["BATCH_MAX", "batch_fetch_channel"]

logger = get_logger(__name__)

#: Most messages one top-up takes (one script call).
BATCH_MAX = 100

_PATCHED = "_celery_concurrent_batch_fetch"

# KEYS: unacked index (zset), unacked (hash), then the queue keys in priority order.
# ARGV: how many messages to take at most. Returns item, key, item, key, ...
_TOP_UP = """
local now = redis.call('TIME')
local score = tonumber(now[1]) + tonumber(now[2]) / 1000000
local wanted = tonumber(ARGV[1])
local taken = {}
local count = 0
for i = 3, #KEYS do
  while count < wanted do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local ok, message = pcall(cjson.decode, item)
    local props = ok and type(message) == 'table' and message['properties']
    local info = type(props) == 'table' and props['delivery_info']
    local tag = type(props) == 'table' and props['delivery_tag']
    if type(info) ~= 'table' or type(tag) ~= 'string' then
      redis.call('RPUSH', KEYS[i], item)
      return taken
    end
    redis.call('ZADD', KEYS[1], score, tag)
    redis.call('HSET', KEYS[2], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'])
      .. ',' .. cjson.encode(info['routing_key']) .. ']')
    taken[#taken + 1] = item
    taken[#taken + 1] = KEYS[i]
    count = count + 1
  end
end
return taken
"""


def batch_fetch_channel(channel: Any) -> bool:
    """Make a kombu Redis ``channel`` top up to its free prefetch after every ``BRPOP``.

    Returns True when the channel was (or already is) changed, False when it is left alone.
    """
    if getattr(channel, _PATCHED, False):
        return True
    handlers = getattr(channel, "handlers", None)
    qos = getattr(channel, "qos", None)
    if (
        not isinstance(handlers, dict)
        or "BRPOP" not in handlers
        or qos is None
        or not hasattr(qos, "unacked_key")
        or not getattr(channel, "ack_emulation", False)
        or bool(getattr(channel, "global_keyprefix", ""))
    ):
        return False
    read_one = handlers["BRPOP"]
    prerecorded: set[str] = set()
    append = qos.append
    script: list[Any] = []

    def append_once(message: Any, delivery_tag: str) -> None:
        if delivery_tag in prerecorded:
            prerecorded.discard(delivery_tag)
            # The script already recorded it in Redis: only kombu's in-memory bookkeeping.
            virtual.QoS.append(qos, message, delivery_tag)  # type: ignore[no-untyped-call]
        else:
            append(message, delivery_tag)

    def read_then_top_up(**options: Any) -> Any:
        delivered = read_one(**options)
        _top_up(channel, script, prerecorded)
        return delivered

    qos.append = append_once
    handlers["BRPOP"] = read_then_top_up
    setattr(channel, _PATCHED, True)
    return True


def _top_up(channel: Any, script: list[Any], prerecorded: set[str]) -> None:
    free = channel.qos.can_consume_max_estimate()
    wanted = BATCH_MAX if free is None else min(int(free), BATCH_MAX)
    queues = channel.active_queues
    if wanted <= 0 or not queues:
        return
    keys = [channel._q_for_pri(queue, pri) for pri in channel.priority_steps for queue in queues]
    qos = channel.qos
    with channel.conn_or_acquire() as client:
        if not script:
            script.append(client.register_script(_TOP_UP))
        taken = script[0](
            keys=[qos.unacked_index_key, qos.unacked_key, *keys], args=[wanted], client=client
        )
    items = list(zip(taken[::2], taken[1::2], strict=True))
    for done, (raw, key) in enumerate(items):
        payload = json.loads(raw)
        tag = payload["properties"]["delivery_tag"]
        queue = (key if isinstance(key, str) else key.decode()).rsplit(channel.sep, 1)[0]
        prerecorded.add(tag)
        try:
            channel.connection._deliver(payload, queue)
        except BaseException:
            # Not delivered: back to their queues, so nothing waits for the visibility timeout.
            prerecorded.discard(tag)
            for rest_raw, _ in items[done:]:
                rest = json.loads(rest_raw)
                rest_tag = rest["properties"]["delivery_tag"]
                prerecorded.discard(rest_tag)
                if rest_tag not in getattr(qos, "_delivered", {}):
                    qos.restore_by_tag(rest_tag)
            raise
