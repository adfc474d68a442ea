"""The async client against real workers: adelay/aapply_async, aget, GroupResult.aget.

Each test runs its coroutine with ``asyncio.run``, as a caller's program would. Tasks come
from ``tests.app``; the test routes them to its own worker with ``task_default_queue``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, chain, group
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, GroupResult
from kombu.exceptions import OperationalError

import celery_concurrent
from celery_concurrent import ConcurrencyConfigError
from celery_concurrent.testing import WorkerProcess
from celery_concurrent.testing.devserver import find_server_binary
from tests import app as test_app
from tests.conftest import REDIS_URL, ROOT, Worker, wait_for

INPUTS = 1000
TICK_S = 0.005


@pytest.fixture
def routed(queue_name: str) -> Iterator[str]:
    """Send this test's tasks (``adelay`` takes no options) to its worker's queue."""
    conf = test_app.app.conf
    previous = conf.task_default_queue
    conf.task_default_queue = queue_name
    yield queue_name
    conf.task_default_queue = previous


@pytest.fixture
def worker(start_worker: Callable[..., Worker], routed: str) -> Worker:
    return start_worker("-c", "1")


def test_adelay_and_aget_round_trip_on_a_redis_broker(worker: Worker) -> None:
    async def main() -> tuple[Any, ...]:
        first = await test_app.async_add.adelay(2, 3)
        second = await test_app.async_add.aapply_async((4,), {"y": 5}, queue=worker.queue)
        assert isinstance(first, AsyncResult)
        # several waiters on one task, one of them through another result object
        same = await asyncio.gather(
            first.aget(timeout=30),
            first.aget(timeout=30),
            test_app.app.AsyncResult(first.id).aget(timeout=30),
        )
        assert same == [5, 5, 5]
        return first.id, await first.aget(timeout=30), await second.aget(timeout=30)

    task_id, first, second = asyncio.run(main())
    assert (first, second) == (5, 9)
    # the value came from the backend a plain client reads too
    assert test_app.app.AsyncResult(task_id).get(timeout=10) == 5


def test_adelay_and_aget_round_trip_on_a_rabbitmq_broker(
    start_worker: Callable[..., Worker], amqp_url: str, queue_name: str
) -> None:
    start_worker("-c", "1", broker=amqp_url)
    client = Celery("aio-amqp-client", broker=amqp_url, backend=REDIS_URL)
    client.conf.task_default_queue = queue_name
    celery_concurrent.install(client)

    async def main() -> list[Any]:
        # a producer that does not import the worker's code: signatures by name
        sent = [await client.signature("tests.app.async_add", (i, i)).adelay() for i in range(5)]
        sent.append(await client.signature("tests.app.async_add").aapply_async((1, 1)))
        return [await r.aget(timeout=30) for r in sent]

    try:
        assert asyncio.run(main()) == [0, 2, 4, 6, 8, 2]
    finally:
        client.close()


def test_aget_times_out_then_returns_once_the_result_is_there(worker: Worker) -> None:
    async def main() -> Any:
        result = await test_app.async_sleep.adelay(1.0)
        started = time.monotonic()
        with pytest.raises(CeleryTimeoutError, match=r"no result after 0.2s"):
            await result.aget(timeout=0.2)
        assert time.monotonic() - started < 0.9  # it did not wait for the task
        return await result.aget(timeout=30)

    assert asyncio.run(main())["end"] > 0


def test_aget_of_a_failing_task_raises_its_exception(worker: Worker) -> None:
    async def main() -> Any:
        result = await test_app.async_fail.adelay("boom from the worker")
        with pytest.raises(ValueError, match="boom from the worker"):
            await result.aget(timeout=30)
        return await result.aget(timeout=30, propagate=False)

    returned = asyncio.run(main())
    assert isinstance(returned, ValueError)


def test_aget_of_a_result_stored_before_the_call(worker: Worker) -> None:
    """The value is read after subscribing, so a result that already landed is found."""
    sent = test_app.async_add.delay(20, 22)
    assert sent.get(timeout=30) == 42

    async def main() -> Any:
        return await test_app.app.AsyncResult(sent.id).aget(timeout=5)

    assert asyncio.run(main()) == 42


def test_group_result_aget(worker: Worker) -> None:
    async def main() -> tuple[list[Any], GroupResult]:
        sent = await group(test_app.async_add.s(i, 100) for i in range(20)).aapply_async()
        return await sent.aget(timeout=30), sent

    values, sent = asyncio.run(main())
    assert isinstance(sent, GroupResult)
    assert values == [i + 100 for i in range(20)]

    async def failing() -> None:
        members = [
            test_app.async_add.s(1, 1),
            test_app.async_fail.s("member 2"),
            test_app.async_add.s(2, 2),
        ]
        sent = await group(members).aapply_async()
        with pytest.raises(ValueError, match="member 2"):
            await sent.aget(timeout=30)
        values = await sent.aget(timeout=30, propagate=False)
        assert values[0] == 2 and isinstance(values[1], ValueError) and values[2] == 4
        # a GroupResult made by group(...).apply_async() works the same
        blocking = group(test_app.async_add.s(i, i) for i in range(3)).apply_async()
        assert await blocking.aget(timeout=30) == [0, 2, 4]

    asyncio.run(failing())


@pytest.mark.parametrize(
    ("backend", "named"),
    [
        ("rpc://", r"RPCBackend \(rpc://\)"),
        ("cache+memory://", r"CacheBackend \(cache\+memory://\)"),
        (None, r"DisabledBackend \(result_backend is not set\)"),
    ],
)
def test_aget_needs_the_redis_result_backend(backend: str | None, named: str) -> None:
    app = Celery("aio-other-backend", broker="memory://", backend=backend)
    celery_concurrent.install(app)

    async def main() -> None:
        message = r"aget needs the Redis result backend \(redis:// or rediss://\); this app uses "
        with pytest.raises(NotImplementedError, match=message + named):
            await app.AsyncResult("some-id").aget(timeout=1)
        with pytest.raises(NotImplementedError, match=message + named):
            await app.GroupResult("g", [app.AsyncResult("a")]).aget(timeout=1)

    try:
        asyncio.run(main())
    finally:
        app.close()


def test_eager_mode_runs_the_task_off_the_loop() -> None:
    app = Celery("aio-eager", broker="memory://")
    app.conf.task_always_eager = True
    celery_concurrent.install(app)

    @app.task(name="aio.eager_add")
    def add(x: int, y: int) -> int:
        return x + y

    async def main() -> Any:
        return await (await add.adelay(1, 2)).aget(timeout=5)

    try:
        assert asyncio.run(main()) == 3
    finally:
        app.close()


def test_adelay_to_an_unreachable_broker_raises_without_blocking_the_loop() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = Celery("aio-no-broker", broker=f"redis://127.0.0.1:{port}/0")
    app.conf.update(
        broker_connection_timeout=0.5,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.2},
    )
    celery_concurrent.install(app)

    @app.task(name="aio.unreachable")
    def add(x: int, y: int) -> int:
        return x + y

    async def main() -> None:
        sending = asyncio.create_task(add.adelay(1, 2))
        meanwhile = asyncio.create_task(asyncio.sleep(0))
        done, _ = await asyncio.wait({sending, meanwhile}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {meanwhile}  # the loop ran other work while the publish retried
        with pytest.raises(OperationalError):
            await sending

    try:
        asyncio.run(main())
    finally:
        app.close()


def test_adelay_needs_install() -> None:
    app = Celery("aio-not-installed", broker="memory://", backend=REDIS_URL)

    @app.task(name="aio.not_installed")
    def add(x: int, y: int) -> int:
        return x + y

    async def main() -> None:
        with pytest.raises(ConcurrencyConfigError, match=r"needs celery_concurrent.install\(app\)"):
            await add.adelay(1, 2)

    try:
        asyncio.run(main())
    finally:
        app.close()


def test_results_of_the_async_client_work_with_get_too(worker: Worker) -> None:
    """The results carry the caller's backend: the blocking get() works on them as usual."""

    async def main() -> tuple[Any, Any]:
        one = await test_app.async_sleep.adelay(0.2)
        many = await group(test_app.async_sleep.s(0.2) for _ in range(3)).aapply_async()
        return one, many

    one, many = asyncio.run(main())
    assert one.get(timeout=30)["end"] > 0
    assert len(many.get(timeout=30)) == 3


def test_aget_of_a_chain_raises_the_failed_step_not_a_timeout(worker: Worker) -> None:
    async def main() -> Any:
        good = await chain(test_app.async_add.s(1, 2), test_app.async_add.s(3)).aapply_async()
        bad = await chain(
            test_app.async_fail.si("step 1 failed"), test_app.async_add.si(1, 1)
        ).aapply_async()
        with pytest.raises(ValueError, match="step 1 failed"):  # the last step never runs
            await bad.aget(timeout=60)
        return await good.aget(timeout=30)

    assert asyncio.run(main()) == 6


def test_adelay_and_aget_inside_an_async_input(queue_name: str, tmp_path: Path) -> None:
    """An input sends and awaits others on the child's loop; ids and trail are Celery's."""
    from tests import aio_app

    async def main() -> tuple[Any, Any]:
        sent = await aio_app.fan_out.adelay(5)
        return sent, await sent.aget(timeout=60)

    with _worker_for("tests.aio_app", aio_app.app, queue_name, tmp_path / "w.log"):
        sent, value = asyncio.run(main())
    assert value["id"] == sent.id
    assert len(value["children"]) == 5
    for child in value["children"]:
        assert (child["parent_id"], child["root_id"]) == (sent.id, sent.id)
    # add_to_parent: the children are in the parent's stored result, as with delay()
    assert sorted(r.id for r in sent.children) == sorted(c["id"] for c in value["children"])


class _RedisOnPort:
    """A private redis-server that can be killed and started again on the same port."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = directory
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._proc = subprocess.Popen(
            [find_server_binary(), *args],
            cwd=self._dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_for(answers, 10, f"redis-server on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


def test_aget_survives_a_restart_of_the_result_backend(
    start_worker: Callable[..., Worker], queue_name: str, tmp_path: Path
) -> None:
    """The listener reconnects, subscribes again and reads the stored value again."""
    server = _RedisOnPort(tmp_path)
    server.start()
    client = Celery("aio-outage", broker=REDIS_URL, backend=server.url)
    client.conf.task_default_queue = queue_name
    celery_concurrent.install(client)
    observer = redis.Redis.from_url(server.url)
    try:
        start_worker("-c", "1", env={"REDIS_URL": server.url, "BROKER_URL": REDIS_URL})

        def subscribed(channel: bytes) -> bool:
            try:
                counts: list[tuple[Any, int]] = observer.pubsub_numsub(channel)
                return [int(count) for _, count in counts] == [1]
            except redis.RedisError:
                return False

        async def main() -> Any:
            sent = await client.signature("tests.app.async_sleep", (3.0,)).adelay()
            waiting = asyncio.create_task(sent.aget(timeout=60))
            channel = client.backend.get_key_for_task(sent.id)
            await asyncio.to_thread(wait_for, lambda: subscribed(channel), 10, "the subscription")
            await asyncio.to_thread(server.kill)  # the task is still sleeping on the worker
            await asyncio.to_thread(server.start)
            await asyncio.to_thread(wait_for, lambda: subscribed(channel), 30, "a new subscription")
            return await waiting

        assert asyncio.run(main())["end"] > 0
    finally:
        observer.close()
        client.close()
        server.kill()


def test_aget_waits_by_subscription_not_by_polling(
    start_worker: Callable[..., Worker], queue_name: str, tmp_path: Path
) -> None:
    """200 results awaited at once: a few batched SUBSCRIBE and MGET, no read per result."""
    server = _RedisOnPort(tmp_path)
    server.start()
    client = Celery("aio-commands", broker=REDIS_URL, backend=server.url)
    client.conf.task_default_queue = queue_name
    celery_concurrent.install(client)
    observer = redis.Redis.from_url(server.url)
    try:
        start_worker("-c", "1", env={"REDIS_URL": server.url, "BROKER_URL": REDIS_URL})
        sleep = client.signature("tests.app.async_sleep")

        async def main() -> list[Any]:
            sent = [await sleep.aapply_async((0.5,)) for _ in range(200)]
            return list(await asyncio.gather(*(r.aget(timeout=60) for r in sent)))

        observer.config_resetstat()
        values = asyncio.run(main())
        stats = observer.info("commandstats")
    finally:
        observer.close()
        client.close()
        server.kill()
    assert len(values) == 200 and all(v["end"] > 0 for v in values)

    def calls(command: str) -> int:
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    print(
        "backend commands for 200 agets: "
        + ", ".join(f"{c} {calls(c)}" for c in ("subscribe", "mget", "unsubscribe", "get"))
    )
    # The worker reads each task's meta once before storing its result (Celery's
    # _store_result): those 200 GETs are its own; one more per result would be polling.
    assert calls("get") <= 200, stats
    assert 1 <= calls("subscribe") <= 5, stats
    assert 1 <= calls("mget") <= 20, stats


# -- the stall figure -------------------------------------------------------------------------


class _GcPauses:
    """The longest cyclic-GC pause while active (a full collection can stall any loop)."""

    def __init__(self) -> None:
        self.longest_s = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.longest_s = max(self.longest_s, time.perf_counter() - self._started)

    def __enter__(self) -> _GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


async def _ticker_lateness(
    work: Callable[[], Awaitable[list[Any]]],
) -> tuple[list[Any], list[tuple[float, float]]]:
    """Run ``work`` while a 5 ms ticker on the same loop records how late each tick wakes.

    Each tick also records the loop thread's CPU time during it: lateness well above that
    is time the thread was not running (other processes on the cores, the GIL).
    """
    loop = asyncio.get_running_loop()
    ticks: list[tuple[float, float]] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            start, cpu_start = loop.time(), time.thread_time()
            await asyncio.sleep(TICK_S)
            ticks.append((loop.time() - start - TICK_S, time.thread_time() - cpu_start))

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(TICK_S * 2)  # the ticker is running before the work starts
    try:
        values = await work()
    finally:
        done.set()
        await ticker
    return values, ticks


def _report(label: str, ticks: list[tuple[float, float]], wall_s: float, gc_pause_s: float) -> str:
    ordered = sorted(late for late, _ in ticks)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    worst_late, worst_cpu = max(ticks)
    line = (
        f"{label}: {INPUTS} inputs in {wall_s:.2f}s; 5 ms ticker worst lateness "
        f"{worst_late * 1000:.1f} ms (loop thread on CPU {worst_cpu * 1000:.1f} ms of it), "
        f"p99 {p99 * 1000:.1f} ms, median {statistics.median(ordered) * 1000:.2f} ms over "
        f"{len(ordered)} ticks; most loop CPU in one tick "
        f"{max(cpu for _, cpu in ticks) * 1000:.1f} ms; longest GC pause {gc_pause_s * 1000:.1f} ms"
    )
    print(line)
    return line


def test_stall_figure_adelay_aget_versus_delay_and_get_in_a_thread(worker: Worker) -> None:
    """Figures for the README; asserts only that every result came back right."""
    expected = [i + i for i in range(INPUTS)]

    async def async_client() -> list[Any]:
        sent = await asyncio.gather(*(test_app.async_add.adelay(i, i) for i in range(INPUTS)))
        return list(await asyncio.gather(*(r.aget(timeout=120) for r in sent)))

    async def async_client_group() -> list[Any]:
        members = (test_app.async_add.s(i, i) for i in range(INPUTS))
        sent = await group(members).aapply_async()  # GroupResult built off the loop
        return list(await sent.aget(timeout=120))  # one coroutine waits for all

    async def delay_on_loop_get_in_thread() -> list[Any]:
        sent = [test_app.async_add.delay(i, i) for i in range(INPUTS)]  # blocks the loop
        return list(await asyncio.gather(*(asyncio.to_thread(r.get, timeout=120) for r in sent)))

    async def both_in_threads() -> list[Any]:
        sent = await asyncio.gather(
            *(asyncio.to_thread(test_app.async_add.delay, i, i) for i in range(INPUTS))
        )
        return list(await asyncio.gather(*(asyncio.to_thread(r.get, timeout=120) for r in sent)))

    async def warm_up() -> None:  # connections and imports, outside the measurement
        await (await test_app.async_add.adelay(0, 0)).aget(timeout=30)
        await asyncio.to_thread(test_app.async_add.delay(0, 0).get, timeout=30)

    async def measure(label: str, work: Callable[[], Awaitable[list[Any]]]) -> str:
        with _GcPauses() as pauses:
            started = time.monotonic()
            values, ticks = await _ticker_lateness(work)
            wall_s = time.monotonic() - started
        assert values == expected, label
        return _report(label, ticks, wall_s, pauses.longest_s)

    async def frozen(work: Callable[[], Awaitable[list[Any]]]) -> list[Any]:
        gc.freeze()  # what a server does after start-up: no full GC pass over its imports
        try:
            return await work()
        finally:
            gc.unfreeze()

    async def main() -> list[str]:
        await warm_up()
        return [
            await measure("adelay + aget", async_client),
            await measure(
                ".delay() on the loop + r.get() in asyncio.to_thread", delay_on_loop_get_in_thread
            ),
            await measure("asyncio.to_thread(.delay) + asyncio.to_thread(r.get)", both_in_threads),
            await measure("adelay + aget after gc.freeze()", lambda: frozen(async_client)),
            await measure("group(...).aapply_async() + GroupResult.aget()", async_client_group),
        ]

    lines = asyncio.run(main())
    assert len(lines) == 5


# -- the producer example -----------------------------------------------------------------------


async def _http_get(port: int, path: str) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@contextmanager
def _worker_for(module: str, app: Celery, queue: str, log_path: Path) -> Iterator[WorkerProcess]:
    """A worker for the app in ``module`` on ``queue``; ``app`` sends there meanwhile."""
    conf = app.conf
    previous = conf.task_default_queue
    conf.task_default_queue = queue
    worker = WorkerProcess.start(
        module,
        ["-c", "1", "-l", "info", "--without-gossip", "--without-mingle"],
        queue=queue,
        log_path=log_path,
        env={"REDIS_URL": REDIS_URL, "TEST_QUEUE": queue, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    try:
        if not worker.wait_until_ready(app):
            pytest.fail(f"{module} worker did not start:\n{worker.tail()}")
        yield worker
    finally:
        conf.task_default_queue = previous
        worker.kill()


@pytest.fixture
def example_worker(queue_name: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A worker for ``examples.app`` on this test's queue, which the example sends to."""
    from examples import app as example_app

    with _worker_for("examples.app", example_app.app, queue_name, tmp_path / "w.log") as worker:
        yield worker


def test_async_producer_example_serves_results_from_a_real_worker(
    example_worker: WorkerProcess,
) -> None:
    from examples import async_producer

    async def main() -> list[tuple[int, Any]]:
        server = await async_producer.serve(port=0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            # requests at once: the handlers share the loop, none blocks it
            return list(
                await asyncio.gather(
                    _http_get(port, "/fetch?delay_s=0.3"),
                    _http_get(port, "/fan-out?n=20&delay_s=0.3"),
                    _http_get(port, "/fetch?delay_s=0.3"),
                    _http_get(port, "/nowhere"),
                )
            )

    (s1, one), (s2, fan), (s3, other), (s4, missing) = asyncio.run(main())
    assert (s1, s2, s3, s4) == (200, 200, 200, 404)
    assert one["result"]["id"] == one["task_id"] and other["task_id"] != one["task_id"]
    assert fan["count"] == 20 and len(set(fan["ids"])) == 20
    assert missing["routes"] == ["/fan-out", "/fetch"]
