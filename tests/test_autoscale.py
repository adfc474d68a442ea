"""TargetAutoscaler against real workers: scale on backlog, drain on shrink, control."""

from __future__ import annotations

import collections

import pytest

from celery_concurrent.inspect import concurrent_snapshot
from tests import app
from tests.conftest import wait_for, worker_refused_to_start


def _autoscaler(worker) -> dict:
    """The flat ``stats()["autoscaler"]`` (what Flower and ``inspect stats`` show)."""
    return dict(worker.stats()["autoscaler"])


def _snapshot(worker) -> dict:
    """The structured ``{"pool": ..., "autoscaler": ...}`` (``inspect concurrent_snapshot``)."""
    return dict(concurrent_snapshot(worker.client, [worker.hostname])[worker.hostname])


def _reply(replies: list[dict], hostname: str) -> dict:
    for reply in replies:
        if hostname in reply:
            return dict(reply[hostname])
    raise AssertionError(f"no reply from {hostname}: {replies}")


@pytest.mark.timeout(180)
def test_step_load_scales_up_runs_everywhere_then_drains_back_to_min(start_worker, store):
    worker = start_worker("--autoscale=4,1", env={"TEST_SLOTS": "50", "TEST_SCALEDOWN_WINDOW": "4"})
    assert _autoscaler(worker)["current"] == 1
    names = [f"in{i}" for i in range(600)]
    results = [worker.send(app.async_recorded, name, 1.0) for name in names]
    wait_for(lambda: _autoscaler(worker)["current"] == 4, 15, "scale-up to 4 children")
    stamps = [r.get(timeout=120) for r in results]
    assert len({s["pid"] for s in stamps}) >= 4
    wait_for(lambda: _autoscaler(worker)["current"] == 1, 30, "scale-down to min")
    runs = collections.Counter(x.decode() for x in store.lrange(f"{worker.queue}:runs", 0, -1))
    assert runs == collections.Counter(names)  # nothing lost or repeated by draining
    log = worker.log()
    assert "Scaling up 1 -> " in log and "load above target" in log
    assert "Scaling down" in log and "draining" in log
    assert _snapshot(worker)["autoscaler"]["last_decision"]["to"] == 1
    assert " to 1 children at " in _autoscaler(worker)["last_decision"]
    assert worker.stats()["prefetch_count"] <= 50  # prefetch followed the child count


@pytest.mark.timeout(90)
def test_no_scale_down_before_the_window(start_worker):
    worker = start_worker(
        "--autoscale=3,1", env={"TEST_SLOTS": "50", "TEST_SCALEDOWN_WINDOW": "60"}
    )
    results = [worker.send(app.async_recorded, f"x{i}", 0.5) for i in range(200)]
    wait_for(lambda: _autoscaler(worker)["current"] == 3, 15, "scale-up to 3")
    for r in results:
        r.get(timeout=60)
    wait_for(lambda: _autoscaler(worker)["desired"] == 1, 15, "desired to fall to 1")
    assert _autoscaler(worker)["current"] == 3


@pytest.mark.timeout(60)
def test_info_reports_every_key(start_worker):
    worker = start_worker("--autoscale=3,1", env={"TEST_SLOTS": "50"})
    info = _autoscaler(worker)  # flat: one scalar per key, for Flower's table
    for key in (
        "max",
        "min",
        "current",
        "desired",
        "demand",
        "load",
        "running",
        "reserved",
        "backlog",
        "qty",
        "scaledown_window",
        "last_decision",
        "last_decision_reason",
    ):
        assert key in info, key
    assert all(not isinstance(v, (dict, list)) for v in info.values()), info
    assert info["task tests.app.async_recorded"] == "target 25 / max 50 inputs per child"
    assert not [key for key in info if key.startswith("task celery.")]  # built-ins left out
    assert (info["max"], info["min"]) == (3, 1)
    structured = _snapshot(worker)["autoscaler"]  # nested, for tools
    assert structured["target_inputs"]["tests.app.async_recorded"] == 25
    assert structured["max_inputs"]["tests.app.async_recorded"] == 50
    assert (structured["max"], structured["min"]) == (3, 1)


@pytest.mark.timeout(60)
def test_remote_autoscale_changes_range_and_refuses_bad_ranges(start_worker):
    worker = start_worker("--autoscale=3,1", env={"TEST_SLOTS": "50"})
    control = worker.client.control
    ok = _reply(control.autoscale(4, 2, destination=[worker.hostname], reply=True), worker.hostname)
    assert ok == {"ok": "autoscale now max=4 min=2"}
    wait_for(lambda: _autoscaler(worker)["current"] == 2, 15, "growth to the new min")
    bad = _reply(
        control.autoscale(1, 3, destination=[worker.hostname], reply=True), worker.hostname
    )
    assert "min=3 is above max=1" in bad["error"]
    negative = _reply(
        control.autoscale(-1, 0, destination=[worker.hostname], reply=True), worker.hostname
    )
    assert "must be a whole number >= 0" in negative["error"]
    assert (_autoscaler(worker)["max"], _autoscaler(worker)["min"]) == (4, 2)


@pytest.mark.timeout(60)
def test_pool_grow_is_refused_with_an_autoscaler(start_worker):
    worker = start_worker("--autoscale=3,1", env={"TEST_SLOTS": "50"})
    reply = _reply(
        worker.client.control.pool_grow(1, destination=[worker.hostname], reply=True),
        worker.hostname,
    )
    assert "not supported with autoscale" in reply["error"]


@pytest.mark.timeout(60)
def test_pool_grow_and_shrink_move_children_and_prefetch_without_autoscaler(start_worker):
    worker = start_worker("-c", "1", env={"TEST_SLOTS": "50"})
    assert worker.stats()["prefetch_count"] == 50
    worker.client.control.pool_grow(2, destination=[worker.hostname], reply=True)
    wait_for(lambda: len(worker.child_pids()) == 3, 15, "3 children")
    assert worker.stats()["prefetch_count"] == 150
    worker.client.control.pool_shrink(1, destination=[worker.hostname], reply=True)
    wait_for(lambda: len(worker.child_pids()) == 2, 15, "2 children")
    assert worker.stats()["prefetch_count"] == 100


@pytest.mark.timeout(90)
def test_autoscale_with_another_pool_is_refused_at_start():
    out = worker_refused_to_start(["-P", "threads", "--autoscale=4,1"], {})
    assert "--autoscale with TargetAutoscaler needs ConcurrentPool" in out


@pytest.mark.timeout(90)
def test_autoscale_min_above_max_is_refused_at_start():
    out = worker_refused_to_start(["--autoscale=1,4"], {})
    assert "--autoscale min=4 is above max=1" in out


@pytest.mark.timeout(90)
def test_negative_scaledown_window_is_refused_at_start():
    out = worker_refused_to_start(["--autoscale=4,1"], {"TEST_SCALEDOWN_WINDOW": "-5"})
    assert "concurrent_scaledown_window must be >= 0 seconds, got -5.0" in out


@pytest.mark.timeout(90)
def test_dispatch_fills_children_to_target_before_bursting(start_worker):
    worker = start_worker("-c", "2", env={"TEST_SLOTS": "50"})
    wait_for(
        lambda: [c["state"] for c in _snapshot(worker)["pool"]["children"]] == ["ready"] * 2,
        30,
        "both children ready",
    )

    def per_child(results) -> list[int]:
        pids = collections.Counter(r.get(timeout=60)["pid"] for r in results)
        return sorted(pids.values())

    # 50 inputs of a task with target 25 / max 50: each child takes its target, none bursts.
    assert per_child([worker.send(app.async_recorded, f"a{i}", 1.0) for i in range(50)]) == [25, 25]
    # 100 inputs: every child is at target, so both burst to max_inputs.
    stamps = [worker.send(app.async_recorded, f"b{i}", 1.0) for i in range(100)]
    assert per_child(stamps) == [50, 50]


@pytest.mark.timeout(60)
def test_autoscale_with_max_only_starts_one_child(start_worker):
    worker = start_worker("--autoscale=3", env={"TEST_SLOTS": "50"})
    info = _autoscaler(worker)
    assert (info["max"], info["min"], info["current"]) == (3, 0, 1)
    assert worker.send(app.async_add, 2, 2).get(timeout=30) == 4
