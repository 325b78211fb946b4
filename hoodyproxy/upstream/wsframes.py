"""Where WebSocket frames end in a stream of bytes, without reading their payloads.

A tunnel relays bytes, not frames; to close a WebSocket itself (1001 when the node
drains) it must put its close frame between two frames, never inside one.  So each
direction's position is kept as a pair, updated for every piece relayed:

- ``need``: payload bytes of the current frame still to come (0: a header is next);
- ``head``: the bytes of a frame header received so far (at most 13).

``(0, b"")`` is a frame boundary.  :func:`scan` advances a position over a piece of data
and can stop at the first boundary in it.  Only headers are parsed (RFC 6455 5.2: two
bytes, a 16- or 64-bit extended length, a 4-byte mask); a long payload is skipped with
one subtraction.  Nothing is validated: a stream that is not WebSocket framing at all
only makes the tunnel wait for a boundary that never comes, which the drain's timeout
bounds.
"""

from __future__ import annotations

__all__ = ["BOUNDARY", "scan", "header_size"]

#: The position at a frame boundary (the start of a stream).
BOUNDARY: tuple[int, bytes] = (0, b"")
#: The longest frame header: 2 bytes, a 64-bit length, a mask.
MAX_HEADER = 14


def header_size(head: bytes) -> tuple[int, int] | None:
    """(header length, payload length) of the frame header ``head`` begins with, or
    None if ``head`` holds only part of it."""
    if len(head) < 2:
        return None
    second = head[1]
    length = second & 0x7F
    size = 2
    if length == 126:
        size = 4
    elif length == 127:
        size = 10
    if second & 0x80:
        size += 4
    if len(head) < size:
        return None
    if length == 126:
        length = int.from_bytes(head[2:4], "big")
    elif length == 127:
        length = int.from_bytes(head[2:10], "big")
    return size, length


def scan(need: int, head: bytes, data: bytes, until_boundary: bool = False) -> tuple[int, bytes, int]:
    """Advance the position ``(need, head)`` over ``data``.

    Returns ``(need, head, offset)``: the position after ``data[:offset]``, where offset
    is ``len(data)``, or -- with ``until_boundary`` -- the first offset at which the
    stream is at a frame boundary (0 when it is at one already; ``len(data)`` with a
    position that is not a boundary when there is none in ``data``).
    """
    pos, end = 0, len(data)
    while True:
        if need:
            left = end - pos
            if left <= need:
                return need - left, b"", end
            pos += need
            need = 0
        if until_boundary and not head:
            return 0, b"", pos
        if pos >= end:
            return 0, head, end
        chunk = head + data[pos:pos + MAX_HEADER - len(head)]
        parsed = header_size(chunk)
        if parsed is None:
            return 0, chunk, end
        size, need = parsed
        pos += size - len(head)
        head = b""
