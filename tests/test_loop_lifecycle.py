"""Per-child async set-up on real workers: loop_init/loop_shutdown, @enter/@exit, contexts,
and async code inside inputs that behaves like asyncio (awaiting a task, sub-tasks).

An aiohttp session made on the child's loop fetches from a local HTTP server.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from celery_concurrent import enter
from tests import loop_app
from tests.conftest import local_http_server, wait_for

APP = "tests.loop_app"


@pytest.fixture
def http_url() -> Iterator[str]:
    with local_http_server(lambda path: f"hello {path}".encode()) as url:
        yield url


@pytest.fixture(autouse=True)
def _route_to_test_queue(queue_name: str) -> Iterator[None]:
    previous = loop_app.app.conf.task_default_queue, loop_app.QUEUE
    loop_app.app.conf.task_default_queue = queue_name
    loop_app.QUEUE = queue_name
    yield
    loop_app.app.conf.task_default_queue, loop_app.QUEUE = previous


def _entries(store: Any, queue: str, name: str) -> list[tuple[int, float]]:
    return [
        (int(pid), float(at))
        for pid, at in (raw.decode().split() for raw in store.lrange(f"{queue}:{name}", 0, -1))
    ]


@pytest.mark.parametrize("backend", ["threads", "gevent"])
def test_loop_init_and_enter_open_sessions_used_by_every_input_then_shutdown_closes_them(
    start_worker, store, queue_name, http_url, backend
):
    worker = start_worker("-c", "2", env={"TEST_SYNC_BACKEND": backend}, app=APP)
    pids = set(worker.child_pids())
    # The worker is ready once one child is; the other may still be in its start-up hooks.
    for hook in ("loop_init", "enter"):
        wait_for(
            lambda hook=hook: {pid for pid, _ in _entries(store, queue_name, hook)} == pids,
            30,
            f"{hook} in both children",
        )

    sent = [loop_app.get_text.delay(f"{http_url}/a{i}") for i in range(200)]
    sent += [loop_app.get_with_own_session.delay(f"{http_url}/b{i}") for i in range(200)]
    results = [r.get(timeout=60) for r in sent]
    assert [r["text"] for r in results[:200]] == [f"hello /a{i}" for i in range(200)]
    assert [r["text"] for r in results[200:]] == [f"hello /b{i}" for i in range(200)]
    assert {r["pid"] for r in results} <= pids
    assert store.llen(f"{queue_name}:exit") == 0 and store.llen(f"{queue_name}:loop_shutdown") == 0

    assert worker.stop() == 0
    shutdowns = _entries(store, queue_name, "loop_shutdown")
    exits = _entries(store, queue_name, "exit")
    assert {pid for pid, _ in shutdowns} == pids and len(shutdowns) == 2
    assert {pid for pid, _ in exits} == pids and len(exits) == 2
    last_input_end = max(r["end"] for r in results)
    assert min(at for _, at in shutdowns + exits) >= last_input_end
    assert "raised" not in worker.log(), worker.log()[-3000:]


def test_loop_shutdown_runs_when_a_child_is_recycled(start_worker, store, queue_name, http_url):
    worker = start_worker("-c", "1", "--max-tasks-per-child", "5", app=APP)
    first = worker.child_pids()
    results = [loop_app.get_text.delay(f"{http_url}/{i}").get(timeout=30) for i in range(12)]
    assert all(r["status"] == 200 for r in results)
    recycled = wait_for(
        lambda: {pid for pid, _ in _entries(store, queue_name, "loop_shutdown")} or None,
        30,
        "loop_shutdown in a recycled child",
    )
    assert first[0] in recycled
    inits = [pid for pid, _ in _entries(store, queue_name, "loop_init")]
    assert len(set(inits)) >= 3, inits  # 12 inputs, 5 per child: three children at least
    assert len(inits) == len(set(inits))  # once per child


def test_contextvars_from_start_up_are_seen_by_async_inputs_and_each_keeps_its_own(
    start_worker,
):
    start_worker("-c", "1", app=APP)
    async_results = [loop_app.read_context.delay(f"a{i}") for i in range(300)]
    for i, result in enumerate(async_results):
        seen = result.get(timeout=60)
        pid = seen["pid"]
        assert seen == {
            "process_init": f"process-init-{pid}",
            "loop_init": f"loop-init-{pid}",
            "before": "unset",
            "after": f"a{i}",
            "pid": pid,
        }


@pytest.mark.parametrize("backend", ["threads", "gevent"])
def test_sync_inputs_see_start_up_contextvars_on_both_backends(start_worker, backend):
    start_worker("-c", "1", env={"TEST_SYNC_BACKEND": backend}, app=APP)
    results = [loop_app.read_context_sync.delay(f"s{i}") for i in range(150)]
    for i, result in enumerate(results):
        seen = result.get(timeout=60)
        assert seen["process_init"] == f"process-init-{seen['pid']}"
        assert (seen["loop_init"], seen["before"], seen["after"]) == (
            f"loop-init-{seen['pid']}",
            "unset",
            f"s{i}",
        )


@pytest.mark.parametrize("backend", ["threads", "gevent"])
def test_awaiting_another_async_task_function_inside_an_input(start_worker, backend):
    start_worker("-c", "1", env={"TEST_SYNC_BACKEND": backend}, app=APP)
    results = [loop_app.await_other.delay(i) for i in range(200)]
    for i, result in enumerate(results):
        value = result.get(timeout=60)
        assert value == {"doubled": 2 * i, "twice": [2 * i, 2 * i + 2], "id": result.id}


@pytest.mark.parametrize("backend", ["threads", "gevent"])
def test_sub_tasks_of_an_input_see_its_request_current_task_and_input_id(start_worker, backend):
    start_worker("-c", "1", env={"TEST_SYNC_BACKEND": backend}, app=APP)
    results = [loop_app.sub_tasks.delay(5) for _ in range(100)]
    for result in results:
        value = result.get(timeout=60)
        assert value["id"] == result.id
        assert len(value["seen"]) == 7
        for seen in value["seen"]:
            assert seen == [result.id] * 6, value
        assert value["after"] == [result.id] * 3
        assert value["child"]["parent_id"] == result.id  # sent from a sub-task


@pytest.mark.parametrize("fail", ["loop_init", "enter"])
def test_a_failing_start_up_hook_fails_the_worker_loudly_and_it_never_reports_ready(
    start_worker, fail
):
    worker = start_worker("-c", "2", env={"TEST_LOOP_FAIL": fail}, app=APP, wait=False)
    code = wait_for(lambda: worker.handle.proc.poll(), 120, "the worker to give up")
    log = worker.log()
    assert code != 0
    assert " ready." not in log
    assert f"{fail} fails on purpose" in log and "Traceback" in log
    what = "loop_init receiver" if fail == "loop_init" else "@enter method"
    assert what in log, log[-3000:]
    assert "no pool child could start" in log


def test_a_child_whose_loop_init_fails_is_replaced_and_the_worker_serves(
    start_worker, store, queue_name, http_url
):
    worker = start_worker("-c", "1", env={"TEST_LOOP_FAIL": "loop_init-first"}, app=APP)
    log = worker.log()
    assert "loop_init fails on purpose" in log and "Traceback" in log
    results = [loop_app.get_text.delay(f"{http_url}/{i}") for i in range(50)]
    assert [r.get(timeout=60)["text"] for r in results] == [f"hello /{i}" for i in range(50)]
    assert len(_entries(store, queue_name, "loop_init")) == 1  # the replacement's


def test_loop_shutdown_is_not_run_twice_and_not_on_a_killed_child(start_worker, store, queue_name):
    worker = start_worker("-c", "1", app=APP)
    (pid,) = worker.child_pids()
    os.kill(pid, signal.SIGKILL)
    # Ready, not only started: a child still starting at shutdown is killed, not drained.
    wait_for(
        lambda: re.search(rf"(?<!\d)(?!{pid}\b)\d+ ready", worker.stats()["pool"]["children"]),
        30,
        "a replacement child that is ready",
    )
    assert worker.stop() == 0
    shutdowns = [p for p, _ in _entries(store, queue_name, "loop_shutdown")]
    assert pid not in shutdowns and len(shutdowns) == 1


def test_enter_and_exit_refuse_what_cannot_run_once_per_child():
    with pytest.raises(TypeError, match="must take only self"):

        @enter
        def needs_args(self, url): ...

    with pytest.raises(TypeError, match="plain method of a Task class"):
        enter(staticmethod(lambda: None))


def test_the_readme_async_clients_example_runs_on_a_real_worker(start_worker, queue_name, http_url):
    from examples import async_clients

    worker = start_worker("-c", "2", app="examples.async_clients")
    statuses = [
        async_clients.fetch_status.apply_async((f"{http_url}/s{i}",), queue=queue_name)
        for i in range(100)
    ]
    texts = [
        async_clients.fetch_text.apply_async((f"{http_url}/t{i}",), queue=queue_name)
        for i in range(100)
    ]
    assert [r.get(timeout=60) for r in statuses] == [200] * 100
    assert [r.get(timeout=60) for r in texts] == [f"hello /t{i}" for i in range(100)]
    assert worker.stop() == 0
    assert "raised" not in worker.log()  # the @exit and loop_shutdown closes ran cleanly
