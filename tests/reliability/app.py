"""Tasks for the reliability suite: each execution is counted in Redis.

Configured from the environment, like ``tests/app.py``:

- ``REDIS_URL``: results backend and the store where executions are counted (the shared Redis,
  which the faults never touch); ``BROKER_URL``: the broker (default ``REDIS_URL``).
- ``TEST_QUEUE``: the one queue; every key this app writes starts with it.
- ``TEST_POOL``: ``concurrent`` (default: ``celery_concurrent.install(app)``) or ``prefork``
  (stock Celery; start the worker with ``-P prefork``).
- ``TEST_SLOTS``, ``TEST_SHUTDOWN_TIMEOUT``: our pool's settings.
- ``TEST_PROC_ALIVE_TIMEOUT``: Celery's ``worker_proc_alive_timeout``.
- ``TEST_TRANSPORT_OPTIONS``: JSON for ``broker_transport_options``.
- ``TEST_CANCEL_ON_CONNECTION_LOSS=1``: ``worker_cancel_long_running_tasks_on_connection_loss``.
- ``TEST_INIT_MODE``: what ``worker_process_init`` does: ``hang-first``, ``raise-all``,
  ``raise-first``, ``slow-after-first`` (4 s in every child but the first), or nothing.

Keys (``Q`` is ``TEST_QUEUE``): ``Q:runs`` hash input name -> executions; ``Q:pid`` hash
input name -> pid of the child running it; ``Q:start`` hash input name -> start time;
``Q:ran-on:<pid>`` set of the input names whose body began in that process;
``Q:init`` list of pids whose ``worker_process_init`` started; ``Q:init-seq`` counter;
``Q:grandchildren`` pids to reap.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import threading
import time
from typing import Any

import redis
from celery import Celery, Task, signals
from celery.exceptions import SoftTimeLimitExceeded

import celery_concurrent
from celery_concurrent import concurrent

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("TEST_QUEUE", "celery")
POOL = os.environ.get("TEST_POOL", "concurrent")

app = Celery("rel", broker=os.environ.get("BROKER_URL", REDIS_URL), backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # Reconnect quickly after a broker restart (the default backs off to seconds).
    broker_connection_max_retries=None,
)
if os.environ.get("TEST_SLOTS"):
    app.conf.concurrent_slots_per_child = int(os.environ["TEST_SLOTS"])
if os.environ.get("TEST_SYNC_BACKEND"):
    app.conf.concurrent_sync_backend = os.environ["TEST_SYNC_BACKEND"]
if os.environ.get("TEST_SHUTDOWN_TIMEOUT"):
    app.conf.concurrent_shutdown_timeout = float(os.environ["TEST_SHUTDOWN_TIMEOUT"])
if os.environ.get("TEST_PROC_ALIVE_TIMEOUT"):
    app.conf.worker_proc_alive_timeout = float(os.environ["TEST_PROC_ALIVE_TIMEOUT"])
if os.environ.get("TEST_TRANSPORT_OPTIONS"):
    app.conf.broker_transport_options = json.loads(os.environ["TEST_TRANSPORT_OPTIONS"])
if os.environ.get("TEST_CANCEL_ON_CONNECTION_LOSS") == "1":
    app.conf.worker_cancel_long_running_tasks_on_connection_loss = True
if POOL == "concurrent":
    celery_concurrent.install(app)
elif POOL != "prefork":
    raise RuntimeError(
        f"TEST_POOL={POOL!r} is not a pool this app knows: use concurrent or prefork"
    )

_redis: redis.Redis | None = None


def store() -> redis.Redis:
    """A client for the counting store (one per process; new after a fork)."""
    global _redis
    if _redis is None or _redis.connection_pool.pid != os.getpid():
        _redis = redis.Redis.from_url(REDIS_URL)
    return _redis


def key(*parts: str) -> str:
    return ":".join([QUEUE, *parts])


def count(name: str) -> int:
    """Record one execution of input ``name`` (and the child running it)."""
    pipe = store().pipeline()
    pipe.hincrby(key("runs"), name, 1)
    pipe.hset(key("pid"), name, os.getpid())
    pipe.hset(key("start"), name, time.time())
    pipe.sadd(key("ran-on", str(os.getpid())), name)
    runs, *_ = pipe.execute()
    return int(runs)


# -- sleeps under each ack mode --------------------------------------------------------------


@app.task(name="rel.sleep")
@concurrent(max_inputs=100)
async def sleep(name: str, delay_s: float) -> str:
    count(name)
    await asyncio.sleep(delay_s)
    return name


@app.task(name="rel.sleep_late", acks_late=True)
@concurrent(max_inputs=100)
async def sleep_late(name: str, delay_s: float) -> str:
    count(name)
    await asyncio.sleep(delay_s)
    return name


@app.task(name="rel.sleep_late_reject", acks_late=True, reject_on_worker_lost=True)
@concurrent(max_inputs=100)
async def sleep_late_reject(name: str, delay_s: float) -> str:
    count(name)
    await asyncio.sleep(delay_s)
    return name


@app.task(name="rel.sleep_sync")
@concurrent(max_inputs=20)
def sleep_sync(name: str, delay_s: float) -> str:
    count(name)
    time.sleep(delay_s)
    return name


@app.task(name="rel.capped")
@concurrent(max_inputs=2)
async def capped(name: str, delay_s: float) -> str:
    """At most two at once per child, so the rest wait in the parent."""
    count(name)
    await asyncio.sleep(delay_s)
    return name


@app.task(name="rel.capped_late", acks_late=True)
@concurrent(max_inputs=2)
async def capped_late(name: str, delay_s: float) -> str:
    count(name)
    await asyncio.sleep(delay_s)
    return name


@app.task(name="rel.first_long")
@concurrent(max_inputs=100)
async def first_long(name: str, first_s: float, then_s: float) -> str:
    """Long on its first execution, short when it runs again (after a redelivery)."""
    await asyncio.sleep(first_s if count(name) == 1 else then_s)
    return name


@app.task(name="rel.first_long_late", acks_late=True)
@concurrent(max_inputs=100)
async def first_long_late(name: str, first_s: float, then_s: float) -> str:
    await asyncio.sleep(first_s if count(name) == 1 else then_s)
    return name


@app.task(name="rel.block_free")
@concurrent(max_inputs=10)
async def block_free(name: str, seconds: float) -> str:
    """Blocks the child's event loop, with no time limit."""
    count(name)
    time.sleep(seconds)
    return name


@app.task(name="rel.echo_len")
@concurrent(max_inputs=10)
async def echo_len(name: str, data: str) -> int:
    count(name)
    await asyncio.sleep(0)
    return len(data)


# -- faults from inside the task -------------------------------------------------------------


@app.task(name="rel.segfault")
@concurrent(max_inputs=10)
def segfault(name: str) -> str:
    """A poison input: crashes its child with SIGSEGV."""
    count(name)
    ctypes.string_at(0)
    return "unreachable"


@app.task(name="rel.segfault_late", acks_late=True)
@concurrent(max_inputs=10)
def segfault_late(name: str) -> str:
    count(name)
    ctypes.string_at(0)
    return "unreachable"


@app.task(name="rel.fork_grandchild")
@concurrent(max_inputs=10)
def fork_grandchild(name: str, hold_s: float) -> str:
    """Forks a grandchild that keeps every fd of the child open for ``hold_s``, then waits."""
    pid = os.fork()
    if pid == 0:  # the grandchild: no exec, so inherited fds (pipes to the parent) stay open
        time.sleep(hold_s)
        os._exit(0)
    store().rpush(key("grandchildren"), pid)
    count(name)
    time.sleep(hold_s)
    return name


@app.task(name="rel.block_loop", time_limit=2)
@concurrent(max_inputs=10)
async def block_loop(name: str, seconds: float) -> str:
    """Blocks the child's event loop (the limit cannot cancel it)."""
    count(name)
    time.sleep(seconds)
    return "finished"


@app.task(name="rel.swallow_cancel", time_limit=2)
@concurrent(max_inputs=10)
async def swallow_cancel(name: str, seconds: float) -> str:
    """Ignores every cancellation until ``seconds`` have passed."""
    count(name)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            continue
    return "finished"


@app.task(name="rel.soft_catch")
@concurrent(max_inputs=10)
async def soft_catch(name: str, delay_s: float) -> str:
    count(name)
    try:
        await asyncio.sleep(delay_s)
    except SoftTimeLimitExceeded:
        return "soft limit caught"
    return "finished"


@app.task(name="rel.soft_ignore")
@concurrent(max_inputs=10)
async def soft_ignore(name: str, delay_s: float) -> str:
    """Sleeps on through a soft time limit, so only the hard limit can stop it."""
    count(name)
    deadline = time.monotonic() + delay_s
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(deadline - time.monotonic())
        except SoftTimeLimitExceeded:
            continue
    return "finished"


@app.task(name="rel.unserialisable")
@concurrent(max_inputs=10)
async def unserialisable(name: str) -> Any:
    count(name)
    return object()  # json cannot encode it


class NeedsArgs(Exception):
    """An exception that cannot be rebuilt from its args, and holds a lock (unpicklable)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.lock = threading.Lock()


@app.task(name="rel.unpicklable_exception")
@concurrent(max_inputs=10)
async def unpicklable_exception(name: str) -> None:
    count(name)
    raise NeedsArgs(7, "cannot be pickled")


_HOG: list[bytes] = []


@app.task(name="rel.hog")
@concurrent(max_inputs=10)
async def hog(name: str, megabytes: int) -> int:
    """Keeps ``megabytes`` alive in the child (for --max-memory-per-child)."""
    count(name)
    _HOG.append(os.urandom(megabytes * 1024 * 1024))
    await asyncio.sleep(0.01)
    return os.getpid()


# -- the load mix ----------------------------------------------------------------------------


@app.task(name="rel.quick")
@concurrent(max_inputs=500)
async def quick(name: str) -> str:
    count(name)
    await asyncio.sleep(0.001)
    return name


@app.task(name="rel.quick_sync")
@concurrent(max_inputs=20)
def quick_sync(name: str) -> str:
    count(name)
    return name


@app.task(name="rel.quick_fail")
@concurrent(max_inputs=500)
async def quick_fail(name: str) -> None:
    count(name)
    await asyncio.sleep(0.001)
    raise ValueError(f"{name} fails on purpose")


@app.task(name="rel.quick_retry", bind=True, max_retries=3)
@concurrent(max_inputs=500)
async def quick_retry(self: Task, name: str) -> str:
    """Fails its first attempt with a retry; the second succeeds."""
    if count(name) == 1:
        raise self.retry(countdown=0.05)
    return name


# -- worker_process_init faults --------------------------------------------------------------


@signals.worker_process_init.connect
def _on_child_init(**_: Any) -> None:
    client = store()
    seq = int(client.incr(key("init-seq")))
    client.rpush(key("init"), os.getpid())
    mode = os.environ.get("TEST_INIT_MODE", "")
    if mode == "hang-first" and seq == 1:
        threading.Event().wait()
    if mode == "raise-all" or (mode == "raise-first" and seq == 1):
        raise RuntimeError(f"worker_process_init fails on purpose (child #{seq})")
    if mode == "slow-after-first" and seq > 1:
        time.sleep(4)
