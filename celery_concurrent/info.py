"""What ``celery inspect stats`` and Flower show of the pool and the autoscaler.

Flower's worker page prints each key of ``stats()["pool"]`` and ``stats()["autoscaler"]``
as one table row and renders a nested dict or a list of dicts as raw text. So the stats
keep only scalars (and Celery's own ``processes`` list of pids, which Flower joins with
commas): children, per-task limits and prefetch become flat keys or short strings.

The structured form is :meth:`ConcurrentPool.snapshot` and
:meth:`TargetAutoscaler.snapshot`, read in a worker by :mod:`.metrics` and from outside
by the ``concurrent_snapshot`` remote-control command (:mod:`.inspect`).

Flat keys of the pool, in this order (stable; documented in the README):
``implementation``, ``max-concurrency``, ``processes``, ``slots-per-child``, ``children``
(one string: ``"<pid> <state>, <n> in flight"`` per child), ``inflight``, ``waiting``,
``parked``, ``holding``, ``prefetch-count``, ``prefetch-expected``, ``prefetch-slots``,
``prefetch-multiplier``, ``prefetch-running-early-acked``, ``prefetch-scheduled``,
``prefetch-parked``, ``prefetch-max-parked``, ``children-started``,
``max-tasks-per-child``, ``max-memory-per-child``, ``put-guarded-by-semaphore``,
``timeouts``, then one ``task <name>`` per task (built-in ``celery.*`` tasks left out).

Flat keys of the autoscaler: ``max``, ``min``, ``current``, ``desired``, ``demand``,
``load``, ``running``, ``reserved``, ``backlog``, ``qty``, ``scaledown_window``,
``last_decision``, ``last_decision_reason``, then one ``task <name>`` per task.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

__all__ = ["autoscaler_info", "pool_info", "task_key"]

#: Prefix of the per-task keys (``task tests.app.fetch``).
TASK_KEY_PREFIX = "task "
#: Celery's built-in tasks (``celery.chord_unlock``, ``celery.backend_cleanup``, ...).
BUILTIN_TASK_PREFIX = "celery."
#: Pool keys copied from the snapshot unchanged, in display order.
_POOL_SCALARS_FIRST = ("implementation", "max-concurrency", "processes", "slots-per-child")
_POOL_SCALARS_AFTER_CHILDREN = ("inflight", "waiting", "parked", "holding")
_PREFETCH_KEYS = (
    ("value", "prefetch-count"),
    ("expected", "prefetch-expected"),
    ("slots", "prefetch-slots"),
    ("multiplier", "prefetch-multiplier"),
    ("running-early-acked", "prefetch-running-early-acked"),
    ("scheduled", "prefetch-scheduled"),
    ("parked", "prefetch-parked"),
    ("max-parked", "prefetch-max-parked"),
)
_AUTOSCALER_SCALARS = (
    "max",
    "min",
    "current",
    "desired",
    "demand",
    "load",
    "running",
    "reserved",
    "backlog",
    "qty",
    "scaledown_window",
)


def task_key(name: str) -> str:
    """The flat stats key of task ``name``: ``"task <name>"``."""
    return f"{TASK_KEY_PREFIX}{name}"


def pool_info(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """The pool's flat ``_get_info()`` (``inspect stats``, Flower) from its snapshot.

    ``snapshot`` is :meth:`ConcurrentPool.snapshot`; keys it lacks are left out.
    """
    info: dict[str, Any] = {}
    _copy(snapshot, info, _POOL_SCALARS_FIRST)
    if "children" in snapshot:
        info["children"] = _children_line(snapshot["children"] or [])
    _copy(snapshot, info, _POOL_SCALARS_AFTER_CHILDREN)
    prefetch: Mapping[str, Any] = snapshot.get("prefetch") or {}
    for source, key in _PREFETCH_KEYS:
        if source in prefetch:
            info[key] = prefetch[source]
    _copy(snapshot, info, ("children-started",))
    # As Celery's prefork pool reports them: "N/A" for no limit, timeouts as numbers.
    for key in ("max-tasks-per-child", "max-memory-per-child"):
        if key in snapshot:
            info[key] = "N/A" if snapshot[key] is None else snapshot[key]
    _copy(snapshot, info, ("put-guarded-by-semaphore",))
    if "timeouts" in snapshot:
        info["timeouts"] = [value or 0 for value in snapshot["timeouts"] or ()]
    tasks: Mapping[str, Mapping[str, Any]] = snapshot.get("tasks") or {}
    for name in sorted(tasks):
        if not name.startswith(BUILTIN_TASK_PREFIX):
            info[task_key(name)] = _pool_task_line(tasks[name])
    return info


def autoscaler_info(structured: Mapping[str, Any]) -> dict[str, Any]:
    """The autoscaler's flat ``info()`` (``inspect stats``, Flower) from its snapshot.

    ``structured`` is :meth:`TargetAutoscaler.snapshot`; keys it lacks are left out.
    """
    info: dict[str, Any] = {}
    _copy(structured, info, _AUTOSCALER_SCALARS)
    if "last_decision" in structured:
        decision = structured["last_decision"]
        if decision:
            when = _readable_time(decision.get("at"))
            info["last_decision"] = (
                f"{decision.get('from')} to {decision.get('to')} children at {when}"
            )
            info["last_decision_reason"] = str(decision.get("reason", ""))
        else:
            info["last_decision"] = "none yet"
            info["last_decision_reason"] = ""
    targets: Mapping[str, Any] = structured.get("target_inputs") or {}
    maxes: Mapping[str, Any] = structured.get("max_inputs") or {}
    for name in sorted(set(targets) | set(maxes)):
        if not name.startswith(BUILTIN_TASK_PREFIX):
            info[task_key(name)] = (
                f"target {targets.get(name, '?')} / max {maxes.get(name, '?')} inputs per child"
            )
    return info


def _copy(source: Mapping[str, Any], into: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in source:
            into[key] = source[key]


def _children_line(children: list[Mapping[str, Any]]) -> str:
    """``"12345 ready, 3 in flight; 12346 draining, 0 in flight"`` (``"none"`` if empty)."""
    if not children:
        return "none"
    return "; ".join(
        f"{c.get('pid')} {c.get('state')}, {c.get('inflight', 0)} in flight" for c in children
    )


def _pool_task_line(task: Mapping[str, Any]) -> str:
    """``"3 in flight / max 100, target 80, 0 waiting"``."""
    return (
        f"{task.get('inflight', 0)} in flight / max {task.get('max_inputs')}, "
        f"target {task.get('target_inputs')}, {task.get('waiting', 0)} waiting"
    )


def _readable_time(value: Any) -> str:
    """An ISO time as ``"07:08:30 UTC, 02 Dec 2026"``: Flower turns ``-`` into spaces."""
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return moment.strftime("%H:%M:%S %Z, %d %b %Y").replace("  ", " ")
