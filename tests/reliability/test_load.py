"""Load through one worker: every input reaches its expected final state exactly once.

The CI version pushes 20,000 mixed inputs (bounded at ~60 s of sending); ``-m load`` runs
100,000 short async inputs and ``-m soak`` keeps a steady mixed load for 10 minutes.
"""

from __future__ import annotations

import pytest

from . import scenarios

pytestmark = pytest.mark.reliability


def _check(out):
    print(out.summary() | {"figures": {k: v for k, v in out.figures.items() if k != "wrong"}})
    rss = out.figures
    print(f"worker RSS at start {rss['rss_start_kb']} KB, at end {rss['rss_end_kb']} KB")
    assert out.figures["wrong_count"] == 0, out.figures["wrong"]
    assert not out.lost


@pytest.mark.timeout(240)
def test_20000_mixed_inputs_each_reach_their_final_state_once(harness):
    _check(scenarios.load(harness(), 20_000, mixed=True, send_window_s=60))


@pytest.mark.load
@pytest.mark.timeout(1200)
def test_100000_short_async_inputs(harness):
    _check(scenarios.load(harness(), 100_000, mixed=False, send_window_s=600, settle_s=600))


@pytest.mark.soak
@pytest.mark.timeout(1500)
def test_ten_minute_mixed_soak(harness):
    _check(scenarios.load(harness(), 0, mixed=True, duration_s=600, settle_s=300))
