"""The README's main job, ``python -m examples.demo``, end to end against a real worker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from examples.demo import Capacity

ROOT = Path(__file__).resolve().parent.parent


def test_usable_slots_are_the_slots_or_the_caps_of_the_kinds_sent() -> None:
    capacity = Capacity(children=4, slots_per_child=100, caps={"async": 100, "sync": 16})
    assert capacity.usable_slots({"async": 720, "sync": 80}) == 400
    assert capacity.usable_slots({"async": 0, "sync": 80}) == 64  # 16 per child
    small = Capacity(children=2, slots_per_child=10, caps={"async": 8, "sync": 1})
    assert small.usable_slots({"async": 5, "sync": 5}) == 18


def test_ideal_wall_counts_full_waves_and_each_kinds_cap() -> None:
    capacity = Capacity(children=4, slots_per_child=100, caps={"async": 100, "sync": 16})
    assert capacity.ideal_wall_s({"async": 720, "sync": 80}, 3.0) == 6.0  # 2 waves of 400
    assert capacity.ideal_wall_s({"async": 401, "sync": 0}, 1.0) == 2.0
    # 200 sync inputs at 64 at once need 4 waves, whatever the async ones need.
    assert capacity.ideal_wall_s({"async": 100, "sync": 200}, 1.0) == 4.0


@pytest.mark.timeout(180)
def test_demo_runs_a_burst_and_reports_it(tmp_path: Path) -> None:
    figures_path = tmp_path / "demo.json"
    command = [
        sys.executable, "-m", "examples.demo",
        "--async-inputs", "200", "--sync-inputs", "20", "--delay", "0.1", "--concurrency", "2",
        "--json", str(figures_path),
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=ROOT,
        env=os.environ.copy(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=170,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(r"throughput\s+\d+(\.\d+)? inputs/s", output), output
    assert re.search(r"completed\s+220 of 220 inputs", output), output
    assert re.search(r"failures\s+0 failed, 0 timed out", output), output
    assert re.search(r"usable slots\s+200 \(2 children x 100 of 100 slots each\)", output), output
    assert re.search(r"peak in flight\s+\d+ inputs at once, \d+% of the usable slots", output)
    assert re.search(r"wall time\s+.*x the ideal 0\.2 s for those slots", output), output
    assert re.search(r"bound by\s+(slots|messages per second, not slots)", output), output
    figures = json.loads(figures_path.read_text())
    assert figures["completed"] == 220 and figures["usable_slots"] == 200
    assert 0 < figures["peak_in_flight"] <= 200
    assert figures["slot_bound"] == (figures["peak_in_flight"] >= 0.8 * 200)


@pytest.mark.amqp
@pytest.mark.timeout(180)
def test_demo_runs_a_burst_on_rabbitmq_and_deletes_its_queue(amqp_url: str) -> None:
    """``--broker amqp://...``: the worker consumes from RabbitMQ, results stay in Redis."""
    from kombu import Connection
    from kombu.utils.url import maybe_sanitize_url

    command = [
        sys.executable, "-m", "examples.demo",
        "--async-inputs", "100", "--sync-inputs", "10", "--delay", "0.1", "--concurrency", "2",
        "--broker", amqp_url,
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=170,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"broker: {maybe_sanitize_url(amqp_url)} (--broker); results: redis://" in output
    assert re.search(r"completed\s+110 of 110 inputs", output), output
    assert re.search(r"failures\s+0 failed, 0 timed out", output), output
    worker = re.search(r"^worker: (demo-[0-9a-f]+)@\S+ -c 2, log: (\S+)$", output, re.M)
    assert worker is not None, output
    queue, log = worker.group(1), Path(worker.group(2)).read_text(errors="replace")
    assert f"Connected to {maybe_sanitize_url(amqp_url)}" in log, log[-3000:]
    with Connection(amqp_url) as conn, pytest.raises(conn.channel_errors, match="404"):
        conn.default_channel.queue_declare(queue, passive=True)  # the demo deleted it
