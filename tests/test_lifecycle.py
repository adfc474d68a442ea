"""Children die and are replaced; warm shutdown finishes or returns every input."""

from __future__ import annotations

import collections

import pytest
from billiard.exceptions import WorkerLostError

from tests import app
from tests.conftest import wait_for


@pytest.mark.timeout(90)
def test_dead_child_fails_its_inputs_with_worker_lost_and_is_replaced(start_worker):
    worker = start_worker("-c", "1", env={"TEST_SLOTS": "100"})
    before = worker.child_pids()
    result = worker.send(app.async_die, "x")
    with pytest.raises(WorkerLostError):
        result.get(timeout=30)
    after = wait_for(
        lambda: (pids := worker.child_pids()) and pids != before and pids,
        30,
        "a replacement child",
    )
    assert len(after) == 1
    assert worker.send(app.async_add, 1, 1).get(timeout=30) == 2


def _broker(name: str, request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("amqp_url") if name == "amqp" else None


@pytest.mark.parametrize("broker", ["redis", "amqp"])
@pytest.mark.timeout(90)
def test_acks_late_reject_on_worker_lost_requeues_and_runs_again(
    start_worker, store, broker, request
):
    worker = start_worker("-c", "1", env={"TEST_SLOTS": "100"}, broker=_broker(broker, request))
    result = worker.send(app.async_die_once, "once")
    assert result.get(timeout=60) == "attempt 2"
    assert int(store.get(f"{worker.queue}:attempts:once")) == 2


@pytest.mark.parametrize("broker", ["redis", "amqp"])
@pytest.mark.timeout(120)
def test_warm_shutdown_finishes_in_flight_and_requeues_waiting(
    start_worker, store, broker, request
):
    broker_url = _broker(broker, request)
    first = start_worker("-c", "1", env={"TEST_SLOTS": "10"}, broker=broker_url)
    names = [f"n{i}" for i in range(10)]
    results = [
        first.send(app.async_counted, name, 4.0 if i < 2 else 0.3) for i, name in enumerate(names)
    ]
    runs_key = f"{first.queue}:runs"
    wait_for(lambda: store.llen(runs_key) == 2, 20, "two inputs to start (max_inputs=2)")

    def reserved() -> int:
        return len((first.inspect().reserved() or {}).get(first.hostname, []))

    wait_for(lambda: reserved() == 8, 10, "8 inputs waiting in the parent, unacknowledged")
    assert first.stop() == 0
    assert sum(r.state == "SUCCESS" for r in results) == 2
    second = start_worker("-c", "1", env={"TEST_SLOTS": "10"}, broker=broker_url)
    stamps = [r.get(timeout=60) for r in results]
    runs = collections.Counter(x.decode() for x in store.lrange(runs_key, 0, -1))
    assert runs == collections.Counter(names)  # every input ran exactly once
    assert {s["pid"] for s in stamps} >= set(second.child_pids())


@pytest.mark.timeout(120)
def test_warm_shutdown_timeout_returns_acks_late_inputs(start_worker, store):
    first = start_worker("-c", "1", env={"TEST_SHUTDOWN_TIMEOUT": "1"})
    result = first.send(app.async_slow_late, "late", 8.0)
    runs_key = f"{first.queue}:runs"
    wait_for(lambda: store.llen(runs_key) == 1, 20, "the input to start")
    assert first.stop() == 0
    assert "Warm shutdown timed out" in first.log()
    start_worker("-c", "1")
    assert result.get(timeout=60) == "late"
    assert store.llen(runs_key) == 2  # started twice: once cut off, once completed
