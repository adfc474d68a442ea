"""Where the next input goes: under target first, least loaded first; burst up to max."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

__all__ = ["ChildLoad", "Limits", "LoadSnapshot", "choose_child"]


@dataclass(frozen=True)
class Limits:
    """Per-child limits of one task."""

    max_inputs: int
    target_inputs: int


class ChildLoad(Protocol):
    """What dispatch needs to know of a child."""

    @property
    def accepting(self) -> bool: ...

    @property
    def running(self) -> int: ...

    @property
    def ready(self) -> bool: ...

    @property
    def per_task(self) -> Counter[str]: ...


@dataclass
class LoadSnapshot:
    """A plain :class:`ChildLoad`, for tests and simulations."""

    accepting: bool = True
    running: int = 0
    per_task: Counter[str] = field(default_factory=Counter)
    ready: bool = True


C = TypeVar("C", bound=ChildLoad)


def choose_child(
    children: Iterable[C], task_name: str, limits: Limits, slots_per_child: int
) -> C | None:
    """The child that should run the next input of ``task_name``, or None if all are full.

    A child is eligible while it accepts work, runs fewer than ``limits.max_inputs`` of this
    task and fewer than ``slots_per_child`` inputs in all. Ready children come before
    children still starting (a new child takes a moment before it runs anything, so a ready
    child bursts meanwhile); within each, children under the task's target win over
    children at or above it (burst), and ties go to the least loaded.
    """
    best: C | None = None
    best_rank: tuple[bool, bool, int] | None = None
    for child in children:
        if not child.accepting or child.running >= slots_per_child:
            continue
        of_task = child.per_task[task_name]
        if of_task >= limits.max_inputs:
            continue
        rank = (not child.ready, of_task >= limits.target_inputs, child.running)
        if best_rank is None or rank < best_rank:
            best, best_rank = child, rank
    return best
