"""Fast Redis acks: one client, batched acks, and kombu's unacked bookkeeping intact."""

from __future__ import annotations

import json
import threading
import uuid

import pytest
import redis
from kombu import Connection

from celery_concurrent.redis_acks import ack_batch, speed_up_channel
from tests import app
from tests.conftest import AMQP_URL, REDIS_URL, wait_for

LOG_LINE = "Redis acks: one client, one round trip per batch of inputs"


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
        assert speed_up_channel(channel)
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


def test_acks_in_a_batch_are_sent_together_when_it_ends():
    queue = f"t-batch-{uuid.uuid4().hex[:8]}"
    observer = redis.Redis.from_url(REDIS_URL)
    with Connection(REDIS_URL) as conn:
        channel = conn.default_channel
        speed_up_channel(channel)
        with conn.SimpleQueue(queue, channel=channel) as simple:
            for n in range(50):
                simple.put({"n": n})
            messages = [simple.get(timeout=5) for _ in range(50)]
            with ack_batch():
                for message in messages[:30]:
                    message.ack()
                with ack_batch():  # nested: the outer block sends
                    messages[30].ack()
                assert len(_unacked_for(observer, queue)) == 50  # nothing sent yet
                messages[31].reject()  # dropped: its bookkeeping is batched too
            assert len(_unacked_for(observer, queue)) == 18
            messages[32].requeue()  # outside a batch: at once, and back on the queue
            assert len(_unacked_for(observer, queue)) == 17
            for message in messages[33:]:
                message.ack()
            assert _unacked_for(observer, queue) == []
            assert simple.get(timeout=5).payload == {"n": 32}
            with pytest.raises(simple.Empty):  # the acked and the rejected ones are gone
                simple.get(timeout=0.5)
        simple.queue.delete()
    observer.close()


def test_a_batch_on_another_thread_does_not_take_this_threads_acks():
    queue = f"t-thread-{uuid.uuid4().hex[:8]}"
    observer = redis.Redis.from_url(REDIS_URL)
    with Connection(REDIS_URL) as conn:
        channel = conn.default_channel
        speed_up_channel(channel)
        with conn.SimpleQueue(queue, channel=channel) as simple:
            simple.put({"n": 1})
            message = simple.get(timeout=5)
            opened, release = threading.Event(), threading.Event()

            def hold_a_batch_open() -> None:
                with ack_batch():
                    opened.set()
                    release.wait(5)

            holder = threading.Thread(target=hold_a_batch_open)
            holder.start()
            opened.wait(5)
            message.ack()
            assert _unacked_for(observer, queue) == []
            release.set()
            holder.join()
        simple.queue.delete()
    observer.close()


def test_a_replaced_pool_gets_a_new_client():
    with Connection(REDIS_URL) as conn:
        channel = conn.default_channel
        speed_up_channel(channel)
        first = channel._create_client()
        channel._pool = None  # what kombu does when it disconnects its pools
        second = channel._create_client()
        assert second is not first
        assert second.connection_pool is channel.pool
        assert second.ping()


def test_other_transports_are_left_alone(amqp_url):
    with Connection(AMQP_URL) as conn:
        assert speed_up_channel(conn.default_channel) is False


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
    worker = start_worker("-c", "1", env={"TEST_FAST_ACKS": "0"})
    assert worker.send(app.async_add, 2, 3).get(timeout=30) == 5
    assert LOG_LINE not in worker.log()
