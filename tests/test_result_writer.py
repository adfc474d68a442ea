"""The result writer: async inputs' result writes and publishes leave the child's loop.

Real workers on the shared Redis broker; results go to a private ``redis-server`` that the
tests stop (SIGSTOP, or kill) and start again on the same port.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests import app
from tests.conftest import Worker, wait_for
from tests.reliability.harness import BrokerUnavailable, PrivateRedisServer


@pytest.fixture
def results() -> Iterator[PrivateRedisServer]:
    """The workers' result backend: a private redis-server, killed at teardown."""
    try:
        server = PrivateRedisServer().start()
    except BrokerUnavailable as exc:
        pytest.skip(str(exc))
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)  # a failed test may leave it stopped
    server.close()


@pytest.fixture
def writer_worker(
    start_worker: Callable[..., Worker], results: PrivateRedisServer
) -> Iterator[Callable[..., Worker]]:
    """Factory: a worker whose result backend is ``results``; logs shown when a test fails."""
    workers: list[Worker] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Worker:
        worker = start_worker(
            *(args or ("-c", "1")),
            env={
                "RESULT_URL": results.url,
                "TEST_SLOTS": "1000",
                "TEST_RESULT_WRITER": "1",
                **(env or {}),
            },
        )
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        print(f"--- {worker.hostname} ({worker.log_path}):\n{worker.handle.tail(60)}")


def meta(server: PrivateRedisServer, task_id: str) -> dict[str, Any] | None:
    client = server.client()
    try:
        raw = client.get(f"celery-task-meta-{task_id}")
    finally:
        client.close()
    return None if raw is None else dict(json.loads(raw))


def wait_states(
    server: PrivateRedisServer, ids: list[str], timeout_s: float, ready: set[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Wait until every id has a final state (one MGET per poll); returns their metas."""
    ready = ready or {"SUCCESS", "FAILURE"}
    client = server.client()
    found: dict[str, dict[str, Any]] = {}

    def all_final() -> bool:
        missing = [i for i in ids if i not in found]
        for start in range(0, len(missing), 500):
            chunk = missing[start : start + 500]
            for task_id, raw in zip(
                chunk, client.mget([f"celery-task-meta-{i}" for i in chunk]), strict=True
            ):
                if raw is not None and json.loads(raw)["status"] in ready:
                    found[task_id] = json.loads(raw)
        return len(found) == len(ids)

    try:
        wait_for(all_final, timeout_s, f"{len(ids)} final states")
    except AssertionError:
        missing = [i for i in ids if i not in found][:10]
        states = [(i, client.get(f"celery-task-meta-{i}")) for i in missing]
        raise AssertionError(f"{len(found)} of {len(ids)} final; missing: {states}") from None
    finally:
        client.close()
    return found


def runs(store: redis.Redis) -> Counter[str]:
    return Counter(v.decode() for v in store.lrange(app.key("runs"), 0, -1))


def writer_stats(worker: Worker, results: PrivateRedisServer) -> dict[str, Any] | None:
    task_id = worker.send(app.async_writer_stats).id
    return wait_states(results, [task_id], 30)[task_id]["result"]  # type: ignore[no-any-return]


class Subscriber:
    """Every state published on the result channels, in the order Redis sent them."""

    def __init__(self, server: PrivateRedisServer) -> None:
        self._client = server.client()
        self._pubsub = self._client.pubsub()
        self._pubsub.psubscribe("celery-task-meta-*")
        self.states: dict[str, list[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        wait_for(lambda: self._pubsub.get_message(timeout=0.1), 5, "the psubscribe reply")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.1)
            if message and message["type"] == "pmessage":
                body = json.loads(message["data"])
                self.states.setdefault(body["task_id"], []).append(body["status"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self._client.close()


@pytest.mark.timeout(120)
def test_started_then_success_in_order_with_expiry_and_batches(writer_worker, results):
    worker = writer_worker()
    subscriber = Subscriber(results)
    try:
        ids = [worker.send(app.async_tracked, 0.05).id for _ in range(300)]
        metas = wait_states(results, ids, 60)
        wait_for(lambda: all(len(subscriber.states.get(i, [])) >= 2 for i in ids), 10, "published")
    finally:
        subscriber.close()
    assert {m["status"] for m in metas.values()} == {"SUCCESS"}
    assert {tuple(subscriber.states[i]) for i in ids} == {("STARTED", "SUCCESS")}
    client = results.client()
    ttls = {client.ttl(f"celery-task-meta-{i}") for i in ids[:20]}
    client.close()
    assert all(500 < ttl <= 600 for ttl in ttls), ttls  # SETEX with result_expires, as stock
    stats = writer_stats(worker, results)
    assert stats is not None
    # Each input: a GET then a SET for STARTED, again for SUCCESS; fewer batches than writes.
    assert stats["sets"] >= 600 and stats["gets"] >= 600, stats
    assert stats["batches"] < stats["sets"] + stats["gets"], stats
    assert stats["largest_batch"] > 1, stats


@pytest.mark.timeout(120)
def test_setting_off_keeps_the_stock_path(writer_worker, results):
    worker = writer_worker(env={"TEST_RESULT_WRITER": "0"})
    ids = [worker.send(app.async_add, i, 1).id for i in range(20)]
    metas = wait_states(results, ids, 30)
    assert [metas[i]["result"] for i in ids] == [i + 1 for i in range(20)]
    assert writer_stats(worker, results) is None


@pytest.mark.timeout(120)
def test_done_waits_for_the_write_so_a_killed_child_redelivers(writer_worker, results, store):
    """acks_late: the child dies after the body, while its result write is held."""
    worker = writer_worker()
    assert results.proc is not None
    os.kill(results.proc.pid, signal.SIGSTOP)
    task_id = worker.send(app.async_late_once, "late").id
    finished = wait_for(lambda: store.lrange(app.key("finished"), 0, -1), 30, "the body's end")
    child = int(finished[0].decode().rsplit(":", 1)[1])
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: "exited unexpectedly" in worker.log(), 30, "the pool to see the death")
    os.kill(results.proc.pid, signal.SIGCONT)
    final = wait_states(results, [task_id], 60)[task_id]
    assert final["status"] == "SUCCESS" and final["result"] == "late"
    # The first run's DONE never reached the parent, so the message was redelivered.
    assert runs(store) == Counter({"late": 2})


@pytest.mark.timeout(120)
def test_a_soft_limit_during_a_held_write_lands_at_the_next_await(writer_worker, results):
    """The STARTED write is held; the soft limit fires meanwhile and reaches the body."""
    worker = writer_worker()
    assert results.proc is not None
    os.kill(results.proc.pid, signal.SIGSTOP)
    try:
        task_id = worker.send(app.async_tracked_soft, 30.0).id
        wait_for(lambda: "Soft time limit (0.5s) exceeded" in worker.log(), 30, "the soft limit")
    finally:
        os.kill(results.proc.pid, signal.SIGCONT)
    final = wait_states(results, [task_id], 30)[task_id]
    # Raised inside the write, it would have been a FAILURE (an error outside the body).
    assert final["status"] == "SUCCESS" and final["result"] == "soft limit caught", final


@pytest.mark.timeout(120)
def test_retries_and_publishes_from_the_body_go_through_the_writer(writer_worker, results, store):
    worker = writer_worker()
    names = [f"r{i}" for i in range(50)]
    retry_ids = [worker.send(app.async_retry, name, 2).id for name in names]
    spawn_ids = [worker.send(app.async_spawn, f"s{i}").id for i in range(20)]
    metas = wait_states(results, retry_ids + spawn_ids, 60)
    assert [metas[i]["result"] for i in retry_ids] == [3] * 50
    for name in names:  # two retries each, no message published twice
        assert int(store.get(app.key("attempts", name)) or 0) == 3, name
    children = [metas[i]["result"] for i in spawn_ids]
    assert [m["result"] for m in wait_states(results, children, 60).values()] != []
    assert runs(store) == Counter({f"s{i}": 1 for i in range(20)})
    # before_task_publish ran in the publishing input's greenlet: current_task was the parent.
    seen = {v.decode() for v in store.lrange(app.key("published-from"), 0, -1)}
    assert seen == {f"{parent}:{child}" for parent, child in zip(spawn_ids, children, strict=True)}
    stats = writer_stats(worker, results)
    assert stats is not None and stats["publishes"] >= 100 + 20, stats
    assert stats["failed"] == 0, stats


@pytest.mark.timeout(300)
def test_a_mixed_burst_of_1000_ends_in_the_right_states(writer_worker, results, store):
    worker = writer_worker("-c", "2")
    sent: list[tuple[str, str]] = []
    for i in range(1000):
        kind = ("ok", "fail", "retry")[i % 3]
        if kind == "ok":
            sent.append((kind, worker.send(app.async_add, i, 1).id))
        elif kind == "fail":
            sent.append((kind, worker.send(app.async_fail, f"boom {i}").id))
        else:
            sent.append((kind, worker.send(app.async_retry, f"m{i}", 1).id))
    metas = wait_states(results, [task_id for _, task_id in sent], 240)
    for i, (kind, task_id) in enumerate(sent):
        found = metas[task_id]
        if kind == "ok":
            assert (found["status"], found["result"]) == ("SUCCESS", i + 1), found
        elif kind == "fail":
            assert found["status"] == "FAILURE", found
            assert found["result"]["exc_message"] == [f"boom {i}"], found
        else:
            assert (found["status"], found["result"]) == ("SUCCESS", 2), found
            assert int(store.get(app.key("attempts", f"m{i}")) or 0) == 2


def _outage(results: PrivateRedisServer, how: str) -> Callable[[], None]:
    """Start a result-backend outage; returns the function that ends it."""
    proc = results.proc
    assert proc is not None
    if how == "sigstop":
        os.kill(proc.pid, signal.SIGSTOP)
        return lambda: os.kill(proc.pid, signal.SIGCONT)
    proc.kill()  # appendfsync always: what was written survives
    proc.wait()
    results.proc = None

    def restart() -> None:
        results.start()  # same port, same data directory

    return restart


def _ticks(store: redis.Redis, name: str) -> int:
    return int(store.llen(app.key("ticks", name)))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["sigstop", "kill"])
def test_a_result_backend_outage_delays_results_but_not_the_loop(
    writer_worker, results, store, how
):
    worker = writer_worker()
    worker.send(app.async_ticker, "t", 0.02)
    wait_for(lambda: _ticks(store, "t") >= 5, 30, "the ticker to tick")
    before = [worker.send(app.async_once, f"b{i}").id for i in range(20)]
    wait_states(results, before, 30)

    end_outage = _outage(results, how)
    try:
        during = [worker.send(app.async_once, f"d{i}").id for i in range(50)]
        # Every body runs while nothing can be stored, and the ticker keeps ticking.
        wait_for(lambda: len(runs(store)) == 70, 30, "the inputs' bodies during the outage")
        ticks = _ticks(store, "t")
        wait_for(lambda: _ticks(store, "t") >= ticks + 25, 10, "ticks during the outage")
    finally:
        end_outage()
    metas = wait_states(results, during, 90)
    assert [metas[i]["result"] for i in during] == [f"d{i}" for i in range(50)]
    assert runs(store) == Counter(
        {**{f"b{i}": 1 for i in range(20)}, **{f"d{i}": 1 for i in range(50)}}
    )
    store.set(app.key("stop", "t"), 1)
    if how == "kill":
        assert "Connection to Redis lost: Retry" in worker.log()  # the backend's retry policy


@pytest.mark.timeout(120)
def test_outage_control_without_the_writer_the_loop_stalls(writer_worker, results, store):
    """The same measure with the writer off: the ticker stops (so the test above can fail)."""
    worker = writer_worker(env={"TEST_RESULT_WRITER": "0"})
    worker.send(app.async_ticker, "t", 0.02)
    wait_for(lambda: _ticks(store, "t") >= 5, 30, "the ticker to tick")
    end_outage = _outage(results, "sigstop")
    try:
        ids = [worker.send(app.async_once, f"d{i}").id for i in range(5)]
        wait_for(lambda: len(runs(store)) >= 1, 30, "a body during the outage")
        ticks = _ticks(store, "t")
        with pytest.raises(AssertionError, match="timed out"):
            wait_for(lambda: _ticks(store, "t") >= ticks + 25, 3, "ticks during the outage")
    finally:
        end_outage()
    wait_states(results, ids, 60)
    store.set(app.key("stop", "t"), 1)
