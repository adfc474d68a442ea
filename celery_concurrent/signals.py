"""Signals of a pool child's event loop, sent in every child of a ConcurrentPool worker.

Receivers may be plain functions or ``async def``; async ones are awaited on the child's
loop. Both get ``sender`` (the app), ``loop`` (the child's event loop) and ``pid``::

    from celery_concurrent.signals import loop_init, loop_shutdown

    @loop_init.connect
    async def open_session(sender, loop, **kwargs):
        global session
        session = aiohttp.ClientSession()

    @loop_shutdown.connect
    async def close_session(sender, **kwargs):
        await session.close()

- ``loop_init``: after ``worker_process_init``, before the child takes its first input.
  Contextvars set here are seen by every input of the child. A receiver that raises fails
  the child's start: the worker logs the traceback and starts another child, with backoff.
- ``loop_shutdown``: after the child's last input (warm shutdown, scale-down, recycling by
  ``--max-tasks-per-child`` or ``--max-memory-per-child``), before ``worker_process_shutdown``.
  A receiver that raises is logged; the others still run.

Sync receivers are called first, in the order they connected; then the async ones are
awaited one after another, in that order. Not sent on a child that is killed (SIGKILL,
a crash, a cold shutdown's kill).
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["loop_init", "loop_shutdown"]

loop_init = Signal(name="loop_init", providing_args={"loop", "pid"})
loop_shutdown = Signal(name="loop_shutdown", providing_args={"loop", "pid"})
