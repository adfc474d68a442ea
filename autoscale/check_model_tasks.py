"""The celery-concurrent app of :mod:`autoscale.check_model` (3 real autoscaled workers).

One I/O-bound ``async def`` task, ``io_wait``, under ``@concurrent``: a worker child runs up to
``BENCH_MAX_INPUTS`` of them at once and the autoscaler aims for ``BENCH_TARGET_INPUTS`` per
child. Configured from the environment (the harness sets every variable):

- ``REDIS_URL``: broker and result backend.
- ``BENCH_QUEUE``: the queue the worker consumes (one per run).
- ``BENCH_MAX_INPUTS`` / ``BENCH_TARGET_INPUTS``: the ``@concurrent`` limits (40 / 20).
- ``BENCH_SCALEDOWN_WINDOW``: ``concurrent_scaledown_window`` in seconds (5).

Per-input log lines ("Task ... received/succeeded") are silenced so logging costs no CPU the
inputs need; the autoscaler's "Scaling up/down" and the pool's child lines stay at INFO.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from celery import Celery, signals

import celery_concurrent
from celery_concurrent import concurrent

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_QUEUE", "bench-autoscale")
MAX_INPUTS = int(os.environ.get("BENCH_MAX_INPUTS", "40"))
TARGET_INPUTS = int(os.environ.get("BENCH_TARGET_INPUTS", "20"))
SCALEDOWN_WINDOW_S = float(os.environ.get("BENCH_SCALEDOWN_WINDOW", "5"))

#: Loggers that write a line (or two) per input; the benchmark keeps them quiet.
PER_INPUT_LOGGERS = ("celery.app.trace", "celery.worker.strategy", "celery.worker.request")

app = Celery("bench_autoscale", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    concurrent_scaledown_window=SCALEDOWN_WINDOW_S,
)
celery_concurrent.install(app)


@signals.after_setup_logger.connect
def _quiet_per_input_logging(**_: Any) -> None:
    for name in PER_INPUT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@app.task(name="bench.autoscale.io_wait")
@concurrent(max_inputs=MAX_INPUTS, target_inputs=TARGET_INPUTS)
async def io_wait(enqueued_at: float, delay_s: float) -> dict[str, float]:
    """Wait ``delay_s`` on the child's event loop; return when it started and ended."""
    started = time.time()
    await asyncio.sleep(delay_s)
    return {"enq": enqueued_at, "start": started, "end": time.time(), "pid": os.getpid()}
