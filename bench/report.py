"""Turn the runs of one invocation into rows, ratios, goals, a table, JSON files and a chart.

- A **row** is one (system, scenario): the median of each figure over the repetitions.
- A **ratio** compares two systems' figures *from the same repetition* (both ran within
  seconds of each other); the reported ratio is the median of those per-repetition ratios.
- The **goals** are issue 13's (:data:`GOALS_ISSUE_13`: against arq and taskiq at the same
  500 in flight, trivial against taskiq, memory per in-flight input on fresh workers) and the
  earlier ones against stock Celery, each against stock as it ships and, where it runs, with
  our Redis consumer step (``+acks``), so the pool's gain and the patch's are apart.

Files: ``<name>.json`` (the rows, each with the date and machine), ``<name>-runs.json``
(every repetition), ``<name>-goals.json`` (ratios, goals, machine) and ``<name>.png``
(throughput, p99 and memory per system). They go to :data:`LOCAL_RESULTS` (git-ignored)
unless the run is asked to publish (:func:`output_dir`): then to :data:`RESULTS`, where the
READMEs' figures come from.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.measure import median
from bench.scenarios import ASYNC_LEVEL, IO_LEVEL, memory_scenario

FIGURES = [
    "tasks_per_s",
    "p50_ms",
    "p99_ms",
    "peak_rss_mb",
    "cpu_us_per_input",
    "wall_s",
    "fill_s",
    "peak_inflight",
    "rss_base_mb",
    "rss_full_mb",
    "rss_growth_kb_per_inflight",
    "rss_growth_mb_per_1000_inflight",
]
RESULTS = Path(__file__).resolve().parent / "results"
#: Where runs write unless asked to publish (git-ignored by bench/.gitignore).
LOCAL_RESULTS = RESULTS / "local"
CONCURRENT = "celery-concurrent"
IO_SCENARIOS = ["trivial", "async-io", "sync-io", "http"]


# -- where results go ------------------------------------------------------------------------


def add_output_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--publish`` and ``--out``, the same for every benchmark that writes results."""
    parser.add_argument(
        "--publish",
        action="store_true",
        help=f"write {what} to bench/results/, the files the READMEs' figures come from "
        "(default: bench/results/local/, git-ignored)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write to this directory instead")


def output_dir(args: argparse.Namespace, *, asked: bool = False) -> Path:
    """``--out``; else bench/results/ when publishing (or ``asked``); else bench/results/local/."""
    if args.out is not None:
        return Path(args.out)
    return RESULTS if args.publish or asked else LOCAL_RESULTS


def where_note(out: Path) -> str:
    """A line saying whether ``out`` is tracked, for the end of a run."""
    try:
        local = out.resolve().is_relative_to(LOCAL_RESULTS.resolve())
    except OSError:
        local = False
    if local:
        return f"(untracked: {LOCAL_RESULTS} is git-ignored; --publish writes bench/results/)"
    return ""


# -- machine ---------------------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str, path: Path | None = None) -> str:
    try:
        if path is not None:
            for found in importlib.metadata.distributions(name=dist, path=[str(path)]):
                return str(found.version)
            return "not installed"
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(store: redis.Redis[bytes]) -> dict[str, Any]:
    from bench.systems import ARQ_SITE

    try:
        server = store.info("server")
        redis_version = str(server.get("redis_version", "?"))
    except redis.RedisError:
        redis_version = "?"
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(pages / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "redis_server": redis_version,
        "versions": {
            "celery": _version("celery"),
            "kombu": _version("kombu"),
            "celery-concurrent": _version("celery-concurrent"),
            "arq": _version("arq", ARQ_SITE),
            "taskiq": _version("taskiq"),
            "taskiq-redis": _version("taskiq-redis"),
            "aiohttp": _version("aiohttp"),
            "gevent": _version("gevent"),
        },
        "load_before": load_average(),
    }
    info["machine"] = (
        f"{info['nproc']} cores ({info['cpu_model']}), {info['memory_gib']} GiB, "
        f"Python {info['python']}, Celery {info['versions']['celery']}, "
        f"Redis {redis_version}"
    )
    return info


# -- rows and ratios -------------------------------------------------------------------------


def aggregate(runs: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (system, scenario): medians over repetitions, in run order."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        grouped[(run["system"], run["scenario"])].append(run)
    systems = list(meta.get("systems") or [])
    scenarios = list(meta.get("scenarios") or [])

    def order(key: tuple[str, str]) -> tuple[int, int]:
        system, scenario = key
        return (
            scenarios.index(scenario) if scenario in scenarios else len(scenarios),
            systems.index(system) if system in systems else len(systems),
        )

    rows = []
    for (system, scenario), group in sorted(grouped.items(), key=lambda kv: order(kv[0])):
        first = group[0]
        row: dict[str, Any] = {
            "system": system,
            "scenario": scenario,
            "pool": first.get("pool"),
            "loglevel": first.get("loglevel") or (meta.get("loglevels") or {}).get(system),
            "date": meta["date"],
            "machine": meta["machine"],
        }
        if "skipped" in first:
            row.update({f: None for f in FIGURES[:5]})
            row["skipped"] = first["skipped"]
            rows.append(row)
            continue
        row.update(
            {
                "concurrency": first["concurrency"],
                "inputs": first["inputs"],
                "repeats": len(group),
                "errors": sum(r["errors"] for r in group),
                "timed_out": sum(r["timed_out"] for r in group),
            }
        )
        for figure in FIGURES:
            values = [r[figure] for r in group if r.get(figure) is not None]
            if values:
                row[figure] = median(values)
        row["tasks_per_s_runs"] = [r["tasks_per_s"] for r in group]
        rows.append(row)
    return rows


def paired_ratio(
    runs: Sequence[dict[str, Any]],
    top: tuple[str, str],
    bottom: tuple[str, str],
    figure: str = "tasks_per_s",
) -> tuple[float, list[float]]:
    """Median over repetitions of top/bottom, each pair taken from the same repetition."""
    by_rep: dict[tuple[str, str, int], float] = {}
    for run in runs:
        if "skipped" not in run and run.get(figure) is not None:
            by_rep[(run["system"], run["scenario"], run["repetition"])] = run[figure]
    ratios = []
    for (system, scenario, rep), value in sorted(by_rep.items()):
        if (system, scenario) != top:
            continue
        other = by_rep.get((*bottom, rep))
        if other:
            ratios.append(value / other)
    return median(ratios), ratios


@dataclass(frozen=True)
class Goal:
    text: str
    top: tuple[str, str]
    bottom: tuple[str, str] | None  # None: a figure of ``top``'s own row, not a ratio
    figure: str
    threshold: float
    better: Callable[[float, float], bool]
    unit: str = "x"
    issue: str = "earlier"


def _at_least(value: float, threshold: float) -> bool:
    return value >= threshold


def _at_most(value: float, threshold: float) -> bool:
    return value <= threshold


#: Issue 13's goals: memory is judged at every level between these two (both fresh workers).
MEMORY_GOAL_LEVELS = (1000, 10000)
MEMORY_GOAL_KB = 16.0
GOALS_ISSUE_13 = "issue 13"


def _goals(concurrent: str) -> list[Goal]:
    async_io = (concurrent, "async-io")
    goals = [
        Goal(
            f"async-io (0.1 s) throughput >= 1.1x taskiq's, both {ASYNC_LEVEL} in flight",
            async_io,
            ("taskiq", "async-io"),
            "tasks_per_s",
            1.1,
            _at_least,
            issue=GOALS_ISSUE_13,
        ),
        Goal(
            f"async-io (0.1 s) throughput >= 1.1x arq's, both {ASYNC_LEVEL} in flight",
            async_io,
            ("arq", "async-io"),
            "tasks_per_s",
            1.1,
            _at_least,
            issue=GOALS_ISSUE_13,
        ),
        Goal(
            f"trivial throughput >= taskiq's, both {IO_LEVEL} in flight",
            (concurrent, "trivial"),
            ("taskiq", "trivial"),
            "tasks_per_s",
            1.0,
            _at_least,
            issue=GOALS_ISSUE_13,
        ),
    ]
    for level in MEMORY_GOAL_LEVELS:
        goals.append(
            Goal(
                f"RSS growth <= {MEMORY_GOAL_KB:g} KB per in-flight async input, main process "
                f"+ children, {level:,} in flight on a fresh worker",
                (concurrent, memory_scenario(level).name),
                None,
                "rss_growth_kb_per_inflight",
                MEMORY_GOAL_KB,
                _at_most,
                unit=" KB",
                issue=GOALS_ISSUE_13,
            )
        )
    for prefork in ("celery-prefork", "celery-prefork+acks"):
        goals.append(
            Goal(
                f"async-io throughput >= 90% of {prefork}'s trivial-task ceiling",
                async_io,
                (prefork, "trivial"),
                "tasks_per_s",
                0.9,
                _at_least,
            )
        )
    for threads, at in (
        ("celery-threads", f"{IO_LEVEL} threads against our {ASYNC_LEVEL} in flight"),
        ("celery-threads+acks", f"{IO_LEVEL} threads, with our Redis step"),
        ("celery-threads-500", f"{ASYNC_LEVEL} threads, as many in flight as ours"),
    ):
        goals.append(
            Goal(
                f"async-io throughput >= 2x {threads}'s ({at}; asyncio.run per input)",
                async_io,
                (threads, "async-io"),
                "tasks_per_s",
                2.0,
                _at_least,
            )
        )
    for scenario in IO_SCENARIOS:
        goals.append(
            Goal(
                f"worker CPU per input <= stock prefork's ({scenario})",
                (concurrent, scenario),
                ("celery-prefork", scenario),
                "cpu_us_per_input",
                1.0,
                _at_most,
            )
        )
    return goals


def evaluate_goals(
    runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], concurrent: str
) -> list[dict[str, Any]]:
    by_key = {(r["system"], r["scenario"]): r for r in rows}
    results = []
    for goal in _goals(concurrent):
        if goal.bottom is None:
            row = by_key.get(goal.top)
            value = row.get(goal.figure) if row else None
            per_rep = [
                r[goal.figure]
                for r in runs
                if (r["system"], r["scenario"]) == goal.top and r.get(goal.figure) is not None
            ]
        else:
            value, per_rep = paired_ratio(runs, goal.top, goal.bottom, goal.figure)
        measured = value is not None and not math.isnan(value)
        results.append(
            {
                "goal": goal.text,
                "issue": goal.issue,
                "value": value if measured else None,
                "per_repetition": per_rep,
                "threshold": goal.threshold,
                "kind": "ratio" if goal.bottom else goal.figure,
                "unit": goal.unit,
                "met": bool(measured and goal.better(float(value), goal.threshold)),  # type: ignore[arg-type]
                "measured": measured,
            }
        )
    return results


def ratio_table(
    runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], concurrent: str
) -> list[dict[str, Any]]:
    """celery-concurrent / each other system, per scenario: throughput, p99 and CPU."""
    out = []
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows if r["system"] != concurrent))
    for scenario in scenarios:
        for system in systems:
            entry: dict[str, Any] = {"scenario": scenario, "versus": system}
            for figure in ("tasks_per_s", "p99_ms", "cpu_us_per_input", "peak_rss_mb"):
                value, _ = paired_ratio(runs, (concurrent, scenario), (system, scenario), figure)
                entry[figure] = None if math.isnan(value) else value
            if any(entry[f] is not None for f in ("tasks_per_s", "p99_ms")):
                out.append(entry)
    return out


# -- output ----------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


SYSTEM_WIDTH = 22


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per row; ``log`` is the worker's log level, ``KB/input`` the memory figure."""
    w = SYSTEM_WIDTH
    header = (
        f"{'system':<{w}} {'scenario':<21} {'log':<7} {'conc':>5} {'inputs':>6} "
        f"{'tasks/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'RSS MB':>7} {'CPU us':>6} {'KB/in':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        log = row.get("loglevel") or "?"
        if row.get("skipped"):
            lines.append(
                f"{row['system']:<{w}} {row['scenario']:<21} {log:<7} n/a: {row['skipped']}"
            )
            continue
        bad = row.get("errors", 0) + row.get("timed_out", 0)
        lines.append(
            f"{row['system']:<{w}} {row['scenario']:<21} {log:<7} {row['concurrency']:>5} "
            f"{row['inputs']:>6} {_fmt(row.get('tasks_per_s')):>8} "
            f"{_fmt(row.get('p50_ms')):>7} {_fmt(row.get('p99_ms')):>7} "
            f"{_fmt(row.get('peak_rss_mb'), 1):>7} {_fmt(row.get('cpu_us_per_input')):>6} "
            f"{_fmt(row.get('rss_growth_kb_per_inflight'), 1):>6}"
            + (f"  ({bad} of {row['inputs'] * row['repeats']} failed)" if bad else "")
        )
    return "\n".join(lines)


def format_goals(goals: Sequence[dict[str, Any]]) -> str:
    """The goals, issue 13's first, each MET, MISS or n/a (a system it needs did not run)."""
    lines = []
    for issue in dict.fromkeys(g.get("issue", "earlier") for g in goals):
        lines.append(f"goals, {issue}:" if issue != "earlier" else "goals, earlier issues:")
        for goal in (g for g in goals if g.get("issue", "earlier") == issue):
            if not goal["measured"]:
                mark, value = "n/a ", "not measured (a system or scenario it needs did not run)"
            else:
                mark = "MET " if goal["met"] else "MISS"
                unit = goal.get("unit", "x")
                runs = ", ".join(f"{v:.3f}" for v in goal["per_repetition"])
                value = f"{goal['value']:.3f}{unit} (runs: {runs}; target {goal['threshold']:g})"
            lines.append(f"  [{mark}] {goal['goal']}: {value}")
    return "\n".join(lines)


def format_ratios(ratios: Sequence[dict[str, Any]], concurrent: str) -> str:
    w = SYSTEM_WIDTH
    lines = [
        f"{concurrent} / other, median of same-repetition ratios "
        "(tasks/s > 1 and p99, CPU < 1 favour celery-concurrent)",
        f"{'scenario':<22} {'versus':<{w}} {'tasks/s':>8} {'p99':>8} {'CPU/in':>8} {'peak RSS':>8}",
    ]
    for r in ratios:
        lines.append(
            f"{r['scenario']:<22} {r['versus']:<{w}} {_fmt(r['tasks_per_s'], 2):>8} "
            f"{_fmt(r['p99_ms'], 2):>8} {_fmt(r['cpu_us_per_input'], 2):>8} "
            f"{_fmt(r['peak_rss_mb'], 2):>8}"
        )
    return "\n".join(lines)


def format_markdown(
    rows: Sequence[dict[str, Any]],
    ratios: Sequence[dict[str, Any]],
    goals: Sequence[dict[str, Any]],
    concurrent: str,
) -> str:
    """The table, ratios and goals as Markdown, for bench/README.md."""
    out = [
        "| system | scenario | log level | concurrency | inputs | tasks/s | p50 ms | p99 ms "
        "| peak RSS MB | CPU us/input | RSS KB per in-flight input |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    reasons: dict[str, list[str]] = {}
    for row in rows:
        log = row.get("loglevel") or "?"
        if row.get("skipped"):
            reasons.setdefault(row["skipped"], []).append(f"{row['system']} {row['scenario']}")
            out.append(f"| {row['system']} | {row['scenario']} | {log} | n/a" + " | -" * 7 + " |")
            continue
        out.append(
            f"| {row['system']} | {row['scenario']} | {log} | {row['concurrency']} "
            f"| {row['inputs']} | {_fmt(row.get('tasks_per_s'))} | {_fmt(row.get('p50_ms'))} "
            f"| {_fmt(row.get('p99_ms'))} | {_fmt(row.get('peak_rss_mb'), 1)} "
            f"| {_fmt(row.get('cpu_us_per_input'))} "
            f"| {_fmt(row.get('rss_growth_kb_per_inflight'), 1)} |"
        )
    out += ["", *(f"n/a: {', '.join(where)}: {why}." for why, where in reasons.items())]
    out += [
        "",
        f"| scenario | {concurrent} / | tasks/s | p99 | CPU per input | peak RSS |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in ratios:
        out.append(
            f"| {r['scenario']} | {r['versus']} | {_fmt(r['tasks_per_s'], 2)} "
            f"| {_fmt(r['p99_ms'], 2)} | {_fmt(r['cpu_us_per_input'], 2)} "
            f"| {_fmt(r['peak_rss_mb'], 2)} |"
        )
    out += [
        "",
        "| goal | issue | measured | per repetition | target | |",
        "| --- | --- | ---: | --- | ---: | --- |",
    ]
    for goal in goals:
        issue = goal.get("issue", "earlier")
        if not goal["measured"]:
            out.append(f"| {goal['goal']} | {issue} | not measured | | {goal['threshold']:g} | |")
            continue
        unit = goal.get("unit", "x")
        runs = ", ".join(f"{v:.2f}" for v in goal["per_repetition"])
        verdict = "met" if goal["met"] else "**missed**"
        out.append(
            f"| {goal['goal']} | {issue} | {goal['value']:.3f}{unit} | {runs} "
            f"| {goal['threshold']:g} | {verdict} |"
        )
    return "\n".join(out)


def plot(rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if not r.get("skipped")]
    systems = list(dict.fromkeys(r["system"] for r in measured))
    io = [s for s in IO_SCENARIOS if any(r["scenario"] == s for r in measured)]
    memory = list(dict.fromkeys(r["scenario"] for r in measured if "memory" in r["scenario"]))
    panels = [
        ("tasks_per_s", "throughput (tasks/s)", io, False),
        ("p99_ms", "p99 latency (ms, log)", io, True),
        ("rss_growth_kb_per_inflight", "RSS growth per in-flight input (KB)", memory, False),
    ]
    panels = [p for p in panels if p[2]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    width = 0.8 / max(len(systems), 1)
    by_key = {(r["system"], r["scenario"]): r for r in measured}
    labels = {}
    for system in systems:
        pools = [r["pool"] for r in measured if r["system"] == system]
        labels[system] = f"{system}: {pools[0]}" if pools else system  # pool and log level
    for ax, (figure, title, scenarios, log) in zip(axes[0], panels, strict=True):
        for i, system in enumerate(systems):
            values = [by_key.get((system, s), {}).get(figure) or 0.0 for s in scenarios]
            xs = [x + (i - (len(systems) - 1) / 2) * width for x in range(len(scenarios))]
            ax.bar(xs, values, width, label=labels[system])
        ax.set_xticks(range(len(scenarios)))
        ax.set_xticklabels(scenarios, rotation=15)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        if figure == "rss_growth_kb_per_inflight":
            ax.axhline(
                MEMORY_GOAL_KB,
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"goal: {MEMORY_GOAL_KB:g} KB",
            )
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{meta['plan']} run {meta['date']}: {meta['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _write(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=1) + "\n")
    tmp.replace(path)


def _upgraded(run: dict[str, Any]) -> dict[str, Any]:
    """A run record of an earlier version with the figures this one reports.

    Runs before ``rss_growth_kb_per_inflight`` have the same growth per 1,000 in MB (the same
    fresh-worker, main + children measurement), so it is converted, not re-measured.
    """
    per_1000 = run.get("rss_growth_mb_per_1000_inflight")
    if per_1000 is None or "rss_growth_kb_per_inflight" in run:
        return run
    return {**run, "rss_growth_kb_per_inflight": per_1000 * 1024 / 1000}


def publish(
    runs: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    out: Path,
    name: str,
    markdown: bool = False,
) -> dict[str, Any]:
    """Print the table, ratios and goals; write the JSON files and the chart."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [_upgraded(run) for run in runs]
    rows = aggregate(runs, meta)
    systems = [r["system"] for r in rows]
    concurrent = (
        CONCURRENT
        if CONCURRENT in systems
        else next((s for s in systems if "concurrent" in s), CONCURRENT)
    )
    goals = evaluate_goals(runs, rows, concurrent)
    ratios = ratio_table(runs, rows, concurrent)
    _write(out / f"{name}.json", rows)
    _write(out / f"{name}-runs.json", {"meta": meta, "runs": list(runs)})
    _write(
        out / f"{name}-goals.json",
        {"meta": meta, "concurrent": concurrent, "goals": goals, "ratios": ratios},
    )
    if rows:
        plot(rows, meta, out / f"{name}.png")
    print()
    print(f"{meta['plan']} run, {meta['date']}, {meta['machine']}")
    print(
        f"repetitions: {meta['repeats']}, load average before {meta['load_before']}, "
        f"after {meta['load_after']}, {meta['duration_s']:.0f} s"
    )
    print()
    print(format_table(rows))
    print()
    print(format_ratios(ratios, concurrent))
    print()
    print(format_goals(goals))
    if markdown:
        print()
        print(format_markdown(rows, ratios, goals, concurrent))
    print(f"\nwrote {out / name}.json, -runs.json, -goals.json, .png {where_note(out)}".rstrip())
    return {"rows": rows, "goals": goals, "ratios": ratios}
