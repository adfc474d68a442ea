"""Per-task limits on one shared queue: a saturated task never starves another, and prefetch
is a function of the pool's state after every event (Redis and RabbitMQ)."""

from __future__ import annotations

import collections
from typing import Any

import pytest

from tests import app
from tests.conftest import overlap, wait_for

SLOTS = "100"  # slots per child = the wide task's max_inputs, as in the measurement


def _broker(name: str, request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("amqp_url") if name == "amqp" else None


def _span(stamps: list[dict[str, Any]]) -> float:
    return max(s["end"] for s in stamps) - min(s["start"] for s in stamps)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
@pytest.mark.timeout(180)
def test_wide_task_is_unharmed_by_a_saturated_narrow_task_on_the_same_queue(
    start_worker, broker, request
):
    worker = start_worker("-c", "1", env={"TEST_SLOTS": SLOTS}, broker=_broker(broker, request))
    alone = [worker.send(app.wide, 1.0) for _ in range(200)]
    alone_stamps = [r.get(timeout=60) for r in alone]

    wide, narrow = [], []
    for i in range(200):
        wide.append(worker.send(app.wide, 1.0))
        if i % 2:
            narrow.append(worker.send(app.narrow, 0.2))
    mixed_stamps = [r.get(timeout=60) for r in wide]
    narrow_stamps = [r.get(timeout=120) for r in narrow]

    ratio = _span(mixed_stamps) / _span(alone_stamps)
    print(
        f"{broker}: wide alone {_span(alone_stamps):.2f}s (peak {overlap(alone_stamps)}), "
        f"beside narrow {_span(mixed_stamps):.2f}s (peak {overlap(mixed_stamps)}), "
        f"ratio {ratio:.2f}"
    )
    # The wide task still runs at (almost) its full width: only the narrow task's two
    # slots are taken from it; before parking, it ran at a trickle (the issue: 10.7x).
    assert overlap(mixed_stamps) >= 0.8 * overlap(alone_stamps)
    assert overlap(narrow_stamps) <= 2  # the narrow task's cap held throughout
    assert len({r.id for r in wide + narrow}) == len(mixed_stamps) + len(narrow_stamps)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
@pytest.mark.timeout(180)
def test_a_second_worker_gets_the_inputs_the_first_cannot_start_soon(
    start_worker, store, broker, request
):
    broker_url = _broker(broker, request)
    first = start_worker("-c", "1", env={"TEST_SLOTS": SLOTS}, broker=broker_url)
    results = [first.send(app.narrow, 0.5) for _ in range(80)]
    wait_for(lambda: _pool(first)["parked"] >= 10, 30, "narrow inputs parked on the first worker")
    reserved = len((first.inspect().reserved() or {}).get(first.hostname, []))
    assert reserved >= _pool(first)["parked"]  # inspect reserved shows the parked inputs
    second = start_worker("-c", "1", env={"TEST_SLOTS": SLOTS}, broker=broker_url)
    stamps = [r.get(timeout=120) for r in results]
    by_pid = collections.Counter(s["pid"] for s in stamps)
    print(f"{broker}: inputs per child {dict(by_pid)}")
    second_pids = set(second.child_pids())
    assert sum(n for pid, n in by_pid.items() if pid in second_pids) >= 20
    assert len(stamps) == 80 and len({s["id"] for s in stamps}) == 80  # each ran once


# -- prefetch ----------------------------------------------------------------------------


def _pool(worker: Any) -> dict[str, Any]:
    return dict(worker.stats()["pool"])


def _prefetch(worker: Any) -> tuple[int, int]:
    """(the consumer's prefetch now, what the pool's state calls for)."""
    stats = worker.stats()
    pool = stats["pool"]
    expected = pool["prefetch"]["expected"] if "prefetch" in pool else pool["prefetch-expected"]
    return int(stats["prefetch_count"]), int(expected)


def _settles_at(worker: Any, value: int, what: str) -> None:
    def settled() -> bool:
        try:
            current, expected = _prefetch(worker)
        except Exception:  # the test's own broker connection was cut too: ask again
            return False
        return current == expected == value

    wait_for(settled, 30, f"prefetch {value} {what}")


def _check_events(worker: Any) -> None:
    slots = 10
    _settles_at(worker, slots, "at start")
    running = [worker.send(app.async_sleep, 2.0) for _ in range(4)]
    _settles_at(worker, slots - 4, "with 4 early-acked inputs running")
    for r in running:
        r.get(timeout=30)
    _settles_at(worker, slots, "after they ended")
    capped = [worker.send(app.async_capped, 2.0) for _ in range(6)]  # max_inputs=2
    _settles_at(worker, slots - 2 + 4, "with 2 running and 4 parked")
    for r in capped:
        r.get(timeout=30)
    _settles_at(worker, slots, "after the capped inputs ended")
    worker.client.control.pool_grow(1, destination=[worker.hostname], reply=True, timeout=5)
    _settles_at(worker, 2 * slots, "after pool_grow")
    worker.client.control.pool_shrink(1, destination=[worker.hostname], reply=True, timeout=5)
    _settles_at(worker, slots, "after pool_shrink")


@pytest.mark.parametrize("broker", ["redis", "amqp"])
@pytest.mark.timeout(180)
def test_prefetch_is_computed_after_every_event(start_worker, broker, request):
    worker = start_worker("-c", "1", env={"TEST_SLOTS": "10"}, broker=_broker(broker, request))
    _check_events(worker)


@pytest.mark.timeout(120)
def test_prefetch_follows_the_autoscaler(start_worker):
    worker = start_worker("--autoscale=3,1", env={"TEST_SLOTS": "10", "TEST_SCALEDOWN_WINDOW": "2"})
    _settles_at(worker, 10, "at start (one child)")
    results = [worker.send(app.async_capped, 3.0) for _ in range(12)]  # target_inputs=2
    wait_for(lambda: _pool(worker)["max-concurrency"] == 30, 30, "the autoscaler to grow to 3")
    wait_for(lambda: len(set(_prefetch(worker))) == 1, 20, "prefetch to match")
    for r in results:
        r.get(timeout=60)
    _settles_at(worker, 10, "after scaling back down to one child")


@pytest.mark.timeout(180)
def test_prefetch_is_set_again_after_a_redis_reconnection(start_worker, private_redis):
    worker = start_worker("-c", "1", env={"TEST_SLOTS": "10"}, broker=private_redis.url)
    running = [worker.send(app.async_sleep, 6.0) for _ in range(3)]
    _settles_at(worker, 7, "with 3 inputs running")
    assert private_redis.kill_clients() > 0
    wait_for(lambda: "Connection to broker lost" in worker.log(), 30, "a lost connection")
    _settles_at(worker, 7, "after reconnecting, 3 inputs still running")
    for r in running:
        r.get(timeout=60)
    _settles_at(worker, 10, "after they ended")


@pytest.mark.timeout(300)
def test_prefetch_is_set_again_after_a_rabbitmq_restart(start_worker, private_rabbit):
    worker = start_worker("-c", "1", env={"TEST_SLOTS": "10"}, broker=private_rabbit.url)
    running = [worker.send(app.async_sleep, 30.0) for _ in range(3)]
    _settles_at(worker, 7, "with 3 inputs running")
    private_rabbit.restart()
    wait_for(lambda: worker.log().count("Connected to amqp://") >= 2, 120, "a reconnection")
    _settles_at(worker, 7, "after reconnecting, 3 inputs still running")
    for r in running:
        r.get(timeout=90)
    _settles_at(worker, 10, "after they ended")
