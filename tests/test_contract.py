"""Celery's contract holds under concurrency: states, requests, retries, canvas, signals."""

from __future__ import annotations

import threading
import time

import pytest
from celery import chain, chord, group
from celery.result import AsyncResult

from celery_concurrent.inspect import concurrent_snapshot
from tests import app
from tests.conftest import wait_for


@pytest.fixture(params=["threads", "gevent"])
def worker(start_worker, request):
    """The contract holds on both sync backends (async inputs run on the loop in both)."""
    return start_worker(
        "-c", "2", "-E", env={"TEST_SLOTS": "500", "TEST_SYNC_BACKEND": request.param}
    )


@pytest.mark.timeout(120)
def test_self_request_and_current_input_id_are_each_inputs_own_async(worker):
    results = [worker.send(app.async_whoami, 0.2 + (i % 7) * 0.01) for i in range(300)]
    for result in results:
        seen = result.get(timeout=60)["seen"]
        assert all(tuple(s) == (result.id, result.id, result.id) for s in seen), seen


@pytest.mark.timeout(120)
def test_self_request_and_current_input_id_are_each_inputs_own_sync(worker):
    results = [worker.send(app.sync_whoami, 0.1) for _ in range(200)]
    for result in results:
        seen = result.get(timeout=60)["seen"]
        assert all(tuple(s) == (result.id, result.id) for s in seen), seen


@pytest.mark.timeout(60)
def test_class_based_task_runs_on_the_loop(worker):
    out = worker.send(app.embed, "hello").get(timeout=30)
    assert out["len"] == 5
    assert out["id"] == out["input"]


@pytest.mark.timeout(60)
def test_failure_is_stored_with_its_exception(worker):
    result = worker.send(app.async_fail, "bad input")
    with pytest.raises(ValueError, match="bad input"):
        result.get(timeout=30)
    assert result.state == "FAILURE"
    assert "async_fail" in (result.traceback or "")


@pytest.mark.timeout(60)
def test_self_retry_retries_then_succeeds(worker, store):
    results = [worker.send(app.async_retry, f"r{i}", 2) for i in range(50)]
    assert [r.get(timeout=60) for r in results] == [3] * 50
    events = store.lrange(f"{worker.queue}:signals:{results[0].id}", 0, -1)
    assert events.count(b"retry") == 2


@pytest.mark.timeout(60)
def test_autoretry_for_with_backoff_async_and_sync(worker):
    async_results = [worker.send(app.async_flaky, f"a{i}", 3) for i in range(50)]
    sync_results = [worker.send(app.sync_flaky, f"s{i}", 2) for i in range(50)]
    assert [r.get(timeout=60) for r in async_results] == [4] * 50
    assert [r.get(timeout=60) for r in sync_results] == [3] * 50


@pytest.mark.timeout(60)
def test_ignore_result_stores_nothing_but_runs(worker, store):
    results = [worker.send(app.async_ignored, f"n{i}") for i in range(20)]
    wait_for(lambda: store.llen(f"{worker.queue}:ignored") == 20, 30, "20 ignored inputs to run")
    time.sleep(0.2)
    assert all(r.state == "PENDING" for r in results)


@pytest.mark.timeout(60)
def test_track_started_shows_started_while_running(worker):
    result = worker.send(app.async_tracked, 2.0)
    wait_for(lambda: result.state == "STARTED", 20, "STARTED state")
    assert result.get(timeout=30) == "tracked"


@pytest.mark.timeout(60)
def test_chain_chord_group_and_link(worker):
    q = worker.queue
    assert chain(app.async_add.s(1, 2), app.async_add.s(10)).set(queue=q)().get(timeout=30) == 13
    header = group(app.async_add.s(i, i).set(queue=q) for i in range(20))
    assert chord(header)(app.async_sum.s().set(queue=q)).get(timeout=30) == sum(
        2 * i for i in range(20)
    )
    assert group(app.async_add.s(i, 1).set(queue=q) for i in range(10))().get(timeout=30) == list(
        range(1, 11)
    )
    linked = app.async_add.apply_async((2, 3), queue=q, link=app.async_add.s(100).set(queue=q))
    assert linked.get(timeout=30) == 5
    child = wait_for(lambda: linked.children, 30, "the linked callback to be recorded")
    assert child[0].get(timeout=30) == 105


@pytest.mark.timeout(60)
def test_signals_fire_for_each_input_with_its_own_request(worker, store):
    ok = [worker.send(app.async_add, i, 1) for i in range(50)]
    bad = [worker.send(app.async_fail, "x") for _ in range(10)]
    sync_ok = [worker.send(app.sync_sleep, 0.01) for _ in range(20)]
    for r in ok + sync_ok:
        r.get(timeout=30)
    for r in bad:
        with pytest.raises(ValueError):
            r.get(timeout=30)

    def events(result: AsyncResult) -> list[bytes]:
        return store.lrange(f"{worker.queue}:signals:{result.id}", 0, -1)

    for r in ok + sync_ok:
        wait_for(lambda r=r: b"postrun" in events(r), 10, "postrun")
        assert events(r) == [b"prerun", b"success", b"postrun"]
    for r in bad:
        wait_for(lambda r=r: b"postrun" in events(r), 10, "postrun")
        assert events(r) == [b"prerun", b"failure", b"postrun"]


@pytest.mark.timeout(90)
def test_worker_process_init_and_shutdown_run_in_each_child(start_worker, store):
    worker = start_worker("-c", "3")
    pids = set(worker.child_pids())
    assert len(pids) == 3

    def initialised() -> set[int]:
        return {int(p) for p in store.lrange(f"{worker.queue}:child-init", 0, -1)}

    wait_for(lambda: initialised() == pids, 30, "worker_process_init in all 3 children")
    assert worker.stop() == 0
    shutdown = {int(p) for p in store.lrange(f"{worker.queue}:child-shutdown", 0, -1)}
    assert shutdown == pids


@pytest.mark.timeout(60)
def test_the_loop_is_the_one_made_at_child_start(worker):
    loops = [worker.send(app.async_loop_identity).get(timeout=30) for _ in range(20)]
    assert -1 not in loops
    assert len(set(loops)) <= 2  # one loop per child


@pytest.mark.timeout(60)
def test_undecorated_tasks_still_run(worker):
    assert worker.send(app.plain_sync, 21).get(timeout=30) == 42
    assert worker.send(app.plain_async, 5).get(timeout=30) == 15


@pytest.mark.timeout(60)
def test_inspect_active_reserved_and_stats(worker):
    results = [worker.send(app.async_sleep, 3.0) for _ in range(30)]

    def active_ids() -> set[str]:
        replies = worker.inspect().active() or {}
        return {t["id"] for t in replies.get(worker.hostname, [])}

    wait_for(lambda: len(active_ids()) == 30, 20, "30 active inputs")
    assert active_ids() == {r.id for r in results}
    reserved = (worker.inspect().reserved() or {}).get(worker.hostname)
    assert reserved == []
    pool = worker.stats()["pool"]
    assert pool["implementation"] == "celery_concurrent.pool:ConcurrentPool"
    assert pool["max-concurrency"] == 2 * 500
    assert pool["slots-per-child"] == 500
    assert len(pool["processes"]) == 2
    assert pool["task tests.app.async_sleep"].startswith("30 in flight / max 10000,")
    assert not [key for key in pool if key.startswith("task celery.")]  # built-ins left out
    snapshot = concurrent_snapshot(worker.client, [worker.hostname])[worker.hostname]
    task = snapshot["pool"]["tasks"]["tests.app.async_sleep"]
    assert task["max_inputs"] == 10_000
    assert task["inflight"] == 30
    for r in results:
        r.get(timeout=30)


@pytest.mark.timeout(60)
def test_task_events_reach_a_monitor(worker):
    seen: dict[str, set[str]] = {}

    def on_event(event: dict) -> None:
        if "uuid" in event:
            seen.setdefault(event["uuid"], set()).add(event["type"])
        elif event.get("type") == "test-probe":
            seen.setdefault("probe", set()).add("seen")

    with app.app.connection_for_read() as conn:
        receiver = app.app.events.Receiver(conn, handlers={"*": on_event})
        thread = threading.Thread(
            target=receiver.capture,
            kwargs={"limit": None, "timeout": 30, "wakeup": False},
            daemon=True,
        )
        thread.start()
        with app.app.events.default_dispatcher() as dispatcher:
            wait_for(
                lambda: dispatcher.send("test-probe") or "probe" in seen,
                20,
                "the event receiver to be consuming",
            )
        results = [worker.send(app.async_add, i, i) for i in range(10)]
        wanted = {"task-received", "task-started", "task-succeeded"}
        wait_for(
            lambda: all(wanted <= seen.get(r.id, set()) for r in results),
            30,
            "received/started/succeeded events for 10 inputs",
        )
        receiver.should_stop = True
        thread.join(5)
