"""Draining (hoodyproxy.drain): a stopping node takes no new connection and lets what is
in flight finish, on every protocol, then ends.

In-process nodes on loopback with real clients: raw HTTP/1.1 over TLS, an HTTP/2 client
that records the GOAWAY frames it gets, aioquic for HTTP/3, and a WebSocket to a naive
container.  The backend holds chosen requests until the test releases them, so "in
flight when the drain began" is a fact of the test, not a race.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import ssl
from unittest import skipIf

from aioquic.buffer import Buffer
from aioquic.h3.connection import FrameType
from aioquic.quic.events import StreamDataReceived
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.h2client import H2Client, h2_connect
from tests.load import NO_WRK, Wrk, load_config
from tests.naive import NaiveContainer
from tests.rawclient import tls_client
from tests.support import Backend, host_for, register, start_node, until
from tests.test_process import ProcessTestCase, count_lines, wait_until
from tests.test_sockets import DEMO_HOST

#: [drain] for these tests: WebSockets get half a second, everything else ten.
DRAIN = {"drain": {"websocket_grace": 0.5, "timeout": 10.0}}


async def within(d: defer.Deferred, timeout: float = 15.0):
    """``await d``, failing after ``timeout`` seconds."""
    return await d.addTimeout(timeout, reactor)


class Held(Resource):
    """``/hold`` is answered only when the test calls :meth:`release`; anything else at once."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held = []

    def render_GET(self, request):
        if request.path == b"/hold":
            self.held.append(request)
            return NOT_DONE_YET
        return b"ok"

    def release(self) -> None:
        held, self.held = self.held, []
        for request in held:
            if not request._disconnected:
                request.write(b"late")
                request.finish()


class _NodeWithHeldBackend:
    def node_and_backend(self, config=None):
        node = start_node(self, {**DRAIN, **(config or {})})
        resource = Held()
        backend = Backend(self, resource)
        register(node, backend.number)
        return node, resource, host_for(index=backend.number)


class HTTP1DrainTests(_NodeWithHeldBackend, unittest.TestCase):

    async def test_in_flight_answer_says_close_and_idle_keepalive_ends(self):
        """While the node drains: the answer in flight says ``Connection: close`` and the
        connection ends after it; an idle keep-alive connection ends; a new connection is
        refused; the drain is over when nothing is left."""
        node, backend, host = self.node_and_backend()
        busy = await tls_client(self, node.https_port, host, node.ca_path)
        busy.transport.write(b"GET /hold HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        idle = await tls_client(self, node.https_port, host, node.ca_path)
        idle.transport.write(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        await until(lambda: backend.held and idle.received.endswith(b"ok"))
        self.assertNotIn(b"connection: close", idle.head.lower())

        stopped = node.stopService()
        self.assertTrue(node.draining)
        await within(idle.closed)
        self.assertTrue(idle.received.endswith(b"ok"))  # (nothing more was written)
        with self.assertRaises(ConnectionRefusedError):
            await tls_client(self, node.https_port, host, node.ca_path)
        self.assertFalse(stopped.called)

        backend.release()
        await within(busy.closed)
        self.assertEqual(busy.status_line, b"HTTP/1.1 200 OK")
        self.assertIn(b"connection: close", busy.head.lower())
        self.assertIn(b"late", busy.body)
        await within(stopped)

    async def test_a_request_on_a_busy_connection_is_still_served(self):
        """A keep-alive connection whose next request arrives during the drain gets it
        answered, with ``Connection: close`` (the race an immediate close would lose)."""
        node, backend, host = self.node_and_backend()
        client = await tls_client(self, node.https_port, host, node.ca_path)
        client.transport.write(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        await until(lambda: client.received.endswith(b"ok"))
        stopped = node.stopService()
        client.received = b""
        client.transport.write(b"GET /again HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        await within(client.closed)
        self.assertEqual(client.status_line, b"HTTP/1.1 200 OK")
        self.assertIn(b"connection: close", client.head.lower())
        await within(stopped)

    async def test_timeout_cuts_what_is_left(self):
        """A request still unanswered at ``[drain] timeout`` is cut, and the node stops."""
        node, backend, host = self.node_and_backend({"drain": {"websocket_grace": 0.2, "timeout": 0.5}})
        client = await tls_client(self, node.https_port, host, node.ca_path)
        client.transport.write(b"GET /hold HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        await until(lambda: backend.held)
        await within(node.stopService())
        self.assertTrue(node.drainer.cut)
        await within(client.closed)
        self.assertEqual(client.received, b"")


class _GoawayRecorder(H2Client):
    """An HTTP/2 client that records GOAWAY frames and keeps its streams going after one
    (h2's client state machine closes at the first GOAWAY, so those frames are taken out
    before it sees them)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.goaways: list[tuple[int, int]] = []
        self._frames = b""

    def dataReceived(self, data: bytes) -> None:
        self._frames += data
        keep = b""
        while len(self._frames) >= 9:
            length = int.from_bytes(self._frames[:3], "big")
            if len(self._frames) < 9 + length:
                break
            frame, self._frames = self._frames[:9 + length], self._frames[9 + length:]
            if frame[3] == 0x7:
                self.goaways.append((int.from_bytes(frame[9:13], "big") & 0x7FFFFFFF,
                                     int.from_bytes(frame[13:17], "big")))
            else:
                keep += frame
        if keep:
            super().dataReceived(keep)


class HTTP2DrainTests(_NodeWithHeldBackend, unittest.TestCase):

    async def test_goaway_notice_then_last_stream_and_in_flight_finishes(self):
        """HTTP/2: GOAWAY(2^31-1, NO_ERROR) at once, then GOAWAY naming the last stream
        served; the stream in flight is answered, a stream opened after is refused
        (REFUSED_STREAM, safe to retry), and the connection ends."""
        node, backend, host = self.node_and_backend()
        client = await h2_connect(self, node, host, client_class=_GoawayRecorder)
        held = client.request(b"GET", b"/hold", host.encode())
        await until(lambda: backend.held)
        stopped = node.stopService()
        await until(lambda: len(client.goaways) == 2)
        self.assertEqual(client.goaways, [((1 << 31) - 1, 0), (held.id, 0)])
        late = client.request(b"GET", b"/", host.encode())
        await within(late.done)
        self.assertEqual(late.reset_code, 7)  # REFUSED_STREAM
        backend.release()
        await within(held.done)
        self.assertEqual((held.status, held.body), (200, b"late"))
        await within(client.closed)
        await within(stopped)


def _goaways(control: bytes) -> list[int]:
    """The identifiers of the GOAWAY frames in the bytes of an HTTP/3 control stream."""
    buf = Buffer(data=control)
    found = []
    try:
        if buf.pull_uint_var() != 0:  # (stream type: control)
            return []
        while not buf.eof():
            frame_type, length = buf.pull_uint_var(), buf.pull_uint_var()
            payload = buf.pull_bytes(length)
            if frame_type == FrameType.GOAWAY:
                found.append(Buffer(data=payload).pull_uint_var())
    except Exception:  # (a frame not all in yet)
        pass
    return found


class HTTP3DrainTests(_NodeWithHeldBackend, unittest.TestCase):

    async def test_goaway_notice_then_first_stream_not_served(self):
        """HTTP/3: a GOAWAY notice (2^62-4) on the control stream, then GOAWAY naming the
        first request stream not served; the request in flight is answered and the
        connection closes."""
        from tests import h3client

        goaways: list[int] = []

        class Recording(h3client._H3Client):
            """Reads the server's control stream itself: aioquic skips GOAWAY frames unread."""

            control = b""

            def handle_event(self, event):
                if isinstance(event, StreamDataReceived) and event.stream_id == 3:  # (the server's first uni stream)
                    self.control += event.data
                    goaways[:] = _goaways(self.control)
                return super().handle_event(event)

        node, backend, host = self.node_and_backend()
        self.patch(h3client, "_H3Client", Recording)
        client = await h3client.connect(self, reactor, node.https_port, server_name=host, ca_path=node.ca_path)
        held = client.request("GET", "/hold", host)
        await until(lambda: backend.held)
        stopped = node.stopService()
        await until(lambda: len(goaways) == 2)
        self.assertEqual(goaways, [(1 << 62) - 4, held.stream_id + 4])
        backend.release()
        await within(held.done)
        self.assertEqual((held.status, held.sink.body), (200, b"late"))
        await within(client.closed)
        await within(stopped)


class WebSocketDrainTests(unittest.TestCase):

    async def _websocket(self, node, container):
        host = host_for(index=container.port)
        client = await tls_client(self, node.https_port, host, node.ca_path)
        key = base64.b64encode(os.urandom(16))
        client.transport.write(b"GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                               b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (host.encode(), key))
        await until(lambda: b"\r\n\r\n" in client.received)
        self.assertEqual(client.status_line, b"HTTP/1.1 101 Switching Protocols")
        client.received = b""
        return client

    async def test_websocket_gets_1001_after_the_grace(self):
        """A WebSocket still open ``[drain] websocket_grace`` seconds into the drain is
        closed with 1001 (going away): a close frame to the client, a masked one to the
        container, then both connections end."""
        node = start_node(self, DRAIN)
        container = NaiveContainer(self)
        register(node, container.port)
        client = await self._websocket(node, container)
        stopped = node.stopService()
        await within(client.closed)
        self.assertEqual(client.received, b"\x88\x02\x03\xe9")
        await until(lambda: container.closes == [b"\x03\xe9"])
        await within(stopped)

    async def test_close_waits_for_the_end_of_a_frame(self):
        """A frame half sent when the grace ends is relayed whole before the close frame:
        the container gets the whole message, then 1001."""
        node = start_node(self, DRAIN)
        container = NaiveContainer(self)
        register(node, container.port)
        client = await self._websocket(node, container)
        mask = b"\x01\x02\x03\x04"
        payload = b"half here, half later"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frame = bytes([0x81, 0x80 | len(payload)]) + mask + masked
        client.transport.write(frame[:10])
        stopped = node.stopService()
        await until(lambda: client.received == b"\x88\x02\x03\xe9")  # (towards the client: at a boundary)
        self.assertEqual(container.closes, [])
        client.transport.write(frame[10:])
        await until(lambda: container.closes == [b"\x03\xe9"])
        self.assertEqual(container.messages, [payload])
        await within(stopped)


class SigtermTests(ProcessTestCase):
    """SIGTERM to a real twistd under load, with a WebSocket open."""

    @skipIf(NO_WRK, NO_WRK)
    def test_sigterm_under_load_finishes_requests_and_closes_websockets_with_1001(self):
        """Every request the node took is answered 2xx (wrk sees no read or write error and
        no error answer: only refused connections once the listener is closed); the
        WebSocket open gets a 1001 close frame after the grace; the process ends cleanly."""
        config = load_config(self, "[drain]\nwebsocket_grace = 1.0\ntimeout = 20.0\n")
        node = self.start("--demo", "--config", config)
        port = node.ports["https"]
        websocket = _open_websocket(node, port)
        self.addCleanup(websocket.close)
        load = Wrk(self, f"https://127.0.0.1:{port}/", DEMO_HOST, connections=8)
        node.wait_for(r"hoodyproxy audit log")
        audit = os.path.join(node.data_dir, "audit.log")
        self.assertTrue(wait_until(lambda: count_lines(audit) > 200), "the load does not get through")
        node.proc.terminate()
        received = _read_until_closed(websocket)
        self.assertEqual(node.wait_exit(), -signal.SIGTERM)
        result = load.stop()
        self.assertIn("Server Shut Down", node.output())
        self.assertIn(b"\x88\x02\x03\xe9", received)  # (close, 2 bytes: 1001)
        self.assertEqual((result.read_errors, result.write_errors, result.timeouts, result.non_2xx), (0, 0, 0, 0),
                         result.output)
        self.assertGreater(result.requests, 0)


def _open_websocket(node, port: int):
    """A WebSocket to the demo's echo (a blocking TLS socket, 101 read)."""
    context = ssl.create_default_context(cafile=os.path.join(node.data_dir, "tls", "ca.pem"))
    context.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock = context.wrap_socket(raw, server_hostname=DEMO_HOST)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /echo HTTP/1.1\r\nHost: {DEMO_HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _read_until_closed(sock) -> bytes:
    received = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        received += chunk
    return received
