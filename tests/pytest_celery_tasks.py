"""A task module that tests/test_pytest_celery.py hands to pytest-celery's worker volume.

pytest-celery copies this file's source into the worker's ``/app`` and imports it from the
generated ``app.py``, so it may import only what the image installs.
"""

from __future__ import annotations

import asyncio
import os
import time

from celery import shared_task

from celery_concurrent import concurrent


@shared_task
@concurrent(max_inputs=20)
async def nap(seconds: float) -> dict[str, float]:
    """Wait ``seconds`` on the child's event loop; when and where it ran."""
    start = time.time()
    await asyncio.sleep(seconds)
    return {"start": start, "end": time.time(), "pid": float(os.getpid())}
