"""The arq worker of the benchmark: ``python -m bench.tasks_arq``.

arq 0.28 needs ``redis<6`` and Celery 5.7's kombu needs ``redis>=6.1``, so arq is installed
apart, in ``bench/.arq-site`` (``scripts/bench.sh`` does it), and this module runs with that
directory first on ``PYTHONPATH``. Configured from the environment like
:mod:`bench.tasks_celery`: ``BENCH_REDIS_URL``, ``BENCH_QUEUE`` (arq's ``queue_name``),
``BENCH_MAX_INPUTS`` (``max_jobs``). Everything else is arq's default (poll delay 0.5 s,
results kept an hour). arq has no sync jobs; its docs run blocking code with
``run_in_executor``, here on a thread pool as large as ``max_jobs``. The worker is started
without arq's CLI; ``BENCH_LOGLEVEL`` (``warning`` unless the runner says otherwise) is the
root logger's level, so at ``info`` arq logs its line per job start and end as its CLI does,
and at ``warning`` nothing per job (the Celery workers' ``-l`` is the same level).
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from arq.connections import RedisSettings
from arq.worker import run_worker

from bench import workload

REDIS_URL = os.environ.get("BENCH_REDIS_URL") or os.environ.get(
    "REDIS_URL", "redis://127.0.0.1:6379/0"
)
QUEUE = os.environ.get("BENCH_QUEUE", "bench-arq")
MAX_INPUTS = int(os.environ.get("BENCH_MAX_INPUTS", "100"))
LOGLEVEL = os.environ.get("BENCH_LOGLEVEL", "warning").upper()

Ctx = dict[str, Any]


async def noop(ctx: Ctx) -> dict[str, Any]:
    return workload.noop()


async def sleep_async(ctx: Ctx, delay_s: float) -> dict[str, Any]:
    return await workload.sleep_io(delay_s)


async def sleep_sync(ctx: Ctx, delay_s: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    result: dict[str, Any] = await loop.run_in_executor(ctx["executor"], workload.block_io, delay_s)
    return result


async def http_get(ctx: Ctx, url: str) -> dict[str, Any]:
    return await workload.http_get(url)


async def hold(ctx: Ctx, gate: str, expected: int) -> dict[str, Any]:
    return await workload.hold(gate, expected)


async def startup(ctx: Ctx) -> None:
    ctx["executor"] = ThreadPoolExecutor(MAX_INPUTS, thread_name_prefix="arq-sync")


async def shutdown(ctx: Ctx) -> None:
    ctx["executor"].shutdown(wait=False)


class WorkerSettings:
    functions = [noop, sleep_async, sleep_sync, http_get, hold]  # noqa: RUF012 - arq's API
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    queue_name = QUEUE
    max_jobs = MAX_INPUTS
    on_startup = startup
    on_shutdown = shutdown


if __name__ == "__main__":
    logging.basicConfig(level=LOGLEVEL, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    run_worker(WorkerSettings)  # type: ignore[arg-type]
