"""Per-child async clients: one aiohttp session per pool child, made on the child's loop.

``loop_init`` receivers and ``@enter`` methods run once in each child, awaited on the loop
the child's inputs run on, before its first input; ``loop_shutdown`` and ``@exit`` run after
its last. Run a worker and send it URLs::

    REDIS_URL=redis://127.0.0.1:6379/0 celery -A examples.async_clients worker
    python -c "from examples.async_clients import fetch_status; \\
        print(fetch_status.delay('https://example.org').get())"
"""

from __future__ import annotations

import os

import aiohttp
from celery import Celery

import celery_concurrent
from celery_concurrent import concurrent
from celery_concurrent.signals import loop_init, loop_shutdown

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("async_clients", broker=REDIS_URL, backend=REDIS_URL)
celery_concurrent.install(app)

# A module-level client, one per child (each child is its own process), made on the
# child's loop: aiohttp.ClientSession() needs a running loop, which worker_process_init lacks.
session: aiohttp.ClientSession


@loop_init.connect
async def open_session(**kwargs: object) -> None:
    global session
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))


@loop_shutdown.connect
async def close_session(**kwargs: object) -> None:
    await session.close()


@app.task
@concurrent(max_inputs=100)
async def fetch_status(url: str) -> int:
    """The status code of ``url``, fetched with the child's session."""
    async with session.get(url) as response:
        return response.status


# The same on a Task class, Modal-style: the client lives on the task instance.
@concurrent(max_inputs=100)
class FetchText(app.Task):  # type: ignore[name-defined,misc]
    name = "async_clients.fetch_text"

    @celery_concurrent.enter
    async def open(self) -> None:
        self.client = aiohttp.ClientSession()

    @celery_concurrent.exit
    async def close(self) -> None:
        await self.client.close()

    async def run(self, url: str) -> str:  # type: ignore[override]
        async with self.client.get(url) as response:
            return await response.text()


fetch_text = app.register_task(FetchText())
