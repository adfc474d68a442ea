"""One input handed to the pool by Celery, and the handle Celery keeps to stop it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .process import ChildProcess

__all__ = ["Job", "Terminator"]


class Terminator(Protocol):
    """What a :class:`Job` asks to stop itself (the pool)."""

    def terminate_input(self, job: Job, signum: int) -> None: ...


@dataclass(eq=False, slots=True, weakref_slot=True)
class Job:
    """One input: what to run, Celery's callbacks, and where it is.

    It is also what ``on_apply`` returns: Celery keeps a weak reference to it and calls
    :meth:`terminate` for ``revoke(terminate=True)``, stamped-header revokes, cold shutdown
    and cancel-on-connection-loss (``Request.terminate``/``Request.cancel``).
    """

    id: int
    task_name: str
    task_id: str
    target: Callable[..., Any]
    args: tuple[Any, ...]
    soft_timeout_s: float | None
    timeout_s: float | None
    callback: Callable[..., Any] | None
    error_callback: Callable[..., Any] | None
    accept_callback: Callable[..., Any] | None
    timeout_callback: Callable[..., Any] | None
    is_async: bool
    pool: Terminator | None = None
    child: ChildProcess | None = None
    received_at: float = field(default_factory=time.monotonic)
    accepted_at: float | None = None
    early_acked: bool = False  # acknowledged at start: holds no unacked message
    finished: bool = False  # Celery has been told the outcome (or it was handed back)

    @property
    def accepted(self) -> bool:
        return self.accepted_at is not None

    @property
    def request(self) -> Any:
        """Celery's Request this job came from, when Celery's worker sent it."""
        return getattr(self.accept_callback, "__self__", None)

    @property
    def label(self) -> str:
        return f"{self.task_name}[{self.task_id}]"

    @property
    def acks_late(self) -> bool:
        """Its message stays unacknowledged until it ends (Celery's ``acks_late``)."""
        request = self.request
        task = getattr(request, "task", None)
        return bool(getattr(task, "acks_late", False)) and not getattr(
            request, "acknowledged", False
        )

    def terminate(self, signal: int | None = None) -> None:
        """Stop this input (Celery's ``ApplyResult.terminate`` contract)."""
        if self.pool is not None and not self.finished:
            self.pool.terminate_input(self, int(signal or 15))
