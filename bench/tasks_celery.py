"""The Celery apps of the benchmark: ``stock`` (Celery's own pools) and ``concurrent``.

Workers start with ``celery -A bench.tasks_celery:stock worker -P prefork|threads|gevent`` or
``celery -A bench.tasks_celery:concurrent worker`` (``install`` selects ConcurrentPool). Two
apps, because ``install`` sets ``worker_pool`` and Celery's CLI treats ``-P prefork`` as "the
configured pool". Configured from the environment (set by ``bench.systems``):

- ``BENCH_REDIS_URL``: broker and result backend.
- ``BENCH_QUEUE``: the queue this worker consumes (one per system and phase).
- ``BENCH_MAX_INPUTS``: ``@concurrent(max_inputs=...)`` of every concurrent task.
- ``BENCH_TARGET_INPUTS``: their ``target_inputs`` (the autoscaler's aim per child; unset:
  ``max_inputs``).
- ``BENCH_AUTOSCALER=1``: ``install(concurrent)`` with the TargetAutoscaler (used with
  ``--autoscale``; the other workers install without it); ``BENCH_SCALEDOWN_WINDOW``:
  ``concurrent_scaledown_window`` in seconds.
- ``BENCH_QUIET_INPUTS=1``: the per-input loggers (``Task ... received/succeeded``) at
  WARNING in a worker run at ``-l info``, so the autoscalers' "Scaling up/down" and the
  pool's child lines stay, without a log line per input (``bench.autoscale_scenario``).
- ``BENCH_ACK_EMULATION=0``: an experiment, kombu's ``ack_emulation`` transport option off.
- ``BENCH_FAST_ACKS=0``: ``concurrent_redis_fast_acks = False`` (concurrent app).
- ``BENCH_BATCH_FETCH=0``: ``concurrent_redis_batch_fetch = False`` (concurrent app).
- ``BENCH_RESULT_WRITER=0|1``: ``concurrent_result_writer`` (concurrent app).
- ``BENCH_SYNC_BACKEND``: ``concurrent_sync_backend`` (concurrent app), e.g. ``gevent``.
- ``BENCH_REDIS_STEP=1``: the stock app gets our Redis consumer step,
  :class:`celery_concurrent.redis_acks.RedisFastAcks`, as ``install()`` adds it: fast acks
  (``concurrent_redis_fast_acks``) and batch fetch (``concurrent_redis_batch_fetch``), both
  on by default and switched by the same ``BENCH_FAST_ACKS`` / ``BENCH_BATCH_FETCH``. Nothing
  else of celery-concurrent: the stock pool, prefetch multiplier 4. This is how a stock
  worker gets the patch, and it lets the report tell the pool's gain from the patch's.

Stock tasks run the same coroutines with ``asyncio.run`` per input, which is what Celery users
do today; the concurrent app's tasks are the coroutines themselves. Both keep Celery's
defaults otherwise (results stored in Redis, prefetch multiplier 4 for stock, 1 for
concurrent as ``install`` sets it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tracemalloc
from typing import Any

from celery import Celery, signals

import celery_concurrent
from bench import workload
from celery_concurrent import concurrent as concurrent_inputs
from celery_concurrent.redis_acks import RedisFastAcks

REDIS_URL = os.environ.get("BENCH_REDIS_URL") or os.environ.get(
    "REDIS_URL", "redis://127.0.0.1:6379/0"
)
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
MAX_INPUTS = int(os.environ.get("BENCH_MAX_INPUTS", "100"))
TARGET_INPUTS = (
    int(os.environ["BENCH_TARGET_INPUTS"]) if "BENCH_TARGET_INPUTS" in os.environ else None
)
#: Loggers that write a line (or two) per input (BENCH_QUIET_INPUTS=1 quiets them).
PER_INPUT_LOGGERS = ("celery.app.trace", "celery.worker.strategy", "celery.worker.request")

_COMMON: dict[str, Any] = {
    "task_default_queue": QUEUE,
    "result_expires": 3600,
    "broker_connection_retry_on_startup": True,
    "worker_hijack_root_logger": True,
}
if os.environ.get("BENCH_ACK_EMULATION") == "0":
    # Experiment only (bench/README.md): kombu's Redis transport then keeps no unacked
    # bookkeeping (no redelivery of a lost worker's messages), which is most of the
    # consumer's cost per message.
    _COMMON["broker_transport_options"] = {"ack_emulation": False}

# -- stock Celery: prefork, threads, gevent --------------------------------------------------


def _redis_switches(app: Celery) -> None:
    """``BENCH_FAST_ACKS=0`` / ``BENCH_BATCH_FETCH=0``: turn a part of our Redis step off."""
    if os.environ.get("BENCH_FAST_ACKS") == "0":
        app.conf.concurrent_redis_fast_acks = False
    if os.environ.get("BENCH_BATCH_FETCH") == "0":
        app.conf.concurrent_redis_batch_fetch = False


stock = Celery("bench_stock", broker=REDIS_URL, backend=REDIS_URL)
stock.conf.update(_COMMON)
if os.environ.get("BENCH_REDIS_STEP") == "1":
    _redis_switches(stock)
    stock.steps["consumer"].add(RedisFastAcks)


@stock.task(name="bench.stock.noop")
def stock_noop() -> dict[str, Any]:
    return workload.noop()


@stock.task(name="bench.stock.sleep_async")
def stock_sleep_async(delay_s: float) -> dict[str, Any]:
    return asyncio.run(workload.sleep_io(delay_s))


@stock.task(name="bench.stock.sleep_sync")
def stock_sleep_sync(delay_s: float) -> dict[str, Any]:
    return workload.block_io(delay_s)


@stock.task(name="bench.stock.http_get")
def stock_http_get(url: str) -> dict[str, Any]:
    return asyncio.run(workload.http_get_fresh(url))


@stock.task(name="bench.stock.http_get_blocking")
def stock_http_get_blocking(url: str) -> dict[str, Any]:
    return workload.http_get_blocking(url)


@stock.task(name="bench.stock.hold")
def stock_hold(gate: str, expected: int) -> dict[str, Any]:
    return asyncio.run(workload.hold(gate, expected))


@stock.task(name="bench.stock.hold_sync")
def stock_hold_sync(gate: str, expected: int) -> dict[str, Any]:
    return workload.hold_sync(gate, expected)


# -- celery-concurrent -----------------------------------------------------------------------

concurrent = Celery("bench_concurrent", broker=REDIS_URL, backend=REDIS_URL)
concurrent.conf.update(_COMMON)
_redis_switches(concurrent)
if os.environ.get("BENCH_SYNC_BACKEND"):
    concurrent.conf.concurrent_sync_backend = os.environ["BENCH_SYNC_BACKEND"]
if os.environ.get("BENCH_RESULT_WRITER"):
    concurrent.conf.concurrent_result_writer = os.environ["BENCH_RESULT_WRITER"] == "1"
if os.environ.get("BENCH_SCALEDOWN_WINDOW"):
    concurrent.conf.concurrent_scaledown_window = float(os.environ["BENCH_SCALEDOWN_WINDOW"])
celery_concurrent.install(concurrent, autoscaler=os.environ.get("BENCH_AUTOSCALER") == "1")


@signals.after_setup_logger.connect
def _quiet_per_input_logging(**_: Any) -> None:
    if os.environ.get("BENCH_QUIET_INPUTS") == "1":
        for name in PER_INPUT_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


@signals.worker_process_init.connect
def _trace_child_memory(**_: Any) -> None:
    """Under ``bench.memprofile``: trace allocations in each pool child."""
    if workload.TRACEMALLOC_DIR and not tracemalloc.is_tracing():
        tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "12")))


@signals.worker_init.connect
def _trace_main_process_memory(**_: Any) -> None:
    """Under ``bench.memprofile --process main``: trace the worker's main process too.

    Each SIGUSR2 dumps a snapshot: the first one ``main-first``, later ones ``main-full``.
    """
    if not (workload.TRACEMALLOC_DIR and os.environ.get("BENCH_TRACEMALLOC_MAIN")):
        return
    tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "12")))
    taken: list[str] = []

    def dump(signum: int, frame: Any) -> None:
        name = "main-full" if taken else "main-first"
        taken.append(name)
        workload.snapshot(name)

    signal.signal(signal.SIGUSR2, dump)


@concurrent.task(name="bench.concurrent.noop")
@concurrent_inputs(max_inputs=MAX_INPUTS, target_inputs=TARGET_INPUTS)
async def concurrent_noop() -> dict[str, Any]:
    return workload.noop()


@concurrent.task(name="bench.concurrent.noop_sync")
@concurrent_inputs(max_inputs=MAX_INPUTS, target_inputs=TARGET_INPUTS)
def concurrent_noop_sync() -> dict[str, Any]:
    return workload.noop()


@concurrent.task(name="bench.concurrent.sleep_async")
@concurrent_inputs(max_inputs=MAX_INPUTS, target_inputs=TARGET_INPUTS)
async def concurrent_sleep_async(delay_s: float) -> dict[str, Any]:
    return await workload.sleep_io(delay_s)


@concurrent.task(name="bench.concurrent.sleep_sync")
@concurrent_inputs(max_inputs=MAX_INPUTS, target_inputs=TARGET_INPUTS)
def concurrent_sleep_sync(delay_s: float) -> dict[str, Any]:
    return workload.block_io(delay_s)


@concurrent.task(name="bench.concurrent.http_get")
@concurrent_inputs(max_inputs=MAX_INPUTS, target_inputs=TARGET_INPUTS)
async def concurrent_http_get(url: str) -> dict[str, Any]:
    return await workload.http_get(url)


@concurrent.task(name="bench.concurrent.hold")
@concurrent_inputs(max_inputs=MAX_INPUTS, target_inputs=TARGET_INPUTS)
async def concurrent_hold(gate: str, expected: int) -> dict[str, Any]:
    return await workload.hold(gate, expected)


@concurrent.task(name="bench.concurrent.hold_sync")
@concurrent_inputs(max_inputs=MAX_INPUTS, target_inputs=TARGET_INPUTS)
def concurrent_hold_sync(gate: str, expected: int) -> dict[str, Any]:
    return workload.hold_sync(gate, expected)
