"""The autoscaler benchmark's figures: per-run summaries, medians, ratios, goals, table, plot.

The runs come from :mod:`bench.autoscale_scenario`. The **headline** compares
``cc-autoscale`` (1-6 children x 40 inputs: 240 slots at most) with stock gevent at the same
240 slots: ``stock-gevent-240`` (fixed, what a gevent user runs) and ``stock-gevent`` (its
autoscaler, 40-240); stock prefork's autoscaler (6 processes, one input each) is beside
them, not the headline. The autoscaler's own goals compare it with ``cc-fixed-6``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.measure import peak_in_flight, percentile
from bench.report import jsonable
from bench.scenarios import Arrivals
from bench.systems import (
    AUTOSCALE_MAX_CHILDREN,
    AUTOSCALE_MAX_INPUTS,
    AUTOSCALE_SCALEDOWN_WINDOW_S,
    AUTOSCALE_TARGET_INPUTS,
)

#: Goals from the autoscaler's issue: p99 within 1.3x of fixed-at-max, clearly fewer
#: child-seconds ("clearly": at most 80% of fixed-at-max).
GOAL_P99_VS_MAX = 1.3
GOAL_CHILD_S_VS_MAX = 0.8
AUTOSCALED = "cc-autoscale"
FIXED_MAX = "cc-fixed-6"
#: Stock systems to compare p99 with: the headline (same slots) first, prefork beside it.
STOCK = ("stock-gevent-240", "stock-gevent", "stock-prefork")
HEADLINE = "stock-gevent-240"
#: Counts added up over repeats (everything else is a median).
SUMMED = frozenset({"sent", "completed", "failed", "unfinished"})


def integral(samples: Sequence[Sequence[float]], start: float, end: float) -> float:
    """Integral of a sampled step function (value held until the next sample) over a window."""
    total = 0.0
    for (t, n), (t_next, _) in zip(samples, [*samples[1:], (end, 0)], strict=True):
        lo, hi = max(t, start), min(t_next, end)
        if hi > lo:
            total += n * (hi - lo)
    return total


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """p50/p99, child-seconds, peaks and scaling counts of one run."""
    if "error" in run:
        return {"error": run["error"]}
    # [enqueued, start, end] in seconds after t0 (runs before 2026-12-03 also have the pid)
    inputs = [row[:3] for row in run["inputs"]]
    latencies = sorted((end - enq) * 1000.0 for enq, _, end in inputs)
    waits = sorted((start - enq) * 1000.0 for enq, start, _ in inputs)
    samples = run["processes"]
    window_end = samples[-1][0] if samples else 0.0
    ups = sum(1 for _, line in run["scaling"] if line.startswith("Scaling up"))
    downs = sum(1 for _, line in run["scaling"] if line.startswith("Scaling down"))
    cpu = [c for _, c in run["cpu_percent"]]
    return {
        "sent": run["sent"],
        "completed": len(inputs),
        "failed": run["failed"],
        "unfinished": run["unfinished"],
        "p50_ms": round(percentile(latencies, 50), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "max_ms": round(latencies[-1], 1) if latencies else math.nan,
        "p99_wait_ms": round(percentile(waits, 99), 1),
        "child_seconds": round(integral(samples, 0.0, window_end), 1),
        "child_seconds_arrivals": round(integral(samples, 0.0, run["arrivals_end_s"]), 1),
        "window_s": round(window_end, 1),
        "max_children": max((n for _, n in samples), default=0),
        "peak_in_flight": peak_in_flight([s for _, s, _ in inputs], [e for _, _, e in inputs]),
        "last_end_s": round(max((e for _, _, e in inputs), default=math.nan), 2),
        "scale_ups": ups,
        "scale_downs": downs,
        "machine_cpu_mean_pct": round(sum(cpu) / len(cpu), 1) if cpu else math.nan,
    }


def summarize_all(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Scenario -> system -> summary; with repeats, the median of each number."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        summary = run.get("summary") or summarize(run)
        grouped.setdefault(run["scenario"], {}).setdefault(run["system"], []).append(summary)
    return {
        scenario: {key: aggregate(items) for key, items in by_system.items()}
        for scenario, by_system in grouped.items()
    }


def aggregate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median of every number over repeats; ``*_all`` keeps p99 and child-s per repeat."""
    ok = [i for i in items if "error" not in i]
    if not ok:
        return dict(items[0])
    if len(ok) == 1 and len(items) == 1:
        return {**ok[0], "repeats": 1}
    merged: dict[str, Any] = {}
    for name in ok[0]:
        values = [i[name] for i in ok]
        merged[name] = sum(values) if name in SUMMED else statistics.median(values)
    for name in ("p99_ms", "child_seconds"):
        merged[f"{name}_all"] = [i[name] for i in ok]
    merged["repeats"] = len(ok)
    merged["errors"] = len(items) - len(ok)
    return merged


def ratios(summaries: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per scenario: cc-autoscale against fixed-at-max and each stock system."""
    out: dict[str, dict[str, Any]] = {}
    for scenario, by_system in summaries.items():
        auto = by_system.get(AUTOSCALED, {})
        fixed = by_system.get(FIXED_MAX, {})
        row: dict[str, Any] = {}
        if "p99_ms" in auto and "p99_ms" in fixed:
            row["p99_vs_fixed_max"] = round(auto["p99_ms"] / fixed["p99_ms"], 2)
            row["child_s_vs_fixed_max"] = round(auto["child_seconds"] / fixed["child_seconds"], 2)
            row["child_s_arrivals_vs_fixed_max"] = round(
                auto["child_seconds_arrivals"] / fixed["child_seconds_arrivals"], 2
            )
            row["goal_p99"] = row["p99_vs_fixed_max"] <= GOAL_P99_VS_MAX
            if "p99_ms_all" in auto and "p99_ms_all" in fixed:  # worst pairing of repeats
                worst = max(auto["p99_ms_all"]) / min(fixed["p99_ms_all"])
                row["p99_vs_fixed_max_worst"] = round(worst, 2)
            row["goal_child_s"] = row["child_s_vs_fixed_max"] <= GOAL_CHILD_S_VS_MAX
        for stock in STOCK:
            other = by_system.get(stock, {})
            if "p99_ms" in auto and "p99_ms" in other:
                row[f"p99_vs_{stock}"] = round(auto["p99_ms"] / other["p99_ms"], 3)
                row[f"goal_p99_better_than_{stock}"] = auto["p99_ms"] < other["p99_ms"]
        out[scenario] = row
    return out


def table_lines(
    summaries: dict[str, dict[str, dict[str, Any]]], labels: dict[str, str] | None = None
) -> Iterator[str]:
    """A Markdown table: system x scenario (``labels``: each system's worker and log level)."""
    yield (
        "| scenario | system | p50 ms | p99 ms | child-s (all) | child-s (arrivals) | "
        "max procs | peak in flight | ups/downs | done/sent | failed |"
    )
    yield "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    for scenario, by_system in summaries.items():
        for key, s in by_system.items():
            if "error" in s:
                yield f"| {scenario} | {key} | {s['error']} | | | | | | | | |"
                continue
            p99 = f"{s['p99_ms']:.0f}"
            if s.get("repeats", 1) > 1:
                p99 += f" ({min(s['p99_ms_all']):.0f}-{max(s['p99_ms_all']):.0f})"
            yield (
                f"| {scenario} | {key} | {s['p50_ms']:.0f} | {p99} | "
                f"{s['child_seconds']:.0f} | {s['child_seconds_arrivals']:.0f} | "
                f"{s['max_children']:.0f} | {s['peak_in_flight']:.0f} | "
                f"{s['scale_ups']:g}/{s['scale_downs']:g} | {s['completed']}/{s['sent']} | "
                f"{s['failed'] + s['unfinished']} |"
            )
    for key, label in (labels or {}).items():
        yield f"{key}: {label}"


def ratio_lines(rows: dict[str, dict[str, Any]]) -> Iterator[str]:
    """The headline (against stock gevent at the same slots) first, then the goals."""
    for scenario, r in rows.items():
        if f"p99_vs_{HEADLINE}" not in r:
            yield f"{scenario}: headline not measured ({AUTOSCALED} and {HEADLINE} both needed)"
        for stock in STOCK:
            if f"p99_vs_{stock}" in r:
                better = r[f"goal_p99_better_than_{stock}"]
                what = "headline, same 240 slots" if stock == HEADLINE else "beside it"
                yield (
                    f"{scenario}: p99 {AUTOSCALED} / {stock} = {r[f'p99_vs_{stock}']:.3f} "
                    f"({'better' if better else 'NOT better'}; {what})"
                )
        if "p99_vs_fixed_max" not in r:
            continue
        worst = ""
        if "p99_vs_fixed_max_worst" in r:
            worst = f"; worst repeat vs best fixed-6 repeat {r['p99_vs_fixed_max_worst']:.2f}"
        yield (
            f"{scenario}: p99 {AUTOSCALED} / {FIXED_MAX} = {r['p99_vs_fixed_max']:.2f} "
            f"(goal <= {GOAL_P99_VS_MAX}: {'met' if r['goal_p99'] else 'NOT met'}{worst}); "
            f"child-s {AUTOSCALED} / {FIXED_MAX} = {r['child_s_vs_fixed_max']:.2f} "
            f"(arrivals only {r['child_s_arrivals_vs_fixed_max']:.2f}; goal <= "
            f"{GOAL_CHILD_S_VS_MAX}: {'met' if r['goal_child_s'] else 'NOT met'})"
        )


def print_report(report: dict[str, Any]) -> None:
    labels = {key: spec["label"] for key, spec in report.get("systems", {}).items()}
    print("\n" + "\n".join(table_lines(report["summaries"], labels)))
    print("\n" + "\n".join(ratio_lines(report["ratios"])))


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the JSON; per-input timings are kept for the first repeat only (the plotted one)."""
    for run in report["runs"]:
        if "summary" not in run:
            run["summary"] = summarize(run)
        if run.get("repeat", 0) > 0:
            run.pop("inputs", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(report), separators=(",", ":")) + "\n")


# -- the plot -----------------------------------------------------------------------------------

#: Small vertical offsets of each system's line in the processes panel.
OFFSETS = {
    "cc-autoscale": 0.0,
    "cc-fixed-1": -0.08,
    "cc-fixed-6": -0.08,
    "stock-prefork": 0.08,
    "stock-gevent": 0.08,
    "stock-gevent-240": 0.16,
}
COLORS = {
    "cc-autoscale": "tab:blue",
    "cc-fixed-1": "tab:orange",
    "cc-fixed-6": "tab:green",
    "stock-prefork": "tab:red",
    "stock-gevent": "tab:purple",
    "stock-gevent-240": "tab:brown",
}


def plot(report: dict[str, Any], path: Path) -> None:
    """Per scenario (column): arrival rate, pool processes, inputs in flight, latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs: list[dict[str, Any]] = [
        r for r in report["runs"] if "error" not in r and r.get("repeat", 0) == 0
    ]
    names = list(dict.fromkeys(r["scenario"] for r in report["runs"]))
    specs = {s["name"]: s for s in report["scenarios"]}
    fig, axes = plt.subplots(4, len(names), figsize=(7.5 * len(names), 14), squeeze=False)
    for col, name in enumerate(names):
        spec = specs[name]
        arrivals = Arrivals.from_dict(spec)
        horizon = arrivals.arrivals_end_s + arrivals.tail_s + 3
        ax_rate, ax_proc, ax_flight, ax_lat = axes[:, col]
        grid = np.arange(0.0, horizon, 0.05)
        rates = [arrivals.rate_at(t) for t in grid]
        ax_rate.plot(grid, rates, color="black", lw=1, label="scheduled")
        for run in (r for r in runs if r["scenario"] == name):
            key, color = run["system"], COLORS.get(run["system"], "gray")
            inputs = np.array(run["inputs"]) if run["inputs"] else np.zeros((0, 3))
            late = run["inputs"] and inputs[:, 2].max() > horizon
            label = key + (f" (until t={inputs[:, 2].max():.0f} s)" if late else "")
            if key == AUTOSCALED:
                bins = np.arange(0.0, horizon + 0.5, 0.5)
                counts, _ = np.histogram(inputs[:, 0], bins=bins)
                ax_rate.step(
                    bins[:-1],
                    counts / 0.5,
                    where="post",
                    color=color,
                    lw=0.8,
                    alpha=0.7,
                    label=f"sent ({AUTOSCALED} run)",
                )
            procs = np.array(run["processes"]) if run["processes"] else np.zeros((0, 2))
            nudge = OFFSETS.get(key, 0.0)  # overlapping lines stay visible
            ax_proc.step(procs[:, 0], procs[:, 1] + nudge, where="post", color=color, label=label)
            starts, ends = np.sort(inputs[:, 1]), np.sort(inputs[:, 2])
            flight = np.searchsorted(starts, grid, "right") - np.searchsorted(ends, grid, "right")
            ax_flight.plot(grid, flight, color=color, lw=1, label=label)
            ax_lat.scatter(
                inputs[:, 0],
                inputs[:, 2] - inputs[:, 0],
                s=2,
                color=color,
                alpha=0.5,
                label=key,
                rasterized=True,
            )
        ax_rate.set_title(f"{name}: {spec['description']}", fontsize=10)
        ax_rate.set_ylabel("arrivals (inputs/s)")
        ax_proc.set_ylabel("pool processes (lines nudged)")
        ax_proc.set_ylim(0, AUTOSCALE_MAX_CHILDREN + 0.8)
        ax_flight.set_ylabel("inputs in flight")
        ax_lat.set_ylabel("latency s (enqueue -> end), log")
        ax_lat.set_yscale("log")
        ax_lat.set_xlabel("time since first arrival (s)   [latency plotted at enqueue time]")
        for ax in (ax_rate, ax_proc, ax_flight, ax_lat):
            ax.set_xlim(0, horizon)
            ax.grid(alpha=0.3)
            ax.axvline(arrivals.arrivals_end_s, color="gray", ls=":", lw=0.8)
        ax_rate.legend(fontsize=8, loc="upper right")
        ax_proc.legend(fontsize=8, loc="upper right")
        ax_flight.legend(fontsize=8, loc="upper right")
        ax_lat.legend(fontsize=8, loc="upper left", markerscale=4)
    fig.suptitle(
        f"Autoscaler scenarios: {report['params']['delay_s']:g} s async wait per input, "
        f"@concurrent(max_inputs={AUTOSCALE_MAX_INPUTS}, "
        f"target_inputs={AUTOSCALE_TARGET_INPUTS}), "
        f"budget {AUTOSCALE_MAX_CHILDREN} processes, scale-down window "
        f"{AUTOSCALE_SCALEDOWN_WINDOW_S:g} s ({report['machine']['nproc']} cores, "
        f"{report['date'][:10]})",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
