"""A local HTTP server with injected latency, the far end of the ``http`` scenario.

    python -m bench.httpserver [--port 0]

``GET /delay?ms=100`` answers ``ok`` after 100 ms (``asyncio.sleep``: the server is never the
bottleneck). Prints ``listening on PORT`` once it accepts connections and runs until SIGTERM
or SIGINT. No access log. :class:`HttpServer` runs it as a subprocess for the harness.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from aiohttp import web

READY_PREFIX = "listening on "
ROOT = Path(__file__).resolve().parent.parent


async def delay(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("ms", "0")) / 1000)
    return web.Response(text="ok")


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_get("/delay", delay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    print(f"{READY_PREFIX}{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


class HttpServer:
    """``python -m bench.httpserver`` as a subprocess on a free port."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.httpserver", "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise RuntimeError(f"bench.httpserver did not start: {line!r}")
        self.port = int(line[len(READY_PREFIX) :])

    def url(self, delay_s: float) -> str:
        return f"http://127.0.0.1:{self.port}/delay?ms={round(delay_s * 1000)}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
