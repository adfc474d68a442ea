"""What ``celery inspect stats`` and Flower show of the pool and the autoscaler."""

from __future__ import annotations

from typing import Any

__all__ = ["pool_info"]


def pool_info(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The pool's ``_get_info()`` from :meth:`ConcurrentPool.snapshot`."""
    return dict(snapshot)
