"""The README's main job, ``python -m examples.demo``, end to end against a real worker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_demo_runs_a_burst_and_reports_it() -> None:
    command = [
        sys.executable, "-m", "examples.demo",
        "--async-inputs", "200", "--sync-inputs", "20", "--delay", "0.1", "--concurrency", "2",
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
