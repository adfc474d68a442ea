"""Batch fetch on a real Redis: what kombu records, restores and acks stays the same."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from celery_concurrent.redis_fetch import batch_fetch_channel
from tests.conftest import REDIS_URL


@pytest.fixture
def queue() -> Iterator[Queue]:
    name = f"fetch-{uuid.uuid4().hex[:8]}"
    yield Queue(name, Exchange(name, type="direct"), routing_key=name)
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{name}*"):
        client.delete(key)


def _consume(
    conn: Connection, queue: Queue, prefetch: int, *, patched: bool, until: int
) -> list[Any]:
    got: list[Any] = []
    channel = conn.default_channel
    if patched:
        assert batch_fetch_channel(channel)
    consumer = Consumer(channel, [queue], callbacks=[lambda body, m: got.append(m)])
    consumer.qos(prefetch_count=prefetch)
    with consumer:
        while len(got) < until:
            try:
                conn.drain_events(timeout=2)
            except TimeoutError:
                break
    return got


def _publish(conn: Connection, queue: Queue, n: int, **options: Any) -> None:
    producer = Producer(conn.default_channel)
    for i in range(n):
        producer.publish({"i": i}, exchange=queue.exchange, routing_key=queue.routing_key,
                         declare=[queue], **options)  # fmt: skip


def _unacked(conn: Connection) -> dict[str, list[Any]]:
    channel = conn.default_channel
    client = redis.Redis.from_url(REDIS_URL)
    raw = client.hgetall(channel.unacked_key)
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def test_batch_fetch_records_each_message_as_kombu_does_then_acks_clear_it(queue):
    with Connection(REDIS_URL) as plain, Connection(REDIS_URL) as batched:
        _publish(plain, queue, 30)
        stock = _consume(plain, queue, 10, patched=False, until=10)
        stock_records = {m.delivery_tag: _unacked(plain)[m.delivery_tag] for m in stock}
        ours = _consume(batched, queue, 20, patched=True, until=20)
        assert len(ours) == 20
        assert sorted(m.payload["i"] for m in stock + ours) == list(range(30))
        records = _unacked(batched)
        for message in ours:  # same shape as kombu's own record: [message, exchange, key]
            record = records[message.delivery_tag]
            assert record[1:] == [queue.exchange.name, queue.routing_key]
            assert record[0]["properties"]["delivery_tag"] == message.delivery_tag
        sample = next(iter(stock_records.values()))
        assert [type(x) for x in sample] == [type(x) for x in records[ours[0].delivery_tag]]
        for message in stock + ours:
            message.ack()
        tags = {m.delivery_tag for m in stock + ours}
        assert not tags & set(_unacked(batched))
        client = redis.Redis.from_url(REDIS_URL)
        index = client.zrange(batched.default_channel.unacked_index_key, 0, -1)
        assert not tags & {t.decode() for t in index}


def test_batch_fetch_never_takes_more_than_the_free_prefetch(queue):
    with Connection(REDIS_URL) as conn:
        _publish(conn, queue, 50)
        got = _consume(conn, queue, 7, patched=True, until=50)
        assert len(got) == 7  # nothing acked, so the prefetch of 7 is all it may hold
        assert redis.Redis.from_url(REDIS_URL).llen(queue.name) == 43


def test_unacked_batch_is_restored_by_the_visibility_timeout(queue):
    with Connection(REDIS_URL) as conn:
        _publish(conn, queue, 12)
        got = _consume(conn, queue, 12, patched=True, until=12)
        assert len(got) == 12
        channel = conn.default_channel
        channel.qos._delivered.clear()  # as if this consumer had died without restoring
        channel.qos.visibility_timeout = -1  # every unacked message is past it now
        channel.qos.restore_visible(start=0, num=100, interval=1)
    assert redis.Redis.from_url(REDIS_URL).llen(queue.name) == 12
    with Connection(REDIS_URL) as again:
        second = _consume(again, queue, 12, patched=False, until=12)
        assert sorted(m.payload["i"] for m in second) == list(range(12))
        for m in second:
            m.ack()


def test_a_message_that_is_not_kombu_json_is_left_to_kombu(queue):
    with Connection(REDIS_URL) as conn:
        _publish(conn, queue, 3)
        client = redis.Redis.from_url(REDIS_URL)
        client.lpush(queue.name, b"not json")  # LPUSH: popped after the three (RPOP order)
        _publish(conn, queue, 2)
        got: list[Any] = []
        errors: list[BaseException] = []
        channel = conn.default_channel
        assert batch_fetch_channel(channel)
        consumer = Consumer(channel, [queue], callbacks=[lambda body, m: got.append(m)])
        consumer.qos(prefetch_count=20)
        with consumer:
            for _ in range(10):
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    break
                except Exception as exc:  # kombu's own path meets the bad message
                    errors.append(exc)
        assert sorted(m.payload["i"] for m in got) == [0, 0, 1, 1, 2]
        assert errors, "the bad message went to kombu's path"
        assert client.llen(queue.name) == 0


def test_priorities_are_taken_in_kombu_order(queue):
    def order(patched: bool) -> list[int]:
        with Connection(REDIS_URL) as conn:
            for pri in (9, 0, 5, 9, 0, 5):
                _publish(conn, queue, 1, priority=pri)
            got = _consume(conn, queue, 10, patched=patched, until=6)
            for m in got:
                m.ack()
            return [m.properties["priority"] for m in got]

    stock = order(patched=False)
    assert len(stock) == 6
    assert order(patched=True) == stock


@pytest.mark.parametrize(("patched", "expected"), [(False, 1), (True, 20)])
def test_one_poll_takes_up_to_the_free_prefetch(queue, patched, expected):
    with Connection(REDIS_URL) as conn:
        _publish(conn, queue, 25)
        got: list[Any] = []
        channel = conn.default_channel
        if patched:
            assert batch_fetch_channel(channel)
        consumer = Consumer(channel, [queue], callbacks=[lambda body, m: got.append(m)])
        consumer.qos(prefetch_count=20)
        with consumer:
            conn.drain_events(timeout=2)
        assert len(got) == expected
