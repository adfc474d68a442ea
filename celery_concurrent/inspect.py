"""The ``concurrent_snapshot`` remote-control command: the pool's and autoscaler's structure.

``celery inspect stats`` (and Flower) show flat keys (see :mod:`.info`); tools and tests
that need the nested form (each child, each task's counts, prefetch parts, the last scaling
decision) ask for it with::

    celery -A proj inspect concurrent_snapshot

or from Python with :func:`concurrent_snapshot`. Each worker replies
``{"pool": ConcurrentPool.snapshot(), "autoscaler": TargetAutoscaler.snapshot() or None}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery.worker.control import inspect_command

__all__ = ["COMMAND", "concurrent_snapshot", "snapshot_command"]

#: The remote-control command's name.
COMMAND = "concurrent_snapshot"


@inspect_command(name=COMMAND)  # type: ignore[untyped-decorator]
def snapshot_command(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Structured state of the concurrent pool and its autoscaler (None without one)."""
    consumer = state.consumer
    pool = consumer.pool
    autoscaler = getattr(consumer.controller, "autoscaler", None)
    pool_snapshot = getattr(pool, "snapshot", None)
    scaler_snapshot = getattr(autoscaler, "snapshot", None)
    return {
        "pool": pool_snapshot() if pool_snapshot is not None else pool.info,
        "autoscaler": scaler_snapshot() if scaler_snapshot is not None else None,
    }


def concurrent_snapshot(
    app: Any, destination: Sequence[str] | None = None, timeout: float = 5.0
) -> dict[str, dict[str, Any]]:
    """Ask workers (all, or the hostnames in ``destination``) for their snapshot.

    Returns ``{hostname: {"pool": ..., "autoscaler": ...}}``; a worker that did not reply
    within ``timeout`` seconds is missing from it.
    """
    replies = app.control.broadcast(
        COMMAND,
        destination=list(destination) if destination is not None else None,
        reply=True,
        timeout=timeout,
        limit=len(destination) if destination else None,
    )
    merged: dict[str, dict[str, Any]] = {}
    for reply in replies or []:
        merged.update(reply)
    return merged
