"""Limits the parent enforces: time limits, revokes that terminate, child recycling."""

from __future__ import annotations

import pytest

from . import scenarios

pytestmark = pytest.mark.reliability


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["block", "swallow"])
def test_async_time_limit_holds_and_replaces_the_child(harness, kind):
    out = scenarios.time_limit(harness(), kind)
    print(out)
    print(f"limited input final after {out.figures.get('limited_final_after_s')} s")
    limited, neighbour = out.inputs["limited"], out.inputs["neighbour"]
    assert limited.state == "FAILURE" and limited.error.startswith("TimeLimitExceeded"), (
        limited.state,
        limited.error,
    )
    # Documented blast radius: the neighbour on the same child is treated as in a crash.
    assert neighbour.state == "FAILURE" and neighbour.error.startswith("WorkerLostError"), (
        neighbour.state,
        neighbour.error,
    )
    assert limited.executions == 1 and neighbour.executions == 1
    after = out.figures["children_after"]
    assert len(after) == 1 and after != out.figures["child_before"], "the child was not replaced"


@pytest.mark.timeout(90)
def test_worker_wide_time_limits_apply_to_concurrent_inputs(harness):
    out = scenarios.worker_time_limits(harness())
    print(out)
    hard = out.inputs["hard"]
    assert hard.state == "FAILURE" and hard.error.startswith("TimeLimitExceeded"), hard.error
    assert out.figures["soft_result"] == "soft limit caught"


@pytest.mark.timeout(90)
def test_revoke_terminate_sigkill_revokes_and_replaces_the_child(harness):
    out = scenarios.revoke_terminate(harness(), "sigkill")
    print(out)
    assert out.inputs["victim"].state == "REVOKED"
    assert out.inputs["victim"].executions == 1
    after = out.figures["children_after"]
    assert len(after) == 1 and after != out.figures["child_before"], "the child was not replaced"
    assert out.inputs["after"].state == "SUCCESS"


@pytest.mark.timeout(90)
def test_revoke_terminate_sigterm_cancels_only_that_async_input(harness):
    out = scenarios.revoke_terminate(harness(), "sigterm")
    print(out)
    assert out.inputs["victim"].state == "REVOKED"
    assert (out.inputs["neighbour"].state, out.inputs["neighbour"].executions) == ("SUCCESS", 1)
    assert out.figures["children_after"] == out.figures["child_before"]


@pytest.mark.timeout(90)
def test_revoke_by_stamped_headers_terminates_the_stamped_input(harness):
    out = scenarios.revoke_terminate(harness(), "stamped")
    print(out)
    assert out.inputs["victim"].state == "REVOKED"
    assert out.inputs["victim"].executions == 1
    assert (out.inputs["neighbour"].state, out.inputs["neighbour"].executions) == ("SUCCESS", 1)


@pytest.mark.timeout(120)
def test_max_tasks_per_child_recycles_children_without_losing_inputs(harness):
    out = scenarios.max_tasks_per_child(harness())
    print(out)
    assert {n: (i.state, i.executions) for n, i in out.inputs.items()} == {
        n: ("SUCCESS", 1) for n in out.inputs
    }
    assert out.figures["child_inits"] > 2, "no child was recycled"
    assert out.figures["pids_used"] > 2
    # Never more than MAX working children (draining ones come on top; they are not counted).
    assert out.figures["most_reported_processes"] <= 2


@pytest.mark.timeout(120)
def test_max_memory_per_child_recycles_children_without_losing_inputs(harness):
    out = scenarios.max_memory_per_child(harness())
    print(out)
    assert {n: (i.state, i.executions) for n, i in out.inputs.items()} == {
        n: ("SUCCESS", 1) for n in out.inputs
    }
    assert out.figures["pids_used"] > 1, "no child was recycled"
    assert out.figures["most_reported_processes"] <= 1
