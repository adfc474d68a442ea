"""How a child runs sync inputs: on OS threads (the default) or as gevent greenlets.

``app.conf.concurrent_sync_backend`` picks one. Both offer the same three operations to the
child runtime: start an input, raise an exception inside a running one (revoke, soft and
hard time limits), and shut down.

- **threads**: a thread pool of the child's slot count. An exception is raised in the
  input's thread at its next Python bytecode (``PyThreadState_SetAsyncExc``), so a thread
  inside a long C call (``time.sleep``, a socket read) only sees it when that call returns;
  the parent enforces a hard limit past that by replacing the child.
- **gevent**: the child monkeypatches itself at start (before ``worker_process_init``, so
  clients made there are cooperative) and runs each sync input as a greenlet. A greenlet
  blocked in I/O or sleep is woken with the exception at once. The child's event loop uses
  gevent's selector, so async inputs run on the same hub: while the loop waits for I/O,
  greenlets run, and the reverse.

The child's own machinery (pipe reader and writer, loop watchdog) must stay on real OS
threads in a gevent child: :func:`start_os_thread` and :data:`OsQueue` are bound here at
import, before any monkeypatching, for that.
"""

from __future__ import annotations

import _thread
import ctypes
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from queue import SimpleQueue as OsQueue  # the C queue; gevent replaces queue.SimpleQueue
from typing import Any, Protocol

from .exceptions import ConcurrencyConfigError

__all__ = [
    "BACKENDS",
    "GEVENT_INSTALL",
    "OsQueue",
    "OsThread",
    "SyncBackend",
    "check_backend",
    "make_backend",
    "os_sleep",
    "start_os_thread",
]

THREADS = "threads"
GEVENT = "gevent"
BACKENDS = (THREADS, GEVENT)
GEVENT_INSTALL = "pip install 'celery-concurrent[gevent]'"

_os_start_new_thread = _thread.start_new_thread
_os_allocate_lock = _thread.allocate_lock
os_sleep = time.sleep

#: Called on the loop (via ``call_soon_threadsafe``) when an input ends: it returns the
#: input's outcome, or raises what escaped it.
Outcome = Callable[[], Any]
OnDone = Callable[[Outcome], None]


def check_backend(name: Any) -> str:
    """Validate ``concurrent_sync_backend`` in the parent at start; returns the name."""
    if name not in BACKENDS:
        raise ConcurrencyConfigError(
            f"concurrent_sync_backend must be one of {', '.join(map(repr, BACKENDS))}, "
            f"got {name!r}: e.g. app.conf.concurrent_sync_backend = 'gevent'"
        )
    if name == GEVENT:
        try:
            import gevent  # noqa: F401
        except ImportError as exc:
            raise ConcurrencyConfigError(
                "concurrent_sync_backend = 'gevent' needs gevent, which is not installed: "
                f"{GEVENT_INSTALL}"
            ) from exc
    return str(name)


class OsThread:
    """A real OS thread, even in a monkeypatched child; ``join`` waits for it to end."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self.name = name
        self._target = target
        self._ended = _os_allocate_lock()
        self._ended.acquire()

    def start(self) -> None:
        _os_start_new_thread(self._run, ())

    def join(self, timeout_s: float) -> bool:
        if self._ended.acquire(timeout=timeout_s):
            self._ended.release()
            return True
        return False

    def _run(self) -> None:
        try:
            self._target()
        finally:
            self._ended.release()


def start_os_thread(target: Callable[[], None], name: str) -> OsThread:
    thread = OsThread(target, name)
    thread.start()
    return thread


class SyncBackend(Protocol):
    """What the child runtime needs from a sync backend."""

    name: str

    def submit(self, fn: Callable[[], Any], on_done: OnDone) -> None:
        """Run ``fn`` as an input; ``on_done`` gets its outcome (from any thread)."""

    def handle(self) -> Any:
        """Called inside a running input: the handle :meth:`raise_in` takes."""

    def raise_in(self, handle: Any, exc_type: type[BaseException]) -> None:
        """Raise ``exc_type`` inside the input running under ``handle``."""

    def clear_pending(self) -> None:
        """Called inside an input as it ends: drop an exception not yet delivered."""

    def shutdown(self) -> None:
        """Wait for running inputs, then release the backend's resources."""


class ThreadBackend:
    """Sync inputs on a pool of OS threads."""

    name = THREADS

    def __init__(self, slots: int) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=max(slots, 1), thread_name_prefix="concurrent-input"
        )

    def submit(self, fn: Callable[[], Any], on_done: OnDone) -> None:
        future: Future[Any] = self._executor.submit(fn)
        future.add_done_callback(lambda f: on_done(f.result))

    def handle(self) -> Any:
        return threading.get_ident()

    def raise_in(self, handle: Any, exc_type: type[BaseException]) -> None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(handle), ctypes.py_object(exc_type)
        )

    def clear_pending(self) -> None:
        while True:
            try:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(threading.get_ident()), ctypes.py_object()
                )
                return
            except BaseException:  # it fired while we were clearing it: clear again
                continue

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


class GeventBackend:
    """Sync inputs as gevent greenlets in a monkeypatched child."""

    name = GEVENT

    def __init__(self) -> None:
        import gevent

        self._gevent = gevent
        self._running: set[Any] = set()

    @staticmethod
    def patch() -> None:
        """Monkeypatch this (freshly forked) child; call before anything else runs in it."""
        from gevent import monkey

        with warnings.catch_warnings():
            # "ssl imported before patching": it was, in the parent, which stays unpatched;
            # the child's connections are all made after this point.
            warnings.simplefilter("ignore", monkey.MonkeyPatchWarning)
            monkey.patch_all()

    def submit(self, fn: Callable[[], Any], on_done: OnDone) -> None:
        glet = self._gevent.spawn(fn)
        self._running.add(glet)

        def ended(glet: Any) -> None:
            self._running.discard(glet)
            on_done(glet.get)

        glet.link(ended)

    def handle(self) -> Any:
        return self._gevent.getcurrent()

    def raise_in(self, handle: Any, exc_type: type[BaseException]) -> None:
        handle.kill(exc_type, block=False)

    def clear_pending(self) -> None:
        """A kill scheduled for a greenlet that has ended is a no-op in gevent."""

    def shutdown(self) -> None:
        self._gevent.joinall(list(self._running))


def make_backend(name: str, slots: int) -> SyncBackend:
    """The backend ``name`` for a child with ``slots`` input slots."""
    if name == GEVENT:
        return GeventBackend()
    return ThreadBackend(slots)
