"""Sync inputs on both backends (threads, gevent): concurrency, real blocking I/O, limits."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from tests import app
from tests.conftest import local_http_server, overlap, wait_for, worker_refused_to_start


@pytest.fixture
def gevent_worker(start_worker):
    return start_worker("-c", "1", env={"TEST_SYNC_BACKEND": "gevent", "TEST_SLOTS": "1000"})


@pytest.fixture
def slow_server() -> Iterator[str]:
    """A local HTTP server answering each request after 0.5 s, many at once."""
    with local_http_server(str.encode, delay_s=0.5) as url:
        yield url


def _pids(worker) -> set[int]:
    stats = worker.inspect().stats() or {}
    return set(stats.get(worker.hostname, {}).get("pool", {}).get("processes", []))


@pytest.mark.timeout(180)
def test_gevent_runs_1000_sync_sleeps_at_once_in_one_child(start_worker, queue_name):
    # Queued before the worker starts, so the inputs' overlap is the pool's, not the sender's.
    # time.sleep(3): the parent starts ~1,000 inputs/s here, so with 3 s they all overlap.
    results = [app.sync_wide_sleep.apply_async((3.0,), queue=queue_name) for _ in range(1000)]
    worker = start_worker("-c", "1", env={"TEST_SYNC_BACKEND": "gevent", "TEST_SLOTS": "1000"})
    began = time.monotonic()
    stamps = [r.get(timeout=120) for r in results]
    took = time.monotonic() - began
    print(f"1,000 x time.sleep(3) on gevent, one child, from ready: {took:.1f} s")
    assert [s["id"] for s in stamps] == [r.id for r in results]  # each input's own id
    assert {s["pid"] for s in stamps} == _pids(worker)
    assert overlap(stamps) >= 900, overlap(stamps)


@pytest.mark.timeout(180)
def test_gevent_sync_http_and_redis_are_cooperative_beside_async_inputs(gevent_worker, slow_server):
    fetches = [gevent_worker.send(app.sync_fetch, f"{slow_server}/{i}") for i in range(200)]
    waits = [gevent_worker.send(app.sync_blpop, f"w{i}", 1) for i in range(200)]
    asyncs = [gevent_worker.send(app.async_sleep, 1.0) for _ in range(200)]
    asyncs += [gevent_worker.send(app.async_to_thread, 0.5) for _ in range(20)]
    fetched = [r.get(timeout=120) for r in fetches]
    assert [f["body"] for f in fetched] == [f"/{i}" for i in range(200)]
    waited = [r.get(timeout=120) for r in waits]
    slept = [r.get(timeout=120) for r in asyncs]
    assert len({s["pid"] for s in fetched + waited + slept}) == 1
    # Sync HTTP, sync Redis and async inputs ran at the same time in one child: blocking
    # calls that did not yield would run one at a time. (The peak of all three together
    # depends on how fast this test sends, about 260-400 here; each kind's share does not.)
    together = _fewest_at_once([fetched, waited, slept])
    assert together >= 50, together


def _fewest_at_once(kinds: list[list[dict[str, float]]]) -> int:
    """The largest n such that, at one instant, at least n inputs of every kind were running."""
    events = sorted(
        (t, delta, k)
        for k, stamps in enumerate(kinds)
        for s in stamps
        for t, delta in ((s["start"], 1), (s["end"], -1))
    )
    running = [0] * len(kinds)
    best = 0
    for _, delta, k in events:
        running[k] += delta
        best = max(best, min(running))
    return best


@pytest.mark.timeout(120)
def test_gevent_limits_and_revoke_stop_only_their_input(gevent_worker, store):
    pids_before = _pids(gevent_worker)
    neighbours = [gevent_worker.send(app.sync_wide_sleep, 4.0) for _ in range(50)]
    soft = gevent_worker.send(app.sync_soft_limited, 10.0, 10.0)  # one long time.sleep
    hard = gevent_worker.send(app.sync_hard_limited, 30.0)
    victim = gevent_worker.send(app.sync_wide_sleep, 30.0)
    wait_for(lambda: _active(gevent_worker, victim.id), 20, "the victim input to start")
    victim.revoke(terminate=True)
    assert soft.get(timeout=20) == "soft limit caught"
    with pytest.raises(TimeLimitExceeded):
        hard.get(timeout=20)
    wait_for(lambda: victim.state == "REVOKED", 20, "the revoked input to be REVOKED")
    assert all(r.get(timeout=30)["pid"] in pids_before for r in neighbours)
    assert store.lrange(f"{gevent_worker.queue}:hard-finally", 0, -1) == [hard.id.encode()]
    assert _pids(gevent_worker) == pids_before  # no child was replaced for any of it


@pytest.mark.timeout(120)
def test_gevent_worker_wide_soft_time_limit_applies(start_worker):
    worker = start_worker("-c", "1", "--soft-time-limit", "1", env={"TEST_SYNC_BACKEND": "gevent"})
    result = worker.send(app.sync_wide_sleep, 10.0)
    with pytest.raises(SoftTimeLimitExceeded):
        result.get(timeout=20)


@pytest.mark.timeout(120)
def test_threads_hard_time_limit_replaces_the_child_and_the_worker_serves_on(start_worker):
    worker = start_worker("-c", "1")
    pids_before = _pids(worker)
    began = time.monotonic()
    limited = worker.send(app.sync_hard_limited, 30.0)  # time_limit=2, in one C call
    with pytest.raises(TimeLimitExceeded):
        limited.get(timeout=25)
    took = time.monotonic() - began
    print(f"sync time_limit=2 on threads: TimeLimitExceeded after {took:.1f} s")
    assert took < 15  # the 30 s sleep was not waited for
    after = worker.send(app.sync_wide_sleep, 0.1).get(timeout=30)
    assert after["pid"] not in pids_before
    assert "hard time limit (2s) exceeded" in worker.log()


@pytest.mark.timeout(120)
def test_threads_soft_time_limit_raises_at_the_next_bytecode(start_worker):
    worker = start_worker("-c", "1")
    assert worker.send(app.sync_soft_limited, 10.0, 0.05).get(timeout=20) == "soft limit caught"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["threads", "gevent"])
def test_start_up_log_says_how_sync_limits_are_enforced(start_worker, backend):
    worker = start_worker("-c", "1", env={"TEST_SYNC_BACKEND": backend})
    expected = {
        "threads": "Task tests.app.sync_hard_limited (sync, on threads): soft_time_limit=None "
        "raises SoftTimeLimitExceeded in its thread at the next Python bytecode",
        "gevent": "Task tests.app.sync_hard_limited (sync, on gevent): soft_time_limit=None "
        "raises SoftTimeLimitExceeded in its greenlet at once",
    }[backend]
    assert expected in worker.log()


def test_an_unknown_sync_backend_is_refused_with_the_choices():
    out = worker_refused_to_start(["-c", "1"], {"TEST_SYNC_BACKEND": "eventlet"})
    assert "concurrent_sync_backend must be one of 'threads', 'gevent', got 'eventlet'" in out, out


def test_gevent_backend_without_gevent_names_the_pip_install(tmp_path: Path):
    shadow = tmp_path / "gevent"
    shadow.mkdir()
    (shadow / "__init__.py").write_text('raise ImportError("no gevent here (test shadow)")\n')
    out = worker_refused_to_start(
        ["-c", "1"], {"TEST_SYNC_BACKEND": "gevent", "PYTHONPATH": str(tmp_path)}
    )
    assert "pip install 'celery-concurrent[gevent]'" in out, out


def _active(worker, task_id: str) -> bool:
    return task_id in _active_ids(worker)


@pytest.mark.timeout(240)
def test_gevent_stress_mixed_sync_async_failures_retries_revokes_and_limits(start_worker, store):
    """1,000 inputs at once on two gevent children; every one ends in its expected state."""
    # A child this busy on 2 shared cores can lag past the default 1 s grace before it
    # reports the limit it enforced; 10 s keeps the parent's backstop out of this test.
    env = {"TEST_SYNC_BACKEND": "gevent", "TEST_SLOTS": "1000", "TEST_CANCEL_GRACE": "10"}
    worker = start_worker("-c", "2", env=env)
    expected: dict[str, tuple[object, str]] = {}  # task id -> (result, final state)
    for i in range(550):
        r = worker.send(app.sync_wide_sleep, 0.2 + (i % 10) / 10)
        expected[r.id] = (r, "SUCCESS")
    for i in range(250):
        r = worker.send(app.async_sleep, 0.2 + (i % 10) / 10)
        expected[r.id] = (r, "SUCCESS")
    for i in range(60):
        r = worker.send(app.sync_fail, f"boom {i}")
        expected[r.id] = (r, "FAILURE")
    for i in range(60):
        r = worker.send(app.sync_flaky, f"f{i}", 2)  # fails twice, retried, then succeeds
        expected[r.id] = (r, "SUCCESS")
    soft = [worker.send(app.sync_soft_limited, 10.0, 10.0) for _ in range(20)]
    hard = [worker.send(app.sync_hard_limited, 30.0) for _ in range(20)]
    victims = [worker.send(app.sync_wide_sleep, 30.0) for _ in range(40)]
    for r in hard:
        expected[r.id] = (r, "FAILURE")
    for r in victims:
        expected[r.id] = (r, "REVOKED")
    wait_for(lambda: all(_active(worker, v.id) for v in victims[:1]), 30, "a victim to start")
    for v in victims:
        v.revoke(terminate=True)
    assert [r.get(timeout=60) for r in soft] == ["soft limit caught"] * 20

    def unfinished() -> Counter[tuple[str, str]]:
        return Counter(
            (getattr(r, "name", None) or "?", r.state)
            for r, _ in expected.values()
            if r.state not in ("SUCCESS", "FAILURE", "REVOKED")
        )

    with contextlib.suppress(AssertionError):
        wait_for(lambda: not unfinished(), 120, "every input to reach a final state")
    left = unfinished()
    assert not left, f"not final after 120 s, (task, state): {dict(left)}\n{worker.log()[-3000:]}"
    states = {tid: r.state for tid, (r, _) in expected.items()}
    wrong = {tid: (states[tid], want) for tid, (_, want) in expected.items() if states[tid] != want}
    assert not wrong, [
        (expected[tid][0].name, got, want, repr(expected[tid][0].result)[:200])
        for tid, (got, want) in list(wrong.items())[:10]
    ]
    attempts = [int(store.get(f"{worker.queue}:attempts:f{i}")) for i in range(60)]
    assert attempts == [3] * 60  # each flaky input ran exactly three times: no lost retries
    assert all(isinstance(r.result, TimeLimitExceeded) for r in hard)


@pytest.mark.timeout(120)
def test_gevent_child_warm_shutdown_finishes_running_sync_inputs(start_worker):
    worker = start_worker("-c", "1", env={"TEST_SYNC_BACKEND": "gevent", "TEST_SLOTS": "1000"})
    results = [worker.send(app.sync_wide_sleep, 2.0) for _ in range(100)]
    wait_for(lambda: len(_active_ids(worker)) == 100, 30, "100 inputs running")
    assert worker.stop() == 0
    assert all(r.state == "SUCCESS" for r in results)


def _active_ids(worker) -> set[str]:
    replies = worker.inspect().active() or {}
    return {t["id"] for t in replies.get(worker.hostname, [])}
