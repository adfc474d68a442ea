"""Fixtures for the reliability suite: a scenario harness and private brokers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import BrokerUnavailable, Harness, PrivateRabbit, PrivateRedisServer


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """Factory: ``harness(pool="concurrent", broker_url=None, env=None)``; all killed after."""
    made: list[Harness] = []

    def make(
        pool: str = "concurrent",
        broker_url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Harness:
        h = Harness(pool, broker_url=broker_url, log_dir=tmp_path, env=env)
        made.append(h)
        return h

    yield make
    for h in made:
        for worker in h.workers:  # shown by pytest when the test fails
            print(f"--- {worker.hostname} ({worker.handle.log_path}):\n{worker.handle.tail(80)}")
        h.close()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedisServer]:
    """A private redis-server (appendonly yes) on a free port; killed at teardown."""
    try:
        server = PrivateRedisServer().start()
    except BrokerUnavailable as exc:
        pytest.skip(str(exc))
    yield server
    server.close()


@pytest.fixture(scope="session")
def private_rabbit() -> Iterator[PrivateRabbit]:
    """A private RabbitMQ node; skipped when RabbitMQ is absent unless REQUIRE_AMQP=1."""
    try:
        node = PrivateRabbit().start()
    except BrokerUnavailable as exc:
        if os.environ.get("REQUIRE_AMQP") == "1":
            pytest.fail(f"{exc}; REQUIRE_AMQP=1 needs it (apt-get install rabbitmq-server)")
        pytest.skip(f"{exc} (set REQUIRE_AMQP=1 to fail instead)")
    yield node
    node.close()
