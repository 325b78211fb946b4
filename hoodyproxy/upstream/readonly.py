"""Read-only WebSockets: the container's messages reach the client, the client's do not.

A WebSocket allowed only at a read-only level (``view``, ``read``) is still a byte
tunnel from the container to the client, but what the client sends is parsed into
frames with autobahn's parser (its ``processData``; no hand-written framing here):
control frames (ping, pong, close) pass to the container, re-framed and masked; the
first data frame (text, binary or continuation) closes the connection with 1008
(policy violation) and never reaches the container.
"""

from __future__ import annotations

import os
import struct
from typing import Callable

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

POLICY_VIOLATION = 1008
#: Largest control frame payload (RFC 6455 5.5) and the most buffered while parsing.
MAX_BUFFER = 64 * 1024


class _ClientFrames(WebSocketServerProtocol):
    """autobahn's frame parser, fed the client's bytes after the upgrade, never a transport."""

    def __init__(self, on_control: Callable[[int, bool, bytes], None], on_data_frame: Callable[[], None]) -> None:
        super().__init__()
        self.factory = _FACTORY
        self.on_control = on_control
        self.on_data_frame = on_data_frame
        self.data = b""
        self.current_frame = None
        self.inside_message = False
        self._perMessageCompress = None
        self.requireMaskedClientFrames = True
        self.applyMask = True
        self.violated = False
        self._control: list[bytes] = []

    def _protocol_violation(self, reason) -> bool:
        self.violated = True
        self.on_data_frame()
        return False

    def feed(self, data: bytes) -> None:
        if self.violated:
            return
        self.data += data
        if len(self.data) > MAX_BUFFER:
            self._protocol_violation("too much buffered")
            return
        while not self.violated and self.processData():
            pass

    def onFrameBegin(self) -> None:
        if self.current_frame.opcode <= 7:
            self.violated = True
            self.on_data_frame()
        self._control = []

    def onFrameData(self, payload: bytes):
        if self.violated:
            return False
        self._control.append(payload)
        return None

    def onFrameEnd(self):
        if self.violated:
            return False
        frame = self.current_frame
        self.current_frame = None
        self.on_control(frame.opcode, frame.fin, b"".join(self._control))
        self._control = []
        return None


_FACTORY = WebSocketServerFactory()


def masked_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client-to-server frame (masked, as RFC 6455 requires of clients)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def close_frame(code: int, reason: bytes = b"") -> bytes:
    """A server-to-client close frame (unmasked)."""
    payload = struct.pack("!H", code) + reason[:123]
    return bytes([0x88, len(payload)]) + payload


class ReadOnlyClientSide:
    """Sits between the client's bytes and the upstream: passes control frames, stops data."""

    def __init__(self, forward: Callable[[bytes], None], violation: Callable[[], None]) -> None:
        self.forward = forward
        self.violation = violation
        self.parser = _ClientFrames(self._control, self._data_frame)
        self.closed = False

    def feed(self, data: bytes) -> None:
        self.parser.feed(data)

    def _control(self, opcode: int, fin: bool, payload: bytes) -> None:
        if not self.closed:
            self.forward(masked_frame(opcode, payload, fin))

    def _data_frame(self) -> None:
        if not self.closed:
            self.closed = True
            self.violation()
