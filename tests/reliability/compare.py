"""Run the fault scenarios on ConcurrentPool and on prefork, side by side.

::

    REDIS_URL=redis://127.0.0.1:6379/0 python -m tests.reliability.compare [--only a,b] [--load]

Prints ``scenario | inputs sent | completed | lost | ran twice | prefork in the same scenario``
and writes both pools' outcomes to ``bench/results/faults.json``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import scenarios
from .harness import (
    ROOT,
    BrokerUnavailable,
    Harness,
    Outcome,
    PrivateRabbit,
    PrivateRedisServer,
)

DEFAULT_OUT = ROOT / "bench" / "results" / "faults.json"


def run_one(name: str, pool: str, log_dir: Path, rabbit: PrivateRabbit | None) -> Outcome:
    """Run scenario ``name`` on ``pool`` with a fresh private broker if it needs one."""
    function, needs, kwargs = scenarios.SCENARIOS[name]
    server: PrivateRedisServer | PrivateRabbit | None = None
    private: PrivateRedisServer | None = None
    try:
        if needs == "redis":
            server = private = PrivateRedisServer().start()
        elif needs == "rabbit":
            if rabbit is None:
                return Outcome(scenario=name, pool=pool, error="RabbitMQ unavailable")
            server = rabbit
        h = Harness(pool, broker_url=server.url if server else None, log_dir=log_dir)
        try:
            takes_broker = len(inspect.signature(function).parameters) > 1 + len(kwargs)
            args = (server,) if (server is not None and takes_broker) else ()
            return function(h, *args, **kwargs)
        except Exception as exc:
            outcome = h.collect(name)
            outcome.error = f"{type(exc).__name__}: {exc}"
            return outcome
        finally:
            h.close()
    finally:
        if private is not None:
            private.close()


def _cell(out: Outcome) -> str:
    text = (
        f"sent {out.sent}, completed {out.completed}, lost {len(out.lost)}, twice {len(out.twice)}"
    )
    return f"{text} (error: {out.error[:60]})" if out.error else text


def table(rows: list[tuple[Outcome, Outcome | None]]) -> str:
    lines = [
        "| scenario | inputs sent | completed | lost | ran twice | prefork in the same scenario |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for ours, prefork in rows:
        note = f" (error: {ours.error[:60]})" if ours.error else ""
        lines.append(
            f"| {ours.scenario}{note} | {ours.sent} | {ours.completed} | {len(ours.lost)} "
            f"| {len(ours.twice)} | {_cell(prefork) if prefork else 'not run'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated scenario names", default="")
    parser.add_argument("--pools", default="concurrent,prefork")
    parser.add_argument("--load", action="store_true", help="also a 5,000-input mixed load")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(scenarios.SCENARIOS)
    unknown = sorted(set(names) - set(scenarios.SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(scenarios.SCENARIOS)}")
    if args.load:
        scenarios.SCENARIOS["load-5000-mixed"] = (scenarios.load, None, {"total": 5000})
        names.append("load-5000-mixed")
    pools = args.pools.split(",")
    rabbit = None
    if any(scenarios.SCENARIOS[n][1] == "rabbit" for n in names):
        try:
            rabbit = PrivateRabbit().start()
        except BrokerUnavailable as exc:
            print(f"skipping RabbitMQ scenarios: {exc}", file=sys.stderr)
    results: dict[str, dict[str, Outcome]] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="rel-compare-"))
    try:
        for name in names:
            for pool in pools:
                started = time.monotonic()
                out = run_one(name, pool, log_dir, rabbit)
                out.figures["scenario_s"] = round(time.monotonic() - started, 1)
                results.setdefault(name, {})[pool] = out
                print(f"{name} [{pool}]: {out}", file=sys.stderr, flush=True)
    finally:
        if rabbit is not None:
            rabbit.close()
    rows = [
        (r.get("concurrent") or next(iter(r.values())), r.get("prefork")) for r in results.values()
    ]
    print(table(rows))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    doc: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit,
        "worktree_dirty": bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "celery_concurrent"],
                cwd=ROOT,
                capture_output=True,
                text=True,
            ).stdout.strip()
        ),
        "logs": str(log_dir),
        "table": table(rows),
        "scenarios": {
            name: {pool: out.summary() for pool, out in by_pool.items()}
            for name, by_pool in results.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
