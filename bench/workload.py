"""What every benchmarked input does, shared by the Celery, arq and taskiq task modules.

Each input returns ``{"start": t0, "end": t1, "pid": pid}`` (``time.time()``), so throughput
and latency come from the inputs themselves: latency = ``end`` - the producer's enqueue time.

- :func:`sleep_io`: ``await asyncio.sleep(delay_s)`` (the ``async-io`` scenario).
- :func:`block_io`: ``time.sleep(delay_s)`` (the ``sync-io`` scenario, on a thread).
- :func:`http_get`: one GET to the local latency-injecting server (the ``http`` scenario), on
  a session that lives as long as the event loop; :func:`http_get_fresh` opens a session per
  input, which is all ``asyncio.run`` per task allows; :func:`http_get_blocking` is the
  urllib client a gevent user reaches for.
- :func:`hold`: wait on a gate until the harness opens it (the ``memory-*`` scenarios);
  :func:`hold_sync` is the same for a sync input (a thread or greenlet blocked on an event).

The gate: every input that reaches :func:`hold` counts itself; when ``expected`` inputs are
waiting in this process it creates ``<gate>/ready``; the harness measures RSS and creates
``<gate>/open``; a watcher thread (one per gate and process) sees it and wakes every waiter
on its own event loop. Waiters cost one ``asyncio.Event`` wait, no polling.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import tracemalloc
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

__all__ = [
    "block_io",
    "hold",
    "hold_sync",
    "http_get",
    "http_get_blocking",
    "http_get_fresh",
    "noop",
    "sleep_io",
    "stamp",
]

GATE_POLL_S = 0.02
HTTP_TIMEOUT_S = 30.0
#: bench.memprofile sets it: tracing processes dump a tracemalloc snapshot at the first input
#: on a gate and when the gate is full.
TRACEMALLOC_DIR = os.environ.get("BENCH_TRACEMALLOC_DIR", "")


def stamp(start: float) -> dict[str, Any]:
    """What an input returns: its own start and end (wall clock) and the process it ran in."""
    return {"start": start, "end": time.time(), "pid": os.getpid()}


def noop() -> dict[str, Any]:
    """The ``trivial`` input: nothing but the bookkeeping."""
    return stamp(time.time())


async def sleep_io(delay_s: float) -> dict[str, Any]:
    """The ``async-io`` input."""
    start = time.time()
    await asyncio.sleep(delay_s)
    return stamp(start)


def block_io(delay_s: float) -> dict[str, Any]:
    """The ``sync-io`` input: blocks its thread (or, under gevent, its greenlet)."""
    start = time.time()
    time.sleep(delay_s)
    return stamp(start)


# -- http ------------------------------------------------------------------------------------

_sessions: dict[int, aiohttp.ClientSession] = {}


def _loop_session() -> aiohttp.ClientSession:
    """One session per running event loop, created on first use and kept."""
    key = id(asyncio.get_running_loop())
    session = _sessions.get(key)
    if session is None or session.closed:
        connector = aiohttp.TCPConnector(limit=0)
        session = aiohttp.ClientSession(connector=connector)
        _sessions[key] = session
    return session


async def _fetch(session: aiohttp.ClientSession, url: str) -> int:
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with session.get(url, timeout=timeout) as response:
        await response.read()
        return response.status


async def http_get(url: str) -> dict[str, Any]:
    """The ``http`` input on a session shared by every input of this event loop."""
    start = time.time()
    status = await _fetch(_loop_session(), url)
    return {**stamp(start), "status": status}


async def http_get_fresh(url: str) -> dict[str, Any]:
    """The ``http`` input with its own session (a new loop per input cannot share one)."""
    start = time.time()
    async with aiohttp.ClientSession() as session:
        status = await _fetch(session, url)
    return {**stamp(start), "status": status}


def http_get_blocking(url: str) -> dict[str, Any]:
    """The ``http`` input with the standard library's blocking client (gevent patches it)."""
    start = time.time()
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        response.read()
        status = int(response.status)
    return {**stamp(start), "status": status}


# -- the memory gate -------------------------------------------------------------------------


class _Gate:
    """The waiters of one gate directory in this process."""

    def __init__(self, directory: str, expected: int) -> None:
        self.directory = Path(directory)
        self.expected = expected
        self.arrived = 0
        self.lock = threading.Lock()
        self.waiters: list[tuple[asyncio.AbstractEventLoop | None, Any]] = []
        self.opened = False
        threading.Thread(target=self._watch, name="bench-gate", daemon=True).start()

    def join(self) -> asyncio.Event:
        event = asyncio.Event()
        self._arrive(asyncio.get_running_loop(), event)
        return event

    def join_sync(self) -> threading.Event:
        event = threading.Event()
        self._arrive(None, event)
        return event

    def _arrive(self, loop: asyncio.AbstractEventLoop | None, event: Any) -> None:
        with self.lock:
            if self.opened:
                event.set()
                return
            self.waiters.append((loop, event))
            self.arrived += 1
            if self.arrived == 1:
                snapshot("first")
            if self.arrived == self.expected:
                snapshot("full")
                (self.directory / "ready").touch()

    def _watch(self) -> None:
        opener = self.directory / "open"
        while not opener.exists():
            time.sleep(GATE_POLL_S)
        with self.lock:
            self.opened = True
            waiters, self.waiters = self.waiters, []
        for loop, event in waiters:
            if loop is None:
                event.set()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(event.set)


def snapshot(name: str) -> None:
    """Under ``bench.memprofile``: dump this process's tracemalloc snapshot as ``name-<pid>``."""
    if TRACEMALLOC_DIR and tracemalloc.is_tracing():
        path = Path(TRACEMALLOC_DIR, f"{name}-{os.getpid()}.snapshot")
        tracemalloc.take_snapshot().dump(str(path))


_gates: dict[str, _Gate] = {}
_gates_lock = threading.Lock()


def _gate(gate: str, expected: int) -> _Gate:
    with _gates_lock:
        entry = _gates.get(gate)
        if entry is None:
            entry = _gates[gate] = _Gate(gate, expected)
        return entry


async def hold(gate: str, expected: int) -> dict[str, Any]:
    """The ``memory-*`` input: wait until the harness opens ``gate``."""
    start = time.time()
    await _gate(gate, expected).join().wait()
    return stamp(start)


def hold_sync(gate: str, expected: int) -> dict[str, Any]:
    """The ``memory-sync-*`` input: block this thread (or greenlet) until ``gate`` opens."""
    start = time.time()
    _gate(gate, expected).join_sync().wait()
    return stamp(start)
