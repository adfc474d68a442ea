"""Per-child set-up and tear-down on the child's loop: the loop signals and ``@enter``/``@exit``.

``@enter`` and ``@exit`` mark methods of a Task class (Modal's ``@modal.enter`` and
``@modal.exit``): each runs once per pool child, on that child's task instance, ``async def``
ones awaited on the child's loop::

    @concurrent(max_inputs=100)
    class Fetch(app.Task):
        name = "proj.fetch"

        @celery_concurrent.enter
        async def open(self):
            self.session = aiohttp.ClientSession()

        @celery_concurrent.exit
        async def close(self):
            await self.session.close()

        async def run(self, url):
            async with self.session.get(url) as response:
                return response.status

Order in a child: ``worker_process_init``, ``loop_init`` receivers, ``@enter`` methods (each
task in registration order, each class's methods in definition order, bases first), then
inputs; at the end ``@exit`` methods (reverse order), ``loop_shutdown`` receivers, then
``worker_process_shutdown``.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from celery import Celery

from . import signals

__all__ = ["ChildLifecycle", "LifecycleError", "enter", "exit"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: Attribute marking a method as an ``enter`` or ``exit`` hook.
HOOK_ATTR = "__concurrent_hook__"
ENTER = "enter"
EXIT = "exit"


class LifecycleError(Exception):
    """A ``loop_init`` receiver or an ``@enter`` method raised: the child cannot start."""


def enter(method: F) -> F:
    """Run this Task-class method once in each pool child, before the child's first input."""
    return _mark(method, ENTER)


def exit(method: F) -> F:  # shadows the builtin on purpose: the name users know from Modal
    """Run this Task-class method once in each pool child, after the child's last input."""
    return _mark(method, EXIT)


def _mark(method: F, kind: str) -> F:
    if isinstance(method, (staticmethod, classmethod)) or not inspect.isfunction(method):
        raise TypeError(
            f"@celery_concurrent.{kind} marks a plain method of a Task class (def or async "
            f"def taking self), got {method!r}"
        )
    if len(inspect.signature(method).parameters) != 1:
        raise TypeError(
            f"@celery_concurrent.{kind} method {method.__qualname__} must take only self: "
            f"it runs once per child, with no arguments"
        )
    setattr(method, HOOK_ATTR, kind)
    return method


def _hooks(task: Any, kind: str) -> Iterator[Callable[[], Any]]:
    """The task's bound hook methods of ``kind``: bases first, each in definition order."""
    seen: set[str] = set()
    for cls in reversed(type(task).__mro__):
        for name, value in vars(cls).items():
            if getattr(value, HOOK_ATTR, None) == kind and name not in seen:
                seen.add(name)
                yield getattr(task, name)


class ChildLifecycle:
    """Runs one child's start-up and tear-down hooks in the context its inputs inherit."""

    def __init__(self, app: Celery, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop
        #: The context every input starts from (a copy each): what start-up set is in it.
        self.context = contextvars.copy_context()

    def start(self) -> None:
        """``loop_init`` receivers, then ``@enter`` methods; raises LifecycleError.

        Called after ``worker_process_init``: what its receivers set is in the context too.
        """
        self.context = contextvars.copy_context()
        self._run(self._start())

    def stop(self) -> None:
        """``@exit`` methods, then ``loop_shutdown`` receivers; failures are logged."""
        self._run(self._stop())

    def _run(self, coro: Any) -> None:
        self.loop.run_until_complete(self.loop.create_task(coro, context=self.context))

    async def _start(self) -> None:
        pending = self._send(signals.loop_init)
        for index, (name, response) in enumerate(pending):
            try:
                if isinstance(response, BaseException):
                    raise response  # a sync receiver's, which Signal.send caught and logged
                await response
            except Exception as exc:
                _close_all(pending[index + 1 :])
                raise LifecycleError(f"loop_init receiver {name} raised") from exc
        for task in list(self.app.tasks.values()):
            for hook in _hooks(task, ENTER):
                try:
                    await _call(hook)
                except Exception as exc:
                    raise LifecycleError(
                        f"@enter method {hook.__qualname__} of task {task.name} raised"
                    ) from exc

    async def _stop(self) -> None:
        for task in reversed(list(self.app.tasks.values())):
            for hook in reversed(list(_hooks(task, EXIT))):
                try:
                    await _call(hook)
                except Exception:
                    logger.exception(
                        "child %d: @exit method %s of task %s raised",
                        os.getpid(),
                        hook.__qualname__,
                        task.name,
                    )
        for name, response in self._send(signals.loop_shutdown):
            if isinstance(response, BaseException):
                continue  # Celery's Signal.send has logged it with its traceback
            try:
                await response
            except Exception:
                logger.exception("child %d: loop_shutdown receiver %s raised", os.getpid(), name)

    def _send(self, signal: Any) -> list[tuple[str, Any]]:
        """Call every receiver; keep the failures and the coroutines still to await."""
        kept = []
        for receiver, response in signal.send(sender=self.app, loop=self.loop, pid=os.getpid()):
            if isinstance(response, BaseException) or inspect.isawaitable(response):
                kept.append((getattr(receiver, "__qualname__", repr(receiver)), response))
        return kept


async def _call(hook: Callable[[], Any]) -> None:
    result = hook()
    if inspect.isawaitable(result):
        await result


def _close_all(pending: list[tuple[str, Any]]) -> None:
    for _name, response in pending:
        if inspect.iscoroutine(response):
            response.close()
