"""Messages between the pool (parent) and its children, framed over pipes.

Each frame is a 4-byte big-endian length followed by a pickled tuple whose first item
names the message. Parent to child: ``RUN``, ``CANCEL``, ``STOP``. Child to parent:
``READY``, ``ACCEPTED``, ``DONE``, ``DRAINING``.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any

__all__ = ["FrameReader", "encode", "write_all"]

RUN = "run"  # (RUN, job_id, target, args, soft_timeout_s, timeout_s)
CANCEL = "cancel"  # (CANCEL, job_id, signum)
STOP = "stop"  # (STOP,): finish what is in flight, take nothing new, exit
READY = "ready"  # (READY, pid)
DRAINING = "draining"  # (DRAINING, pid): the child was told to stop by a signal
ACCEPTED = "accepted"  # (ACCEPTED, job_id, pid, monotonic_time)
DONE = "done"  # (DONE, job_id, (failed, retval, runtime))

_HEADER = struct.Struct(">I")


def encode(message: tuple[Any, ...]) -> bytes:
    """One frame for ``message``."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def write_all(fd: int, data: bytes) -> None:
    """Write every byte to a blocking file descriptor."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FrameReader:
    """Accumulates bytes read from a pipe and yields the complete messages."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Any, ...]]:
        """Add ``data``; return every message now complete, in order."""
        buffer = self._buffer
        buffer += data
        messages: list[tuple[Any, ...]] = []
        offset = 0
        header_size = _HEADER.size
        while len(buffer) - offset >= header_size:
            (size,) = _HEADER.unpack_from(buffer, offset)
            end = offset + header_size + size
            if len(buffer) < end:
                break
            messages.append(pickle.loads(buffer[offset + header_size : end]))
            offset = end
        if offset:
            del buffer[:offset]
        return messages
