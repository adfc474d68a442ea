"""Messages between the pool (parent) and its children, framed over pipes.

Each frame is a 4-byte big-endian length followed by one pickled tuple whose first item
names the message; a message is pickled once, where it is made.

Parent to child: ``RUN``, ``CANCEL``, ``STOP``. Child to parent: ``READY``, ``INIT_FAILED``,
``ACCEPTED``, ``DONE``, ``DRAINING``. A child writes ``ACCEPTED`` for an input to the pipe
*before* the input starts, so the parent knows for certain which inputs never started.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections import deque
from typing import Any

__all__ = ["FrameReader", "Outbox", "encode", "write_all"]

RUN = "run"  # (RUN, job_id, target, args, soft_timeout_s, timeout_s)
CANCEL = "cancel"  # (CANCEL, job_id, signum)
STOP = "stop"  # (STOP,): finish what is in flight, take nothing new, exit
READY = "ready"  # (READY, pid)
INIT_FAILED = "init-failed"  # (INIT_FAILED, pid, traceback_text): the child exits next
DRAINING = "draining"  # (DRAINING, pid, reason): the child stops taking inputs on its own
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


class Outbox:
    """Frames waiting to be written to a non-blocking pipe, in order.

    ``write_some`` writes what the pipe takes now and never blocks. Input frames carry a
    tag (the job id) so that :meth:`discard_unstarted` can drop those whose first byte has
    not been written; a frame already partly written must be finished, or the stream would
    lose its framing.
    """

    __slots__ = ("_frames", "_offset", "pending_bytes")

    def __init__(self) -> None:
        self._frames: deque[tuple[bytes, Any]] = deque()
        self._offset = 0  # bytes of the first frame already written
        self.pending_bytes = 0

    def __len__(self) -> int:
        return len(self._frames)

    def append(self, frame: bytes, tag: Any = None) -> None:
        self._frames.append((frame, tag))
        self.pending_bytes += len(frame)

    def write_some(self, fd: int) -> bool:
        """Write as much as the pipe takes; True when everything is written.

        Raises:
            OSError: the pipe is broken (the child is gone).
        """
        frames = self._frames
        while frames:
            frame = frames[0][0]
            try:
                written = os.write(fd, memoryview(frame)[self._offset :])
            except BlockingIOError:
                return False
            self._offset += written
            self.pending_bytes -= written
            if self._offset < len(frame):
                return False
            frames.popleft()
            self._offset = 0
        return True

    def discard_unstarted(self) -> list[Any]:
        """Drop the tagged frames not yet begun (untagged ones stay); return their tags."""
        kept: deque[tuple[bytes, Any]] = deque()
        dropped: list[Any] = []
        for position, (frame, tag) in enumerate(self._frames):
            begun = position == 0 and self._offset > 0
            if tag is None or begun:
                kept.append((frame, tag))
            else:
                dropped.append(tag)
                self.pending_bytes -= len(frame)
        self._frames = kept
        return dropped


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
