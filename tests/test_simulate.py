"""The scale-out model's pieces: the HPA's arithmetic, the per-pod children, the bookkeeping."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from autoscale.simulate import (
    DEFAULT_UP,
    DOWN_1_POD,
    DOWN_10_PERCENT,
    FleetConfig,
    Hpa,
    Policy,
    ScalingRules,
    SimConfig,
    Trace,
    WorkerConfig,
    before,
    external_replicas,
    pods_metric_replicas,
    read_manifests,
    share_out,
    simulate,
    variants,
    weighted_percentile,
    worker_wants,
)

SMALL = SimConfig(dt_s=0.1, service_s=0.5, drain_limit_s=600.0)


def fleet(**changes: object) -> FleetConfig:
    base = FleetConfig(
        min_pods=1,
        max_pods=50,
        threshold=3.0,
        up=ScalingRules(0.0, (Policy("Percent", 100, 15.0),)),
        down=ScalingRules(300.0, (Policy("Pods", 1, 60.0),)),
        pod_start_s=20.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def steps(rate_points: list[tuple[float, float]], duration_s: float) -> Trace:
    xs = [p[0] for p in rate_points]
    ys = [p[1] for p in rate_points]
    return Trace("t", "test", duration_s, lambda t: float(np.interp(t, xs, ys)))


# -- the manifests ------------------------------------------------------------------------------


def test_read_manifests_takes_the_numbers_of_the_yaml_files() -> None:
    keda, worker = read_manifests(source="keda")
    assert (keda.min_pods, keda.max_pods, keda.threshold) == (1, 200, 2.0)
    assert keda.up.stabilization_s == 0 and keda.up.policies == (Policy("Percent", 100, 15.0),)
    assert keda.down.stabilization_s == 300
    assert keda.down.policies == (Policy("Pods", 1, 60.0), Policy("Percent", 10, 60.0))
    assert keda.down.select == "Max"
    assert keda.down == DOWN_10_PERCENT  # the model's recommendation, as applied
    assert keda.scrape_s == 10.0
    assert (worker.min_children, worker.max_children) == (1, 4)
    hpa, _ = read_manifests(source="hpa")
    assert (hpa.max_pods, hpa.threshold, hpa.up, hpa.down) == (200, 2.0, keda.up, keda.down)


def test_the_variants_pin_the_former_manifests_and_label_the_current_ones() -> None:
    keda, worker = read_manifests(source="keda")
    runs = variants(keda, worker, max_pods=300, recommended_max_pods=200)
    assert list(runs) == [
        "manifests: threshold 2, max 200, down 10%",
        "before: threshold 3, max 20",
        "before, max 300",
        "exact, threshold 3, max 200, down 10%",
    ]
    assert runs["manifests: threshold 2, max 200, down 10%"][0] == keda
    old, _ = runs["before: threshold 3, max 20"]
    assert (old.threshold, old.max_pods, old.down) == (3.0, 20, DOWN_1_POD)
    assert (old.up, old.metric) == (keda.up, "desired")
    assert runs["before, max 300"][0] == replace(old, max_pods=300)
    exact, _ = runs["exact, threshold 3, max 200, down 10%"]
    assert (exact.metric, exact.threshold, exact.max_pods) == ("exact", 3.0, 200)
    assert before(keda) == old


def test_read_manifests_refuses_an_unknown_source() -> None:
    with pytest.raises(ValueError, match="source must be 'keda' or 'hpa', got 'cpu'"):
        read_manifests(source="cpu")


# -- the HPA formula ----------------------------------------------------------------------------


def test_external_replicas_is_ceil_of_total_over_target() -> None:
    assert external_replicas(12, 3, current=3) == 4  # 3 saturated pods ask for 4
    assert external_replicas(16, 3, current=4) == 6
    assert external_replicas(4, 3, current=4) == 2  # idle pods at min 1 child


def test_external_replicas_keeps_current_within_the_tolerance() -> None:
    assert external_replicas(31, 3, current=10) == 10  # ratio 1.033
    assert external_replicas(27.5, 3, current=10) == 10  # ratio 0.917
    assert external_replicas(33.3, 3, current=10) == 12  # ratio 1.11: outside
    assert external_replicas(31, 3, current=10, tolerance=0.0) == 11


def test_pods_metric_replicas_without_missing_pods_is_ratio_times_pods() -> None:
    assert pods_metric_replicas([4, 4, 4], unready=0, missing=0, target=3, current=3) == 4
    assert pods_metric_replicas([3, 3, 3.2], unready=0, missing=0, target=3, current=3) == 3


def test_pods_metric_replicas_counts_missing_pods_as_zero_on_scale_up() -> None:
    # 3 pods at 4, a 4th running but not scraped yet: (12 + 0) / 4 pods = 3 = target -> hold
    assert pods_metric_replicas([4, 4, 4], unready=0, missing=1, target=3, current=4) == 4
    # Pending pods count as 0 too while the others ask for more
    assert pods_metric_replicas([4] * 6, unready=2, missing=0, target=3, current=8) == 8
    assert pods_metric_replicas([4] * 6, unready=1, missing=0, target=3, current=7) == 8


def test_pods_metric_replicas_counts_missing_pods_at_target_on_scale_down() -> None:
    # (1 + 1 + 3) / 3 = 1.67 vs 3: still below 1, ceil(0.556 * 3) = 2
    assert pods_metric_replicas([1, 1], unready=0, missing=1, target=3, current=3) == 2


def test_hpa_scale_up_policy_doubles_at_most_per_period() -> None:
    hpa = Hpa(1, 100, ScalingRules(0.0, (Policy("Percent", 100, 15.0),)), DEFAULT_UP)
    assert hpa.decide(0.0, current=4, proposed=40) == 8
    assert hpa.decide(5.0, current=8, proposed=40) == 8  # 4 added within the last 15 s
    assert hpa.decide(15.0, current=8, proposed=40) == 16
    assert hpa.decide(30.0, current=16, proposed=40) == 32
    assert hpa.decide(45.0, current=32, proposed=40) == 40


def test_hpa_scale_up_respects_max_pods() -> None:
    hpa = Hpa(1, 20, DEFAULT_UP, DEFAULT_UP)
    assert hpa.decide(0.0, current=15, proposed=80) == 20


def test_hpa_scale_down_waits_for_the_stabilisation_window() -> None:
    down = ScalingRules(300.0, (Policy("Pods", 1, 60.0),))
    hpa = Hpa(1, 100, DEFAULT_UP, down)
    assert hpa.decide(0.0, current=10, proposed=10) == 10
    for t in range(15, 300, 15):  # the 10 recommended at t=0 is inside the window
        assert hpa.decide(float(t), current=10, proposed=4) == 10
    assert hpa.decide(300.0, current=10, proposed=4) == 9  # window over; one pod per 60 s
    assert hpa.decide(315.0, current=9, proposed=4) == 9
    assert hpa.decide(360.0, current=9, proposed=4) == 8


def test_hpa_scale_down_percent_and_select_max() -> None:
    down = ScalingRules(0.0, (Policy("Pods", 1, 60.0), Policy("Percent", 10, 60.0)))
    hpa = Hpa(1, 300, DEFAULT_UP, down)
    assert hpa.decide(0.0, current=200, proposed=20) == 180  # 10% beats 1 pod
    assert hpa.decide(0.0 + 60.0, current=180, proposed=20) == 162
    few = Hpa(1, 300, DEFAULT_UP, down)
    assert few.decide(0.0, current=5, proposed=1) == 4  # int(5 * 0.9) = 4, 1 pod: 4


def test_hpa_scale_up_stabilisation_takes_the_lowest_recent_recommendation() -> None:
    up = ScalingRules(60.0, (Policy("Percent", 100, 15.0),))
    hpa = Hpa(1, 100, up, DEFAULT_UP)
    assert hpa.decide(0.0, current=5, proposed=5) == 5
    assert hpa.decide(15.0, current=5, proposed=9) == 5  # 5 was recommended 15 s ago
    assert hpa.decide(75.0, current=5, proposed=9) == 9


# -- the per-pod children -----------------------------------------------------------------------


def test_worker_wants_is_the_library_decision() -> None:
    worker = WorkerConfig(max_inputs=40, target_inputs=20, min_children=1, max_children=4)
    assert worker_wants(0, 0, 1, worker) == (0.0, 1)  # idle: min
    assert worker_wants(40, 280, 1, worker) == (16.0, 4)  # backlog seen whole: clamp at max
    assert worker_wants(30, 0, 1, worker) == (1.5, 2)
    assert worker_wants(42, 0, 2, worker)[1] == 2  # 2.1 is within 10% of 2
    assert worker_wants(0, 50, 1, worker) == (2.5, 3)  # backlog alone, at the default target


def test_fixed_pods_grow_on_a_burst_and_shrink_after_the_window() -> None:
    worker = WorkerConfig(scaledown_window_s=10.0)
    trace = Trace("burst", "400 at t=2 s", 40.0, times_s=tuple(2.0 + i / 400 for i in range(400)))
    result = simulate(trace, fleet(fixed_pods=3), worker, SMALL, per_pod=True)
    per_pod = result.per_pod["children"]
    assert max(max(pods) for pods in per_pod) == 4  # every pod sees the whole backlog
    assert all(len(pods) == 3 for pods in per_pod)
    assert per_pod[0] == [1, 1, 1] and per_pod[-1] == [1, 1, 1]
    assert result.summary["served"] == 400


def test_a_pod_never_holds_more_than_its_prefetch() -> None:
    worker = WorkerConfig(max_inputs=10, target_inputs=5, max_children=2)
    trace = steps([(0, 200), (30, 200)], 30.0)
    result = simulate(trace, fleet(fixed_pods=2), worker, SMALL)
    assert max(result.series["inflight"]) <= 2 * 2 * 10
    assert max(result.series["queue"]) > 0  # more than the fleet can run: a backlog


def test_share_out_splits_equally_within_each_pods_room() -> None:
    caps = np.array([0, 5, 100, 100, 3], np.int64)
    shares = share_out(60, caps)
    assert shares.tolist() == [0, 5, 26, 26, 3]
    assert share_out(1000, caps).tolist() == caps.tolist()
    rng = np.random.default_rng(3)
    for total in (0, 1, 7, 57, 207, 208):
        for split in (share_out(total, caps, rotate=total), share_out(total, caps, rng=rng)):
            assert int(split.sum()) == min(total, int(caps.sum()))
            assert (split >= 0).all() and (split <= caps).all()


# -- conservation and latency -------------------------------------------------------------------


@pytest.mark.parametrize("source", ["keda", "hpa"])
@pytest.mark.parametrize("metric", ["desired", "exact"])
def test_every_arrival_is_served_once(source: str, metric: str) -> None:
    trace = steps([(0, 100), (20, 100), (21, 3000), (60, 3000), (61, 100), (120, 100)], 120.0)
    result = simulate(trace, fleet(source=source, metric=metric), WorkerConfig(), SMALL)
    expected = int(trace.counts(SMALL.dt_s).sum())
    summary = result.summary
    assert summary["arrived"] == expected
    assert summary["served"] == expected and summary["unserved"] == 0
    assert result.series["queue"][-1] == 0 and result.series["inflight"][-1] == 0
    assert result.series["served_total"][-1] == result.series["arrived_total"][-1] == expected
    served = np.array(result.series["served_total"])
    assert (np.diff(served) >= 0).all()
    assert (served <= np.array(result.series["arrived_total"])).all()  # none served twice
    # every input was taken off the broker list exactly once
    assert summary["dispatched"] == expected
    assert summary["max_pods"] > 1  # the HPA grew the fleet


def test_latency_is_never_below_the_service_time() -> None:
    trace = steps([(0, 50), (10, 50), (11, 2000), (30, 2000), (31, 50), (60, 50)], 60.0)
    result = simulate(trace, fleet(), WorkerConfig(), SMALL)
    latency = result.latency
    assert latency["p50_s"] and len(latency["p50_s"]) == len(latency["t"])
    assert min(latency["p50_s"]) >= SMALL.service_s
    assert all(p99 >= p50 >= 0 for p50, p99 in zip(latency["p50_s"], latency["p99_s"], strict=True))
    assert result.summary["max_s"] >= result.summary["p99_s"] >= result.summary["p50_s"] > 0


def test_weighted_percentile_is_nearest_rank() -> None:
    values = np.array([3.0, 1.0, 2.0])
    weights = np.array([1, 98, 1], np.int64)
    assert weighted_percentile(values, weights, 50) == 1.0
    assert weighted_percentile(values, weights, 99) == 2.0
    assert weighted_percentile(values, weights, 100) == 3.0
    assert np.isnan(weighted_percentile(np.array([]), np.array([], np.int64), 50))


def test_trace_counts_keep_the_total() -> None:
    trace = steps([(0, 1234.5), (10, 1234.5)], 10.0)
    assert int(trace.counts(0.1).sum()) == 12345
    replayed = Trace("r", "times", 5.0, times_s=(0.0, 0.05, 1.0, 4.99))
    assert replayed.counts(0.1).tolist()[:1] == [2] and int(replayed.counts(0.1).sum()) == 4


def test_a_pinned_replay_sends_each_input_to_its_own_pod() -> None:
    times = tuple(1.0 + i / 200 for i in range(200))  # 200 inputs in 1 s, all to pod 0
    trace = Trace("pinned", "one busy pod", 20.0, times_s=times, pods_of=(0,) * len(times))
    result = simulate(trace, fleet(fixed_pods=3), WorkerConfig(), SMALL, per_pod=True)
    per_pod = result.per_pod["children"]
    assert max(p[0] for p in per_pod) > 1
    assert max(max(p[1], p[2]) for p in per_pod) == 1  # the other pods saw no input
    assert result.summary["served"] == result.summary["dispatched"] == 200


def test_a_pinned_replay_needs_fixed_pods_and_one_pod_per_arrival() -> None:
    trace = Trace("pinned", "", 5.0, times_s=(1.0, 2.0), pods_of=(0, 1))
    with pytest.raises(ValueError, match="pins inputs to pods"):
        simulate(trace, fleet(), WorkerConfig(), SMALL)
    short = Trace("pinned", "", 5.0, times_s=(1.0, 2.0), pods_of=(0,))
    with pytest.raises(ValueError, match="pods_of has 1 entries for 2 arrival times"):
        simulate(short, fleet(fixed_pods=2), WorkerConfig(), SMALL)
