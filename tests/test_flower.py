"""Flower shows the pool and autoscaler as tables; its autoscale form drives TargetAutoscaler.

The browser test drives Flower's worker page in headless Chromium (Debian's ``chromium``
through Python ``playwright`` with ``executable_path``; nothing is downloaded) and saves the
screenshot the README shows, ``docs/flower-worker.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_concurrent.inspect import concurrent_snapshot
from tests import app
from tests.conftest import REDIS_URL, ROOT, wait_for

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = ROOT / "docs" / "flower-worker.png"
POOL_TABLE = "section[aria-labelledby=pool-options-heading] table tr"
AUTOSCALER_TABLE = "section[aria-labelledby=autoscaler-options-heading] table tr"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Flower:
    """A ``celery flower`` subprocess on a free loopback port."""

    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log_path = log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def flower(queue_name: str, tmp_path: Path) -> Iterator[Flower]:
    port = _free_port()
    env = {
        **os.environ,
        "REDIS_URL": REDIS_URL,
        "TEST_QUEUE": queue_name,
        "FLOWER_UNAUTHENTICATED_API": "true",
    }
    log_path = tmp_path / "flower.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            "--inspect_timeout=5000",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield Flower(f"http://127.0.0.1:{port}", log_path)
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError):
        return None


def _post(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _flower_stats(flower: Flower, hostname: str) -> dict[str, Any] | None:
    workers = _get(f"{flower.url}/api/workers?refresh=1") or {}
    info = workers.get(hostname) or {}
    return info.get("stats") or None


@pytest.mark.timeout(120)
def test_flower_api_gets_flat_pool_and_autoscaler_and_drives_autoscale(start_worker, flower):
    worker = start_worker("--autoscale=3,1", "-E", env={"TEST_SLOTS": "50"})
    stats = wait_for(
        lambda: _flower_stats(flower, worker.hostname), 60, "Flower to list the worker's stats"
    )
    pool, autoscaler = stats["pool"], stats["autoscaler"]
    assert pool["implementation"] == "celery_concurrent.pool:ConcurrentPool"
    assert pool["slots-per-child"] == 50
    assert pool["task tests.app.async_recorded"] == "0 in flight / max 50, target 25, 0 waiting"
    assert autoscaler["task tests.app.async_recorded"] == "target 25 / max 50 inputs per child"
    assert {"desired", "load", "backlog", "last_decision"} <= set(autoscaler)
    for section in (pool, autoscaler):
        # Nothing Flower would print as raw text: scalars, or lists of numbers (it joins those).
        raw = {
            k: v
            for k, v in section.items()
            if isinstance(v, dict)
            or (isinstance(v, list) and not all(isinstance(x, int | float) for x in v))
        }
        assert not raw, raw
        assert not [k for k in section if k.startswith("task celery.")], section

    name = worker.hostname
    status, body = _post(f"{flower.url}/api/worker/pool/autoscale/{name}?min=2&max=4")
    assert status == 200, body
    wait_for(lambda: worker.stats()["autoscaler"]["current"] == 2, 20, "2 children")

    status, body = _post(f"{flower.url}/api/worker/pool/autoscale/{name}?min=5&max=2")
    assert status == 403
    assert "min=5 is above max=2" in body


# -- in a browser ---------------------------------------------------------------------------


def _browser_or_skip() -> Any:
    """Playwright's sync API, or skip (fail with REQUIRE_DEPLOY_TOOLS=1) if it cannot run."""
    required = os.environ.get("REQUIRE_DEPLOY_TOOLS") == "1"
    missing = None
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        missing = f"no Chromium at {CHROMIUM} (apt-get install -y --no-install-recommends chromium)"
    try:
        from playwright import sync_api
    except ImportError:
        missing = missing or "playwright is not installed (pip install -e '.[test]')"
        sync_api = None
    if missing:
        if required:
            pytest.fail(f"{missing}, and REQUIRE_DEPLOY_TOOLS=1")
        pytest.skip(f"{missing} (set REQUIRE_DEPLOY_TOOLS=1 to fail)")
    return sync_api


def _table(page: Any, selector: str) -> dict[str, str]:
    """The rendered rows of one key/value table: {label: value} as the user reads them."""
    rows = page.eval_on_selector_all(
        selector,
        "rows => rows.map(r => Array.from(r.querySelectorAll('td'), c => c.innerText.trim()))",
    )
    return {row[0]: row[1] for row in rows if len(row) == 2}


def _open_worker_page(page: Any, url: str) -> tuple[dict[str, str], dict[str, str]]:
    page.goto(url, wait_until="load")
    page.wait_for_selector(AUTOSCALER_TABLE)
    return _table(page, POOL_TABLE), _table(page, AUTOSCALER_TABLE)


@pytest.mark.timeout(180)
def test_flower_worker_page_in_chromium_shows_tables_and_its_form_drives_autoscale(
    start_worker, flower
):
    sync_api = _browser_or_skip()
    worker = start_worker("--autoscale=3,1", "-E", env={"TEST_SLOTS": "50"})
    wait_for(lambda: _flower_stats(flower, worker.hostname), 60, "Flower to list the worker")
    page_url = f"{flower.url}/worker/{worker.hostname}"

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            pool, scaler = _open_worker_page(page, page_url)

            # What the user reads in the two tables (Flower humanizes keys: "-"/"_" -> " ").
            assert pool["Slots per child"] == "50", pool
            assert pool["Max concurrency"] == "50", pool  # 1 child x 50 slots
            assert pool["Implementation"].endswith("ConcurrentPool"), pool
            assert pool["Prefetch count"] == "50", pool
            assert pool["Task tests.app.async recorded"] == (
                "0 in flight / max 50, target 25, 0 waiting"
            ), pool
            assert (scaler["Max"], scaler["Min"]) == ("3", "1"), scaler
            assert (scaler["Current"], scaler["Desired"]) == ("1", "1"), scaler
            assert scaler["Task tests.app.async recorded"] == (
                "Target 25 / max 50 inputs per child"  # Flower capitalizes the first letter
            ), scaler
            for table in (pool, scaler):  # no raw dict text, no built-in tasks
                assert not [v for v in table.values() if v.startswith(("{", "[{"))], table
                assert not [k for k in table if k.lower().startswith("task celery.")], table

            # Flower's autoscale form: min 2, max 4.
            page.fill("#min-autoscale", "2")
            page.fill("#max-autoscale", "4")
            page.click("#worker-pool-autoscale")
            toast = page.wait_for_selector(".toast.text-bg-success, .toast.text-bg-danger")
            assert "success" in (toast.get_attribute("class") or ""), toast.inner_text()

            def changed() -> bool:
                info = worker.stats()["autoscaler"]
                return (info["max"], info["min"], info["current"]) == (4, 2, 2)

            wait_for(changed, 30, "the worker's autoscaler at max 4, min 2, 2 children")
            structured = concurrent_snapshot(worker.client, [worker.hostname])[worker.hostname]
            assert (structured["autoscaler"]["max"], structured["autoscaler"]["min"]) == (4, 2)

            # Flower renders its cached stats and refreshes them behind: reload until fresh.
            def page_changed() -> tuple[dict[str, str], dict[str, str]] | None:
                pool, scaler = _open_worker_page(page, page_url)
                fresh = (scaler["Max"], scaler["Min"], scaler["Current"]) == ("4", "2", "2")
                return (pool, scaler) if fresh else None

            pool, scaler = wait_for(page_changed, 30, "the page to show max 4, min 2, 2 children")
            assert pool["Max concurrency"] == "100", pool  # 2 children x 50 slots
            assert scaler["Last decision"].startswith("1 to 2 children at "), scaler

            # Load for the picture: inputs in flight on both children, then the screenshot.
            held = [worker.send(app.async_recorded, f"shot{i}", 8.0) for i in range(40)]

            def page_busy() -> tuple[dict[str, str], dict[str, str]] | None:
                pool, scaler = _open_worker_page(page, page_url)
                busy = pool["Inflight"] == "40"
                return (pool, scaler) if busy else None

            pool, scaler = wait_for(page_busy, 30, "the page to show 40 inputs in flight")
            assert pool["Task tests.app.async recorded"].startswith("40 in flight / max 50"), pool
            SCREENSHOT.parent.mkdir(exist_ok=True)
            # The page lists every task of the test app (about 60 rows per table): the picture
            # keeps the top, where the pool's and the autoscaler's own values are.
            page.screenshot(
                path=str(SCREENSHOT),
                full_page=True,
                clip={"x": 0, "y": 0, "width": 1280, "height": 1600},
            )
            assert SCREENSHOT.stat().st_size > 10_000
            for result in held:
                result.get(timeout=60)
        finally:
            browser.close()
