"""The taskiq broker and tasks of the benchmark.

Worker: ``taskiq worker bench.tasks_taskiq:broker --workers 1 --max-async-tasks N
--max-threadpool-threads N`` (a manager process and one worker process). Configured from
the environment like :mod:`bench.tasks_celery`: ``BENCH_REDIS_URL``, ``BENCH_QUEUE`` (the
stream/list name and the result key prefix) and ``BENCH_TASKIQ_BROKER``: ``stream``
(``RedisStreamBroker``, acknowledged delivery; the default) or ``list``
(``ListQueueBroker``). Results go to ``RedisAsyncResultBackend`` as Celery's and arq's do.
taskiq runs sync functions on its thread pool.
"""

from __future__ import annotations

import os
from typing import Any

from taskiq import AsyncBroker
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend, RedisStreamBroker

from bench import workload

REDIS_URL = os.environ.get("BENCH_REDIS_URL") or os.environ.get(
    "REDIS_URL", "redis://127.0.0.1:6379/0"
)
QUEUE = os.environ.get("BENCH_QUEUE", "bench-taskiq")
BROKER_KIND = os.environ.get("BENCH_TASKIQ_BROKER", "stream")
RESULT_EXPIRES_S = 3600


def _make_broker() -> AsyncBroker:
    base: AsyncBroker
    if BROKER_KIND == "list":
        base = ListQueueBroker(REDIS_URL, queue_name=QUEUE)
    elif BROKER_KIND == "stream":
        base = RedisStreamBroker(REDIS_URL, queue_name=QUEUE, consumer_group_name=QUEUE)
    else:
        raise ValueError(f"BENCH_TASKIQ_BROKER must be 'stream' or 'list', got {BROKER_KIND!r}")
    backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
        REDIS_URL, prefix_str=QUEUE, result_ex_time=RESULT_EXPIRES_S
    )
    return base.with_result_backend(backend)


broker = _make_broker()


@broker.task(task_name="bench.noop")
async def noop() -> dict[str, Any]:
    return workload.noop()


@broker.task(task_name="bench.sleep_async")
async def sleep_async(delay_s: float) -> dict[str, Any]:
    return await workload.sleep_io(delay_s)


@broker.task(task_name="bench.sleep_sync")
def sleep_sync(delay_s: float) -> dict[str, Any]:
    return workload.block_io(delay_s)


@broker.task(task_name="bench.http_get")
async def http_get(url: str) -> dict[str, Any]:
    return await workload.http_get(url)


@broker.task(task_name="bench.hold")
async def hold(gate: str, expected: int) -> dict[str, Any]:
    return await workload.hold(gate, expected)
