"""The broker goes away: connections killed, the server restarted (Redis and RabbitMQ)."""

from __future__ import annotations

import pytest

from . import scenarios

pytestmark = pytest.mark.reliability


@pytest.mark.timeout(120)
def test_connection_loss_redelivers_waiting_inputs_once_and_keeps_consuming(harness, private_redis):
    out = scenarios.connection_loss(harness(broker_url=private_redis.url), private_redis)
    print(out)
    assert out.figures["reserved_at_kill"] >= 15
    assert {n: (i.state, i.executions) for n, i in out.inputs.items()} == {
        n: ("SUCCESS", 1) for n in out.inputs
    }  # includes the three sent after the reconnect


def _check_restart(out):
    assert not out.lost, f"never reached a final state: {out.lost}"
    assert all(i.state == "SUCCESS" for i in out.inputs.values()), out.states()
    twice_early = [n for n in out.twice if n.startswith("early")]
    assert not twice_early, f"early-ack inputs that ran twice: {twice_early}"
    print(f"acks_late inputs run twice: {[n for n in out.twice if n.startswith('late')]}")


@pytest.mark.timeout(180)
def test_redis_restart_loses_nothing(harness, private_redis):
    out = scenarios.broker_restart(harness(broker_url=private_redis.url), private_redis)
    print(out)
    _check_restart(out)


@pytest.mark.amqp
@pytest.mark.timeout(240)
def test_rabbitmq_restart_loses_nothing(harness, private_rabbit):
    out = scenarios.broker_restart(harness(broker_url=private_rabbit.url), private_rabbit)
    print(out)
    _check_restart(out)


@pytest.mark.timeout(120)
def test_cancel_on_connection_loss_redelivers_running_acks_late_inputs_once(harness, private_redis):
    h = harness(broker_url=private_redis.url)
    out = scenarios.cancel_on_connection_loss(h, private_redis)
    print(out)
    assert {n: (i.state, i.executions) for n, i in out.inputs.items()} == {
        n: ("SUCCESS", 2) for n in out.inputs
    }
