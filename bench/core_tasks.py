"""Tasks for bench/core.py: configured from BENCH_REDIS_URL, BENCH_QUEUE, BENCH_MAX_INPUTS."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from celery import Celery

import celery_concurrent
from celery_concurrent import concurrent

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MAX_INPUTS = int(os.environ.get("BENCH_MAX_INPUTS", "200"))

app = Celery("core_bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=os.environ.get("BENCH_QUEUE", "core-bench"),
    result_expires=600,
    concurrent_slots_per_child=MAX_INPUTS + 1,
)
celery_concurrent.install(app)

_gates: dict[str, asyncio.Event] = {}


@app.task
@concurrent(max_inputs=MAX_INPUTS)
async def async_sleep(delay_s: float) -> dict[str, Any]:
    start = time.time()
    await asyncio.sleep(delay_s)
    return {"start": start, "end": time.time(), "pid": os.getpid()}


@app.task
@concurrent(max_inputs=MAX_INPUTS)
def sync_sleep(delay_s: float) -> dict[str, Any]:
    start = time.time()
    time.sleep(delay_s)
    return {"start": start, "end": time.time(), "pid": os.getpid()}


@app.task
@concurrent(max_inputs=MAX_INPUTS)
async def wait_gate(name: str) -> float:
    await _gates.setdefault(name, asyncio.Event()).wait()
    return time.time()


@app.task
@concurrent(max_inputs=1)
async def open_gate(name: str) -> int:
    _gates.setdefault(name, asyncio.Event()).set()
    return os.getpid()
