"""Run Celery's synchronous tracer for an ``async def`` task without blocking the loop.

Each async input gets an :class:`InputGreenlet` that runs Celery's own trace function, so
every tracer step (signals, states, retries, result storage, callbacks) behaves exactly as
in prefork. When the tracer calls the task's ``run``, the sync facade made by
:func:`make_sync_facade` creates the coroutine and steps it *inside that greenlet*: each
future the coroutine yields is handed to the event loop by :class:`GreenletTrace`, which
the child awaits as an ordinary asyncio task. Because the coroutine body runs in its own
greenlet, everything Celery keys on greenlet identity (``self.request``,
``celery.current_task``) is this input's own, even with thousands sharing one loop thread.

Async code inside an input behaves like asyncio: calling an async task's function from a
running coroutine returns a coroutine to await, and the asyncio tasks an input creates
(``create_task``, ``gather``) run in greenlets of their own that carry the input's request,
current task and context (:func:`input_task_factory`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Callable, Coroutine, Generator
from contextvars import ContextVar
from typing import Any

import greenlet
from celery._state import get_current_task, pop_current_task, push_current_task

__all__ = [
    "GreenletTrace",
    "InputGreenlet",
    "block_on",
    "current_input_id",
    "input_task_factory",
    "make_sync_facade",
    "running_on_loop",
]

_current_input_id: ContextVar[str | None] = ContextVar("celery_concurrent_input", default=None)

#: The label of the input whose code runs on the loop thread right now (for the watchdog).
_running_label: str | None = None


def running_on_loop() -> str | None:
    """Label (``name[id]``) of the async input executing on the loop at this instant."""
    return _running_label


def current_input_id() -> str | None:
    """The task id of the input running in this context, or None outside a task."""
    return _current_input_id.get()


def set_current_input_id(task_id: str | None) -> None:
    """Bind the running input's id in this context (a greenlet or a thread)."""
    _current_input_id.set(task_id)


class _Yield:
    """What a coroutine yielded (a future or None), on its way to the event loop."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class InputGreenlet(greenlet.greenlet):
    """The greenlet one async input's trace (and its coroutine steps) runs in."""

    #: Raised in place of CancelledError when the loop side cancels for a hard time limit.
    cancel_replacement: BaseException | None = None
    #: A coroutine is being stepped here: code running now is async code of the input.
    driving = False
    #: ``name[id]`` of the input, for the loop watchdog.
    label = ""
    #: A cancellation (or soft limit) that arrived during :func:`block_on`, held until the
    #: coroutine's next ``await``; dropped if the coroutine never awaits again.
    held: BaseException | None = None

    def drive(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Step ``coro`` to completion, handing each yielded future to the loop side."""
        send_value: Any = None
        to_throw: BaseException | None = None
        was_driving, self.driving = self.driving, True
        try:
            while True:
                try:
                    if to_throw is None:
                        yielded = coro.send(send_value)
                    else:
                        yielded, to_throw = coro.throw(to_throw), None
                except StopIteration as stop:
                    return stop.value
                if self.held is not None:  # it arrived while a write of this input was held
                    to_throw, self.held, send_value = self.held, None, None
                    if asyncio.isfuture(yielded):
                        yielded.cancel()
                    continue
                send_value, to_throw = self.parent.switch(_Yield(yielded))
        except asyncio.CancelledError:
            if self.cancel_replacement is not None:
                raise self.cancel_replacement from None
            raise
        finally:
            self.driving = was_driving
            coro.close()


def block_on(waiter: asyncio.Future[Any]) -> None:
    """From inside an async input's greenlet, let the loop run until ``waiter`` is done.

    The input's greenlet is suspended (its neighbours on the loop run meanwhile) and resumes
    once ``waiter`` has a result. ``waiter`` must refuse cancellation (its ``cancel()``
    returns False), so the asyncio task waits for it even when cancelled; a cancellation or
    soft time limit thrown in meanwhile is held (:attr:`InputGreenlet.held`) and raised at
    the coroutine's next ``await``: never in the middle of a result write or a publish,
    which a synchronous store could not be interrupted in either.
    """
    glet = greenlet.getcurrent()
    if not isinstance(glet, InputGreenlet):
        raise RuntimeError(f"block_on() called outside an async input's greenlet ({glet!r})")
    while not waiter.done():
        waiter._asyncio_future_blocking = True
        _sent, thrown = glet.parent.switch(_Yield(waiter))
        if thrown is not None and glet.held is None:
            glet.held = thrown


def make_sync_facade(async_fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Wrap an ``async def`` task body in the sync ``run`` Celery's tracer calls.

    Under :class:`~celery_concurrent.pool.ConcurrentPool` the coroutine runs on the child's
    event loop when Celery's tracer (sync code) calls it. Called from running async code
    (another input's coroutine, or any coroutine outside the pool) it returns the coroutine
    for the caller to await, as calling an ``async def`` does. Anywhere else (eager mode,
    ``task.apply()``, another pool) it runs with ``asyncio.run``.
    """

    @functools.wraps(async_fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        coro = async_fn(*args, **kwargs)
        current = greenlet.getcurrent()
        if isinstance(current, InputGreenlet):
            return coro if current.driving else current.drive(coro)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        return coro

    run.__signature__ = inspect.signature(async_fn)  # type: ignore[attr-defined]
    return run


class GreenletTrace:
    """Awaitable that runs ``fn(*args)`` in an :class:`InputGreenlet` on the running loop.

    ``interrupt(exc)`` delivers ``exc`` into the coroutine at its current ``await`` (used
    for the soft time limit) once the owning asyncio task has been cancelled.

    ``context`` is the contextvars context the greenlet runs in (a copy of the running
    one by default): what the child's start-up set, plus this input's id.
    """

    __slots__ = ("_glet", "_pending_interrupt")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        input_id: str,
        label: str,
        context: contextvars.Context | None = None,
    ) -> None:
        def run_trace() -> Any:
            set_current_input_id(input_id)
            return fn(*args)

        self._glet = InputGreenlet(run_trace)
        self._glet.gr_context = context if context is not None else contextvars.copy_context()
        self._glet.label = label
        self._pending_interrupt: BaseException | None = None

    def interrupt_with(self, exc: BaseException) -> None:
        """Throw ``exc`` into the coroutine when the next cancellation arrives."""
        self._pending_interrupt = exc

    def cancel_as(self, exc: BaseException) -> None:
        """Let the task's cancellation surface to the tracer as ``exc`` (hard time limit)."""
        self._glet.cancel_replacement = exc

    def __await__(self) -> Generator[Any, Any, Any]:
        glet = self._glet
        message = self._switch(())
        while not glet.dead:
            try:
                sent = yield message.value
            except asyncio.CancelledError as cancel:
                message = self._switch(((None, self._translate(cancel)),))
            except GeneratorExit:
                glet.throw(greenlet.GreenletExit)
                raise
            except BaseException as exc:
                message = self._switch(((None, exc),))
            else:
                message = self._switch(((sent, None),))
        return message

    def _switch(self, args: tuple[Any, ...]) -> Any:
        global _running_label
        _running_label = self._glet.label
        try:
            return self._glet.switch(*args)
        finally:
            _running_label = None

    def _translate(self, cancel: asyncio.CancelledError) -> BaseException:
        replacement, self._pending_interrupt = self._pending_interrupt, None
        if replacement is None:
            return cancel
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return replacement


def input_task_factory(
    loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
) -> asyncio.Task[Any]:
    """The child loop's task factory: tasks an input creates belong to that input.

    A coroutine scheduled from inside an input (``asyncio.create_task``, ``gather``,
    ``TaskGroup``) runs in a greenlet of its own whose Celery request and current task are
    the input's, so ``self.request``, ``celery.current_task`` and ``current_input_id()``
    read the same there as in the input's body. Other tasks are created as usual.
    """
    current = greenlet.getcurrent()
    if isinstance(current, InputGreenlet) and current.driving and asyncio.iscoroutine(coro):
        task = get_current_task()
        if task is not None:
            coro = _part_of_input(coro, task, task.request, current.label)
    return asyncio.Task(coro, loop=loop, **kwargs)


async def _part_of_input(
    coro: Coroutine[Any, Any, Any], task: Any, request: Any, label: str
) -> Any:
    def run_as_input() -> Any:
        push_current_task(task)
        task.request_stack.push(request)
        try:
            return greenlet.getcurrent().drive(coro)
        finally:
            task.request_stack.pop()
            pop_current_task()

    # Built here, on the loop's own greenlet, so the new greenlet hands its futures to it.
    return await GreenletTrace(run_as_input, (), current_input_id() or "", label)
