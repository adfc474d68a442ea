"""Prometheus metrics served by a real worker (MetricsStep), and their settings."""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from celery_concurrent import ConcurrencyConfigError, install
from celery_concurrent.metrics import ENV_PORT, MetricsStep, metrics_endpoint
from tests import app
from tests.conftest import wait_for

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
    assert worker.stats()["metrics"]["port"] == port  # also in `celery inspect stats`

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
    assert metrics_endpoint(_app()) is None
    assert metrics_endpoint(_app(concurrent_metrics_port=9808)) == ("0.0.0.0", 9808)
    assert metrics_endpoint(
        _app(concurrent_metrics_port="9809", concurrent_metrics_address="127.0.0.1")
    ) == ("127.0.0.1", 9809)
    monkeypatch.setenv(ENV_PORT, "9900")
    assert metrics_endpoint(_app(concurrent_metrics_port=9808)) == ("0.0.0.0", 9900)
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
