"""@concurrent records its settings and refuses every misuse with the fix in the message."""

from __future__ import annotations

import asyncio

import pytest
from celery import Celery, Task

import celery_concurrent
from celery_concurrent import ConcurrencySettings, concurrent, settings_for


@pytest.fixture
def app() -> Celery:
    return Celery("unit", set_as_current=False)


def test_records_settings_on_function_task(app: Celery) -> None:
    @app.task
    @concurrent(max_inputs=100, target_inputs=80)
    async def fetch(url: str) -> str:
        return url

    assert settings_for(fetch) == ConcurrencySettings(100, 80, is_async=True)


def test_target_defaults_to_max(app: Celery) -> None:
    @app.task(bind=True)
    @concurrent(max_inputs=16)
    def resize(self: Task, path: str) -> str:
        return path

    assert settings_for(resize) == ConcurrencySettings(16, 16, is_async=False)


def test_records_settings_on_task_class(app: Celery) -> None:
    @concurrent(max_inputs=50, target_inputs=40)
    class Embed(Task):  # type: ignore[misc]
        name = "unit.embed"

        async def run(self, text: str) -> int:  # type: ignore[override]
            await asyncio.sleep(0)
            return len(text)

    task = app.register_task(Embed())
    assert settings_for(task) == ConcurrencySettings(50, 40, is_async=True)


def test_async_task_runs_outside_the_pool_with_asyncio_run(app: Celery) -> None:
    @app.task
    @concurrent(max_inputs=4)
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    assert double(21) == 42
    assert double.apply(args=(5,)).get() == 10


def test_async_task_called_inside_a_loop_returns_an_awaitable(app: Celery) -> None:
    @app.task
    @concurrent(max_inputs=4)
    async def twice(x: int) -> int:
        return x * 2

    async def main() -> int:
        return await twice(4)  # type: ignore[no-any-return]

    assert asyncio.run(main()) == 8


def test_argument_checking_keeps_the_signature(app: Celery) -> None:
    @app.task(typing=True)
    @concurrent(max_inputs=4)
    async def one_arg(x: int) -> int:
        return x

    with pytest.raises(TypeError):
        one_arg.delay(1, 2)


def test_plain_task_has_no_settings(app: Celery) -> None:
    @app.task
    def plain() -> None: ...

    assert settings_for(plain) is None


def test_missing_max_inputs() -> None:
    with pytest.raises(TypeError, match=r"needs max_inputs.*@concurrent\(max_inputs=N\)"):
        concurrent()


def test_bare_decorator_without_parentheses() -> None:
    with pytest.raises(
        TypeError,
        match=r"did you forget the parentheses\? use "
        r"@concurrent\(max_inputs=N\)",
    ):

        @concurrent  # type: ignore[arg-type]
        def task() -> None: ...


def test_positional_limit() -> None:
    with pytest.raises(TypeError, match=r"keyword arguments only.*max_inputs=10"):
        concurrent(10)


@pytest.mark.parametrize("value", ["10", 2.5, True, None])
def test_max_inputs_not_an_int(value: object) -> None:
    with pytest.raises(TypeError, match="max_inputs must be an int"):
        concurrent(max_inputs=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -3])
def test_max_inputs_below_one(value: int) -> None:
    with pytest.raises(ValueError, match=f"max_inputs must be >= 1, got {value}"):
        concurrent(max_inputs=value)


def test_target_inputs_not_an_int() -> None:
    with pytest.raises(TypeError, match="target_inputs must be an int"):
        concurrent(max_inputs=5, target_inputs="3")  # type: ignore[arg-type]


def test_target_inputs_below_one() -> None:
    with pytest.raises(ValueError, match="target_inputs must be >= 1, got 0"):
        concurrent(max_inputs=5, target_inputs=0)


def test_target_inputs_above_max() -> None:
    with pytest.raises(ValueError, match=r"target_inputs=8 is above max_inputs=5.*<= max_inputs"):
        concurrent(max_inputs=5, target_inputs=8)


def test_applied_twice_to_a_function() -> None:
    with pytest.raises(TypeError, match="applied twice"):

        @concurrent(max_inputs=2)
        @concurrent(max_inputs=3)
        def task() -> None: ...


def test_applied_twice_to_a_class() -> None:
    with pytest.raises(TypeError, match="applied twice"):

        @concurrent(max_inputs=2)
        @concurrent(max_inputs=3)
        class Twice(Task):  # type: ignore[misc]
            def run(self) -> None: ...


def test_stacked_above_app_task(app: Celery) -> None:
    with pytest.raises(TypeError, match=r"stacked above @app.task; it must go under it"):

        @concurrent(max_inputs=2)
        @app.task(shared=False)
        def lazy_task() -> None: ...


def test_stacked_above_a_finalized_app_task(app: Celery) -> None:
    app.finalize()
    with pytest.raises(TypeError, match=r"stacked above @app.task"):

        @concurrent(max_inputs=2)
        @app.task(shared=False)
        def finalized_task() -> None: ...


def test_on_a_method_of_a_task_class() -> None:
    with pytest.raises(TypeError, match=r"on the method .*Embed.run; put it on the Task class"):

        class Embed(Task):  # type: ignore[misc]
            @concurrent(max_inputs=2)
            async def run(self) -> None: ...


def test_on_a_class_that_is_not_a_task() -> None:
    with pytest.raises(TypeError, match="needs a celery Task subclass"):

        @concurrent(max_inputs=2)
        class NotATask:
            pass


def test_on_a_task_class_without_run() -> None:
    with pytest.raises(TypeError, match="must define run"):

        @concurrent(max_inputs=2)
        class NoRun(Task):  # type: ignore[misc]
            pass


def test_on_a_generator() -> None:
    with pytest.raises(TypeError, match="is a generator"):

        @concurrent(max_inputs=2)
        def gen() -> object:
            yield 1


def test_public_api_is_pinned() -> None:
    assert celery_concurrent.__all__ == [
        "ConcurrencyConfigError",
        "ConcurrencySettings",
        "ConcurrentError",
        "ConcurrentPool",
        "TargetAutoscaler",
        "concurrent",
        "current_input_id",
        "enter",
        "exit",
        "install",
        "settings_for",
    ]
