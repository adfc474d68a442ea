"""Fault scenarios: each runs a workload on a :class:`Harness` and returns an :class:`Outcome`.

A scenario injects its fault and records what happened (executions and final state per input,
plus figures such as exit times); it asserts nothing, so the same function runs on
ConcurrentPool in the tests and on prefork in ``python -m tests.reliability.compare``.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .harness import (
    FINAL_STATES,
    Harness,
    Outcome,
    PrivateRabbit,
    PrivateRedisServer,
    RelWorker,
    ScenarioError,
    wait_until,
)

#: Broker transport options that make the Redis transport redeliver unacked messages quickly.
FAST_RESTORE = json.dumps(
    {"visibility_timeout": 5, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
)
#: Which task runs for each ack mode.
ACK_TASKS = {"early": "sleep", "late": "sleep_late", "late_reject": "sleep_late_reject"}


def _children(worker: RelWorker, timeout_s: float = 20) -> list[int]:
    """Wait until the worker has all its children; their pids."""
    count = worker.expected_children

    def all_there() -> list[int]:
        pids = worker.child_pids()
        return pids if len(pids) == count else []

    return list(wait_until(all_there, timeout_s, f"{count} children"))


def child_kill(h: Harness, ack: str = "early") -> Outcome:
    """SIGKILL the child running three long inputs while short ones are being dispatched.

    ``ack="sync"``: the long inputs are sync (early ack), and so are the short ones.
    """
    task = "sleep_sync" if ack == "sync" else ACK_TASKS[ack]
    short = "sleep_sync" if ack == "sync" else "sleep"
    worker = h.start_worker(parallel=20, children=2)
    _children(worker)
    longs = [f"long{i}" for i in range(4)]
    for name in longs:
        h.send(task, name, 4.0)
    wait_until(lambda: h.started(*longs), 20, "the long inputs to start")
    victim = h.run_pid("long0")
    for i in range(10):
        h.send(short, f"short{i}", 0.3)
    worker.kill_child(victim)
    killed_at = time.monotonic()
    h.wait_final(30)
    outcome = h.collect(f"child SIGKILL ({ack} ack)")
    running = _reported_running(h, worker.log(), victim)
    outcome.figures.update(
        victim_pid=victim,
        # Began on the victim and had not finished when it died (the pool reported them).
        victims=sorted(h.ran_on(victim) & set(running)),
        reported_running=running,
        children_after=worker.child_pids(),
        seconds_to_final=round(time.monotonic() - killed_at, 2),
    )
    return outcome


def _reported_running(h: Harness, log: str, pid: int) -> list[str]:
    """The inputs ConcurrentPool said were running on child ``pid`` when it died.

    That includes any the child had accepted (and early-acked) whose body had not begun; the
    task's own counter cannot see those. Empty for prefork, which logs no such line.
    """
    names_by_id = {item.result.id: name for name, item in h.inputs.items()}
    for line in log.splitlines():
        if f"Child {pid} exited unexpectedly" in line:
            return sorted(names_by_id[i] for i in re.findall(r"\[([0-9a-f-]{36})\]", line))
    return []


def worker_sigkill(h: Harness) -> Outcome:
    """SIGKILL the whole worker with acks_late inputs running; a second worker takes over."""
    env = {"TEST_TRANSPORT_OPTIONS": FAST_RESTORE}
    first = h.start_worker(parallel=4, env=env)
    names = [f"n{i}" for i in range(10)]
    for name in names:
        h.send("sleep_late", name, 2.0)
    wait_until(lambda: sum(h.runs().values()) >= 4, 20, "four inputs to start")
    first.kill()
    running = sorted(n for n, c in h.runs().items() if c >= 1)
    h.start_worker(parallel=10, env=env)
    h.wait_final(60)
    outcome = h.collect("worker SIGKILL (acks_late, visibility_timeout 5 s)")
    outcome.figures["running_at_kill"] = running
    return outcome


def warm_sigterm(h: Harness) -> Outcome:
    """SIGTERM a worker mid-load (one child, many inputs queued); a second finishes the rest."""
    first = h.start_worker(parallel=5)
    names = [f"n{i}" for i in range(30)]
    for name in names:
        h.send("sleep", name, 1.0)
    wait_until(lambda: sum(h.runs().values()) >= 5, 20, "five inputs to start")
    first.send_signal(signal.SIGTERM)
    code = first.wait_exit(60)
    done_by_first = sum(s == "SUCCESS" for s in h.states().values())
    h.start_worker(parallel=10)
    h.wait_final(60)
    outcome = h.collect("warm SIGTERM mid-load")
    outcome.figures.update(exit_code=code, completed_by_first=done_by_first)
    return outcome


def cold_shutdown(h: Harness) -> Outcome:
    """SIGQUIT with acks_late inputs running (shutdown timeout 5 s); a second worker reruns them."""
    first = h.start_worker(parallel=5, env={"TEST_SHUTDOWN_TIMEOUT": "5"})
    names = [f"n{i}" for i in range(5)]
    for name in names:
        h.send("first_long_late", name, 30.0, 0.5)
    wait_until(lambda: h.started(*names), 20, "five inputs to start")
    started = time.monotonic()
    first.send_signal(signal.SIGQUIT)
    code = first.wait_exit(30)
    exit_s = round(time.monotonic() - started, 2)
    after_exit = h.states()
    if code is None:
        first.kill()
    h.start_worker(parallel=5)
    h.wait_final(30)
    outcome = h.collect("cold shutdown (SIGQUIT, acks_late)")
    outcome.figures.update(exit_code=code, exit_s=exit_s, states_after_exit=after_exit)
    return outcome


def _unacked_ids(server: PrivateRedisServer) -> set[str]:
    client = server.client()
    try:
        raw = client.hgetall("unacked")
    finally:
        client.close()
    ids = set()
    for value in raw.values():
        message = json.loads(value)[0]
        ids.add(message["headers"]["id"])
    return ids


def drain_acks(h: Harness, server: PrivateRedisServer) -> Outcome:
    """Warm drain with 9 fast and one slow acks_late input: are the fast ones acked meanwhile?"""
    worker = h.start_worker(parallel=10)
    fast = [f"fast{i}" for i in range(9)]
    for name in fast:
        h.send("sleep_late", name, 1.0)
    h.send("sleep_late", "slow", 6.0)
    wait_until(lambda: h.started(*fast, "slow"), 20, "all ten inputs to start")
    worker.send_signal(signal.SIGTERM)
    term_at = time.monotonic()
    ids = {h.inputs[n].result.id: n for n in fast}
    succeeded_at: dict[str, float] = {}
    acked_at: dict[str, float] = {}
    slow_done_at = None
    while worker.alive() and time.monotonic() - term_at < 30:
        now = time.monotonic()
        states = h.states([*fast, "slow"])
        unacked = _unacked_ids(server)
        for task_id, name in ids.items():
            if states[name] == "SUCCESS":
                succeeded_at.setdefault(name, now)
            if task_id not in unacked and name in succeeded_at:
                acked_at.setdefault(name, now)
        if states["slow"] in FINAL_STATES and slow_done_at is None:
            slow_done_at = now
        time.sleep(0.05)
    worker.wait_exit(30)
    acked_in_drain = sorted(
        n for n, t in acked_at.items() if slow_done_at is None or t < slow_done_at
    )
    delays = [acked_at[n] - succeeded_at[n] for n in acked_at]
    outcome = h.collect("warm drain keeps acking")
    outcome.figures.update(
        acked_before_slow_finished=acked_in_drain,
        max_ack_delay_s=round(max(delays), 2) if delays else None,
        still_unacked_at_exit=sorted(n for n in fast if n not in acked_at),
    )
    return outcome


def connection_loss(h: Harness, server: PrivateRedisServer) -> Outcome:
    """CLIENT KILL the broker connections while ~15 inputs wait in the parent (one child)."""
    # One child, two at a time (the task's cap; prefork: two processes), 15 waiting.
    worker = h.start_worker(parallel=17 if h.pool == "concurrent" else 2)
    names = [f"n{i}" for i in range(17)]
    for i, name in enumerate(names):
        h.send("capped", name, 3.0 if i < 2 else 0.3)
    wait_until(lambda: h.started("n0", "n1"), 20, "two inputs to start")
    waiting = 15 if h.pool == "concurrent" else 1
    wait_until(lambda: worker.reserved() >= waiting, 20, f"{waiting} inputs reserved")
    reserved = worker.reserved()
    killed = server.kill_clients()
    h.wait_final(40)
    after = [f"after{i}" for i in range(3)]
    for name in after:
        h.send("sleep", name, 0.1)
    h.wait_final(30, after)
    outcome = h.collect("connection loss (CLIENT KILL) with inputs waiting in the parent")
    outcome.figures.update(reserved_at_kill=reserved, connections_killed=killed)
    return outcome


def broker_restart(h: Harness, broker: PrivateRedisServer | PrivateRabbit) -> Outcome:
    """Restart the broker mid-load: early-ack and acks_late inputs, one child."""
    env = {
        "TEST_TRANSPORT_OPTIONS": json.dumps(
            {"visibility_timeout": 8, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
        )
    }
    h.start_worker(parallel=5, env=env)
    for i in range(15):
        if i % 3 == 2:
            h.send("sleep_late", f"late{i}", 1.0)
        else:
            h.send("sleep", f"early{i}", 1.0)
    worker = h.workers[0]
    wait_until(lambda: sum(h.runs().values()) >= 3, 20, "three inputs to start")
    stopped = time.monotonic()
    broker.stop()
    wait_until(
        lambda: "Connection to broker lost" in worker.log(), 30, "the worker to see the broker go"
    )
    broker.start()
    down_s = time.monotonic() - stopped
    h.wait_final(90)
    kind = "Redis, appendonly" if isinstance(broker, PrivateRedisServer) else "RabbitMQ"
    outcome = h.collect(f"broker restart ({kind})")
    outcome.figures["down_s"] = round(down_s, 2)
    return outcome


def poison(h: Harness, late: bool = False) -> Outcome:
    """A sync input that segfaults its child: how many children crash for it?"""
    worker = h.start_worker(parallel=2)
    _children(worker)
    wait_until(lambda: h.child_inits() >= 1, 10, "the child's worker_process_init")
    inits = h.child_inits()
    h.send("segfault_late" if late else "segfault", "poison")
    h.wait_final(30, ["poison"])
    h.send("sleep", "after", 0.1)
    h.wait_final(30, ["after"])
    outcome = h.collect(f"poison input (segfault, {'acks_late' if late else 'early ack'})")
    outcome.figures.update(
        child_crashes=h.child_inits() - inits,
        crash_log_lines=worker.log().count("exited unexpectedly")
        + worker.log().count("exited prematurely"),
    )
    return outcome


def init_hang_first(h: Harness) -> Outcome:
    """worker_process_init hangs forever in the first child only (-c 2)."""
    env = {"TEST_INIT_MODE": "hang-first", "TEST_PROC_ALIVE_TIMEOUT": "3"}
    started = time.monotonic()
    outcome = Outcome(scenario="worker_process_init hangs in the first child", pool=h.pool)
    try:
        worker = h.start_worker(parallel=20, children=2, env=env, wait=True)
    except ScenarioError as exc:
        outcome.error = str(exc)
        return outcome
    ready_s = time.monotonic() - started
    hung = int(wait_until(lambda: h.store.lindex(h.key("init"), 0), 10, "the first child's init"))
    probe = h.ping_during(worker, 2.0)
    for i in range(5):
        h.send("sleep", f"n{i}", 0.1)
    h.wait_final(20)
    pings = probe.result()
    try:
        wait_until(
            lambda: hung not in (p := worker.child_pids()) and len(p) == 2,
            20,
            "the hung child to be replaced",
        )
        replaced_s: float | None = round(time.monotonic() - started, 2)
    except ScenarioError:
        replaced_s = None
    outcome = h.collect(outcome.scenario)
    outcome.figures.update(
        ready_s=round(ready_s, 2), replaced_after_s=replaced_s, hung_pid=hung, **pings
    )
    return outcome


def init_raise(h: Harness, first_only: bool) -> Outcome:
    """worker_process_init raises in every child (the worker must stop) or only the first."""
    mode = "raise-first" if first_only else "raise-all"
    scenario = f"worker_process_init raises ({'first child' if first_only else 'every child'})"
    outcome = Outcome(scenario=scenario, pool=h.pool)
    worker = h.start_worker(parallel=20, children=2, env={"TEST_INIT_MODE": mode}, wait=False)
    if first_only:
        try:
            worker.wait_ready(60)
        except ScenarioError as exc:
            outcome.error = str(exc)
            outcome.figures["log_tail"] = worker.handle.tail(20)
            return outcome
        for i in range(5):
            h.send("sleep", f"n{i}", 0.1)
        h.wait_final(20)
        outcome = h.collect(scenario)
    code = worker.wait_exit(5 if first_only else 40)
    log = worker.log()
    outcome.figures.update(
        exit_code=code,
        logged_ready=" ready." in log,
        logged_exception="fails on purpose" in log,
        logged_traceback="Traceback" in log,
        child_inits=h.child_inits(),
        children=worker.child_pids(),
    )
    return outcome


def grandchild(h: Harness) -> Outcome:
    """The task forks a grandchild holding the child's fds; the child is SIGKILLed."""
    worker = h.start_worker(parallel=5)
    h.send("fork_grandchild", "gc", 60.0)
    wait_until(lambda: h.started("gc"), 20, "the input to start")
    victim = h.run_pid("gc")
    worker.kill_child(victim)
    killed = time.monotonic()
    h.wait_final(20, ["gc"])
    delay = time.monotonic() - killed
    h.send("sleep", "after", 0.1)
    h.wait_final(20, ["after"])
    outcome = h.collect("grandchild holds the child's fds, child SIGKILLed")
    outcome.figures.update(lost_error_after_s=round(delay, 2), victim_pid=victim)
    return outcome


def big_argument(h: Harness) -> Outcome:
    """A 10 MB argument to a child whose loop is blocked for 4 s: does the parent still answer?"""
    worker = h.start_worker(parallel=5)
    h.send("block_free", "blocker", 4.0)
    wait_until(lambda: h.started("blocker"), 20, "the blocking input to start")
    probe = h.ping_during(worker, 4.0)
    h.send("echo_len", "big", "x" * (10 * 1024 * 1024))
    h.wait_final(40)
    outcome = h.collect("10 MB argument while the child's loop is blocked")
    outcome.figures.update(probe.result())
    outcome.figures["big_result"] = (
        h.inputs["big"].result.result if outcome.inputs["big"].state == "SUCCESS" else None
    )
    return outcome


def slow_init(h: Harness) -> Outcome:
    """A replacement child sleeps 4 s in worker_process_init: do ping and inspect still answer?"""
    env = {"TEST_INIT_MODE": "slow-after-first", "TEST_PROC_ALIVE_TIMEOUT": "10"}
    worker = h.start_worker(parallel=5, env=env)
    worker.kill_child()
    probe = h.ping_during(worker, 4.0)
    for i in range(3):
        h.send("sleep", f"n{i}", 0.1)
    started = time.monotonic()
    active = worker.inspect(2.0).active()
    inspect_s = time.monotonic() - started
    h.wait_final(30)
    outcome = h.collect("a child slow in worker_process_init (4 s)")
    outcome.figures.update(probe.result())
    outcome.figures.update(inspect_answered=bool(active), inspect_s=round(inspect_s, 2))
    return outcome


def bad_inputs(h: Harness) -> Outcome:
    """An unserialisable result, an unpicklable exception, an unknown task, an undecodable body."""
    h.start_worker(parallel=5)
    h.send("unserialisable", "unserialisable")
    h.send("unpicklable_exception", "unpicklable")
    unknown = h.client.send_task("rel.no_such_task", ("unknown",), queue=h.queue)
    h.publish_raw(b"{not json")
    after = [f"after{i}" for i in range(3)]
    for name in after:
        h.send("sleep", name, 0.1)
    h.wait_final(30)
    outcome = h.collect("bad inputs (unserialisable, unpicklable, unknown task, bad body)")
    log = h.workers[0].log()
    outcome.figures.update(
        unknown_task_id=unknown.id,
        unknown_state=unknown.state,
        logged_unregistered="unregistered task" in log,
        logged_undecodable="decode" in log.lower(),
        errors={n: i.error for n, i in outcome.inputs.items() if i.error},
    )
    return outcome


def time_limit(h: Harness, kind: str = "block") -> Outcome:
    """An async input past time_limit=2 that blocks (``block``) or swallows cancels
    (``swallow``), next to a neighbour on the same child."""
    worker = h.start_worker(parallel=5)
    before = _children(worker)
    h.send("sleep", "neighbour", 8.0)
    if kind == "block":
        h.send("block_loop", "limited", 6.0)
    else:
        h.send("swallow_cancel", "limited", 8.0)
    wait_until(lambda: h.started("neighbour", "limited"), 20, "both inputs to start")
    h.wait_final(30)
    outcome = h.collect(
        f"async time_limit=2, {'blocking call' if kind == 'block' else 'swallowed CancelledError'}"
    )
    meta = h.inputs["limited"].result.backend.get_task_meta(h.inputs["limited"].result.id)
    start = float(h.store.hget(h.key("start"), "limited") or 0)
    done = meta.get("date_done")
    if done is not None and start:
        from datetime import datetime

        done_ts = (
            done if isinstance(done, datetime) else datetime.fromisoformat(str(done))
        ).timestamp()
        outcome.figures["limited_final_after_s"] = round(done_ts - start, 2)
    outcome.figures.update(child_before=before, children_after=worker.child_pids())
    return outcome


def worker_time_limits(h: Harness) -> Outcome:
    """Worker-wide --time-limit=2 --soft-time-limit=1 on @concurrent inputs with no limits."""
    h.start_worker("--time-limit=2", "--soft-time-limit=1", parallel=5)
    h.send("soft_ignore", "hard", 6.0)
    h.send("soft_catch", "soft", 4.0)
    h.wait_final(30)
    outcome = h.collect("worker-wide --time-limit/--soft-time-limit")
    soft = h.inputs["soft"]
    outcome.figures["soft_result"] = soft.result.result if soft.state == "SUCCESS" else None
    return outcome


def revoke_terminate(h: Harness, how: str) -> Outcome:
    """Revoke one running input: ``sigkill``, ``sigterm`` (terminate=True) or ``stamped``."""
    worker = h.start_worker(parallel=5)
    before = _children(worker)
    if how == "stamped":
        stamp = f"m-{uuid.uuid4().hex[:8]}"
        sig = h.client.signature("rel.sleep", args=("victim", 30.0), queue=h.queue)
        sig.stamp(mark=stamp)
        h.send_signature("victim", sig)
    else:
        h.send("sleep", "victim", 30.0)
    h.send("sleep", "neighbour", 3.0)
    wait_until(lambda: h.started("victim", "neighbour"), 20, "both inputs to start")
    victim_id = h.inputs["victim"].result.id
    if how == "sigkill":
        h.client.control.revoke(victim_id, terminate=True, signal="SIGKILL")
    elif how == "sigterm":
        h.client.control.revoke(victim_id, terminate=True)
    else:
        h.client.control.revoke_by_stamped_headers({"mark": stamp}, terminate=True)
    revoked_at = time.monotonic()
    h.wait_final(40)
    ended = round(time.monotonic() - revoked_at, 2)
    h.send("sleep", "after", 0.1)
    h.wait_final(20, ["after"])
    outcome = h.collect(f"revoke(terminate=True) {how}")
    outcome.figures.update(
        child_before=before, children_after=worker.child_pids(), seconds_to_final=ended
    )
    return outcome


def cancel_on_connection_loss(h: Harness, server: PrivateRedisServer) -> Outcome:
    """worker_cancel_long_running_tasks_on_connection_loss with acks_late inputs running."""
    h.start_worker(parallel=5, env={"TEST_CANCEL_ON_CONNECTION_LOSS": "1"})
    names = [f"c{i}" for i in range(3)]
    for name in names:
        h.send("first_long_late", name, 30.0, 0.5)
    wait_until(lambda: h.started(*names), 20, "three inputs to start")
    killed = server.kill_clients()
    h.wait_final(40)
    outcome = h.collect("cancel long-running acks_late inputs on connection loss")
    outcome.figures["connections_killed"] = killed
    return outcome


class _ChildCounter(threading.Thread):
    """Samples a worker's children until stopped: processes alive (``most``) and those the
    pool reports as its working ``processes`` in ``inspect stats`` (``most_reported``)."""

    def __init__(self, worker: RelWorker) -> None:
        super().__init__(daemon=True)
        self.worker = worker
        self.most = 0
        self.most_reported = 0
        self.seen: set[int] = set()
        self.stopping = threading.Event()
        self.reporter = threading.Thread(target=self._sample_stats, daemon=True)

    def run(self) -> None:
        self.reporter.start()
        while not self.stopping.is_set():
            pids = self.worker.child_pids()
            self.seen.update(pids)
            self.most = max(self.most, len(pids))
            time.sleep(0.02)
        self.reporter.join(10)

    def _sample_stats(self) -> None:
        while not self.stopping.is_set():
            stats = (self.worker.inspect(1.0).stats() or {}).get(self.worker.hostname) or {}
            processes = (stats.get("pool") or {}).get("processes") or []
            self.most_reported = max(self.most_reported, len(processes))

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


def max_tasks_per_child(h: Harness) -> Outcome:
    """--max-tasks-per-child=5 with two children and 40 short inputs."""
    worker = h.start_worker("--max-tasks-per-child=5", parallel=20, children=2)
    counter = _ChildCounter(worker)
    counter.start()
    for i in range(40):
        h.send("sleep", f"n{i}", 0.05)
    h.wait_final(60)
    counter.stop()
    outcome = h.collect("--max-tasks-per-child=5")
    pids = {h.run_pid(n) for n in h.inputs}
    outcome.figures.update(
        most_children=counter.most,
        most_reported_processes=counter.most_reported,
        children_seen=len(counter.seen),
        child_inits=h.child_inits(),
        pids_used=len(pids),
    )
    return outcome


def max_memory_per_child(h: Harness) -> Outcome:
    """--max-memory-per-child: each input keeps 80 MB alive in its child."""
    worker = h.start_worker("--max-memory-per-child=150000", parallel=5)
    counter = _ChildCounter(worker)
    counter.start()
    for i in range(4):
        h.send("hog", f"n{i}", 80)
        h.wait_final(30, [f"n{i}"])
    counter.stop()
    outcome = h.collect("--max-memory-per-child=150000 (KB)")
    pids = {h.run_pid(n) for n in h.inputs}
    outcome.figures.update(
        most_children=counter.most,
        most_reported_processes=counter.most_reported,
        pids_used=len(pids),
        child_inits=h.child_inits(),
    )
    return outcome


def killpg_sigterm(h: Harness, task: str = "sleep") -> Outcome:
    """SIGTERM to the worker's whole process group (children too) mid-load."""
    first = h.start_worker(parallel=10, children=2)
    _children(first)
    for i in range(20):
        h.send(task, f"n{i}", 2.0)
    wait_until(lambda: sum(h.runs().values()) >= 6, 20, "six inputs to start")
    inits = h.child_inits()
    first.send_signal(signal.SIGTERM, group=True)
    code = first.wait_exit(60)
    forked = h.child_inits() - inits
    h.start_worker(parallel=20, children=2)
    h.wait_final(60)
    outcome = h.collect("SIGTERM to the whole process group")
    outcome.figures.update(exit_code=code, children_forked_during_shutdown=forked)
    return outcome


def _lines_naming(log: str, task_id: str) -> list[str]:
    """Log lines that mention ``task_id``, except the routine received/succeeded ones."""
    routine = ("Received task", " succeeded in ")
    return [
        line for line in log.splitlines() if task_id in line and not any(r in line for r in routine)
    ]


def shutdown_timeout(h: Harness) -> Outcome:
    """Warm shutdown timeout (1 s) passes with an early-ack and an acks_late input running."""
    first = h.start_worker(parallel=5, env={"TEST_SHUTDOWN_TIMEOUT": "1"})
    h.send("first_long", "early", 30.0, 0.2)
    h.send("first_long_late", "late", 30.0, 0.2)
    wait_until(lambda: h.started("early", "late"), 20, "both inputs to start")
    first.send_signal(signal.SIGTERM)
    code = first.wait_exit(30)
    after_exit = h.states()
    log = first.log()
    h.start_worker(parallel=5)
    h.wait_final(30)
    outcome = h.collect("warm shutdown timeout passes")
    ids = {n: i.result.id for n, i in outcome.inputs.items()}
    outcome.figures.update(
        exit_code=code,
        states_after_exit=after_exit,
        log_lines={n: _lines_naming(log, tid) for n, tid in ids.items()},
    )
    return outcome


# -- load ------------------------------------------------------------------------------------

#: Kind of input -> (task, expected state, expected executions).
LOAD_KINDS = {
    "async": ("quick", "SUCCESS", 1),
    "sync": ("quick_sync", "SUCCESS", 1),
    "fail": ("quick_fail", "FAILURE", 1),
    "retry": ("quick_retry", "SUCCESS", 2),
    "revoked": ("quick", "REVOKED", 0),
}


def load_kind(i: int, mixed: bool) -> str:
    if not mixed:
        return "async"
    slot = i % 100
    if slot < 10:
        return "fail"
    if slot < 20:
        return "sync"
    if slot < 25:
        return "retry"
    if slot == 25:
        return "revoked"
    return "async"


def load(
    h: Harness,
    total: int,
    *,
    mixed: bool = True,
    send_window_s: float = 60.0,
    duration_s: float | None = None,
    settle_s: float = 120.0,
) -> Outcome:
    """Push ``total`` short inputs (or, with ``duration_s``, keep sending for that long)."""
    worker = h.start_worker(parallel=1000, children=2)
    _children(worker)
    rss_start = worker.rss_kb()
    started = time.monotonic()
    expected: dict[str, str] = {}
    revoked: list[str] = []
    i = 0
    with h.client.producer_or_acquire() as producer:
        while True:
            elapsed = time.monotonic() - started
            if duration_s is None and (i >= total or elapsed > send_window_s):
                break
            if duration_s is not None and elapsed > duration_s:
                break
            batch = []
            for _ in range(500 if duration_s is None else 100):
                kind = load_kind(i, mixed)
                name = f"{kind}-{i}"
                expected[name] = kind
                task_id = str(uuid.uuid4())
                if kind == "revoked":
                    revoked.append(task_id)
                batch.append((name, kind, task_id))
                i += 1
            batch_revoked = [t for _, k, t in batch if k == "revoked"]
            if batch_revoked:  # revoked before they are sent: they never run
                h.client.control.revoke(batch_revoked)
                worker.ping(5.0)  # the revoke is processed before the inputs arrive
            for name, kind, task_id in batch:
                h.send(LOAD_KINDS[kind][0], name, task_id=task_id, producer=producer)
            if duration_s is not None:  # a steady rate for the soak
                time.sleep(max(0.0, 0.5 - (time.monotonic() - started - elapsed)))  # ~200/s
    send_s = time.monotonic() - started
    h.wait_final(settle_s)
    done_s = time.monotonic() - started
    rss_end = worker.rss_kb()
    outcome = h.collect(f"load: {len(expected)} short inputs ({'mixed' if mixed else 'async'})")
    wrong = {
        n: (item.state, item.executions)
        for n, item in outcome.inputs.items()
        if (item.state, item.executions) != LOAD_KINDS[expected[n]][1:]
    }
    outcome.figures.update(
        send_s=round(send_s, 1),
        total_s=round(done_s, 1),
        per_s=round(len(expected) / done_s, 1),
        rss_start_kb=rss_start,
        rss_end_kb=rss_end,
        wrong=dict(list(wrong.items())[:20]),
        wrong_count=len(wrong),
    )
    return outcome


#: name -> (function, needs): what the compare script runs; needs is None, "redis" or "rabbit".
SCENARIOS: dict[str, tuple[Callable[..., Outcome], str | None, dict[str, Any]]] = {
    "child-kill-early": (child_kill, None, {"ack": "early"}),
    "child-kill-late": (child_kill, None, {"ack": "late"}),
    "child-kill-late-reject": (child_kill, None, {"ack": "late_reject"}),
    "worker-sigkill": (worker_sigkill, "redis", {}),
    "warm-sigterm": (warm_sigterm, None, {}),
    "cold-shutdown": (cold_shutdown, None, {}),
    "drain-acks": (drain_acks, "redis", {}),
    "connection-loss": (connection_loss, "redis", {}),
    "broker-restart-redis": (broker_restart, "redis", {}),
    "broker-restart-rabbit": (broker_restart, "rabbit", {}),
    "poison": (poison, None, {}),
    "poison-late": (poison, None, {"late": True}),
    "init-hang-first": (init_hang_first, None, {}),
    "init-raise-first": (init_raise, None, {"first_only": True}),
    "grandchild": (grandchild, None, {}),
    "big-argument": (big_argument, None, {}),
    "bad-inputs": (bad_inputs, None, {}),
    "time-limit-block": (time_limit, None, {"kind": "block"}),
    "time-limit-swallow": (time_limit, None, {"kind": "swallow"}),
    "revoke-sigkill": (revoke_terminate, None, {"how": "sigkill"}),
    "cancel-on-connection-loss": (cancel_on_connection_loss, "redis", {}),
    "max-tasks-per-child": (max_tasks_per_child, None, {}),
    "killpg-sigterm": (killpg_sigterm, None, {}),
    "shutdown-timeout": (shutdown_timeout, None, {}),
}
