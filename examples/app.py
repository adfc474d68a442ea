"""Example app: async I/O, threaded sync work, and a class-based task on one worker.

Run a worker (the concurrent pool and autoscaler are selected by ``install``)::

    REDIS_URL=redis://127.0.0.1:6379/0 celery -A examples.app worker --autoscale=4,1 -E
"""

from __future__ import annotations

import asyncio
import os
import time

from celery import Celery

import celery_concurrent
from celery_concurrent import concurrent, current_input_id

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("examples", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(result_expires=3600, task_track_started=True)
celery_concurrent.install(app)


@app.task
@concurrent(max_inputs=100, target_inputs=80)
async def fetch(delay_s: float = 0.1) -> dict[str, object]:
    """An I/O-bound input: waits on the loop without holding a thread."""
    started = time.time()
    await asyncio.sleep(delay_s)
    return {"id": current_input_id(), "pid": os.getpid(), "start": started, "end": time.time()}


@app.task(bind=True)
@concurrent(max_inputs=16)
def resize(self, delay_s: float = 0.1) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """A blocking input on one of the child's threads."""
    started = time.time()
    time.sleep(delay_s)
    return {"id": self.request.id, "pid": os.getpid(), "start": started, "end": time.time()}


@concurrent(max_inputs=50, target_inputs=40)
class Embed(app.Task):  # type: ignore[name-defined,misc]
    """Class-based concurrent task."""

    name = "examples.embed"

    async def run(self, text: str) -> list[float]:  # type: ignore[override]
        await asyncio.sleep(0.01)
        return [float(len(text)), float(sum(map(ord, text)) % 97)]


embed = app.register_task(Embed())
