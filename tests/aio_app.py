"""Tasks for the async client tests that ``tests.app`` does not have.

Async inputs that send other tasks with ``adelay`` and wait for them with ``aget``, on the
child's loop. Configured like ``tests.app``: ``REDIS_URL`` (backend, and broker unless
``BROKER_URL``) and ``TEST_QUEUE``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from celery import Celery, Task

import celery_concurrent
from celery_concurrent import concurrent

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("aio_tests", broker=os.environ.get("BROKER_URL", REDIS_URL), backend=REDIS_URL)
app.conf.update(
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
celery_concurrent.install(app)


@app.task(bind=True)
@concurrent(max_inputs=200)
async def whoami(self: Task) -> dict[str, Any]:
    await asyncio.sleep(0.01)
    request = self.request
    return {"id": request.id, "parent_id": request.parent_id, "root_id": request.root_id}


@app.task(bind=True)
@concurrent(max_inputs=200)
async def fan_out(self: Task, n: int) -> dict[str, Any]:
    """Sends ``n`` whoami inputs from this input and awaits them, on the child's loop.

    Sent from the input's own coroutine (tests.loop_app.sub_tasks sends from a sub-task).
    """
    sent = [await whoami.adelay() for _ in range(n)]
    children = await asyncio.gather(*(r.aget(timeout=30) for r in sent))
    return {"id": self.request.id, "children": children}
