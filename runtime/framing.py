"""Length-prefixed frames on a byte stream, sans-I/O.

Wire form: every frame is ::

    frame = length (u32, big-endian: the payload's byte length, 0 .. max_frame_bytes)
          | payload (length bytes)

A TCP connection carries a sequence of frames and nothing else. `FrameDecoder` turns
arbitrarily chunked bytes back into those frames; it touches no socket, so it is tested
with plain bytes. The limit is checked as soon as the 4 length bytes are in, before any
of the payload is buffered: a peer announcing a 4 GiB frame costs us 4 bytes, not 4 GiB.
After an oversized length the stream has lost its framing for good (we cannot know where
the next frame would start), so the decoder stays failed and the connection must close.

The limit is mutable (`max_frame_bytes`) because one connection uses two: a small one for
the handshake and MAX_FRAME_BYTES after it. Frames are parsed lazily (`next_frame`), so a
frame is always checked against the limit in force when it is parsed.
"""

from __future__ import annotations

import struct
from typing import Final

from pbft.codec import MAX_FRAME_BYTES

__all__ = [
    "FRAME_HEADER_SIZE",
    "MAX_FRAME_BYTES",
    "FrameDecoder",
    "FramingError",
    "encode_frame",
]

_HEADER: Final = struct.Struct(">I")
FRAME_HEADER_SIZE: Final = _HEADER.size  # 4
_MAX_LENGTH_FIELD: Final = 2**32 - 1


class FramingError(Exception):
    """A peer broke the framing (an oversized length). `reason` is a short code for counters."""

    def __init__(self, reason: str, length: int, maximum: int) -> None:
        super().__init__(f"{reason}: frame length {length} exceeds {maximum} bytes")
        self.reason = reason
        self.length = length
        self.maximum = maximum


def _check_limit(max_frame_bytes: object) -> int:
    if isinstance(max_frame_bytes, bool) or not isinstance(max_frame_bytes, int):
        raise TypeError(f"max_frame_bytes must be an int, not {type(max_frame_bytes).__name__}")
    if not 0 <= max_frame_bytes <= _MAX_LENGTH_FIELD:
        raise ValueError(f"max_frame_bytes must be in 0..2**32-1, got {max_frame_bytes}")
    return max_frame_bytes


def encode_frame(payload: bytes, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """The frame carrying `payload`. Our own payloads are bounded, so a bigger one is a bug."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    length = len(payload)
    if length > _check_limit(max_frame_bytes):
        raise ValueError(f"payload of {length} bytes exceeds the frame limit {max_frame_bytes}")
    return _HEADER.pack(length) + bytes(payload)


def frame_header(length: int) -> bytes:
    """The 4 length bytes alone, for writing a large payload without copying it."""
    return _HEADER.pack(length)


class FrameDecoder:
    """Feed it bytes as they arrive; get back every frame completed so far, in order.

    Memory: at most one incomplete frame (its header and up to `max_frame_bytes` of payload)
    plus whatever one `append` brought in beyond it.
    """

    __slots__ = ("_buffer", "_failed", "_max_frame_bytes", "_start")

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._max_frame_bytes = _check_limit(max_frame_bytes)
        self._buffer = bytearray()
        self._start = 0  # bytes of _buffer already handed out as frames
        self._failed: FramingError | None = None

    @property
    def max_frame_bytes(self) -> int:
        return self._max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        self._max_frame_bytes = _check_limit(value)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (0: we are at a frame boundary)."""
        return len(self._buffer) - self._start

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer `data`; nothing is parsed until `next_frame`."""
        if self._failed is not None:
            raise self._failed
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete frame's payload, or None if it has not fully arrived yet.

        Raises FramingError (and stays failed) if the next frame's length exceeds the limit.
        """
        if self._failed is not None:
            raise self._failed
        available = len(self._buffer) - self._start
        if available < FRAME_HEADER_SIZE:
            self._compact()
            return None
        (length,) = _HEADER.unpack_from(self._buffer, self._start)
        if length > self._max_frame_bytes:
            self._failed = FramingError("oversize_frame", length, self._max_frame_bytes)
            raise self._failed
        end = self._start + FRAME_HEADER_SIZE + length
        if end > len(self._buffer):
            self._compact()
            return None
        with memoryview(self._buffer) as view:
            frame = bytes(view[self._start + FRAME_HEADER_SIZE : end])
        self._start = end
        return frame

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """`append(data)`, then every frame now complete, in order (maybe none)."""
        self.append(data)
        return list(iter(self.next_frame, None))

    def _compact(self) -> None:
        # Once per incomplete read, not once per frame: a burst of small frames is not
        # quadratic, and a large frame arriving in chunks is never moved while it grows.
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
