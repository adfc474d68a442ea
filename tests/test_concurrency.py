"""Inputs really run concurrently in one child: async on the loop, sync on threads."""

from __future__ import annotations

import pytest
from celery import group

from tests import app
from tests.conftest import overlap, wait_for

# Inputs last long enough that every one of them has been delivered before the first ends,
# so the overlap reached is the cap itself, however slow this machine is today. Wall times
# are measured in bench/core.py, not asserted here.


@pytest.mark.timeout(120)
def test_async_inputs_overlap_up_to_the_slots_in_one_child(start_worker):
    worker = start_worker("-c", "1", env={"TEST_SLOTS": "200"})
    stamps = [r.get(timeout=60) for r in [worker.send(app.async_sleep, 3.0) for _ in range(400)]]
    assert len({s["pid"] for s in stamps}) == 1
    assert overlap(stamps) == 200  # the per-child slot cap, reached and never exceeded


@pytest.mark.timeout(120)
def test_sync_inputs_overlap_on_threads_in_one_child(start_worker):
    worker = start_worker("-c", "1", env={"TEST_SLOTS": "200"})
    stamps = [r.get(timeout=60) for r in [worker.send(app.sync_sleep, 3.0) for _ in range(400)]]
    assert len({s["pid"] for s in stamps}) == 1
    assert overlap(stamps) == 200


@pytest.mark.timeout(300)
def test_10000_async_inputs_in_flight_in_one_child(start_worker):
    worker = start_worker("-c", "1", env={"TEST_SLOTS": "10001"})
    signatures = [app.async_wait_release.s("gate").set(queue=worker.queue) for _ in range(10_000)]
    waiting = group(signatures).apply_async()
    wait_for(
        lambda: worker.stats()["pool"]["inflight"] == 10_000,
        240,
        "10,000 inputs in flight in the one child",
    )
    worker.send(app.async_release, "gate").get(timeout=30)
    stamps = waiting.join_native(timeout=120)
    assert len({s["pid"] for s in stamps}) == 1
    assert overlap(stamps) == 10_000


@pytest.mark.timeout(120)
def test_per_task_cap_holds_when_slots_are_larger(start_worker):
    worker = start_worker("-c", "1", env={"TEST_SLOTS": "50"})
    results = [worker.send(app.async_capped, 0.3) for _ in range(20)]
    fillers = [worker.send(app.async_sleep, 2.0) for _ in range(40)]
    capped = [r.get(timeout=60) for r in results]
    others = [r.get(timeout=60) for r in fillers]
    assert overlap(capped) == 2
    assert overlap(others) > 2


@pytest.mark.timeout(120)
def test_children_share_the_load(start_worker):
    worker = start_worker("-c", "2", env={"TEST_SLOTS": "100"})
    stamps = [r.get(timeout=60) for r in [worker.send(app.async_sleep, 3.0) for _ in range(300)]]
    pids = {s["pid"] for s in stamps}
    assert pids == set(worker.child_pids())
    assert len(pids) == 2
    assert overlap(stamps) == 200


@pytest.mark.timeout(180)
def test_mixed_async_sync_failures_and_retries_under_load(start_worker, store):
    worker = start_worker("-c", "2", env={"TEST_SLOTS": "200"})
    sent = []
    for i in range(600):
        kind = i % 6
        if kind == 0:
            sent.append(("ok", worker.send(app.async_sleep, 0.2)))
        elif kind == 1:
            sent.append(("ok", worker.send(app.sync_sleep, 0.2)))
        elif kind == 2:
            sent.append(("fail", worker.send(app.async_fail, f"boom {i}")))
        elif kind == 3:
            sent.append(("flaky", worker.send(app.async_flaky, f"a{i}", 2)))
        elif kind == 4:
            sent.append(("flaky", worker.send(app.sync_flaky, f"s{i}", 1)))
        else:
            sent.append(("fail", worker.send(app.sync_fail, f"sync boom {i}")))
    for kind, result in sent:
        if kind == "fail":
            with pytest.raises(ValueError, match="boom"):
                result.get(timeout=120)
            assert result.state == "FAILURE"
        else:
            result.get(timeout=120)
            assert result.state == "SUCCESS"
    attempts = {
        k.decode(): int(store.get(k)) for k in store.scan_iter(f"{worker.queue}:attempts:*")
    }
    assert len(attempts) == 200
    for name, count in attempts.items():
        expected = 3 if name.split(":")[-1].startswith("a") else 2
        assert count == expected, (name, count)
