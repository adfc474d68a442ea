"""Inputs the worker cannot handle normally each get a clear end; the worker keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import scenarios
from .harness import Harness, Outcome

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    """One worker gets all four bad inputs, then three good ones."""
    h = Harness("concurrent", log_dir=tmp_path_factory.mktemp("bad-inputs"))
    try:
        out = scenarios.bad_inputs(h)
        out.figures["log_tail"] = h.workers[0].handle.tail(60)
        yield out
    finally:
        h.close()


def _after(out: Outcome) -> None:
    assert {n: out.inputs[n].state for n in ("after0", "after1", "after2")} == dict.fromkeys(
        ("after0", "after1", "after2"), "SUCCESS"
    ), out.figures["log_tail"]


@pytest.mark.timeout(90)
def test_unserialisable_result_fails_with_an_encode_error(bad):
    print(bad)
    item = bad.inputs["unserialisable"]
    assert (item.state, item.executions) == ("FAILURE", 1), bad.figures["log_tail"]
    assert "serializ" in item.error.lower() or "encode" in item.error.lower(), item.error
    _after(bad)


@pytest.mark.timeout(90)
def test_unpicklable_exception_fails_with_its_type_and_message(bad):
    item = bad.inputs["unpicklable"]
    assert (item.state, item.executions) == ("FAILURE", 1), bad.figures["log_tail"]
    assert "cannot be pickled" in item.error, item.error
    _after(bad)


@pytest.mark.timeout(90)
def test_unknown_task_name_is_logged_and_skipped(bad):
    assert bad.figures["logged_unregistered"], bad.figures["log_tail"]
    _after(bad)


@pytest.mark.timeout(90)
def test_undecodable_body_is_logged_and_skipped(bad):
    assert bad.figures["logged_undecodable"], bad.figures["log_tail"]
    _after(bad)
