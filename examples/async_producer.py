"""A web service that sends tasks and awaits their results without blocking its loop.

The handlers are what a FastAPI or aiohttp endpoint would be: two awaits, ``adelay`` to send
and ``aget`` to wait. The server around them is the standard library's asyncio streams, so
the example runs without a web framework::

    REDIS_URL=redis://127.0.0.1:6379/0 celery -A examples.app worker        # the worker
    REDIS_URL=redis://127.0.0.1:6379/0 python -m examples.async_producer    # this service
    curl 'http://127.0.0.1:8080/fetch?delay_s=0.2'
    curl 'http://127.0.0.1:8080/fan-out?n=50&delay_s=0.2'

The same handler in FastAPI::

    @api.get("/fetch")
    async def fetch_endpoint(delay_s: float = 0.1) -> dict:
        result = await fetch.adelay(delay_s)
        return await result.aget(timeout=10)
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from celery import group
from celery.exceptions import TimeoutError as CeleryTimeoutError

from examples.app import fetch

RESULT_TIMEOUT_S = 10.0

Handler = Callable[[dict[str, str]], Awaitable[Any]]


async def fetch_endpoint(query: dict[str, str]) -> dict[str, Any]:
    """``GET /fetch?delay_s=0.1``: one task, its result as the response."""
    result = await fetch.adelay(float(query.get("delay_s", 0.1)))
    value: dict[str, Any] = await result.aget(timeout=RESULT_TIMEOUT_S)
    return {"task_id": result.id, "result": value}


async def fan_out_endpoint(query: dict[str, str]) -> dict[str, Any]:
    """``GET /fan-out?n=10&delay_s=0.1``: a group of tasks, awaited together."""
    n, delay_s = int(query.get("n", 10)), float(query.get("delay_s", 0.1))
    results = await group(fetch.s(delay_s) for _ in range(n)).aapply_async()
    values = await results.aget(timeout=RESULT_TIMEOUT_S)
    return {"group_id": results.id, "count": len(values), "ids": [v["id"] for v in values]}


ROUTES: dict[str, Handler] = {"/fetch": fetch_endpoint, "/fan-out": fan_out_endpoint}


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP/1.1 request per connection: route it, answer in JSON."""
    try:
        request_line = (await reader.readline()).decode("latin-1").split()
        while (await reader.readline()).strip():  # headers: not needed here
            pass
        status, body = await _dispatch(request_line)
        payload = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()


async def _dispatch(request_line: list[str]) -> tuple[str, Any]:
    if len(request_line) != 3 or request_line[0] != "GET":
        return "405 Method Not Allowed", {"error": "only GET"}
    url = urlsplit(request_line[1])
    handler = ROUTES.get(url.path)
    if handler is None:
        return "404 Not Found", {"error": f"no route {url.path}", "routes": sorted(ROUTES)}
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    try:
        return "200 OK", await handler(query)
    except CeleryTimeoutError as exc:
        return "504 Gateway Timeout", {"error": str(exc)}
    except Exception as exc:  # the task's own exception, re-raised by aget
        return "502 Bad Gateway", {"error": f"{type(exc).__name__}: {exc}"}


async def serve(host: str = "127.0.0.1", port: int = 8080) -> asyncio.Server:
    """Start the service; ``port=0`` picks a free port (see ``server.sockets``)."""
    return await asyncio.start_server(handle, host, port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()

    async def run() -> None:
        server = await serve(args.host, args.port)
        print(f"listening on http://{args.host}:{server.sockets[0].getsockname()[1]}")
        async with server:
            await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
