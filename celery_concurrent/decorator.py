"""The ``@concurrent`` decorator: records how many inputs a task may run at once per child."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Task
from celery.local import Proxy

from .bridge import make_sync_facade

__all__ = ["ConcurrencySettings", "concurrent", "settings_for"]

T = TypeVar("T", bound=Callable[..., Any])

#: Attribute under which the settings are recorded on a function or Task class.
SETTINGS_ATTR = "__concurrent__"

_MISSING: Any = object()


@dataclass(frozen=True)
class ConcurrencySettings:
    """What ``@concurrent`` recorded for one task.

    Attributes:
        max_inputs: hard cap of inputs of this task running at once in one child.
        target_inputs: inputs per child the autoscaler aims for (<= max_inputs).
        is_async: the task body is an ``async def`` and runs on the child's event loop.
    """

    max_inputs: int
    target_inputs: int
    is_async: bool


def concurrent(
    _target: Any = None,
    /,
    *,
    max_inputs: int = _MISSING,
    target_inputs: int | None = None,
) -> Callable[[T], T]:
    """Let one worker child run up to ``max_inputs`` inputs of a task at once.

    Stack it under ``@app.task`` or put it on a Task class (never on its method)::

        @app.task
        @concurrent(max_inputs=100, target_inputs=80)
        async def fetch(url): ...

    ``async def`` tasks run as asyncio tasks on the child's one persistent event loop, so
    clients created at child start-up stay valid; a blocking call inside one stalls every
    input on that loop. Plain ``def`` tasks run on the child's threads and must be
    thread-safe. ``target_inputs`` (default ``max_inputs``) is the load per child the
    autoscaler aims for; a child bursts above it, up to ``max_inputs``, while scaling catches
    up.

    Raises:
        TypeError: used without parentheses, with a non-int, twice, above ``@app.task``,
            or on a method.
        ValueError: a limit below 1, or ``target_inputs`` above ``max_inputs``.
    """
    if _target is not None:
        if callable(_target):
            raise TypeError(
                "@concurrent needs its settings: did you forget the parentheses? "
                "use @concurrent(max_inputs=N)"
            )
        raise TypeError(
            f"@concurrent takes keyword arguments only, got {_target!r}: "
            f"use @concurrent(max_inputs={_target!r})"
        )
    settings_args = _validate_limits(max_inputs, target_inputs)

    def decorate(target: T) -> T:
        if isinstance(target, type):
            return _decorate_task_class(target, *settings_args)  # type: ignore[return-value]
        return _decorate_function(target, *settings_args)

    return decorate


def settings_for(task: Any) -> ConcurrencySettings | None:
    """The settings recorded for a registered task, or None if it is not ``@concurrent``."""
    found = getattr(type(task), SETTINGS_ATTR, None)
    if found is None:
        found = getattr(getattr(task, "run", None), SETTINGS_ATTR, None)
    return found if isinstance(found, ConcurrencySettings) else None


def _validate_limits(max_inputs: Any, target_inputs: Any) -> tuple[int, int]:
    if max_inputs is _MISSING:
        raise TypeError(
            "@concurrent needs max_inputs, the most inputs one child runs at once: "
            "use @concurrent(max_inputs=N)"
        )
    _check_positive_int("max_inputs", max_inputs)
    if target_inputs is None:
        return max_inputs, max_inputs
    _check_positive_int("target_inputs", target_inputs)
    if target_inputs > max_inputs:
        raise ValueError(
            f"@concurrent target_inputs={target_inputs} is above max_inputs={max_inputs}: "
            "target_inputs is the load per child the autoscaler aims for and must be "
            f"<= max_inputs (e.g. target_inputs={max_inputs})"
        )
    return max_inputs, target_inputs


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"@concurrent {name} must be an int, got {type(value).__name__} {value!r}: "
            f"use e.g. @concurrent({name}=10)"
        )
    if value < 1:
        raise ValueError(f"@concurrent {name} must be >= 1, got {value}: use e.g. {name}=10")


def _decorate_function(fn: T, max_inputs: int, target_inputs: int) -> T:
    if isinstance(fn, Task) or issubclass(type(fn), Proxy):
        raise TypeError(
            "@concurrent is stacked above @app.task; it must go under it:\n"
            "    @app.task\n    @concurrent(max_inputs=N)\n    def my_task(...): ..."
        )
    if not callable(fn):
        raise TypeError(f"@concurrent decorates a task function or a Task class, got {fn!r}")
    if hasattr(fn, SETTINGS_ATTR):
        raise TypeError(f"@concurrent is applied twice to {_name(fn)}: keep one @concurrent(...)")
    if _defined_in_class_body(fn):
        owner = fn.__qualname__.rsplit(".", 2)[-2]
        raise TypeError(
            f"@concurrent is on the method {fn.__qualname__}; put it on the Task class "
            f"instead:\n    @concurrent(max_inputs=N)\n    class {owner}(app.Task): ..."
        )
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"@concurrent task {_name(fn)} is a generator; a task must return its result"
        )
    is_async = inspect.iscoroutinefunction(fn)
    wrapper: Any = make_sync_facade(fn) if is_async else _plain_wrapper(fn)
    setattr(wrapper, SETTINGS_ATTR, ConcurrencySettings(max_inputs, target_inputs, is_async))
    return wrapper  # type: ignore[no-any-return]


def _decorate_task_class(cls: type, max_inputs: int, target_inputs: int) -> type:
    if not issubclass(cls, Task):
        raise TypeError(
            f"@concurrent on a class needs a celery Task subclass, got {cls.__qualname__}: "
            "subclass app.Task and define run()"
        )
    if SETTINGS_ATTR in cls.__dict__:
        raise TypeError(
            f"@concurrent is applied twice to {cls.__qualname__}: keep one @concurrent(...)"
        )
    for attr, value in vars(cls).items():
        if hasattr(value, SETTINGS_ATTR) or hasattr(
            getattr(value, "__func__", None), SETTINGS_ATTR
        ):
            raise TypeError(
                f"@concurrent is on the method {cls.__qualname__}.{attr}; put it on the "
                f"class only:\n    @concurrent(max_inputs=N)\n    class {cls.__qualname__}"
                "(app.Task): ..."
            )
    run = getattr(cls, "run", None)
    if run is None or run is Task.run:
        raise TypeError(f"@concurrent Task class {cls.__qualname__} must define run()")
    is_async = inspect.iscoroutinefunction(run)
    if is_async:
        cls.run = make_sync_facade(run)  # type: ignore[attr-defined]
    setattr(cls, SETTINGS_ATTR, ConcurrencySettings(max_inputs, target_inputs, is_async))
    return cls


def _plain_wrapper(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    run.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    return run


def _defined_in_class_body(fn: Any) -> bool:
    """A function whose qualname is ``Owner.name`` (not ``outer.<locals>.name``)."""
    parts = getattr(fn, "__qualname__", "").split(".")
    return len(parts) >= 2 and parts[-2] != "<locals>"


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
