"""Worker deaths and shutdowns: SIGKILL, warm SIGTERM, cold SIGQUIT, the drain, the timeout."""

from __future__ import annotations

import pytest

from . import scenarios

pytestmark = pytest.mark.reliability


def _runs_and_states(out):
    return {n: (i.state, i.executions) for n, i in out.inputs.items()}


@pytest.mark.timeout(120)
def test_worker_sigkill_acks_late_second_worker_completes_everything(harness, private_redis):
    out = scenarios.worker_sigkill(harness(broker_url=private_redis.url))
    print(out)
    running = set(out.figures["running_at_kill"])
    assert running
    assert not out.lost
    expected = {n: ("SUCCESS", 2 if n in running else 1) for n in out.inputs}
    assert _runs_and_states(out) == expected  # running at the kill: twice, documented


@pytest.mark.timeout(120)
def test_warm_sigterm_mid_load_runs_every_input_exactly_once(harness):
    out = scenarios.warm_sigterm(harness())
    print(out)
    assert out.figures["exit_code"] == 0
    assert out.figures["completed_by_first"] >= 5  # the in-flight ones finished
    assert _runs_and_states(out) == {n: ("SUCCESS", 1) for n in out.inputs}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["threads", "gevent"])
def test_cold_shutdown_returns_acks_late_inputs_to_the_broker(harness, backend):
    out = scenarios.cold_shutdown(harness(env={"TEST_SYNC_BACKEND": backend}))
    print(out)
    print(f"cold shutdown exit after {out.figures['exit_s']} s")
    assert out.figures["exit_code"] is not None, "the worker did not exit within 30 s"
    assert "FAILURE" not in out.figures["states_after_exit"].values()
    assert _runs_and_states(out) == {n: ("SUCCESS", 2) for n in out.inputs}


@pytest.mark.timeout(120)
def test_cold_shutdown_prefork_reference(harness):
    """What prefork does in the same scenario: the behaviour ConcurrentPool must match."""
    out = scenarios.cold_shutdown(harness("prefork"))
    print(out)
    assert "FAILURE" not in out.figures["states_after_exit"].values()
    assert _runs_and_states(out) == {n: ("SUCCESS", 2) for n in out.inputs}


@pytest.mark.timeout(90)
def test_warm_drain_acks_finished_inputs_while_others_run(harness, private_redis):
    out = scenarios.drain_acks(harness(broker_url=private_redis.url), private_redis)
    print(out)
    print(f"largest delay between SUCCESS and ack: {out.figures['max_ack_delay_s']} s")
    assert out.figures["acked_before_slow_finished"] == [f"fast{i}" for i in range(9)]
    assert _runs_and_states(out) == {n: ("SUCCESS", 1) for n in out.inputs}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("backend", "task"), [("threads", "sleep"), ("gevent", "sleep"), ("gevent", "sleep_sync")]
)
def test_sigterm_to_the_process_group_forks_nothing_and_loses_nothing(harness, backend, task):
    out = scenarios.killpg_sigterm(harness(env={"TEST_SYNC_BACKEND": backend}), task)
    print(out)
    assert out.figures["children_forked_during_shutdown"] == 0
    assert out.figures["exit_code"] is not None
    assert _runs_and_states(out) == {n: ("SUCCESS", 1) for n in out.inputs}


@pytest.mark.timeout(90)
def test_shutdown_timeout_log_says_which_inputs_fail_and_which_go_back(harness):
    out = scenarios.shutdown_timeout(harness())
    print(out)
    early, late = out.inputs["early"], out.inputs["late"]
    assert (early.state, early.executions) == ("FAILURE", 1)
    assert early.error.startswith("WorkerLostError"), early.error
    assert out.figures["states_after_exit"]["late"] != "FAILURE"
    assert (late.state, late.executions) == ("SUCCESS", 2)  # returned, then run by worker 2
    lines = out.figures["log_lines"]
    assert any(
        "fail" in line.lower() and "raised unexpected" not in line for line in lines["early"]
    )
    assert any(w in line.lower() for line in lines["late"] for w in ("broker", "return", "requeue"))
