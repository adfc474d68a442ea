"""Inputs parked behind their own task's cap, and handing the excess back to the queue.

An input is *parked* when it waits in the parent only because its task is at ``max_inputs``
in every child while other tasks could still start. Up to ``concurrent_max_parked`` parked
inputs per worker hold no prefetch (:mod:`celery_concurrent.prefetch`), so the worker keeps
fetching for the other tasks. A parked input beyond that bound goes back to the broker, at
the back of its queue, where a second worker (or this one, later) takes it:

- Redis: ``reject(requeue=True)``, which kombu pushes to the end of the list that is
  consumed last (the message and its delivery tag are kombu's own; nothing is copied);
- RabbitMQ: a requeued message returns to the *head* of its queue and would be delivered
  straight back, so the message is published again, unchanged, to the same exchange and
  routing key, then the original is acknowledged. A worker that dies between the two steps
  leaves both copies: that window is microseconds on loopback and is documented.

After handing back several in a row with nothing started in between, the pool fetches
nothing more until an input ends (:attr:`ConcurrentPool.holding`), so a queue holding only
a saturated task's inputs does not spin through the broker.
"""

from __future__ import annotations

from typing import Any

from celery.utils.log import get_logger
from celery.worker import state as worker_state

from .job import Job

__all__ = ["return_to_queue"]

logger = get_logger(__name__)


def return_to_queue(job: Job, app: Any) -> bool:
    """Hand ``job``'s message back to the end of its queue; False if it could not be."""
    request = job.request
    message = getattr(request, "message", None)
    if request is None or message is None or getattr(request, "acknowledged", False):
        return False
    try:
        if message.channel.connection.client.transport.driver_type == "redis":
            request.reject(requeue=True)
        else:
            _publish_copy(message, app)
            request.acknowledge()
    except Exception as exc:  # keep it parked: it holds prefetch, but nothing is lost
        logger.warning("Could not hand %s back to its queue: %r", job.label, exc)
        return False
    worker_state.task_ready(request)
    job.finished = True
    return True


def _publish_copy(message: Any, app: Any) -> None:
    info = message.delivery_info or {}
    properties = dict(message.properties or {})
    properties.pop("delivery_info", None)
    properties.pop("delivery_tag", None)
    with app.producer_or_acquire() as producer:
        producer.publish(
            message.body,
            exchange=info.get("exchange", ""),
            routing_key=info.get("routing_key"),
            headers=message.headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            retry=True,
            **{k: v for k, v in properties.items() if k in _PUBLISH_PROPERTIES},
        )


_PUBLISH_PROPERTIES = frozenset(
    {"correlation_id", "reply_to", "delivery_mode", "priority", "expiration", "message_id"}
)
