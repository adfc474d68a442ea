"""Fast Redis acks: one client, batched acks, and kombu's unacked bookkeeping intact."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection
from kombu.asynchronous import Hub
from kombu.message import Message

from celery_concurrent.redis_acks import ack_batch, batch_loop_callbacks, speed_up_channel
from tests import app
from tests.conftest import AMQP_URL, REDIS_URL, wait_for

LOG_LINE = "Redis acks: one client, one round trip per batch of inputs"


class PatchedQueue:
    """A kombu SimpleQueue on a Redis channel patched by ``speed_up_channel``."""

    def __init__(self, conn: Connection, observer: redis.Redis) -> None:
        self.name = f"t-acks-{uuid.uuid4().hex[:8]}"
        self.channel = conn.default_channel
        self.patched = speed_up_channel(self.channel)
        self.simple = conn.SimpleQueue(self.name, channel=self.channel)
        self._observer = observer

    def deliver(self, count: int) -> list[Message]:
        for n in range(count):
            self.simple.put({"n": n})
        return [self.simple.get(timeout=5) for _ in range(count)]

    def unacked(self) -> list[str]:
        """Delivery tags kombu still records as unacked for messages routed to this queue."""
        return _unacked_for(self._observer, self.name)


def _unacked_for(client: redis.Redis, queue: str) -> list[str]:
    return [
        tag.decode()
        for tag, raw in client.hgetall("unacked").items()
        if json.loads(raw)[2] == queue
    ]


@pytest.fixture
def patched_queue() -> Iterator[PatchedQueue]:
    observer = redis.Redis.from_url(REDIS_URL)
    with Connection(REDIS_URL) as conn:
        queue = PatchedQueue(conn, observer)
        yield queue
        queue.simple.queue.delete()
        queue.simple.close()
    observer.close()


def test_reused_client_records_and_clears_unacked_messages(patched_queue):
    channel = patched_queue.channel
    assert patched_queue.patched
    assert channel._create_client() is channel._create_client()
    assert channel._create_client(asynchronous=True) is not channel._create_client()
    messages = patched_queue.deliver(20)
    assert len(patched_queue.unacked()) == 20
    for message in messages[:15]:
        message.ack()
    assert len(patched_queue.unacked()) == 5
    for message in messages[15:]:
        message.requeue()
    assert patched_queue.unacked() == []
    redelivered = [patched_queue.simple.get(timeout=5).payload["n"] for _ in range(5)]
    assert sorted(redelivered) == list(range(15, 20))


def test_acks_in_a_batch_are_sent_together_when_it_ends(patched_queue):
    messages = patched_queue.deliver(50)
    with ack_batch():
        for message in messages[:30]:
            message.ack()
        with ack_batch():  # nested: the outer block sends
            messages[30].ack()
        assert len(patched_queue.unacked()) == 50  # nothing sent yet
        messages[31].reject()  # dropped: its bookkeeping is batched too
    assert len(patched_queue.unacked()) == 18
    messages[32].requeue()  # outside a batch: at once, and back on the queue
    assert len(patched_queue.unacked()) == 17
    for message in messages[33:]:
        message.ack()
    assert patched_queue.unacked() == []
    assert patched_queue.simple.get(timeout=5).payload == {"n": 32}
    with pytest.raises(patched_queue.simple.Empty):  # the acked and rejected ones are gone
        patched_queue.simple.get(timeout=0.5)


def test_acks_scheduled_in_one_loop_iteration_are_sent_after_all_of_them(patched_queue):
    """Celery schedules acks with hub.call_soon; one iteration's acks share a round trip."""
    hub = Hub()
    assert batch_loop_callbacks(hub)
    seen: list[int] = []

    def ack_and_look(message: Message) -> None:
        message.ack()
        seen.append(len(patched_queue.unacked()))

    for message in patched_queue.deliver(30):
        hub.call_soon(ack_and_look, message)
    loop = hub.create_loop()
    next(loop)  # one iteration: the ready callbacks, then a poll
    hub.close()
    assert seen == [30] * 30  # none was sent while the others ran
    assert patched_queue.unacked() == []


def test_a_batch_on_another_thread_does_not_take_this_threads_acks(patched_queue):
    (message,) = patched_queue.deliver(1)
    opened, release = threading.Event(), threading.Event()

    def hold_a_batch_open() -> None:
        with ack_batch():
            opened.set()
            release.wait(5)

    holder = threading.Thread(target=hold_a_batch_open)
    holder.start()
    opened.wait(5)
    message.ack()
    assert patched_queue.unacked() == []
    release.set()
    holder.join()


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


@pytest.mark.timeout(180)
def test_worker_acks_every_input_of_a_mixed_stress_run(start_worker, store):
    """1,390 inputs: early and late acks, async and sync, failures and retries."""
    worker = start_worker("-c", "2", env={"TEST_SLOTS": "200"})
    assert LOG_LINE in worker.log()
    late = [worker.send(app.async_slow_late, f"late-{n}", 0.01) for n in range(400)]
    early = [worker.send(app.async_add, n, n) for n in range(400)]
    sync = [worker.send(app.sync_flaky, f"s-{n}", n % 2) for n in range(300)]
    failing = [worker.send(app.async_fail, f"boom-{n}") for n in range(100)]
    retried = [worker.send(app.async_retry, f"r-{n}", 2) for n in range(190)]
    assert [r.get(timeout=90) for r in late] == [f"late-{n}" for n in range(400)]
    assert [r.get(timeout=90) for r in early] == [2 * n for n in range(400)]
    assert [r.get(timeout=90) for r in sync] == [n % 2 + 1 for n in range(300)]
    for result in failing:
        with pytest.raises(ValueError):
            result.get(timeout=90)
    assert [r.get(timeout=90) for r in retried] == [3] * 190
    runs = [name.decode() for name in store.lrange(app.key("runs"), 0, -1)]
    assert sorted(runs) == sorted(f"late-{n}" for n in range(400))  # each exactly once
    wait_for(lambda: _unacked_for(store, worker.queue) == [], 10, "every delivery to be acked")


@pytest.mark.timeout(60)
def test_worker_can_opt_out(start_worker):
    worker = start_worker("-c", "1", env={"TEST_FAST_ACKS": "0"})
    assert worker.send(app.async_add, 2, 3).get(timeout=30) == 5
    assert LOG_LINE not in worker.log()
