"""The stock-Celery app of the autoscaler scenario benchmark: no ``celery_concurrent`` at all.

Stock pools cannot run ``async def`` tasks, so the same wait runs two ways:

- ``io_wait_sync``: ``asyncio.run(asyncio.sleep(d))`` in a plain task, for ``-P prefork``
  (one input per process at a time);
- ``io_wait_green``: ``time.sleep(d)``, which ``-P gevent`` monkeypatches into a cooperative
  sleep (``asyncio.run`` inside gevent fails, see ``../shared/DESIGN.md``).

This module must not set ``worker_pool`` or ``worker_autoscaler``: the CLI treats ``-P prefork``
as "not given" and would substitute a configured pool. Same environment variables as
:mod:`bench.autoscale_tasks` (``REDIS_URL``, ``BENCH_QUEUE``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from celery import Celery, signals

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_QUEUE", "bench-autoscale")

#: Loggers that write a line (or two) per input; the benchmark keeps them quiet.
PER_INPUT_LOGGERS = ("celery.app.trace", "celery.worker.strategy", "celery.worker.request")

app = Celery("bench_autoscale_stock", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
)


@signals.after_setup_logger.connect
def _quiet_per_input_logging(**_: Any) -> None:
    for name in PER_INPUT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@app.task(name="bench.autoscale.io_wait_sync")
def io_wait_sync(enqueued_at: float, delay_s: float) -> dict[str, float]:
    """The async wait, run to completion with ``asyncio.run`` (one input per process)."""
    started = time.time()
    asyncio.run(asyncio.sleep(delay_s))
    return {"enq": enqueued_at, "start": started, "end": time.time(), "pid": os.getpid()}


@app.task(name="bench.autoscale.io_wait_green")
def io_wait_green(enqueued_at: float, delay_s: float) -> dict[str, float]:
    """The same wait as a (monkeypatched, cooperative) ``time.sleep`` for ``-P gevent``."""
    started = time.time()
    time.sleep(delay_s)
    return {"enq": enqueued_at, "start": started, "end": time.time(), "pid": os.getpid()}
