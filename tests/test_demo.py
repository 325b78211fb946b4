"""Tests for :mod:`hoodyproxy.demo`, the sample service behind ``--demo``.

Every test talks to a real listening port on 127.0.0.1 over real TCP.  Connections are
closed by the server (``Connection: close``, or autobahn dropping TCP after the
closing handshake), so by the time the client sees the end of the stream the server
side of the connection is gone too; cleanups abort whatever is still open and wait
for it.

The demo's container in the live map (:class:`DemoContainerTests`) is checked on real
nodes: in this process on a real SQLite directory and real ports, and once with the
real ``twistd -n hoodyproxy`` killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile

import treq

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest
from twisted.web.server import Site

from hoodyproxy.config import settings_from_mapping
from hoodyproxy.demo import DemoRegistration, listen_demo, make_demo_site
from hoodyproxy.directory import Container, SQLiteDirectory, open_database
from hoodyproxy.service import DEMO_CONTAINER, DEMO_PROJECT, NodeService
from tests.support import https_agent
from tests.test_process import Twistd


class _RawHTTPClient(Protocol):
    """Writes one request and collects everything until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.chunks: list[bytes] = []
        self.lost: Deferred[bytes] = Deferred()
        self.connected = False

    def connectionMade(self) -> None:
        self.connected = True
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason) -> None:
        self.connected = False
        self.lost.callback(b"".join(self.chunks))


def _parse_response(raw: bytes) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, body


class _EchoClientProtocol(WebSocketClientProtocol):
    """Sends "hello" (text) and a binary message, closes after both echoes."""

    BINARY = b"\x00\x01\xfe\xff"

    def onOpen(self) -> None:
        self.factory.opened = True
        self.sendMessage(b"hello", isBinary=False)
        self.sendMessage(self.BINARY, isBinary=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.append((payload, isBinary))
        if len(self.factory.received) == 2:
            self.sendClose(code=1000)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self.factory.lost.callback(None)


class DemoTests(unittest.TestCase):
    def setUp(self) -> None:
        self.port = listen_demo(reactor)
        self.addCleanup(self.port.stopListening)
        self.portNumber = self.port.getHost().port

    @inlineCallbacks
    def _http(self, request: bytes):
        client = _RawHTTPClient(request)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.portNumber)
        yield connectProtocol(endpoint, client)

        def close():
            if client.connected:
                client.transport.abortConnection()
            return client.lost

        self.addCleanup(close)
        raw = yield client.lost
        return _parse_response(raw)

    def test_make_demo_site(self) -> None:
        """make_demo_site returns a twisted.web Site; listen_demo listens on 127.0.0.1."""
        self.assertIsInstance(make_demo_site(reactor), Site)
        self.assertEqual(self.port.getHost().host, "127.0.0.1")
        self.assertNotEqual(self.portNumber, 0)

    @inlineCallbacks
    def test_page_escapes_host_and_forwarded_for(self):
        """
        GET / shows the Host, the peer and X-Forwarded-For, HTML-escaped, and carries
        the WebSocket script.
        """
        status, headers, body = yield self._http(
            b"GET / HTTP/1.1\r\n"
            b"Host: <script>alert(1)</script>\r\n"
            b"X-Forwarded-For: 203.0.113.7, <b>x</b>\r\n"
            b"Connection: close\r\n"
            b"\r\n"
        )
        self.assertIn(b" 200 ", status)
        self.assertEqual(headers[b"content-type"], [b"text/html; charset=utf-8"])
        page = body.decode("utf-8")
        self.assertIn("<title>hoodyproxy demo</title>", page)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", page)
        self.assertNotIn("<script>alert(1)</script>", page)
        self.assertIn("203.0.113.7, &lt;b&gt;x&lt;/b&gt;", page)
        self.assertNotIn("<b>x</b>", page)
        self.assertIn("127.0.0.1:", page)
        self.assertIn('"/echo"', page)
        self.assertIn('"wss://"', page)

    @inlineCallbacks
    def test_page_without_forwarded_for(self):
        """Without X-Forwarded-For the page says "(none)" and shows the plain Host."""
        status, _, body = yield self._http(
            b"GET / HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n"
        )
        self.assertIn(b" 200 ", status)
        self.assertIn(b'<dd id="host">app.example.test</dd>', body)
        self.assertIn(b'<dd id="xff">(none)</dd>', body)

    @inlineCallbacks
    def test_headers_json(self):
        """GET /headers returns the request headers as JSON plus the peer address."""
        status, headers, body = yield self._http(
            b"GET /headers HTTP/1.1\r\n"
            b"Host: app.example.test\r\n"
            b"X-Forwarded-For: 198.51.100.2\r\n"
            b"X-Demo: a\r\n"
            b"X-Demo: b\r\n"
            b"Peer: spoofed\r\n"
            b"Connection: close\r\n"
            b"\r\n"
        )
        self.assertIn(b" 200 ", status)
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        data = json.loads(body)
        self.assertEqual(data["host"], "app.example.test")
        self.assertEqual(data["x-forwarded-for"], "198.51.100.2")
        self.assertEqual(data["x-demo"], "a, b")
        self.assertEqual(data["connection"], "close")
        self.assertEqual(data["peer"], "127.0.0.1")

    @inlineCallbacks
    def test_unknown_path(self):
        """Paths other than /, /echo and /headers are 404."""
        status, _, _ = yield self._http(
            b"GET /nope HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n"
        )
        self.assertIn(b" 404 ", status)

    @inlineCallbacks
    def _echo(self, url: str, origin: str | None):
        factory = WebSocketClientFactory(url, origin=origin, reactor=reactor)
        factory.protocol = _EchoClientProtocol
        factory.opened = False
        factory.received = []
        factory.lost = Deferred()
        # Always dial the demo's real port, whatever host and port the URL names:
        # this is what the gateway does (it keeps the browser's Host).
        connector = reactor.connectTCP("127.0.0.1", self.portNumber, factory)

        def close():
            if not factory.lost.called:
                connector.disconnect()
            return factory.lost

        self.addCleanup(close)
        yield factory.lost
        return factory

    @inlineCallbacks
    def test_websocket_echo(self):
        """A real autobahn client gets "hello" (text) and a binary message echoed."""
        factory = yield self._echo(f"ws://127.0.0.1:{self.portNumber}/echo", None)
        self.assertTrue(factory.opened)
        self.assertEqual(
            factory.received,
            [(b"hello", False), (_EchoClientProtocol.BINARY, True)],
        )

    @inlineCallbacks
    def test_websocket_echo_behind_gateway(self):
        """
        The echo endpoint accepts the Host and Origin of the public name even though
        their port (443) is not the port the demo listens on.
        """
        factory = yield self._echo(
            "ws://app.example.test:443/echo", "https://app.example.test"
        )
        self.assertTrue(factory.opened)
        self.assertEqual(
            factory.received,
            [(b"hello", False), (_EchoClientProtocol.BINARY, True)],
        )

    @inlineCallbacks
    def test_echo_without_upgrade(self):
        """A plain GET /echo (no Upgrade) is refused without autobahn's status page."""
        status, _, body = yield self._http(
            b"GET /echo HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n"
        )
        self.assertNotIn(b" 200 ", status)
        self.assertNotIn(b"Autobahn", body)


class DemoContainerTests(unittest.TestCase):
    """The demo's container lives exactly as long as the demo does."""

    def setUp(self) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="hoodyproxy-test-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)

    def node(self, demo: bool) -> NodeService:
        """A started node on this test's data directory (ephemeral loopback ports)."""
        settings = settings_from_mapping({
            "node": {"data_dir": self.data_dir},
            "listen": {"https": "127.0.0.1:0", "http": "127.0.0.1:0", "admin": "127.0.0.1:0"},
            "client_ip": {"mode": "headers"}, "demo": {"enabled": demo}})
        node = NodeService(settings, reactor)
        node.privilegedStartService()
        node.startService()
        self.addCleanup(lambda: node.stopService() if node.running else None)
        return node

    def directory(self) -> SQLiteDirectory:
        """The data directory's live map, opened as another process (the CLI) would."""
        directory = SQLiteDirectory(open_database(os.path.join(self.data_dir, "hoodyproxy.db")))
        self.addCleanup(directory._conn.close)
        return directory

    @inlineCallbacks
    def status_of_demo_route(self, node) -> int:
        https_port = node.ports["https"][0].getHost().port
        agent = https_agent(self, node)
        response = yield agent.request(
            b"GET", f"https://{DEMO_PROJECT}-{DEMO_CONTAINER}-http-80.{node.settings.suffix}:{https_port}/".encode())
        yield treq.content(response)
        return response.code

    @inlineCallbacks
    def test_stop_removes_the_demo_container(self):
        """After a ``--demo`` node stops, the next node (without ``--demo``) has no such container:
        its route answers 503 (no container), not 502 (a dead port)."""
        first = self.node(demo=True)
        self.assertTrue(first.directory.lookup(DEMO_CONTAINER).running)
        self.assertEqual((yield self.status_of_demo_route(first)), 200)
        yield first.stopService()
        self.assertIsNone(self.directory().lookup(DEMO_CONTAINER))
        second = self.node(demo=False)
        self.assertIsNone(second.directory.lookup(DEMO_CONTAINER))
        self.assertEqual((yield self.status_of_demo_route(second)), 503)

    @inlineCallbacks
    def test_a_left_demo_container_is_replaced_by_the_next_demo(self):
        """What a demo that died left (its container, marked) gives way to the next demo's own,
        which answers."""
        DemoRegistration(self.directory(), self.data_dir, DEMO_CONTAINER, DEMO_PROJECT).register(1)
        node = self.node(demo=True)
        container = node.directory.lookup(DEMO_CONTAINER)
        self.assertEqual(dict(container.ports), {"http-80": node.demo_port.getHost().port})
        self.assertEqual((yield self.status_of_demo_route(node)), 200)

    def test_unmarked_container_of_an_older_demo_is_removed(self):
        """A demo container left by a node from before the mark (same ids, loopback, one http-80
        port, no mark) is removed at the next start too."""
        self.directory().put(Container(DEMO_CONTAINER, DEMO_PROJECT, "127.0.0.1", "running", {"http-80": 1}))
        node = self.node(demo=False)
        self.assertIsNone(node.directory.lookup(DEMO_CONTAINER))

    def test_a_container_the_operator_changed_is_left_alone(self):
        """Once the operator has changed the demo's container (another address), it is theirs:
        removing the demo's registration does not delete it, only the mark."""
        directory = self.directory()
        registration = DemoRegistration(directory, self.data_dir, DEMO_CONTAINER, DEMO_PROJECT)
        registration.register(4321)
        directory.put(Container(DEMO_CONTAINER, DEMO_PROJECT, "10.0.0.7", "running", {"http-80": 80}))
        self.assertFalse(registration.remove())
        self.assertEqual(directory.lookup(DEMO_CONTAINER).address, "10.0.0.7")
        self.assertFalse(os.path.exists(registration.path))

    def test_other_containers_are_never_touched(self):
        """Starting and stopping the demo's registration leaves every other container as it was."""
        directory = self.directory()
        other = Container("fedcba9876543210fedcba98", DEMO_PROJECT, "127.0.0.1", "running", {"http-80": 1})
        directory.put(other)
        registration = DemoRegistration(directory, self.data_dir, DEMO_CONTAINER, DEMO_PROJECT)
        registration.register(4321)
        self.assertTrue(registration.remove())
        self.assertIsNone(directory.lookup(DEMO_CONTAINER))
        self.assertEqual(directory.lookup(other.id), other)

    def test_killed_demo_node_leaves_nothing_for_the_next_start(self):
        """The real ``twistd --demo`` killed with SIGKILL leaves its container; the next start
        without ``--demo`` removes it, says so, and the demo's route answers 503."""
        data_dir = os.path.join(self.data_dir, "node")
        first = Twistd(self, data_dir, "--demo").wait_ready()
        url = first.wait_for(r"hoodyproxy demo: open (https://\S+)").group(1)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.wait_exit()
        second = Twistd(self, data_dir).wait_ready()
        self.assertIn("removed the sample container an earlier run left", second.output())
        host = re.fullmatch(r"https://([^/:]+):\d+/", url).group(1)
        port = second.ports["https"]
        status, _, body = second.curl(f"https://{host}:{port}/", host, port)
        self.assertEqual(status, 503, body)
