"""The benchmark's fairness rules, without running a benchmark (bench/, issue 13).

Each test pins one rule: which systems are compared, at which level and log level, where
results go, and how the goals are judged. Nothing here starts a worker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import report, run
from bench.scenarios import IO_SCENARIOS, Arrivals, arrivals_for, memory_scenario
from bench.systems import (
    AUTOSCALE_MAX_SLOTS,
    AUTOSCALE_SYSTEMS,
    DEFAULT_SYSTEMS,
    SYSTEMS,
    _worker_command,
)

ROOT = Path(__file__).resolve().parent.parent
ASYNC_IO = next(s for s in IO_SCENARIOS if s.name == "async-io")
TRIVIAL = next(s for s in IO_SCENARIOS if s.name == "trivial")


def command(name: str, level: int | None = None) -> list[str]:
    """The worker command line, at ``level`` or the system's own in ``trivial``."""
    system = {**SYSTEMS, **AUTOSCALE_SYSTEMS}[name]
    return _worker_command(system, level or system.level_in(TRIVIAL), "q", "q@bench")


# -- systems --------------------------------------------------------------------------------


def test_the_default_set_has_stock_with_and_without_our_redis_step():
    for name in ("celery-prefork", "celery-prefork+acks", "celery-threads", "celery-threads+acks"):
        assert name in DEFAULT_SYSTEMS
    assert not SYSTEMS["celery-prefork"].redis_step
    assert SYSTEMS["celery-prefork+acks"].redis_step
    assert "+ our Redis step" in SYSTEMS["celery-prefork+acks"].describe(8)
    # the same stock app and pool: only the consumer step differs
    assert command("celery-prefork") == command("celery-prefork+acks")


def test_the_stock_app_gets_our_redis_step_only_when_asked():
    probe = (
        "from bench import tasks_celery as t; "
        "print(any('redis_fast_acks' in s.name for s in t.stock.steps['consumer']))"
    )
    seen = {}
    for value in ("0", "1"):
        env = {**os.environ, "BENCH_REDIS_STEP": value}
        out = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        seen[value] = out.stdout.strip()
    assert seen == {"0": "False", "1": "True"}


def test_stock_threads_run_async_io_at_100_and_at_500():
    assert SYSTEMS["celery-threads"].level_in(ASYNC_IO) == 100
    assert SYSTEMS["celery-threads-500"].level_in(ASYNC_IO) == 500
    assert SYSTEMS["celery-concurrent"].level_in(ASYNC_IO) == 500
    assert SYSTEMS["celery-threads-500"].runs(ASYNC_IO)
    assert not SYSTEMS["celery-threads-500"].runs(TRIVIAL)  # the same as celery-threads there
    assert "-c 500" in " ".join(command("celery-threads-500", 500))


def test_every_worker_states_its_log_level():
    for name, system in SYSTEMS.items():
        line = " ".join(command(name))
        if system.kind == "arq":
            continue  # the level is BENCH_LOGLEVEL, set in its environment
        if system.kind == "taskiq":
            assert f"--log-level {system.loglevel.upper()}" in line
        else:
            assert f"-l {system.loglevel}" in line
        assert system.loglevel in system.describe(100)


def test_async_io_runs_at_info_beside_warning():
    warning, info = SYSTEMS["celery-concurrent"], SYSTEMS["celery-concurrent-info"]
    assert (warning.loglevel, info.loglevel) == ("warning", "info")
    assert info.runs(ASYNC_IO) and not info.runs(TRIVIAL)
    assert "celery-concurrent-info" in DEFAULT_SYSTEMS


def test_loglevel_option_leaves_pinned_systems_alone():
    assert SYSTEMS["celery-prefork"].with_loglevel("info").loglevel == "info"
    assert SYSTEMS["celery-concurrent-info"].with_loglevel("error").loglevel == "info"


def test_autoscale_headline_is_stock_gevent_at_the_same_slots():
    assert "-c 240" in " ".join(command("stock-gevent-240"))
    assert AUTOSCALE_MAX_SLOTS == 240
    assert "--autoscale=240,40" in command("stock-gevent")
    assert "--autoscale=6,1" in command("stock-prefork")
    assert "--autoscale=6,1" in command("cc-autoscale")
    assert "-c" not in command("cc-autoscale")
    # gevent cannot run asyncio.run: its wait is the cooperative time.sleep
    assert AUTOSCALE_SYSTEMS["stock-gevent-240"].task_name("sleep_async") == "sleep_sync"


# -- where results go ------------------------------------------------------------------------


def _args(**given: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"publish": False, "out": None, **given})


def test_results_go_to_local_unless_published_or_named():
    assert report.output_dir(_args()) == report.LOCAL_RESULTS
    assert report.output_dir(_args(publish=True)) == report.RESULTS
    assert report.output_dir(_args(), asked=True) == report.RESULTS
    assert report.output_dir(_args(out="/tmp/x")) == Path("/tmp/x")
    assert "git-ignored" in report.where_note(report.LOCAL_RESULTS)
    assert report.where_note(report.RESULTS) == ""


def test_local_results_are_git_ignored():
    checked = subprocess.run(
        ["git", "check-ignore", "-q", "bench/results/local/full.json"], cwd=ROOT, check=False
    )
    if checked.returncode == 128:
        pytest.skip("not a git checkout")
    assert checked.returncode == 0


def test_publish_refuses_a_partial_run(capsys):
    assert run.main(["--publish", "--systems", "celery-concurrent"]) == 2
    assert "--name NAME" in capsys.readouterr().err


# -- memory and goals ------------------------------------------------------------------------


def test_memory_counts_main_process_and_children_per_input():
    kb = 1024
    figures = run._memory_figures((100 * kb, 50 * kb), (1100 * kb, 10050 * kb), 1000)
    assert figures["rss_growth_main_kb_per_inflight"] == pytest.approx(1.0)
    assert figures["rss_growth_children_kb_per_inflight"] == pytest.approx(10.0)
    assert figures["rss_growth_kb_per_inflight"] == pytest.approx(11.0)


def _record(system: str, scenario: str, rep: int, **figures: float) -> dict[str, Any]:
    counts = {"concurrency": 1, "inputs": 1, "errors": 0, "timed_out": 0, "tasks_per_s": 1.0}
    return {"system": system, "scenario": scenario, "repetition": rep, **counts, **figures}


def _goals(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    meta = {"date": "d", "machine": "m", "systems": [], "scenarios": []}
    rows = report.aggregate(runs, meta)
    return {g["goal"]: g for g in report.evaluate_goals(runs, rows, "celery-concurrent")}


def _goal(goals: dict[str, dict[str, Any]], *words: str) -> dict[str, Any]:
    found = [g for text, g in goals.items() if all(w in text for w in words)]
    assert len(found) == 1, (words, list(goals))
    return found[0]


def test_issue_13_goals_need_a_tenth_over_arq_and_taskiq():
    runs = [
        _record("celery-concurrent", "async-io", 0, tasks_per_s=1050.0),
        _record("taskiq", "async-io", 0, tasks_per_s=1000.0),
        _record("arq", "async-io", 0, tasks_per_s=900.0),
        _record("celery-concurrent", "trivial", 0, tasks_per_s=1000.0),
        _record("taskiq", "trivial", 0, tasks_per_s=1000.0),
    ]
    goals = _goals(runs)
    assert not _goal(goals, "1.1x taskiq")["met"]  # 1.05x
    assert _goal(goals, "1.1x arq")["met"]  # 1.17x
    assert _goal(goals, "trivial", "taskiq")["met"]  # equal is enough
    assert _goal(goals, "1.1x arq")["issue"] == "issue 13"


def test_memory_goal_is_16_kb_per_input_at_each_level():
    level_1000, level_10000 = memory_scenario(1000).name, memory_scenario(10000).name
    runs = [
        _record("celery-concurrent", level_1000, 0, rss_growth_kb_per_inflight=15.9),
        _record("celery-concurrent", level_10000, 0, rss_growth_kb_per_inflight=16.5),
    ]
    goals = _goals(runs)
    assert _goal(goals, "16 KB", "1,000 in flight")["met"]
    assert not _goal(goals, "16 KB", "10,000 in flight")["met"]
    assert _goal(goals, "16 KB", "10,000 in flight")["unit"] == " KB"


def test_a_goal_whose_system_did_not_run_is_not_measured():
    goals = _goals([_record("celery-concurrent", "async-io", 0, tasks_per_s=1.0)])
    threads_500 = _goal(goals, "celery-threads-500")
    assert not threads_500["measured"] and not threads_500["met"]
    assert "not measured" in report.format_goals(list(goals.values()))


def test_older_runs_memory_figure_is_converted_on_report():
    old = {"rss_growth_mb_per_1000_inflight": 26.0}
    assert report._upgraded(old)["rss_growth_kb_per_inflight"] == pytest.approx(26.0 * 1.024)


# -- arrivals --------------------------------------------------------------------------------


def test_arrivals_round_trip_through_the_report_json():
    for arrivals in arrivals_for(quick=True):
        again = Arrivals.from_dict(json.loads(json.dumps(arrivals.as_dict())))
        assert again == arrivals
        assert len(again.send_offsets()) == arrivals.as_dict()["inputs"]


def test_a_spike_adds_its_burst_to_the_rate():
    spike = next(a for a in arrivals_for(quick=True) if a.name == "spike")
    assert spike.rate_at(2.0) == pytest.approx(10.0)
    assert spike.rate_at(4.5) == pytest.approx(210.0)  # 10/s + 200 inputs over 1 s
    assert len(spike.send_offsets()) == 90 + 200


def test_thread_cpu_reads_one_threads_cpu_time():
    """bench.loop_cpu reads the loop thread's CPU with thread_cpu (a spinning thread's grows)."""
    import threading
    import time

    from bench.measure import ProcessTree
    from bench.profile import thread_cpu

    def _thread_cpu_s(pid: int, tid: int) -> float:
        return thread_cpu(ProcessTree(pid))[(pid, tid)]

    tid: list[int] = []
    stop = threading.Event()

    def spin() -> None:
        tid.append(threading.get_native_id())
        while not stop.is_set():
            pass

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        while not tid:
            time.sleep(0.01)
        before = _thread_cpu_s(os.getpid(), tid[0])
        deadline = time.monotonic() + 10
        while _thread_cpu_s(os.getpid(), tid[0]) - before < 0.05:
            assert time.monotonic() < deadline, "the spinning thread's CPU time did not grow"
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()


def test_the_writer_row_turns_only_the_result_writer_on():
    system = SYSTEMS["celery-concurrent-writer"]
    assert system.env == {"BENCH_RESULT_WRITER": "1"}
    assert system.name not in DEFAULT_SYSTEMS
