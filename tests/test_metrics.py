"""Prometheus metrics served by a real worker (MetricsStep), their settings, InputStats."""

from __future__ import annotations

import itertools
import math
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import Celery
from celery.exceptions import (
    Ignore,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    Terminated,
    TimeLimitExceeded,
)
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from celery_concurrent import ConcurrencyConfigError, install
from celery_concurrent.load import BacklogProbe
from celery_concurrent.metrics import (
    BUCKETS_S,
    ENV_ADDRESS,
    ENV_PORT,
    OUTCOMES,
    BacklogReader,
    InputStats,
    MetricsStep,
    exported_names,
    input_families,
    metrics_endpoint,
    outcome_of,
)
from tests import app
from tests.conftest import REDIS_URL, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

WORKER_GAUGES = (
    "celery_concurrent_children",
    "celery_concurrent_desired_children",
    "celery_concurrent_demand_children",
    "celery_concurrent_inflight_inputs",
    "celery_concurrent_waiting_inputs",
    "celery_concurrent_input_slots",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> Samples | None:
    """Every sample at /metrics, keyed by (name, sorted labels); None while not answering."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.timeout(180)
def test_worker_serves_gauges_and_desired_children_follows_load(start_worker, store):
    port = _free_port()
    worker = start_worker(
        "--autoscale=3,1",
        env={"TEST_SLOTS": "50", ENV_PORT: str(port), "TEST_SCALEDOWN_WINDOW": "60"},
    )
    samples = wait_for(lambda: _scrape(port), 30, f"metrics on port {port}")
    host = worker.hostname
    for name in (*WORKER_GAUGES, "celery_concurrent_backlog"):
        assert (name, (("worker", host),)) in samples, name
    assert _value(samples, "celery_concurrent_children", worker=host) == 1
    assert _value(samples, "celery_concurrent_desired_children", worker=host) == 1
    assert _value(samples, "celery_concurrent_input_slots", worker=host) == 1 * 50
    assert _value(samples, "celery_concurrent_inflight_inputs", worker=host) == 0
    assert _value(samples, "celery_concurrent_waiting_inputs", worker=host) == 0
    assert _value(samples, "celery_concurrent_backlog", worker=host) == 0
    assert _value(samples, "celery_concurrent_autoscale_max_children", worker=host) == 3
    assert _value(samples, "celery_concurrent_autoscale_min_children", worker=host) == 1
    task = "tests.app.async_recorded"
    assert _value(samples, "celery_concurrent_task_max_inputs", worker=host, task=task) == 50
    assert _value(samples, "celery_concurrent_task_target_inputs", worker=host, task=task) == 25
    assert worker.stats()["metrics"] == {  # also in `celery inspect stats`
        "address": "127.0.0.1",  # loopback unless concurrent_metrics_address opens it
        "port": port,
        "path": "/metrics",
    }
    assert _value(samples, "celery_concurrent_backlog_age_seconds", worker=host) >= 0

    # 200 inputs at target 25 is a demand of 8 children: desired rises to the max, 3.
    results = [worker.send(app.async_recorded, f"m{i}", 2.0) for i in range(200)]
    peak: dict[str, float] = {}

    def desired_above_one() -> bool:
        now = _scrape(port) or {}
        for name in ("celery_concurrent_task_inflight", "celery_concurrent_demand_children"):
            labels = {"worker": host, "task": task} if "task_" in name else {"worker": host}
            value = now.get((name, tuple(sorted(labels.items()))), 0.0)
            peak[name] = max(peak.get(name, 0.0), value)
        return now.get(("celery_concurrent_desired_children", (("worker", host),)), 0) > 1

    wait_for(desired_above_one, 20, "celery_concurrent_desired_children above 1")
    wait_for(
        lambda: _value(_scrape(port) or {}, "celery_concurrent_children", worker=host) == 3,
        20,
        "children to follow desired up to 3",
    )
    samples = _scrape(port) or {}
    assert _value(samples, "celery_concurrent_input_slots", worker=host) == 3 * 50
    assert peak["celery_concurrent_demand_children"] > 1
    for r in results:
        r.get(timeout=60)
    assert peak["celery_concurrent_task_inflight"] > 0
    # The queue is empty now: the backlog gauge must say so (it once stayed at its last
    # non-zero reading), and its age says how fresh that reading is.
    wait_for(
        lambda: _value(_scrape(port) or {}, "celery_concurrent_backlog", worker=host) == 0,
        20,
        "celery_concurrent_backlog back to 0 after the queue emptied",
    )
    samples = _scrape(port) or {}
    age = _value(samples, "celery_concurrent_backlog_age_seconds", worker=host)
    print(f"backlog age at an idle scrape: {age:.3f}s")
    # Every series names its worker.
    assert all(dict(labels).get("worker") == host for (_, labels) in samples)
    assert worker.stop() == 0
    assert _scrape(port) is None  # the server stopped with the worker


@pytest.mark.timeout(90)
def test_without_autoscaler_desired_equals_children(start_worker):
    port = _free_port()
    worker = start_worker("-c", "2", env={"TEST_SLOTS": "10", ENV_PORT: str(port)})
    samples = wait_for(lambda: _scrape(port), 30, f"metrics on port {port}")
    host = worker.hostname
    assert _value(samples, "celery_concurrent_children", worker=host) == 2
    assert _value(samples, "celery_concurrent_desired_children", worker=host) == 2
    assert _value(samples, "celery_concurrent_input_slots", worker=host) == 20
    assert ("celery_concurrent_backlog", (("worker", host),)) not in samples
    assert ("celery_concurrent_backlog_age_seconds", (("worker", host),)) not in samples


@pytest.mark.timeout(60)
def test_metrics_are_off_by_default(start_worker):
    worker = start_worker("-c", "1", env={"TEST_SLOTS": "10", ENV_PORT: ""})
    assert "metrics" not in worker.stats()
    assert "Prometheus metrics on" not in worker.log()


def _app(**conf: Any) -> Celery:
    celery_app = Celery("metrics-unit", set_as_current=False)
    celery_app.conf.update(conf)
    return install(celery_app)


def test_endpoint_setting_env_and_validation(monkeypatch):
    monkeypatch.delenv(ENV_PORT, raising=False)
    monkeypatch.delenv(ENV_ADDRESS, raising=False)
    assert metrics_endpoint(_app()) is None
    # Loopback by default: only the host itself can scrape until the address is opened.
    assert metrics_endpoint(_app(concurrent_metrics_port=9808)) == ("127.0.0.1", 9808)
    assert metrics_endpoint(
        _app(concurrent_metrics_port="9809", concurrent_metrics_address="0.0.0.0")
    ) == ("0.0.0.0", 9809)
    monkeypatch.setenv(ENV_PORT, "9900")
    assert metrics_endpoint(_app(concurrent_metrics_port=9808)) == ("127.0.0.1", 9900)
    monkeypatch.setenv(ENV_ADDRESS, "0.0.0.0")
    assert metrics_endpoint(_app(concurrent_metrics_address="127.0.0.2")) == (
        "0.0.0.0",
        9900,
    )  # the environment wins
    monkeypatch.setenv(ENV_PORT, "http")
    with pytest.raises(ConcurrencyConfigError, match="0-65535"):
        metrics_endpoint(_app())
    monkeypatch.setenv(ENV_PORT, "70000")
    with pytest.raises(ConcurrencyConfigError, match=ENV_PORT):
        metrics_endpoint(_app())


def test_install_adds_the_step():
    steps = _app().steps["worker"]
    assert "celery_concurrent.metrics:MetricsStep" in steps


def test_missing_prometheus_client_names_the_extra(monkeypatch):
    monkeypatch.delenv(ENV_PORT, raising=False)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import now fails

    class FakeWorker:
        app = _app(concurrent_metrics_port=9808)

    hint = r"pip install 'celery-concurrent\[prometheus\]'"
    with pytest.raises(ConcurrencyConfigError, match=hint):
        MetricsStep(FakeWorker())
    FakeWorker.app = _app()
    assert MetricsStep(FakeWorker()).enabled is False  # off: prometheus_client never needed


# -- outcome_of and InputStats (no worker needed) -------------------------------------------


def _einfo(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (Retry("again", when=1), "retried"),
        (TimeLimitExceeded(0.5), "time-limited"),
        (SoftTimeLimitExceeded(), "time-limited"),
        (Terminated(15), "revoked"),
        (WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL)"), "lost"),
        (ValueError("boom"), "failed"),
        (Reject("no", requeue=False), "failed"),
        (Ignore(), "failed"),
    ],
)
def test_outcome_of_classifies_the_pool_result(exc: BaseException, outcome: str) -> None:
    assert outcome_of(True, _einfo(exc)) == outcome
    assert outcome_of(True, exc) == outcome  # a bare exception, as some pools hand it
    wrapped = _einfo(ExceptionWithTraceback(exc, "Traceback ..."))
    assert outcome_of(True, wrapped) == outcome  # billiard's pickling wrapper


def test_outcome_of_success_ignores_the_return_value() -> None:
    assert outcome_of(False, {"any": "result"}) == "succeeded"
    assert outcome_of(False, _einfo(ValueError())) == "succeeded"  # failed flag decides
    assert set(OUTCOMES) == {"succeeded", "failed", "retried", "revoked", "time-limited", "lost"}


def test_input_stats_counts_outcomes_and_fills_histograms() -> None:
    stats = InputStats()
    stats.observe_started("t.a", 0.02)
    stats.observe_started("t.a", 3.0)
    stats.observe_finished("t.a", "succeeded", 0.3)
    stats.observe_finished("t.a", "failed", 12.0)
    stats.observe_finished("t.b", "lost", None)  # run time unknown: counted, not observed
    stats.observe_started("t.c", -0.001)  # clock skew between processes: clamped to 0
    stats.observe_finished("t.c", "succeeded", math.nan)  # and a NaN never poisons the sum

    snap = stats.snapshot()
    assert snap.tasks == ["t.a", "t.b", "t.c"]
    assert snap.outcomes == {
        ("t.a", "succeeded"): 1,
        ("t.a", "failed"): 1,
        ("t.b", "lost"): 1,
        ("t.c", "succeeded"): 1,
    }
    runs = snap.durations["t.a"]
    assert runs.count == 2 and runs.sum_s == pytest.approx(12.3)
    assert runs.buckets[-1] == (math.inf, 2)
    cumulative = dict(runs.buckets)
    assert cumulative[0.25] == 0 and cumulative[0.5] == 1 and cumulative[10.0] == 1
    assert cumulative[30.0] == 2
    assert [bound for bound, _ in runs.buckets] == [*BUCKETS_S, math.inf]
    assert "t.b" not in snap.durations
    waits = snap.waits["t.a"]
    assert waits.count == 2 and dict(waits.buckets)[0.025] == 1
    assert snap.waits["t.c"].sum_s == 0.0 and snap.durations["t.c"].sum_s == 0.0

    stats.observe_finished("t.a", "succeeded", 0.1)
    assert snap.outcomes[("t.a", "succeeded")] == 1  # a snapshot is a copy
    assert repr(stats) == "<InputStats started=3 finished=5>"
    stats.clear()
    assert stats.snapshot().tasks == []


def test_input_stats_refuses_an_unknown_outcome() -> None:
    with pytest.raises(ValueError, match=r"unknown outcome 'success' for task 't'.*succeeded"):
        InputStats().observe_finished("t", "success", 1.0)


def test_input_stats_is_thread_safe() -> None:
    stats = InputStats()
    threads, per_thread = 8, 5_000
    barrier = threading.Barrier(threads)

    def hammer() -> None:
        barrier.wait()
        for i in range(per_thread):
            stats.observe_started("t", 0.001)
            stats.observe_finished("t", OUTCOMES[i % len(OUTCOMES)], 0.001)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    snap = stats.snapshot()
    assert sum(snap.outcomes.values()) == threads * per_thread
    assert snap.waits["t"].count == snap.durations["t"].count == threads * per_thread


def _exposition(stats: InputStats, worker: str = "w@h") -> dict[tuple[str, tuple[Any, ...]], float]:
    class Only(Collector):
        def collect(self) -> Iterator[Any]:
            yield from input_families(stats.snapshot(), worker)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Only())
    text = generate_latest(registry).decode()
    samples: dict[tuple[str, tuple[Any, ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return samples


def test_input_families_in_the_text_format() -> None:
    stats = InputStats()
    stats.observe_started("t", 0.2)
    stats.observe_finished("t", "retried", 0.004)
    samples = _exposition(stats)
    for state in OUTCOMES:  # every state of a seen task, zeros included
        want = 1.0 if state == "retried" else 0.0
        labels = (("state", state), ("task", "t"), ("worker", "w@h"))
        assert samples[("celery_concurrent_inputs_total", labels)] == want
    run = (("task", "t"), ("worker", "w@h"))
    assert samples[("celery_concurrent_input_duration_seconds_count", run)] == 1
    assert samples[("celery_concurrent_input_duration_seconds_sum", run)] == 0.004
    bucket = (("le", "0.005"), ("task", "t"), ("worker", "w@h"))
    assert samples[("celery_concurrent_input_duration_seconds_bucket", bucket)] == 1
    inf = (("le", "+Inf"), ("task", "t"), ("worker", "w@h"))
    assert samples[("celery_concurrent_input_wait_seconds_bucket", inf)] == 1
    assert samples[("celery_concurrent_input_wait_seconds_sum", run)] == 0.2
    assert {name for name, _ in samples} <= exported_names()


def test_exported_names_cover_gauges_counters_and_histograms() -> None:
    names = exported_names()
    assert {
        "celery_concurrent_desired_children",
        "celery_concurrent_backlog",
        "celery_concurrent_backlog_age_seconds",
        "celery_concurrent_inputs_total",
        "celery_concurrent_input_duration_seconds_bucket",
        "celery_concurrent_input_wait_seconds_count",
        "celery_concurrent_task_waiting",
    } <= names


# -- the backlog gauge stays fresh ----------------------------------------------------------


def test_a_stale_backlog_is_read_again_by_the_scrape() -> None:
    """The scrape re-reads the broker when the autoscaler's reading is older than its
    poll interval, over its own connection; a fresh reading is used as it is."""
    queue = f"t-backlog-{uuid.uuid4().hex[:8]}"
    broker = Celery("backlog-unit", broker=REDIS_URL, set_as_current=False)
    client = redis.Redis.from_url(REDIS_URL)
    probe = BacklogProbe(connect=broker.connection_for_read, queues=lambda: [queue])
    autoscaler = SimpleNamespace(
        backlog=probe, last_load=SimpleNamespace(backlog=0), _consumed_queues=lambda: [queue]
    )
    reader = BacklogReader(SimpleNamespace(app=broker, autoscaler=autoscaler))
    try:
        client.rpush(queue, *[b"m"] * 3)
        probe.interval_s = 3600.0
        autoscaler.last_load.backlog = probe.read()
        client.rpush(queue, *[b"m"] * 4)
        value, age = reader.read() or (-1, -1.0)
        assert value == 3  # the autoscaler read it within its interval: not read again
        assert 0.0 <= age < 3600.0

        probe.interval_s = 0.05  # now the autoscaler's reading goes stale
        stale_at = probe.last_read_at
        assert stale_at is not None
        wait_for(lambda: time.monotonic() - stale_at >= 0.05, 5, "the reading to go stale")
        value, age = reader.read() or (-1, -1.0)
        assert value == 7  # read again, over the reader's own connection
        assert age < time.monotonic() - stale_at
        assert probe.last_read_at == stale_at  # the autoscaler's probe was left alone

        assert BacklogReader(SimpleNamespace(app=broker, autoscaler=None)).read() is None
    finally:
        reader.close()
        probe.close()
        client.delete(queue)
        client.close()


# -- outcome counters of a real worker under load -------------------------------------------


def _by_task(samples: Samples, name: str, host: str) -> dict[tuple[str, str], float]:
    """``{(task, state-or-""): value}`` of one family for one worker."""
    found: dict[tuple[str, str], float] = {}
    for (sample_name, labels), value in samples.items():
        d = dict(labels)
        if sample_name == name and d.get("worker") == host:
            found[(d["task"], d.get("state", ""))] = value
    return found


@pytest.mark.timeout(240)
def test_outcome_counters_add_up_to_the_inputs_sent(start_worker, store):
    port = _free_port()
    worker = start_worker("-c", "1", env={ENV_PORT: str(port)})
    wait_for(lambda: _scrape(port), 30, f"metrics on port {port}")
    host = worker.hostname
    name = f"n{uuid.uuid4().hex[:6]}"

    expected = {
        ("tests.app.async_sleep", "succeeded"): 200,
        ("tests.app.async_fail", "failed"): 20,
        ("tests.app.async_retry", "retried"): 10,
        ("tests.app.async_retry", "succeeded"): 10,
        ("tests.app.async_hard_limited", "time-limited"): 5,
        ("tests.app.async_wait_release", "revoked"): 5,
        ("tests.app.async_die", "lost"): 1,
    }
    held = [worker.send(app.async_wait_release, f"{name}-held-{i}") for i in range(5)]
    sent = [worker.send(app.async_sleep, 0.5) for _ in range(200)]
    sent += [worker.send(app.async_fail, "boom") for _ in range(20)]
    sent += [worker.send(app.async_retry, f"{name}-retry-{i}", 1) for i in range(10)]
    sent += [worker.send(app.async_hard_limited, 5.0) for _ in range(5)]

    # Scrape while the load runs: counters only grow, and never exceed what was sent.
    scrapes: list[dict[tuple[str, str], float]] = []
    inflight_seen = 0.0

    def all_done() -> bool:
        nonlocal inflight_seen
        now = _scrape(port) or {}
        scrapes.append(_by_task(now, "celery_concurrent_inputs_total", host))
        inflight_seen = max(
            inflight_seen, now.get(("celery_concurrent_inflight_inputs", (("worker", host),)), 0)
        )
        return all(r.ready() for r in sent)

    wait_for(all_done, 120, "the inputs to finish")
    assert inflight_seen > 0, "no scrape saw the load running"
    for before, after in itertools.pairwise(scrapes):
        for key, value in before.items():
            assert after.get(key, 0) >= value, f"{key} went down: {value} -> {after.get(key)}"
    limit = sum(expected.values())
    assert all(sum(s.values()) <= limit for s in scrapes)

    # Revoke the held inputs while they run (terminate), then kill a child under one input.
    for r in held:
        worker.client.control.revoke(r.id, terminate=True)
    for r in held:
        r.get(timeout=30, propagate=False)
    died = worker.send(app.async_die, f"{name}-die")
    died.get(timeout=60, propagate=False)

    def counted() -> dict[tuple[str, str], float] | None:
        found = _by_task(_scrape(port) or {}, "celery_concurrent_inputs_total", host)
        nonzero = {k: v for k, v in found.items() if v}
        return found if sum(nonzero.values()) >= limit else None

    final = wait_for(counted, 30, "the outcome counters to add up to the inputs sent")
    assert {k: v for k, v in final.items() if v} == expected
    samples = _scrape(port) or {}
    starts = _by_task(samples, "celery_concurrent_input_wait_seconds_count", host)
    for task in {t for t, _ in expected}:  # every execution started once
        ran = sum(v for (t, _), v in expected.items() if t == task)
        assert starts[(task, "")] == ran, task
    runs = _by_task(samples, "celery_concurrent_input_duration_seconds_count", host)
    run_sums = _by_task(samples, "celery_concurrent_input_duration_seconds_sum", host)
    assert runs[("tests.app.async_sleep", "")] == 200
    assert run_sums[("tests.app.async_sleep", "")] >= 200 * 0.5 * 0.99  # each slept 0.5 s
    counts = {f"{t.rsplit('.', 1)[1]}/{state}": int(v) for (t, state), v in final.items() if v}
    print(f"outcomes {counts}; {len(scrapes)} scrapes during load")
