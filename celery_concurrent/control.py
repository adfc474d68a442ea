"""Remote-control commands that know a child has many input slots.

Celery's ``pool_grow``/``pool_shrink`` move prefetch by one per process; a concurrent
child has ``slots_per_child`` slots, and :class:`~celery_concurrent.pool.ConcurrentPool`
adjusts prefetch itself. For any other pool these behave exactly like Celery's.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, nok, ok

__all__ = ["pool_grow", "pool_shrink"]

_REFUSED_WITH_AUTOSCALE = (
    "pool_{0} is not supported with autoscale. Adjust autoscale range instead."
)


def _resize(state: Any, n: int, direction: str) -> dict[str, Any]:
    consumer = state.consumer
    if consumer.controller.autoscaler:
        return nok(_REFUSED_WITH_AUTOSCALE.format(direction))  # type: ignore[no-any-return]
    pool = consumer.pool
    if direction == "grow":
        pool.grow(n)
    else:
        pool.shrink(n)
    if not hasattr(pool, "attach_consumer"):  # not ours: Celery's own prefetch update
        consumer._update_prefetch_count(n if direction == "grow" else -n)
    return ok(f"pool will {direction}")  # type: ignore[no-any-return]


@control_command(args=[("n", int)], signature="[N=1]")  # type: ignore[untyped-decorator]
def pool_grow(state: Any, n: int = 1, **kwargs: Any) -> dict[str, Any]:
    """Grow pool by n processes/threads (children, for the concurrent pool)."""
    return _resize(state, n, "grow")


@control_command(args=[("n", int)], signature="[N=1]")  # type: ignore[untyped-decorator]
def pool_shrink(state: Any, n: int = 1, **kwargs: Any) -> dict[str, Any]:
    """Shrink pool by n processes/threads (children, for the concurrent pool)."""
    return _resize(state, n, "shrink")
