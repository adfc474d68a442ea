"""The Redis task channel reuses one client and keeps kombu's unacked bookkeeping intact."""

from __future__ import annotations

import json
import uuid

import pytest
import redis
from kombu import Connection

from celery_concurrent.broker_client import reuse_sync_client
from tests import app
from tests.conftest import AMQP_URL, REDIS_URL, wait_for

LOG_LINE = "Redis channel reuses one client for ack bookkeeping"


def _unacked_for(client: redis.Redis, queue: str) -> list[str]:
    """Delivery tags kombu still records as unacked for messages routed to ``queue``."""
    return [
        tag.decode()
        for tag, raw in client.hgetall("unacked").items()
        if json.loads(raw)[2] == queue
    ]


def test_reused_client_records_and_clears_unacked_messages():
    queue = f"t-client-{uuid.uuid4().hex[:8]}"
    observer = redis.Redis.from_url(REDIS_URL)
    with Connection(REDIS_URL) as conn:
        channel = conn.default_channel
        assert reuse_sync_client(channel)
        assert channel._create_client() is channel._create_client()
        assert channel._create_client(asynchronous=True) is not channel._create_client()
        with conn.SimpleQueue(queue, channel=channel) as simple:
            for n in range(20):
                simple.put({"n": n})
            messages = [simple.get(timeout=5) for _ in range(20)]
            assert len(_unacked_for(observer, queue)) == 20
            for message in messages[:15]:
                message.ack()
            assert len(_unacked_for(observer, queue)) == 5
            for message in messages[15:]:
                message.requeue()
            assert _unacked_for(observer, queue) == []
            assert sorted(simple.get(timeout=5).payload["n"] for _ in range(5)) == list(
                range(15, 20)
            )
        simple.queue.delete()
    observer.close()


def test_a_replaced_pool_gets_a_new_client():
    with Connection(REDIS_URL) as conn:
        channel = conn.default_channel
        reuse_sync_client(channel)
        first = channel._create_client()
        channel._pool = None  # what kombu does when it disconnects its pools
        second = channel._create_client()
        assert second is not first
        assert second.connection_pool is channel.pool
        assert second.ping()


def test_other_transports_are_left_alone(amqp_url):
    with Connection(AMQP_URL) as conn:
        assert reuse_sync_client(conn.default_channel) is False


@pytest.mark.timeout(120)
def test_worker_reuses_the_client_and_acks_every_input(start_worker, store):
    worker = start_worker("-c", "2", env={"TEST_SLOTS": "100"})
    assert LOG_LINE in worker.log()
    late = [worker.send(app.async_slow_late, f"late-{n}", 0.05) for n in range(300)]
    early = [worker.send(app.async_add, n, n) for n in range(300)]
    assert [r.get(timeout=60) for r in late] == [f"late-{n}" for n in range(300)]
    assert [r.get(timeout=60) for r in early] == [2 * n for n in range(300)]
    wait_for(lambda: _unacked_for(store, worker.queue) == [], 10, "every delivery to be acked")


@pytest.mark.timeout(60)
def test_worker_can_opt_out(start_worker):
    worker = start_worker("-c", "1", env={"TEST_REUSE_BROKER_CLIENT": "0"})
    assert worker.send(app.async_add, 2, 3).get(timeout=30) == 5
    assert LOG_LINE not in worker.log()
