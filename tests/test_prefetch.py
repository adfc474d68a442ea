"""A worker reserves only what its children can start, on Redis and RabbitMQ."""

from __future__ import annotations

import pytest

from tests import app
from tests.conftest import wait_for, worker_refused_to_start


def _active(worker) -> int:
    return len((worker.inspect().active() or {}).get(worker.hostname, []))


def _reserved(worker) -> int:
    return len((worker.inspect().reserved() or {}).get(worker.hostname, []))


@pytest.mark.parametrize("broker", ["redis", "amqp"])
@pytest.mark.timeout(120)
def test_saturated_worker_leaves_work_for_a_second_worker(start_worker, broker, request):
    broker_url = request.getfixturevalue("amqp_url") if broker == "amqp" else None
    first = start_worker("-c", "1", env={"TEST_SLOTS": "10"}, broker=broker_url)
    assert first.stats()["prefetch_count"] == 10  # 1 child x 10 slots x multiplier 1
    results = [first.send(app.async_sleep, 4.0) for _ in range(30)]
    wait_for(lambda: _active(first) == 10, 20, "10 inputs active on the first worker")
    # Celery's QoS never drops below 1, so a full worker holds at most one extra.
    assert _reserved(first) <= 1
    second = start_worker("-c", "2", env={"TEST_SLOTS": "10"}, broker=broker_url)
    wait_for(lambda: _active(second) >= 19, 20, "the second worker to take the rest")
    assert _active(first) == 10
    pids = {r.get(timeout=60)["pid"] for r in results}
    assert len(pids) == 3


@pytest.mark.timeout(60)
def test_explicit_prefetch_multiplier_is_respected(start_worker):
    worker = start_worker("-c", "1", "--prefetch-multiplier", "3", env={"TEST_SLOTS": "10"})
    assert worker.stats()["prefetch_count"] == 30


@pytest.mark.timeout(60)
def test_custom_pool_flag_without_install(start_worker):
    worker = start_worker(
        "-P",
        "custom",
        "-c",
        "2",
        env={
            "TEST_NO_INSTALL": "1",
            "CELERY_CUSTOM_WORKER_POOL": "celery_concurrent.pool:ConcurrentPool",
            "TEST_SLOTS": "10",
        },
    )
    stats = worker.stats()
    assert stats["pool"]["implementation"] == "celery_concurrent.pool:ConcurrentPool"
    assert stats["prefetch_count"] == 20  # multiplier 1 by default for this pool too
    results = [worker.send(app.async_sleep, 0.2) for _ in range(40)]
    assert len({r.get(timeout=30)["pid"] for r in results}) == 2


@pytest.mark.timeout(90)
def test_zero_slots_per_child_is_refused_at_start():
    out = worker_refused_to_start(["-c", "1"], {"TEST_SLOTS": "0"})
    assert "concurrent_slots_per_child must be a whole number >= 1, got 0" in out


@pytest.mark.timeout(90)
def test_negative_shutdown_timeout_is_refused_at_start():
    out = worker_refused_to_start(["-c", "1"], {"TEST_SHUTDOWN_TIMEOUT": "-1"})
    assert "concurrent_shutdown_timeout must be a number of seconds >= 0, got -1.0" in out
