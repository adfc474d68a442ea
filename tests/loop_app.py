"""Tasks for the per-child async set-up tests: loop signals, ``@enter``/``@exit``, contexts.

Configured like ``tests.app`` (``REDIS_URL``, ``TEST_QUEUE``, ``TEST_SYNC_BACKEND``), plus
``TEST_LOOP_FAIL``: ``loop_init`` or ``enter`` makes that hook raise in every child,
``loop_init-first`` only in the worker's first child. Hooks record ``pid time`` entries in
Redis lists ``Q:loop_init``, ``Q:enter``, ``Q:exit``, ``Q:loop_shutdown``.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextvars import ContextVar
from typing import Any

import aiohttp
import redis
from celery import Celery, Task, current_task, signals

import celery_concurrent
from celery_concurrent import concurrent, current_input_id
from celery_concurrent.signals import loop_init, loop_shutdown

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("TEST_QUEUE", "celery")
FAIL = os.environ.get("TEST_LOOP_FAIL", "")

app = Celery("loop_tests", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if os.environ.get("TEST_SYNC_BACKEND"):
    app.conf.concurrent_sync_backend = os.environ["TEST_SYNC_BACKEND"]
celery_concurrent.install(app)

#: Set by worker_process_init (sync), by loop_init (async) and by an input.
FROM_PROCESS_INIT: ContextVar[str] = ContextVar("from_process_init", default="unset")
FROM_LOOP_INIT: ContextVar[str] = ContextVar("from_loop_init", default="unset")
FROM_INPUT: ContextVar[str] = ContextVar("from_input", default="unset")

session: aiohttp.ClientSession | None = None


def record(name: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    client.rpush(f"{QUEUE}:{name}", f"{os.getpid()} {time.time()}")
    client.close()


@signals.worker_process_init.connect
def _process_init(**kwargs: Any) -> None:
    FROM_PROCESS_INIT.set(f"process-init-{os.getpid()}")


@loop_init.connect
async def _open_session(
    sender: Celery, loop: asyncio.AbstractEventLoop, pid: int, **_: Any
) -> None:
    global session
    assert asyncio.get_running_loop() is loop and pid == os.getpid()
    if FAIL == "loop_init" or (FAIL == "loop_init-first" and _first_child()):
        raise RuntimeError("loop_init fails on purpose")
    session = aiohttp.ClientSession()  # needs a running loop: fails in worker_process_init
    FROM_LOOP_INIT.set(f"loop-init-{pid}")
    record("loop_init")


def _first_child() -> bool:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return int(client.incr(f"{QUEUE}:loop-init-seq")) == 1
    finally:
        client.close()


@loop_shutdown.connect
async def _close_session(**_: Any) -> None:
    assert session is not None
    await session.close()
    record("loop_shutdown")


@app.task
@concurrent(max_inputs=200)
async def get_text(url: str) -> dict[str, Any]:
    """GET ``url`` with the session loop_init made; when it finished, and on which child."""
    assert session is not None
    async with session.get(url) as response:
        text = await response.text()
    return {"status": response.status, "text": text, "pid": os.getpid(), "end": time.time()}


@concurrent(max_inputs=200)
class GetWithOwnSession(Task):
    """A Task class whose session @enter opens and @exit closes, once per child."""

    name = "loop_tests.get_with_own_session"

    @celery_concurrent.enter
    async def open(self) -> None:
        if FAIL == "enter":
            raise RuntimeError("enter fails on purpose")
        self.client = aiohttp.ClientSession()
        self.opened_in = os.getpid()
        record("enter")

    @celery_concurrent.exit
    async def close(self) -> None:
        await self.client.close()
        record("exit")

    async def run(self, url: str) -> dict[str, Any]:  # type: ignore[override]
        async with self.client.get(url) as response:
            text = await response.text()
        return {"status": response.status, "text": text, "pid": os.getpid(), "end": time.time()}


get_with_own_session = app.register_task(GetWithOwnSession())


def _context_seen(before: str) -> dict[str, str]:
    return {
        "process_init": FROM_PROCESS_INIT.get(),
        "loop_init": FROM_LOOP_INIT.get(),
        "before": before,
        "after": FROM_INPUT.get(),
        "pid": str(os.getpid()),
    }


@app.task
@concurrent(max_inputs=200)
async def read_context(value: str) -> dict[str, str]:
    """What start-up set, and that an input's own variable stays its own across awaits."""
    before = FROM_INPUT.get()
    FROM_INPUT.set(value)
    await asyncio.sleep(0.05)
    return _context_seen(before)


@app.task
@concurrent(max_inputs=200)
def read_context_sync(value: str) -> dict[str, str]:
    before = FROM_INPUT.get()
    FROM_INPUT.set(value)
    time.sleep(0.05)
    return _context_seen(before)


@app.task
@concurrent(max_inputs=200)
async def double(x: int) -> int:
    await asyncio.sleep(0.01)
    return 2 * x


@app.task(bind=True)
@concurrent(max_inputs=200)
async def await_other(self: Task, x: int) -> dict[str, Any]:
    """Awaits another async task's function as a coroutine, then reads its own request."""
    doubled = await double(x)
    twice = await asyncio.gather(double(x), double(x + 1))
    return {"doubled": doubled, "twice": twice, "id": self.request.id}


@app.task(bind=True)
@concurrent(max_inputs=200)
async def sub_tasks(self: Task, n: int) -> dict[str, Any]:
    """What self.request, current_task and current_input_id read in tasks this input makes."""

    async def look() -> list[Any]:
        await asyncio.sleep(0.01)
        seen = [self.request.id, current_task.request.id, current_input_id()]
        await asyncio.sleep(0)
        return [*seen, self.request.id, current_task.request.id, current_input_id()]

    gathered = await asyncio.gather(*(look() for _ in range(n)))
    created = await asyncio.create_task(look())
    async with asyncio.TaskGroup() as group:
        in_group = group.create_task(look())
    sent = await asyncio.create_task(whoami.adelay())
    child = await sent.aget(timeout=30)
    return {
        "id": self.request.id,
        "seen": [*gathered, created, in_group.result()],
        "child": child,
        "after": [self.request.id, current_task.request.id, current_input_id()],
    }


@app.task(bind=True)
@concurrent(max_inputs=200)
async def whoami(self: Task) -> dict[str, Any]:
    return {"id": self.request.id, "parent_id": self.request.parent_id}
