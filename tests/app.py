"""Tasks the integration tests run in real worker subprocesses.

Configured from the environment: ``REDIS_URL`` (backend, and broker unless ``BROKER_URL``),
``TEST_QUEUE`` (the one queue every task goes to), ``TEST_SLOTS`` (slots per child).
Tasks record what they see in Redis under keys prefixed by ``TEST_QUEUE``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from typing import Any

import redis
from celery import Celery, Task, signals
from celery.exceptions import SoftTimeLimitExceeded

import celery_concurrent
from celery_concurrent import concurrent, current_input_id

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("TEST_QUEUE", "celery")

#: The result backend: the broker's Redis unless RESULT_URL names another (a private server
#: the result writer's tests stop and restart).
RESULT_URL = os.environ.get("RESULT_URL", REDIS_URL)

app = Celery("tests", broker=os.environ.get("BROKER_URL", REDIS_URL), backend=RESULT_URL)
app.conf.update(
    task_default_queue=QUEUE,
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if os.environ.get("TEST_SLOTS"):
    app.conf.concurrent_slots_per_child = int(os.environ["TEST_SLOTS"])
if os.environ.get("TEST_SHUTDOWN_TIMEOUT"):
    app.conf.concurrent_shutdown_timeout = float(os.environ["TEST_SHUTDOWN_TIMEOUT"])
if os.environ.get("TEST_SCALEDOWN_WINDOW"):
    app.conf.concurrent_scaledown_window = float(os.environ["TEST_SCALEDOWN_WINDOW"])
if os.environ.get("TEST_MAX_PARKED"):
    app.conf.concurrent_max_parked = int(os.environ["TEST_MAX_PARKED"])
if os.environ.get("TEST_CANCEL_GRACE"):
    app.conf.concurrent_cancel_grace = float(os.environ["TEST_CANCEL_GRACE"])
if os.environ.get("TEST_LOOP_BLOCK_WARNING"):
    app.conf.concurrent_loop_block_warning = float(os.environ["TEST_LOOP_BLOCK_WARNING"])
if os.environ.get("TEST_SYNC_BACKEND"):
    app.conf.concurrent_sync_backend = os.environ["TEST_SYNC_BACKEND"]
if os.environ.get("TEST_FAST_ACKS") == "0":
    app.conf.concurrent_redis_fast_acks = False
if os.environ.get("TEST_RESULT_WRITER"):
    app.conf.concurrent_result_writer = os.environ["TEST_RESULT_WRITER"] == "1"
if not os.environ.get("TEST_NO_INSTALL"):  # else select the pool with -P custom
    celery_concurrent.install(app)

_redis: redis.Redis | None = None


def store() -> redis.Redis:
    """A Redis client for recording observations (one per process)."""
    global _redis
    if _redis is None or _redis.connection_pool.pid != os.getpid():
        _redis = redis.Redis.from_url(REDIS_URL)
    return _redis


def key(*parts: str) -> str:
    return ":".join([QUEUE, *parts])


def stamp(**extra: Any) -> dict[str, Any]:
    return {"pid": os.getpid(), "id": current_input_id(), **extra}


# -- async ----------------------------------------------------------------------------------


@app.task
@concurrent(max_inputs=10_000, target_inputs=200)
async def async_sleep(delay_s: float) -> dict[str, Any]:
    start = time.time()
    await asyncio.sleep(delay_s)
    return stamp(start=start, end=time.time())


@app.task
@concurrent(max_inputs=10_000)
async def async_until(deadline: float) -> dict[str, Any]:
    """Wait until an absolute time, so inputs sent over a long ramp overlap."""
    start = time.time()
    await asyncio.sleep(max(deadline - time.time(), 0))
    return {"start": start, "end": time.time(), "pid": os.getpid()}


_RELEASES: dict[str, asyncio.Event] = {}


@app.task
@concurrent(max_inputs=10_000)
async def async_wait_release(name: str) -> dict[str, Any]:
    """Waits (on this child's loop) until async_release(name) runs in the same child."""
    start = time.time()
    await _RELEASES.setdefault(name, asyncio.Event()).wait()
    return {"start": start, "end": time.time(), "pid": os.getpid()}


@app.task
@concurrent(max_inputs=1)
async def async_release(name: str) -> int:
    _RELEASES.setdefault(name, asyncio.Event()).set()
    return os.getpid()


@app.task(bind=True)
@concurrent(max_inputs=500)
async def async_whoami(self: Task, delay_s: float) -> dict[str, Any]:
    """Reads self.request and current_input_id around awaits."""
    from celery import current_task

    seen = [(self.request.id, current_input_id(), current_task.request.id)]
    await asyncio.sleep(delay_s)
    seen.append((self.request.id, current_input_id(), current_task.request.id))
    await asyncio.sleep(0)
    seen.append((self.request.id, current_input_id(), current_task.request.id))
    return {"seen": seen, "args": list(self.request.args), "retries": self.request.retries}


@app.task
@concurrent(max_inputs=100)
async def async_fail(message: str) -> None:
    await asyncio.sleep(0.01)
    raise ValueError(message)


@app.task
@concurrent(max_inputs=100)
async def async_add(x: int, y: int) -> int:
    await asyncio.sleep(0.01)
    return x + y


@app.task
@concurrent(max_inputs=100)
async def async_sum(values: list[int]) -> int:
    await asyncio.sleep(0.01)
    return sum(values)


@app.task(autoretry_for=(ConnectionError,), retry_backoff=0.1, retry_jitter=False, max_retries=5)
@concurrent(max_inputs=200)
async def async_flaky(name: str, failures: int) -> int:
    """Fails with ConnectionError the first ``failures`` attempts (counted in Redis)."""
    attempt = int(store().incr(key("attempts", name)))
    await asyncio.sleep(0.01)
    if attempt <= failures:
        raise ConnectionError(f"attempt {attempt}")
    return attempt


@app.task(bind=True, max_retries=3)
@concurrent(max_inputs=200)
async def async_retry(self: Task, name: str, failures: int) -> int:
    attempt = int(store().incr(key("attempts", name)))
    await asyncio.sleep(0.01)
    if attempt <= failures:
        raise self.retry(countdown=0.05)
    return attempt


@app.task(ignore_result=True)
@concurrent(max_inputs=100)
async def async_ignored(name: str) -> str:
    await asyncio.sleep(0.01)
    store().rpush(key("ignored"), name)
    return name


@app.task(bind=True, soft_time_limit=0.5)
@concurrent(max_inputs=100)
async def async_soft_limited(self: Task, sleep_s: float) -> str:
    try:
        await asyncio.sleep(sleep_s)
    except SoftTimeLimitExceeded:
        return "soft limit caught"
    return "finished"


@app.task(time_limit=0.5)
@concurrent(max_inputs=100)
async def async_hard_limited(sleep_s: float) -> str:
    try:
        await asyncio.sleep(sleep_s)
    finally:
        store().rpush(key("hard-finally"), current_input_id() or "")
    return "finished"


@app.task
@concurrent(max_inputs=100)
async def async_blocking(seconds: float) -> str:
    time.sleep(seconds)  # deliberately blocks the loop
    return "blocked"


@app.task(track_started=True)
@concurrent(max_inputs=100)
async def async_tracked(delay_s: float) -> str:
    await asyncio.sleep(delay_s)
    return "tracked"


@app.task
@concurrent(max_inputs=2)
async def async_capped(delay_s: float) -> dict[str, Any]:
    start = time.time()
    await asyncio.sleep(delay_s)
    return stamp(start=start, end=time.time())


@app.task
@concurrent(max_inputs=2)
async def async_counted(name: str, delay_s: float) -> dict[str, Any]:
    """Records each execution, so tests can prove nothing ran twice or was lost."""
    start = time.time()
    store().rpush(key("runs"), name)
    await asyncio.sleep(delay_s)
    return stamp(start=start, end=time.time())


@app.task
@concurrent(max_inputs=50, target_inputs=25)
async def async_recorded(name: str, delay_s: float) -> dict[str, Any]:
    """Autoscaler load: records each execution (nothing lost, nothing run twice)."""
    start = time.time()
    store().rpush(key("runs"), name)
    await asyncio.sleep(delay_s)
    return stamp(start=start, end=time.time())


@app.task(acks_late=True, reject_on_worker_lost=True)
@concurrent(max_inputs=100)
async def async_slow_late(name: str, delay_s: float) -> str:
    store().rpush(key("runs"), name)
    await asyncio.sleep(delay_s)
    return name


@app.task(acks_late=True, reject_on_worker_lost=True)
@concurrent(max_inputs=100)
async def async_die_once(name: str) -> str:
    """Kills its own child on the first attempt; the redelivered input succeeds."""
    attempt = int(store().incr(key("attempts", name)))
    await asyncio.sleep(0.05)
    if attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return f"attempt {attempt}"


@app.task
@concurrent(max_inputs=100)
async def async_die(name: str) -> str:
    await asyncio.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
    return "unreachable"


_LOOP_CLIENT: dict[str, Any] = {}


@app.task
@concurrent(max_inputs=100)
async def async_loop_identity() -> int:
    """The id of the loop this input runs on, compared with the loop at child start."""
    loop = asyncio.get_running_loop()
    if _LOOP_CLIENT.get("loop") is not loop:
        return -1
    await asyncio.sleep(0.01)
    return id(loop)


@concurrent(max_inputs=50, target_inputs=40)
class AsyncEmbed(Task):  # type: ignore[misc]
    name = "tests.embed"
    typing = True

    async def run(self, text: str) -> dict[str, Any]:  # type: ignore[override]
        await asyncio.sleep(0.01)
        return {"len": len(text), "id": self.request.id, "input": current_input_id()}


embed = app.register_task(AsyncEmbed())


# -- sync -----------------------------------------------------------------------------------


@app.task
@concurrent(max_inputs=200)
def sync_sleep(delay_s: float) -> dict[str, Any]:
    start = time.time()
    time.sleep(delay_s)
    return stamp(start=start, end=time.time())


@app.task(bind=True)
@concurrent(max_inputs=200)
def sync_whoami(self: Task, delay_s: float) -> dict[str, Any]:
    seen = [(self.request.id, current_input_id())]
    time.sleep(delay_s)
    seen.append((self.request.id, current_input_id()))
    return {"seen": seen}


@app.task(autoretry_for=(ConnectionError,), retry_backoff=0.1, retry_jitter=False, max_retries=5)
@concurrent(max_inputs=200)
def sync_flaky(name: str, failures: int) -> int:
    attempt = int(store().incr(key("attempts", name)))
    if attempt <= failures:
        raise ConnectionError(f"attempt {attempt}")
    return attempt


@app.task
@concurrent(max_inputs=200)
def sync_fail(message: str) -> None:
    raise ValueError(message)


@app.task
@concurrent(max_inputs=1000)
def sync_wide_sleep(delay_s: float) -> dict[str, Any]:
    """Like sync_sleep, with room for 1,000 at once per child (the gevent backend)."""
    start = time.time()
    time.sleep(delay_s)
    return stamp(start=start, end=time.time())


@app.task
@concurrent(max_inputs=1000)
async def async_to_thread(delay_s: float) -> dict[str, Any]:
    """A blocking call moved off the loop (on gevent: onto a greenlet)."""
    start = time.time()
    await asyncio.to_thread(time.sleep, delay_s)
    return stamp(start=start, end=time.time())


@app.task
@concurrent(max_inputs=1000)
def sync_fetch(url: str) -> dict[str, Any]:
    """Blocking HTTP with the standard library (cooperative once gevent has patched)."""
    start = time.time()
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read().decode()
    return stamp(start=start, end=time.time(), body=body)


@app.task
@concurrent(max_inputs=1000)
def sync_blpop(name: str, timeout_s: float) -> dict[str, Any]:
    """A blocking Redis call that waits ``timeout_s`` for a list nobody pushes to."""
    start = time.time()
    client = redis.Redis.from_url(REDIS_URL)  # one per input: BLPOP holds its connection
    try:
        client.blpop([key("nobody", name)], timeout=timeout_s)
    finally:
        client.close()
    return stamp(start=start, end=time.time())


@app.task(soft_time_limit=1)
@concurrent(max_inputs=100)
def sync_soft_limited(sleep_s: float, step_s: float) -> str:
    """Sleeps in steps of ``step_s`` (one long C call when ``step_s == sleep_s``)."""
    deadline = time.monotonic() + sleep_s
    try:
        while time.monotonic() < deadline:
            time.sleep(step_s)
    except SoftTimeLimitExceeded:
        return "soft limit caught"
    return "finished"


@app.task(time_limit=2)
@concurrent(max_inputs=100)
def sync_hard_limited(sleep_s: float) -> str:
    try:
        time.sleep(sleep_s)
    finally:
        store().rpush(key("hard-finally"), current_input_id() or "")
    return "finished"


@app.task(soft_time_limit=5)
@concurrent(max_inputs=10)
def sync_with_limits() -> str:
    return "limits cannot be enforced on threads"


# -- undecorated ----------------------------------------------------------------------------


@app.task
def plain_sync(x: int) -> int:
    time.sleep(0.05)
    return x * 2


@app.task
async def plain_async(x: int) -> int:
    await asyncio.sleep(0.05)
    return x * 3


# -- signals --------------------------------------------------------------------------------


def _record(event: str, task_id: str | None) -> None:
    if task_id:
        store().rpush(key("signals", task_id), event)


@signals.task_prerun.connect
def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    same = task is not None and task.request.id == task_id
    _record("prerun" if same else "prerun-wrong-request", task_id)


@signals.task_postrun.connect
def _on_postrun(task_id: str | None = None, **_: Any) -> None:
    _record("postrun", task_id)


@signals.task_success.connect
def _on_success(sender: Any = None, **_: Any) -> None:
    _record("success", sender.request.id if sender is not None else None)


@signals.task_failure.connect
def _on_failure(task_id: str | None = None, **_: Any) -> None:
    _record("failure", task_id)


@signals.task_retry.connect
def _on_retry(request: Any = None, **_: Any) -> None:
    _record("retry", getattr(request, "id", None))


@signals.worker_process_init.connect
def _on_child_init(**_: Any) -> None:
    _LOOP_CLIENT["loop"] = asyncio.get_event_loop()
    store().rpush(key("child-init"), os.getpid())


@signals.worker_process_shutdown.connect
def _on_child_shutdown(pid: int | None = None, **_: Any) -> None:
    store().rpush(key("child-shutdown"), pid or os.getpid())


# -- per-task limits on one queue -----------------------------------------------------------


@app.task
@concurrent(max_inputs=100)
async def wide(delay_s: float) -> dict[str, Any]:
    """A wide async task (100 per child) that shares a queue with ``narrow``."""
    start = time.time()
    await asyncio.sleep(delay_s)
    return stamp(start=start, end=time.time())


@app.task
@concurrent(max_inputs=2)
def narrow(delay_s: float) -> dict[str, Any]:
    """A narrow sync task (2 per child): saturated, it must not starve ``wide``."""
    start = time.time()
    time.sleep(delay_s)
    return stamp(start=start, end=time.time())


# -- the result writer ----------------------------------------------------------------------


@app.task
@concurrent(max_inputs=1000)
async def async_once(name: str) -> str:
    """Records each execution under ``runs``; the result is its name."""
    store().rpush(key("runs"), name)
    await asyncio.sleep(0.01)
    return name


@app.task(ignore_result=True)
@concurrent(max_inputs=10)
async def async_ticker(name: str, interval_s: float) -> int:
    """Appends a tick to ``ticks:<name>`` every ``interval_s`` until ``stop:<name>`` is set."""
    ticks = 0
    while not store().exists(key("stop", name)):
        store().rpush(key("ticks", name), time.time())
        ticks += 1
        await asyncio.sleep(interval_s)
    return ticks


@app.task(acks_late=True, reject_on_worker_lost=True)
@concurrent(max_inputs=100)
async def async_late_once(name: str) -> str:
    """acks_late: records its run, then ``finished`` (with its child's pid) as the body ends."""
    store().rpush(key("runs"), name)
    await asyncio.sleep(0.01)
    store().rpush(key("finished"), f"{name}:{os.getpid()}")
    return name


@app.task(track_started=True, soft_time_limit=0.5)
@concurrent(max_inputs=100)
async def async_tracked_soft(sleep_s: float) -> str:
    try:
        await asyncio.sleep(sleep_s)
    except SoftTimeLimitExceeded:
        return "soft limit caught"
    return "finished"


@app.task(bind=True)
@concurrent(max_inputs=100)
async def async_spawn(self: Task, name: str) -> str:
    """Sends ``async_once(name)`` from its body; returns the child's id."""
    await asyncio.sleep(0.01)
    return str(async_once.delay(name).id)


@signals.before_task_publish.connect
def _on_before_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """For async_spawn's messages: which task the publishing code ran in."""
    from celery import current_task

    if current_task and current_task.name == async_spawn.name:
        store().rpush(key("published-from"), f"{current_task.request.id}:{(headers or {})['id']}")


@app.task
@concurrent(max_inputs=10)
async def async_writer_stats() -> dict[str, Any] | None:
    """This child's result writer counters (None when it has none)."""
    from dataclasses import asdict

    from celery_concurrent import result_writer

    writer = result_writer.current()
    return None if writer is None else {"pid": os.getpid(), **asdict(writer.stats)}
