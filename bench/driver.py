"""The producer of one system: enqueues a burst of inputs and collects what they returned.

    python -m bench.driver --kind celery-stock|celery-concurrent|arq|taskiq --queue Q --redis URL

A long-lived subprocess per system, so each system's client runs in its own interpreter
(arq's needs ``redis<6``; see :mod:`bench.tasks_arq`) and all producers cost the same kind
of CPU. It speaks JSON lines: reads ``{"op": "run", "task": NAME, "args": [...], "n": N,
"timeout_s": T}`` (optionally ``"t0": EPOCH, "offsets": [...]``: send input ``i`` at
``t0 + offsets[i]``, or at once when behind; Celery clients only) or ``{"op": "quit"}`` on
stdin, and writes ``{"ready": true}`` once,
``{"done": K}`` while a burst completes, then ``{"result": {...}}`` per run with, for each
input in send order, its enqueue time and the ``start``/``end`` it returned.

Sending is as fast as each client allows: Celery publishes on one producer (kombu has no
batch publish), arq and taskiq enqueue up to :data:`SEND_CONCURRENCY` inputs at once on
their asyncio clients. Completion is read straight from the result keys in Redis (one
``MGET`` of the pending keys every :data:`POLL_S`), the same for every system; the figures
use the timestamps the inputs return, not when the driver noticed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis

POLL_S = 0.2
PROGRESS_S = 0.5
KEY_CHUNK = 2000
SEND_CONCURRENCY = 50
MAX_ERRORS_KEPT = 5

Outcome = tuple[bool, Any]  # (succeeded, returned value or error text)


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Client:
    """How one system sends inputs and where it stores their results."""

    def __init__(self, redis_url: str, queue: str) -> None:
        self.redis_url = redis_url
        self.queue = queue
        self.loop = asyncio.new_event_loop()

    def send_all(self, task: str, args: Sequence[Any], ids: Sequence[str]) -> list[float]:
        """Enqueue one input per id; return each one's enqueue time (``time.time()``)."""
        raise NotImplementedError

    def send_scheduled(
        self,
        task: str,
        args: Sequence[Any],
        ids: Sequence[str],
        t0: float,
        offsets: Sequence[float],
    ) -> tuple[list[float], float]:
        """Send input ``i`` at ``t0 + offsets[i]``; enqueue times and the worst lag (s)."""
        raise NotImplementedError(f"{type(self).__name__} cannot send on a schedule")

    def result_key(self, input_id: str) -> str:
        raise NotImplementedError

    def decode(self, raw: bytes) -> Outcome:
        raise NotImplementedError

    def new_id(self) -> str:
        return str(uuid.uuid4())

    def close(self) -> None:
        self.loop.close()


class CeleryClient(Client):
    def __init__(self, redis_url: str, queue: str, app_name: str) -> None:
        super().__init__(redis_url, queue)
        import os

        os.environ["BENCH_REDIS_URL"] = redis_url
        os.environ["BENCH_QUEUE"] = queue
        from bench import tasks_celery

        self.app = getattr(tasks_celery, app_name)
        self.prefix = f"bench.{app_name}."
        self.backend = self.app.backend

    def send_all(self, task: str, args: Sequence[Any], ids: Sequence[str]) -> list[float]:
        times: list[float] = []
        name = self.prefix + task
        with self.app.producer_or_acquire() as producer:
            for input_id in ids:
                times.append(time.time())
                self.app.send_task(
                    name, tuple(args), task_id=input_id, queue=self.queue, producer=producer
                )
        return times

    def send_scheduled(
        self,
        task: str,
        args: Sequence[Any],
        ids: Sequence[str],
        t0: float,
        offsets: Sequence[float],
    ) -> tuple[list[float], float]:
        times: list[float] = []
        behind_s = 0.0
        name = self.prefix + task
        with self.app.producer_or_acquire() as producer:
            for input_id, offset in zip(ids, offsets, strict=True):
                wait_s = t0 + offset - time.time()
                if wait_s > 0:
                    time.sleep(wait_s)
                else:
                    behind_s = max(behind_s, -wait_s)
                times.append(time.time())
                self.app.send_task(
                    name, tuple(args), task_id=input_id, queue=self.queue, producer=producer
                )
        return times, behind_s

    def result_key(self, input_id: str) -> str:
        key = self.backend.get_key_for_task(input_id)
        return key.decode() if isinstance(key, bytes) else str(key)

    def decode(self, raw: bytes) -> Outcome:
        meta = json.loads(raw)
        if meta.get("status") == "SUCCESS":
            return True, meta.get("result")
        return False, f"{meta.get('status')}: {meta.get('result')}"


class _AsyncClient(Client):
    async def _send_one(self, task: str, args: Sequence[Any], input_id: str) -> None:
        raise NotImplementedError

    def send_all(self, task: str, args: Sequence[Any], ids: Sequence[str]) -> list[float]:
        times = [0.0] * len(ids)
        gate = asyncio.Semaphore(SEND_CONCURRENCY)

        async def one(index: int, input_id: str) -> None:
            async with gate:
                times[index] = time.time()
                await self._send_one(task, args, input_id)

        async def every() -> None:
            await asyncio.gather(*(one(i, input_id) for i, input_id in enumerate(ids)))

        self.loop.run_until_complete(every())
        return times


class ArqClient(_AsyncClient):
    def __init__(self, redis_url: str, queue: str) -> None:
        super().__init__(redis_url, queue)
        from arq.connections import RedisSettings, create_pool

        self.pool = self.loop.run_until_complete(
            create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=queue)
        )

    async def _send_one(self, task: str, args: Sequence[Any], input_id: str) -> None:
        job = await self.pool.enqueue_job(task, *args, _job_id=input_id, _queue_name=self.queue)
        if job is None:
            raise RuntimeError(f"arq refused job {input_id}: the id is already in use")

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def result_key(self, input_id: str) -> str:
        from arq.constants import result_key_prefix

        return result_key_prefix + input_id

    def decode(self, raw: bytes) -> Outcome:
        from arq.jobs import deserialize_result

        result = deserialize_result(raw)
        return (True, result.result) if result.success else (False, repr(result.result))

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.aclose())
        super().close()


class TaskiqClient(_AsyncClient):
    def __init__(self, redis_url: str, queue: str) -> None:
        super().__init__(redis_url, queue)
        import os

        os.environ["BENCH_REDIS_URL"] = redis_url
        os.environ["BENCH_QUEUE"] = queue
        from bench import tasks_taskiq

        self.module = tasks_taskiq
        self.loop.run_until_complete(tasks_taskiq.broker.startup())

    async def _send_one(self, task: str, args: Sequence[Any], input_id: str) -> None:
        decorated = getattr(self.module, task)
        await decorated.kicker().with_task_id(input_id).kiq(*args)

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def result_key(self, input_id: str) -> str:
        return f"{self.queue}:{input_id}"

    def decode(self, raw: bytes) -> Outcome:
        backend = self.module.broker.result_backend
        data = backend.serializer.loadb(raw)
        if data.get("is_err"):
            return False, str(data.get("error"))
        return True, data.get("return_value")

    def close(self) -> None:
        self.loop.run_until_complete(self.module.broker.shutdown())
        super().close()


def make_client(kind: str, redis_url: str, queue: str) -> Client:
    if kind == "celery-stock":
        return CeleryClient(redis_url, queue, "stock")
    if kind == "celery-concurrent":
        return CeleryClient(redis_url, queue, "concurrent")
    if kind == "arq":
        return ArqClient(redis_url, queue)
    if kind == "taskiq":
        return TaskiqClient(redis_url, queue)
    raise ValueError(
        f"unknown driver kind {kind!r}: use celery-stock, celery-concurrent, arq or taskiq"
    )


def collect(
    client: Client, store: redis.Redis[bytes], ids: Sequence[str], timeout_s: float
) -> tuple[list[Outcome | None], int]:
    """Wait until every input's result key exists (or ``timeout_s``); delete the keys."""
    keys = [client.result_key(i) for i in ids]
    outcomes: list[Outcome | None] = [None] * len(ids)
    pending = list(range(len(ids)))
    deadline = time.monotonic() + timeout_s
    last_progress = 0.0
    while pending and time.monotonic() < deadline:
        still: list[int] = []
        for start in range(0, len(pending), KEY_CHUNK):
            chunk = pending[start : start + KEY_CHUNK]
            values = store.mget([keys[i] for i in chunk])
            for index, raw in zip(chunk, values, strict=True):
                if raw is None:
                    still.append(index)
                else:
                    outcomes[index] = client.decode(raw)
        pending = still
        now = time.monotonic()
        if now - last_progress >= PROGRESS_S:
            emit({"done": len(ids) - len(pending)})
            last_progress = now
        if pending:
            time.sleep(POLL_S)
    for start in range(0, len(keys), KEY_CHUNK):
        store.delete(*keys[start : start + KEY_CHUNK])
    return outcomes, len(pending)


def run(client: Client, store: redis.Redis[bytes], command: dict[str, Any]) -> dict[str, Any]:
    n = int(command["n"])
    ids = [client.new_id() for _ in range(n)]
    args = command.get("args", [])
    behind_s = 0.0
    if "offsets" in command:
        offsets = [float(o) for o in command["offsets"]]
        enqueued, behind_s = client.send_scheduled(
            command["task"], args, ids, float(command["t0"]), offsets
        )
    else:
        enqueued = client.send_all(command["task"], args, ids)
    outcomes, timed_out = collect(client, store, ids, float(command.get("timeout_s", 300)))
    start: list[float | None] = []
    end: list[float | None] = []
    errors: list[str] = []
    error_count = 0
    for outcome in outcomes:
        value = outcome[1] if outcome is not None and outcome[0] else None
        if isinstance(value, dict) and "end" in value:
            start.append(float(value["start"]))
            end.append(float(value["end"]))
            continue
        start.append(None)
        end.append(None)
        if outcome is not None:
            error_count += 1
            if len(errors) < MAX_ERRORS_KEPT:
                errors.append(str(outcome[1])[:300])
    return {
        "enqueued": enqueued,
        "start": start,
        "end": end,
        "errors": errors,
        "error_count": error_count,
        "timed_out": timed_out,
        "behind_s": behind_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--redis", required=True)
    args = parser.parse_args(argv)
    client = make_client(args.kind, args.redis, args.queue)
    store = redis.Redis.from_url(args.redis)
    try:
        emit({"ready": True})
        for line in sys.stdin:
            command = json.loads(line)
            if command.get("op") == "quit":
                break
            emit({"result": run(client, store, command)})
    finally:
        store.close()
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
