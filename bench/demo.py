"""Is the README's main job bound by slots or by messages? The demo's burst, before and after.

Runs ``python -m examples.demo`` (a real worker, ``--autoscale 4,1``, INFO logs, events on,
the producer on the same machine) a few times with each burst and prints the medians of its
figures: peak in flight against the slots the burst can use, and wall time against the ideal
for those slots. Run it alone on the machine::

    python -m bench.demo [--repeats 3] [--publish]

Writes ``demo.json`` to bench/results/local/ (git-ignored), with ``--publish`` to
bench/results/ (the README's figures), or to ``--out DIR``.

``before`` is the demo's former default (2,000 async + 200 sync inputs of 0.2 s); ``after`` is
its default now (720 + 80 inputs of 3 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import add_output_options, output_dir, where_note

ROOT = Path(__file__).resolve().parent.parent
BURSTS = {
    "before": ["--async-inputs", "2000", "--sync-inputs", "200", "--delay", "0.2"],
    "after": [],  # the demo's defaults
}
COLUMNS = (
    ("peak_in_flight", "peak"),
    ("usable_slots", "usable"),
    ("peak_share", "peak/usable"),
    ("wall_s", "wall s"),
    ("ideal_wall_s", "ideal s"),
    ("wall_vs_ideal", "wall/ideal"),
    ("inputs_per_s", "inputs/s"),
    ("p50_ms", "p50 ms"),
)


def run_demo(extra: list[str]) -> dict[str, Any]:
    """One demo run; its figures (from ``--json``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo.json"
        done = subprocess.run(
            [sys.executable, "-m", "examples.demo", *extra, "--json", str(out)],
            cwd=ROOT,
            env=os.environ.copy(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"demo {extra} failed ({done.returncode}):\n{done.stdout[-3000:]}")
        figures: dict[str, Any] = json.loads(out.read_text())
        return figures


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: statistics.median(run[key] for run in runs) for key, _ in COLUMNS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    add_output_options(parser, "demo.json")
    args = parser.parse_args(argv)
    path = output_dir(args) / "demo.json"
    rows: dict[str, Any] = {}
    for name, extra in BURSTS.items():
        runs = []
        for i in range(args.repeats):
            print(f"{name} {i + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
            runs.append(run_demo(extra))
        rows[name] = {"args": extra or "defaults", "median": medians(runs), "runs": runs}
    header = f"{'burst':<8}" + "".join(f"{label:>13}" for _, label in COLUMNS)
    print(header)
    for name, row in rows.items():
        cells = "".join(f"{row['median'][key]:>13g}" for key, _ in COLUMNS)
        print(f"{name:<8}{cells}")
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "worker": "--autoscale 4,1 -E -l info, task_track_started, producer on the same machine",
        "repeats": args.repeats,
        "bursts": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path} {where_note(path.parent)}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
