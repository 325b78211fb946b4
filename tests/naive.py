"""A container stand-in as naive as the small servers real containers run.

It is what the gateway must protect, so it trusts everything it reads:

- it parses pipelined requests one after another from the same byte stream;
- it never reads a body on ``GET``, ``HEAD`` or ``OPTIONS`` (like Python's
  ``http.server`` and many small servers), so such a body is parsed as the next request;
- for a WebSocket upgrade it answers ``101`` and reads WebSocket frames from the first
  byte after the request head (a body sent with the upgrade becomes frames);
- it answers every request ``200`` with a small JSON body naming the request line, in
  order; a request whose target contains ``delay`` is answered 1.5 seconds later (a
  slow handler), and the requests after it wait their turn.

Every request line and every WebSocket message it received is recorded, so a test can
say exactly what reached the container.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_NO_BODY = (b"GET", b"HEAD", b"OPTIONS")


class NaiveServer(Protocol):
    """One connection: HTTP/1.1 requests, then WebSocket frames after an upgrade."""

    def connectionMade(self) -> None:
        self.buffer = b""
        self.websocket = False
        self.busy = False
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer and not self.busy:
            if self.websocket:
                if not self._frame():
                    return
            elif not self._request():
                return

    def _request(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head, rest = self.buffer[:end], self.buffer[end + 4:]
        lines = head.split(b"\r\n")
        request_line = lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        method = request_line.split(b" ", 1)[0]
        body = b""
        if method not in _NO_BODY:
            length = int(headers.get(b"content-length", b"0") or 0)
            if len(rest) < length:
                return False
            body, rest = rest[:length], rest[length:]
        self.buffer = rest
        self.factory.requests.append(request_line)
        self.factory.bodies.append(body)
        if headers.get(b"upgrade", b"").lower() == b"websocket":
            accept = base64.b64encode(hashlib.sha1(headers.get(b"sec-websocket-key", b"") + _WS_GUID).digest())
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.websocket = True
            return True
        answer = json.dumps({"request": request_line.decode("latin-1")}).encode()
        response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(answer) + answer)
        if b"delay" in request_line:
            self.busy = True
            reactor.callLater(1.5, self._answer_late, response)
            return False
        self.transport.write(response)
        return True

    def _answer_late(self, response: bytes) -> None:
        self.busy = False
        if self.transport is not None and self.connected:
            self.transport.write(response)
            self.dataReceived(b"")

    def _frame(self) -> bool:
        buf = self.buffer
        if len(buf) < 2:
            return False
        opcode, second = buf[0] & 0x0F, buf[1]
        masked, n, pos = second & 0x80, second & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return False
            n, pos = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                return False
            n, pos = struct.unpack("!Q", buf[2:10])[0], 10
        mask = b""
        if masked:
            mask, pos = buf[pos:pos + 4], pos + 4
        if len(buf) < pos + n:
            return False
        payload = buf[pos:pos + n]
        if masked:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.buffer = buf[pos + n:]
        if opcode in (1, 2):
            self.factory.messages.append(payload)
        elif opcode == 8:
            self.factory.closes.append(payload)
        return True


class NaiveContainer:
    """A listening :class:`NaiveServer` on loopback, stopped by the test that made it."""

    def __init__(self, case) -> None:
        factory = Factory.forProtocol(NaiveServer)
        factory.connections = []
        factory.requests = []
        factory.bodies = []
        factory.messages = []
        factory.closes = []
        self.factory = factory
        self.listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port

        def stop():
            for conn in factory.connections:
                if conn.transport is not None:
                    conn.transport.abortConnection()
            return self.listening.stopListening()
        case.addCleanup(stop)

    @property
    def requests(self) -> list[bytes]:
        """Every request line received, in order."""
        return self.factory.requests

    @property
    def closes(self) -> list[bytes]:
        """The payload of every WebSocket close frame received from the client side."""
        return self.factory.closes

    @property
    def messages(self) -> list[bytes]:
        """Every WebSocket data message received from the client side."""
        return self.factory.messages

    def received(self, fragment: bytes) -> bool:
        """True if any request line received contains ``fragment``."""
        return any(fragment in line for line in self.factory.requests)
