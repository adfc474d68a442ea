"""Test your own app on a real concurrent worker: the ``concurrent_worker`` fixture.

celery-concurrent ships a pytest plugin (installed with the package, nothing to configure).
``concurrent_worker(app, *worker_args)`` starts ``celery -A <app> worker`` with ConcurrentPool
in a subprocess and stops it after the test. Without a broker URL
(``--concurrent-broker-url`` or ``CELERY_BROKER_URL``) it starts a private Redis for the
session::

    python -m pytest examples/test_with_plugin.py
    python -m pytest examples/test_with_plugin.py --concurrent-broker-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

from typing import Any

from examples.app import app, fetch, resize


def _peak_overlap(runs: list[dict[str, Any]]) -> int:
    """Most inputs running at the same instant, from their start/end times."""
    edges = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_async_inputs_share_one_child(concurrent_worker: Any) -> None:
    concurrent_worker(app, "-c", "1")
    runs = [r.get(timeout=60) for r in [fetch.delay(1.0) for _ in range(40)]]
    assert len({r["pid"] for r in runs}) == 1  # one child ran them all...
    assert _peak_overlap(runs) > 1  # ...many at once, on its event loop


def test_sync_inputs_run_on_threads(concurrent_worker: Any) -> None:
    concurrent_worker("examples.app:app", "-c", "1")  # the -A path works too
    runs = [r.get(timeout=60) for r in [resize.delay(0.5) for _ in range(8)]]
    assert len({r["id"] for r in runs}) == 8  # self.request is each input's own
    assert _peak_overlap(runs) > 1
