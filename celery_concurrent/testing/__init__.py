"""Helpers for tests, demos and benchmarks: real workers and a private Redis.

Not part of the runtime: a worker never imports this package.

- :class:`WorkerProcess`: a real ``celery worker`` subprocess.
- :mod:`celery_concurrent.testing.devserver`: a throwaway Redis-compatible server
  (``python -m celery_concurrent.testing.devserver -- CMD``).
- :mod:`celery_concurrent.testing.pytest_celery`: pytest-celery's Docker worker on
  ConcurrentPool (extra ``pytest-celery``; import it explicitly).
"""

from __future__ import annotations

from .worker import WorkerProcess

__all__ = ["WorkerProcess"]
