"""End to end over HTTP/3: a real aioquic client on loopback UDP, a real node, real backends.

The client (tests/h3client.py) is aioquic driven by Twisted, so everything runs in
Trial's reactor; the node's own HTTP/3 port is used when the service opens one,
otherwise the test opens one with :func:`hoodyproxy.frontend.http3.listen_http3`.
"""

from __future__ import annotations

import json
import socket

import treq
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from wsproto.frame_protocol import FrameProtocol, Opcode

from hoodyproxy.frontend.http3 import STREAM_WINDOW, listen_http3
from tests import backends
from tests.h3client import Digest, connect, pattern_chunks, pattern_sha256, transfer, within
from tests.support import (CONTAINER, PROJECT, Backend, audit_lines, host_for, raw_backend, register,
                           start_node, until, wait)

TOKEN = "robot-token-0123456789abcdefghijklmnop"


class HTTP3TestCase(unittest.TestCase):
    """A node, one backend registered as the container, and the node's HTTP/3 port."""

    config: dict = {}
    interface = "127.0.0.1"

    def setUp(self):
        self.node = start_node(self, self.config)
        self.backend = Backend(self, backends.app())
        register(self.node, self.backend.number)
        self.udp_port = self._http3_port()
        self.listener = self.udp_port.protocol
        self.port = self.udp_port.getHost().port

    def _http3_port(self):
        ports = self.node.ports.get("http3") if self.interface == "127.0.0.1" else None
        if ports:
            return ports[0]
        port = listen_http3(reactor, self.interface, 0, gateway=self.node.gateway,
                            certificates=self.node.stack.certificates, settings=self.node.settings)
        self.addCleanup(port.stopListening)
        return port

    def host(self, **kw) -> str:
        kw.setdefault("index", self.backend.number)
        return host_for(**kw)

    async def client(self, server_name: str | None = None):
        return await connect(self, reactor, self.port, server_name=server_name or self.host(),
                             ca_path=self.node.ca_path, host="::1" if ":" in self.interface else "127.0.0.1")

    async def get(self, client, path: str = "/headers", authority: str | None = None, **kw):
        stream = client.request(kw.pop("method", "GET"), path, authority or self.host(), **kw)
        await within(stream.done)
        return stream


class ForwardingTests(HTTP3TestCase):

    async def test_get_reaches_container_and_is_audited(self):
        """A GET over HTTP/3 reaches the container with the gateway's headers; its answer
        comes back with status, headers and body, and the exchange has an audit line."""
        client = await self.client()
        stream = await self.get(client, "/headers?x=1", headers=[("x-test", "yes")])
        self.assertEqual(stream.status, 200)
        self.assertEqual(stream.headers[b"content-type"], b"application/json")
        self.assertIn(b"server", stream.headers)
        self.assertIn(b"date", stream.headers)
        seen = stream.json()
        self.assertEqual(seen["uri"], "/headers?x=1")
        self.assertEqual(seen["method"], "GET")
        self.assertEqual(seen["headers"]["host"], [self.host()])
        self.assertEqual(seen["headers"]["x-test"], ["yes"])
        self.assertEqual(seen["headers"]["x-forwarded-proto"], ["https"])
        self.assertEqual(seen["headers"]["x-forwarded-for"], ["127.0.0.1"])
        await until(lambda: any(line.get("path") == "/headers?x=1" for line in audit_lines(self.node)))
        line = [line for line in audit_lines(self.node) if line.get("path") == "/headers?x=1"][-1]
        self.assertEqual(line["status"], 200)
        self.assertEqual(line["method"], "GET")
        self.assertEqual(line["http"], "3")
        self.assertEqual(line["client"], "127.0.0.1")
        self.assertEqual(line["route"]["container"], CONTAINER)
        self.assertEqual(line["bytes_out"], len(stream.sink.body))

    async def test_requests_on_one_connection_are_routed_each_by_its_authority(self):
        """Two requests on one connection go where their own :authority says."""
        other = Backend(self, backends.app())
        register(self.node, other.number, container="aaaaaaaaaaaaaaaaaaaaaaaa")
        client = await self.client()
        first = await self.get(client)
        second = await self.get(client, authority=self.host(container="aaaaaaaaaaaaaaaaaaaaaaaa",
                                                            index=other.number))
        self.assertEqual((first.status, second.status), (200, 200))
        self.assertEqual(second.json()["headers"]["host"],
                         [self.host(container="aaaaaaaaaaaaaaaaaaaaaaaa", index=other.number)])

    async def test_upload_streams_exact_bytes(self):
        """An 8 MiB body with a content-length reaches the container byte for byte."""
        client = await self.client()
        size = 8 * 1024 * 1024
        stream = await transfer(client, "POST", "/digest", self.host(), upload_size=size,
                                headers=[("content-length", str(size))])
        self.assertEqual(stream.status, 200)
        self.assertEqual(stream.bytes_sent, size)
        await until(lambda: any(line.get("path") == "/digest" for line in audit_lines(self.node)))
        # The Digest sink hashed the answer; the container's own count is in the audit line.
        line = [line for line in audit_lines(self.node) if line.get("path") == "/digest"][-1]
        self.assertEqual(line["bytes_in"], size)

    async def test_upload_without_length_is_chunked_to_the_container(self):
        """A body without content-length (4 MiB) arrives whole: length and SHA-256 match."""
        client = await self.client()
        size = 4 * 1024 * 1024 + 7
        stream = client.request("PUT", "/digest", self.host(), upload=pattern_chunks(size))
        await within(stream.done, 120)
        self.assertEqual(stream.status, 200)
        self.assertEqual(stream.json(), {"length": size, "sha256": pattern_sha256(size)})

    async def test_upload_digest_is_exact(self):
        """A 16 MiB upload with a length: the container's SHA-256 is the client's."""
        client = await self.client()
        size = 16 * 1024 * 1024
        stream = client.request("POST", "/digest", self.host(), upload=pattern_chunks(size),
                                headers=[("content-length", str(size))])
        await within(stream.done, 120)
        self.assertEqual(stream.status, 200)
        self.assertEqual(stream.json(), {"length": size, "sha256": pattern_sha256(size)})

    async def test_download_is_exact(self):
        """A 32 MiB answer arrives byte for byte (counted and hashed, never held)."""
        client = await self.client()
        size = 32 * 1024 * 1024
        stream = await transfer(client, "GET", f"/big?size={size}", self.host())
        self.assertEqual(stream.status, 200)
        self.assertEqual(stream.headers[b"content-length"], b"%d" % size)
        self.assertEqual((stream.sink.length, stream.sink.sha256), (size, pattern_sha256(size)))

    async def test_chunked_download_is_exact(self):
        """A container answer without a length (chunked upstream) ends cleanly on the stream."""
        client = await self.client()
        size = 3 * 1024 * 1024 + 11
        stream = await transfer(client, "GET", f"/big?size={size}&chunked=1", self.host())
        self.assertEqual(stream.status, 200)
        self.assertEqual((stream.sink.length, stream.sink.sha256), (size, pattern_sha256(size)))

    async def test_head_has_no_body(self):
        """HEAD: the head only, the stream ended with it."""
        client = await self.client()
        stream = await self.get(client, "/big?size=1000", method="HEAD")
        self.assertEqual(stream.status, 200)
        self.assertEqual(stream.sink.body, b"")


async def settled(value, step: float = 0.5, timeout: float = 60.0):
    """Wait until ``value()`` stops changing (a stalled transfer), then return it."""
    previous, waited = None, 0.0
    while True:
        current = value()
        if current == previous:
            return current
        if waited > timeout:
            raise AssertionError("never settled")
        previous = current
        await wait(step)
        waited += step


class BackpressureTests(HTTP3TestCase):

    def session_stream(self):
        sessions = self.listener.sessions
        self.assertEqual(len(sessions), 1)
        session = next(iter(sessions))
        self.assertEqual(len(session.streams), 1)
        stream_id, stream = next(iter(session.streams.items()))
        return session, stream_id, stream

    async def test_a_container_that_does_not_read_stops_the_upload(self):
        """The container stops reading: the request stream's credit stops growing, the
        client is blocked well short of its 32 MiB, and the gateway holds at most about
        one window for the stream."""
        def stall(protocol, data):
            protocol.transport.pauseProducing()
        number, _ = raw_backend(self, stall)
        register(self.node, number)
        client = await self.client(self.host(index=number))
        size = 32 * 1024 * 1024
        stream = client.request("POST", "/", self.host(index=number), upload=pattern_chunks(size),
                                headers=[("content-length", str(size))])
        sent = await settled(lambda: stream.bytes_sent)
        self.assertLess(sent, size - 8 * 1024 * 1024)
        session, _, held = self.session_stream()
        self.assertLessEqual(sum(map(len, held.held)), STREAM_WINDOW * 3 // 2)
        self.assertTrue(held.paused)

    async def test_a_client_that_does_not_read_pauses_the_container(self):
        """The client stops acknowledging: the response stream's unacknowledged bytes stay
        bounded, the container is paused, and once the client reads again the 32 MiB
        arrive exactly."""
        client = await self.client()
        size = 32 * 1024 * 1024
        stream = client.request("GET", f"/big?size={size}", self.host(), sink=Digest())
        await within(stream.head)
        client.deaf = True
        session, stream_id, state = self.session_stream()
        await until(lambda: state.output_paused, timeout=30)
        unacked = await settled(lambda: session._unacked(stream_id))
        self.assertLess(unacked, 4 * 1024 * 1024)
        client.deaf = False
        client.transmit()
        await within(stream.done, 120)
        self.assertEqual((stream.sink.length, stream.sink.sha256), (size, pattern_sha256(size)))


class ErrorTests(HTTP3TestCase):

    async def test_unknown_host_is_404(self):
        """A host under the node that is no route: 404 with a JSON body."""
        client = await self.client()
        stream = await self.get(client, "/", authority="nothing-here.node-local.containers.localhost")
        self.assertEqual(stream.status, 404)
        self.assertEqual(stream.headers[b"content-type"], b"application/json")
        self.assertIn("error", stream.json())

    async def test_stopped_container_is_503(self):
        """A stopped container: 503 with Retry-After and a JSON body."""
        register(self.node, self.backend.number, state="stopped")
        client = await self.client()
        stream = await self.get(client)
        self.assertEqual(stream.status, 503)
        self.assertIn(b"retry-after", stream.headers)
        self.assertEqual(stream.json()["error"], "container_unavailable")

    async def test_absent_container_is_503(self):
        """A route to a container the node does not know: 503."""
        client = await self.client()
        stream = await self.get(client, authority=self.host(container="bbbbbbbbbbbbbbbbbbbbbbbb"))
        self.assertEqual(stream.status, 503)

    async def test_authority_not_covered_by_the_certificate_is_421(self):
        """SNI picked the node's wildcard; a request for a custom domain that routes (it is
        attached to an alias) but that certificate does not cover is misdirected: 421."""
        aliases = self.node.stack.aliases
        aliases.create("shop", CONTAINER, "http", self.backend.number)
        aliases.attach("shop", "api.example.com")
        client = await self.client()
        stream = await self.get(client, authority="api.example.com")
        self.assertEqual(stream.status, 421)

    async def test_each_host_keeps_its_own_answer(self):
        """The connection remembers which hosts its certificate covers: asked again, and
        past the number it remembers, a host not covered is still 421 and a covered one
        still served."""
        from hoodyproxy.tls.context import COVERED_HOSTS
        client = await self.client()
        own = self.host()
        others = ["shop-%d.example.com" % i for i in range(COVERED_HOSTS + 4)]
        for _ in range(2):
            for start in range(0, len(others), 12):
                streams = []
                for other in others[start:start + 12]:
                    streams.append((other, client.request("GET", "/", other)))
                    streams.append((own, client.request("GET", "/headers", own)))
                for _, stream in streams:
                    await within(stream.done)
                self.assertEqual([(host, stream.status) for host, stream in streams],
                                 [(host, 200 if host == own else 421) for host, _ in streams])

    async def test_malformed_requests_get_400_and_the_connection_serves_on(self):
        """:scheme http, CONNECT with an unknown :protocol, :protocol without CONNECT: each is
        a 400 with a JSON body (a plain CONNECT a 405: no forward proxy here), each has an
        audit line, and the same connection then serves a good request."""
        client = await self.client()
        host = self.host().encode()
        blocks = [
            (400, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", host), (b":path", b"/bad1")]),
            (405, [(b":method", b"CONNECT"), (b":authority", host)]),
            (400, [(b":method", b"CONNECT"), (b":protocol", b"x-other"), (b":scheme", b"https"),
                   (b":authority", host), (b":path", b"/bad3")]),
            (400, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", host), (b":path", b"/bad4"),
                   (b":protocol", b"websocket")]),
        ]
        for status, block in blocks:
            stream = client.open(block, end_stream=True)
            await within(stream.done)
            self.assertEqual(stream.status, status, block)
            self.assertEqual(stream.headers[b"content-type"], b"application/json")
            self.assertIn("error", stream.json())
        await until(lambda: {"/bad1", "/bad3", "/bad4"} <= {line.get("path") for line in audit_lines(self.node)})
        stream = await self.get(client)
        self.assertEqual(stream.status, 200)

    async def test_a_broken_connection_does_not_stop_the_listener(self):
        """A client that breaks HTTP/3 rules (no :authority: aioquic closes the connection)
        costs that connection only; a new one is served."""
        bad = await self.client()
        bad.open([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")], end_stream=True)
        await within(bad.closed)
        good = await self.client()
        self.assertEqual((await self.get(good)).status, 200)

    async def test_garbage_datagrams_are_ignored(self):
        """Random bytes, a short INITIAL-looking datagram and an unknown version do no harm;
        an unknown version is answered with Version Negotiation."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        before = self.listener.version_negotiations_sent
        for junk in (b"", b"\x00", b"\xff" * 20, b"\xc0\x00\x00\x00\x01\x08" + b"\x01" * 30,
                     b"\xc0\x1a\x2a\x3a\x4a\x08" + b"\x02" * 8 + b"\x08" + b"\x03" * 8 + b"\x00" * 1200):
            sock.sendto(junk, ("127.0.0.1", self.port))
        await until(lambda: self.listener.version_negotiations_sent > before)
        client = await self.client()
        self.assertEqual((await self.get(client)).status, 200)


class PermissionTests(HTTP3TestCase):

    async def put_set(self, body: dict) -> None:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        url = f"http://127.0.0.1:{self.node.admin_port}/api/v1/containers/{CONTAINER}/proxy/permissions"
        response = await treq.request("PUT", url, agent=Agent(reactor, pool=pool),
                                      headers={"Authorization": f"Bearer {self.node.token}"},
                                      data=json.dumps(dict(body, project=PROJECT)).encode())
        content = await response.content()
        self.assertIn(response.code, (200, 201), content)

    async def test_token_permission_applies(self):
        """A token group: 401 with a Bearer challenge without the token, 200 with it."""
        await self.put_set({"groups": {"robots": {"type": "token", "value": TOKEN}},
                            "permissions": {"robots": {"http": True}}, "default": "deny"})
        client = await self.client()
        denied = await self.get(client)
        self.assertEqual(denied.status, 401)
        self.assertIn(b"bearer", denied.headers.get(b"www-authenticate", b"").lower())
        allowed = await self.get(client, headers=[("authorization", f"Bearer {TOKEN}")])
        self.assertEqual(allowed.status, 200)
        self.assertNotIn("authorization", allowed.json()["headers"])


class WebSocketTests(HTTP3TestCase):

    async def test_websocket_over_extended_connect_echoes(self):
        """RFC 9220: CONNECT with :protocol websocket gets 200 and the stream carries
        WebSocket frames to the container's echo service and back."""
        client = await self.client()
        await until(lambda: client.h3.received_settings is not None)
        self.assertEqual(client.h3.received_settings.get(0x8), 1)  # SETTINGS_ENABLE_CONNECT_PROTOCOL
        stream = client.open([(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                              (b":authority", self.host().encode()), (b":path", b"/echo"),
                              (b"sec-websocket-version", b"13")], end_stream=False)
        await within(stream.head)
        self.assertEqual(stream.status, 200)
        self.assertNotIn(b"sec-websocket-accept", stream.headers)
        ws = FrameProtocol(client=True, extensions=[])
        stream.send(bytes(ws.send_data("hello over h3", fin=True)))
        stream.send(bytes(ws.send_data(b"\x00\x01binary", fin=True)))
        frames = []

        def echoed():
            ws.receive_bytes(stream.sink.body[echoed.fed:])
            echoed.fed = len(stream.sink.body)
            frames.extend(ws.received_frames())
            return len(frames) >= 2
        echoed.fed = 0
        await until(echoed)
        self.assertEqual([(f.opcode, f.payload) for f in frames[:2]],
                         [(Opcode.TEXT, "hello over h3"), (Opcode.BINARY, b"\x00\x01binary")])
        stream.send(bytes(ws.close(1000)), end_stream=True)
        await within(stream.done)
        await until(lambda: any(r.get("status") == 101 for r in audit_lines(self.node)))
        record = [r for r in audit_lines(self.node) if r.get("status") == 101][-1]
        self.assertEqual(record["http"], "3")
        self.assertGreater(record["bytes_in"], 0)


class RetryTests(HTTP3TestCase):
    config = {"http3": {"retry": "always"}}

    async def test_retry_always_validates_then_serves(self):
        """retry = "always": the client is sent a Retry, comes back with the token and is served."""
        before = self.listener.retries_sent
        client = await self.client()
        self.assertGreater(self.listener.retries_sent, before)
        self.assertEqual((await self.get(client)).status, 200)


class NoRetryTests(HTTP3TestCase):
    config = {"http3": {"retry": "auto", "retry_threshold": 64}}

    async def test_auto_retry_below_threshold_sends_none(self):
        """retry = "auto" with few handshakes pending: no Retry round trip."""
        client = await self.client()
        self.assertEqual((await self.get(client)).status, 200)
        self.assertEqual(self.listener.retries_sent, 0)
        self.assertEqual(self.listener.handshaking, 0)


class LifecycleTests(HTTP3TestCase):

    async def test_stop_listening_closes_connections(self):
        """Stopping the port closes live connections (the client is told) and forgets them."""
        port = listen_http3(reactor, "127.0.0.1", 0, gateway=self.node.gateway,
                            certificates=self.node.stack.certificates, settings=self.node.settings)
        stopped = False

        def stop():
            return None if stopped else port.stopListening()
        self.addCleanup(stop)
        client = await connect(self, reactor, port.getHost().port, server_name=self.host(),
                               ca_path=self.node.ca_path)
        self.assertEqual(len(port.protocol.sessions), 1)
        await port.stopListening()
        stopped = True
        await within(client.closed)
        self.assertEqual(port.protocol.connections, {})

    async def test_connection_ids_route_to_one_session(self):
        """The connection IDs a session issues all route to it; a terminated one is gone."""
        client = await self.client()
        await self.get(client)
        sessions = self.listener.sessions
        self.assertEqual(len(sessions), 1)
        session = sessions.pop()
        self.assertGreater(len([c for c, s in self.listener.connections.items() if s is session]), 1)
        await client.close()
        await until(lambda: session not in self.listener.sessions, timeout=30)


class IPv6Tests(HTTP3TestCase):
    interface = "::1"

    def setUp(self):
        try:
            probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            probe.bind(("::1", 0))
            probe.close()
        except OSError:
            raise unittest.SkipTest("no IPv6 loopback")
        super().setUp()

    async def test_get_over_ipv6(self):
        """An IPv6 listener serves; the container sees the client as ::1."""
        client = await self.client()
        stream = await self.get(client)
        self.assertEqual(stream.status, 200)
        self.assertEqual(stream.json()["headers"]["x-forwarded-for"], ["::1"])
