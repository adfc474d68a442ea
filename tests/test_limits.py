"""Per-input cancellation and time limits on the loop; blocked-loop detection."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from celery.exceptions import TimeLimitExceeded

from tests import app
from tests.conftest import wait_for


@pytest.fixture
def worker(start_worker):
    return start_worker("-c", "1", "-E", env={"TEST_SLOTS": "200"})


def _active_ids(worker) -> set[str]:
    replies = worker.inspect().active() or {}
    return {t["id"] for t in replies.get(worker.hostname, [])}


@pytest.mark.timeout(60)
def test_revoke_terminate_cancels_only_that_input(worker):
    target = worker.send(app.async_sleep, 30.0)
    neighbours = [worker.send(app.async_sleep, 2.0) for _ in range(50)]
    wait_for(lambda: target.id in _active_ids(worker), 20, "the target input to start")
    target.revoke(terminate=True)
    wait_for(lambda: target.state == "REVOKED", 20, "REVOKED state")
    stamps = [r.get(timeout=30) for r in neighbours]
    assert all(r.state == "SUCCESS" for r in neighbours)
    assert len({s["pid"] for s in stamps}) == 1  # the child was not killed
    assert target.state == "REVOKED"


@pytest.mark.timeout(60)
def test_revoke_before_start_skips_the_input(start_worker):
    worker = start_worker("-c", "1", env={"TEST_SLOTS": "2"})
    blockers = [worker.send(app.async_capped, 2.0) for _ in range(2)]
    waiting = worker.send(app.async_capped, 0.1)
    waiting.revoke()
    for r in blockers:
        r.get(timeout=30)
    wait_for(lambda: waiting.state == "REVOKED", 20, "the waiting input to be REVOKED")


@pytest.mark.timeout(60)
def test_soft_time_limit_raises_inside_the_coroutine(worker):
    results = [worker.send(app.async_soft_limited, 5.0) for _ in range(20)]
    quick = worker.send(app.async_soft_limited, 0.1)
    assert [r.get(timeout=30) for r in results] == ["soft limit caught"] * 20
    assert quick.get(timeout=30) == "finished"


@pytest.mark.timeout(60)
def test_soft_time_limit_from_apply_async_option(worker):
    result = worker.send(app.async_soft_limited, 5.0, soft_time_limit=0.2)
    assert result.get(timeout=30) == "soft limit caught"


@pytest.mark.timeout(60)
def test_hard_time_limit_cancels_and_records_time_limit_exceeded(worker, store):
    limited = [worker.send(app.async_hard_limited, 10.0) for _ in range(10)]
    neighbours = [worker.send(app.async_sleep, 1.0) for _ in range(20)]
    for r in limited:
        with pytest.raises(TimeLimitExceeded):
            r.get(timeout=30)
        assert r.state == "FAILURE"
    assert all(r.get(timeout=30) for r in neighbours)
    finally_ran = store.lrange(f"{worker.queue}:hard-finally", 0, -1)
    assert {x.decode() for x in finally_ran} == {r.id for r in limited}


@pytest.mark.timeout(60)
def test_a_blocked_loop_is_logged_with_the_task_name(worker):
    result = worker.send(app.async_blocking, 1.5)
    assert result.get(timeout=30) == "blocked"
    wait_for(
        lambda: (
            "blocked for" in worker.log()
            and f"tests.app.async_blocking[{result.id}]" in worker.log()
        ),
        10,
        "the blocked-loop warning",
    )


@pytest.mark.timeout(60)
def test_sync_task_with_time_limits_says_how_they_are_enforced_at_start(worker):
    log = worker.log()
    assert (
        "Task tests.app.sync_with_limits (sync, on threads): soft_time_limit=5 raises "
        "SoftTimeLimitExceeded in its thread at the next Python bytecode"
    ) in log
    assert "Task tests.app.async_hard_limited (async): soft_time_limit=None" in log


@pytest.mark.timeout(60)
def test_the_blocked_loop_warning_reports_the_blocks_real_length(worker):
    result = worker.send(app.async_blocking, 2.0)
    assert result.get(timeout=30) == "blocked"
    pattern = re.compile(
        rf"was blocked for (\d+\.\d+)s by tests\.app\.async_blocking\[{result.id}\]"
    )
    found = wait_for(lambda: pattern.findall(worker.log()), 10, "the blocked-loop warning")
    assert len(found) == 1, found  # one warning per block, when it ends
    assert 1.8 <= float(found[0]) <= 2.4, found


@pytest.mark.timeout(90)
def test_no_blocked_loop_warning_when_the_loop_thread_only_waits_for_a_cpu(start_worker):
    """The child's threads on one CPU at SCHED_IDLE beside busy processes: starved, not blocked.

    A 50 ms threshold, so the starved loop's gaps (tens to hundreds of ms here) cross it.
    """
    # The result writer on: without it each result store is a synchronous Redis round trip on
    # the loop thread, which on a starved machine can really block the loop past 50 ms.
    env = {"TEST_SLOTS": "200", "TEST_LOOP_BLOCK_WARNING": "0.05", "TEST_RESULT_WRITER": "1"}
    worker = start_worker("-c", "1", env=env)
    (child,) = worker.child_pids()
    # One input first, so that every thread the child will run exists (the result writer
    # starts with the first store) and is starved alike.
    assert worker.send(app.async_sleep, 0.01).get(timeout=30)
    cpu = min(os.sched_getaffinity(child))
    threads = [int(tid) for tid in os.listdir(f"/proc/{child}/task")]
    for tid in threads:
        os.sched_setaffinity(tid, {cpu})
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    hogs = [
        subprocess.Popen(
            [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile 1: pass"]
        )
        for _ in range(2)
    ]
    wait_before = _runqueue_wait_s(child)
    try:
        inputs = [worker.send(app.async_sleep, 0.2) for _ in range(40)]
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            inputs.append(worker.send(app.async_sleep, 0.2))
            time.sleep(0.2)
        waited = _runqueue_wait_s(child) - wait_before
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert all(r.get(timeout=60) for r in inputs)
    assert waited > 1.0, f"the loop thread waited only {waited:.2f}s for a CPU: not starved"
    assert "blocked for" not in worker.log(), worker.log()[-3000:]


def _runqueue_wait_s(pid: int) -> float:
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9
