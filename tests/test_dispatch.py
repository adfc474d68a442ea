"""Dispatch picks children under target first, least loaded first, bursting up to max."""

from __future__ import annotations

from collections import Counter

from celery_concurrent.dispatch import Limits, LoadSnapshot, choose_child
from celery_concurrent.protocol import FrameReader, encode


def _child(task: int, other: int = 0, accepting: bool = True) -> LoadSnapshot:
    return LoadSnapshot(accepting, task + other, Counter({"t": task, "o": other}))


def test_least_loaded_under_target_wins() -> None:
    a, b = _child(5), _child(3)
    assert choose_child([a, b], "t", Limits(10, 8), 100) is b


def test_under_target_beats_a_less_loaded_child_at_target() -> None:
    at_target = _child(8)
    under = _child(7, other=20)
    assert choose_child([at_target, under], "t", Limits(10, 8), 100) is under


def test_burst_above_target_up_to_max() -> None:
    a, b = _child(8), _child(9)
    assert choose_child([a, b], "t", Limits(10, 8), 100) is a
    assert choose_child([_child(10), _child(10)], "t", Limits(10, 8), 100) is None


def test_draining_children_get_nothing() -> None:
    draining = _child(0, accepting=False)
    assert choose_child([draining], "t", Limits(10, 8), 100) is None


def test_slots_cap_all_tasks_together() -> None:
    full = _child(1, other=9)
    assert choose_child([full], "t", Limits(10, 8), 10) is None


def test_frames_split_anywhere_reassemble() -> None:
    data = b"".join(encode(("run", i, "x" * i)) for i in range(50))
    reader = FrameReader()
    got = []
    for i in range(0, len(data), 7):
        got += reader.feed(data[i : i + 7])
    assert got == [("run", i, "x" * i) for i in range(50)]


def test_a_ready_child_bursts_before_a_starting_child_gets_inputs() -> None:
    ready = _child(9)
    starting = _child(0)
    starting.ready = False
    assert choose_child([starting, ready], "t", Limits(10, 8), 100) is ready
    full = _child(10)
    assert choose_child([starting, full], "t", Limits(10, 8), 100) is starting
