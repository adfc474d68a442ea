"""The parent never blocks on a child: a 10 MB argument, a child slow in its init."""

from __future__ import annotations

import pytest

from . import scenarios

pytestmark = pytest.mark.reliability


@pytest.mark.timeout(90)
def test_ten_megabyte_argument_succeeds_and_ping_answers_meanwhile(harness):
    out = scenarios.big_argument(harness())
    print(out)
    assert out.states() == {"blocker": "SUCCESS", "big": "SUCCESS"}
    assert out.figures["big_result"] == 10 * 1024 * 1024
    assert out.figures["pings_answered"] > 0
    assert out.figures["pings_unanswered"] == 0, f"slowest ping {out.figures['slowest_ping_s']} s"


@pytest.mark.timeout(90)
def test_child_slow_in_init_does_not_block_ping_or_inspect(harness):
    out = scenarios.slow_init(harness())
    print(out)
    assert out.figures["pings_answered"] > 0
    assert out.figures["pings_unanswered"] == 0, f"slowest ping {out.figures['slowest_ping_s']} s"
    assert out.figures["inspect_answered"]
    assert out.states() == {f"n{i}": "SUCCESS" for i in range(3)}
