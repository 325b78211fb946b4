"""Attacks on the frontends, replayed against a real node: each test sends what an abusive
client sends, over real sockets, and checks the node neither buffers it, nor waits for it,
nor lets it reach a container.

- bodies nobody asked for (the plain port, the admin API): answered from the head alone,
  never read into memory or a temporary file;
- heads that never end (``[limits] request_head_timeout``): HTTP/1.1 gets 408, a TLS
  handshake is cut off, HTTP/2 gets GOAWAY, an HTTP/3 stream is reset;
- a client that keeps sending after an HTTP/2 GOAWAY: no longer read, then dropped;
- malformed framing (two Transfer-Encoding fields, ``Transfer-Encoding : chunked``...):
  400, and not a byte of the request reaches the container;
- the admin API and the plain port say who they are (``Server: hoodyproxy``) and use
  proper reason phrases.
"""

from __future__ import annotations

import json
import os
import re

from hyperframe.frame import ContinuationFrame, HeadersFrame
from twisted.internet import reactor, tcp
from twisted.trial import unittest

from tests import backends
from tests.h2client import h2_connect
from tests.h3client import ClientStream, connect as h3_connect, within
from tests.rawclient import Flood, tcp_client, tls_client
from tests.support import Backend, audit_lines, host_for, raw_backend, register, start_node, until, wait

MiB = 1024 * 1024
#: What the attacks announce: far more than anyone should read before answering.
HUGE = 200 * MiB
CID = "111111111111111111111111"
PROJECT = "67e89abc123def456789abcd"


def deleted_temp_files() -> set[str]:
    """The unlinked files this process holds open: where twisted.web puts a request body
    over 100 kB (``tempfile.TemporaryFile``)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith("(deleted)"):
            found.add(f"{fd}:{target}")
    return found


def json_body(client) -> dict:
    return json.loads(client.body)


class NodeCase(unittest.TestCase):
    config: dict = {}

    def setUp(self):
        self.node = start_node(self, self.config)
        self.backend = Backend(self, backends.app())
        register(self.node, self.backend.number)
        self.host = host_for(index=self.backend.number)
        # (run before the node stops: cleanups are last in, first out)
        self.addCleanup(self.node_sides_closed)

    async def node_sides_closed(self):
        """Wait until the node's side of every client connection is closed too.

        These tests end when the client sees its connection end; the node's side may
        still be lingering (reading the client's last bytes before it closes), and must
        be gone before the test's reactor check."""
        ports = {self.node.https_port, self.node.http_port, self.node.admin_port}

        def open_sides():
            return [r for r in reactor.getReaders() + reactor.getWriters()
                    if isinstance(r, tcp.Server) and r.getHost().port in ports]
        await until(lambda: not open_sides(), timeout=10)

    async def https(self, host: str | None = None):
        return await tls_client(self, self.node.https_port, host or self.host, self.node.ca_path)

    def naive_ok_backend(self, marker: bytes):
        """A container stand-in as naive as a small server: it answers ``ok`` once for each
        ``marker`` in each read, whatever else it got.  Returns its factory (what each
        connection received) and the host that routes to it."""
        def answer(proto, data):
            for _ in range(data.count(marker)):
                proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        port, factory = raw_backend(self, answer)
        return factory, host_for(index=port)


# -- 1. bodies nobody asked for --------------------------------------------------------------

class PlainPortBodyTests(NodeCase):
    """The plain-HTTP port answers from the head and never reads a body."""

    async def test_redirect_does_not_wait_for_an_announced_body(self):
        """A POST announcing 200 MiB (64 KiB of it sent) gets its 308 at once, with no
        temporary file for the body, and the connection is closed."""
        before = deleted_temp_files()
        client = await tcp_client(self, self.node.http_port)
        client.transport.write(b"POST /upload HTTP/1.1\r\nHost: shop.example.com\r\n"
                               b"Content-Length: %d\r\n\r\n" % HUGE + b"x" * 65536)
        await until(lambda: b"\r\n\r\n" in client.received or client.lost)
        self.assertTrue(client.status_line.startswith(b"HTTP/1.1 308 "), client.received[:100])
        self.assertIn(b"Location: https://shop.example.com:%d/upload" % self.node.https_port, client.head)
        self.assertEqual(deleted_temp_files() - before, set())
        await until(lambda: client.lost)

    async def test_client_that_keeps_sending_is_cut_off(self):
        """A client that pushes its 200 MiB body anyway gets the 308 and is disconnected
        long before the body is through: what it sent is dropped, within a bound."""
        client = await tcp_client(self, self.node.http_port)
        client.transport.write(b"PUT / HTTP/1.1\r\nHost: shop.example.com\r\nContent-Length: %d\r\n\r\n" % HUGE)
        flood = Flood(client.transport, HUGE).start()
        await until(lambda: client.lost, timeout=15)
        self.assertTrue(client.status_line.startswith(b"HTTP/1.1 308 "), client.received[:100])
        self.assertLess(flood.written, 64 * MiB)

    async def test_acme_challenge_is_answered_without_reading_a_body(self):
        """The HTTP-01 answer is given from the head too (a body announced with it is not read)."""
        self.node.stack.http01.add("shop.example.com", "tok_1", "tok_1.thumbprint")
        client = await tcp_client(self, self.node.http_port)
        client.transport.write(b"GET /.well-known/acme-challenge/tok_1 HTTP/1.1\r\nHost: shop.example.com\r\n"
                               b"Content-Length: %d\r\n\r\nabc" % HUGE)
        await until(lambda: client.lost)
        self.assertTrue(client.status_line.startswith(b"HTTP/1.1 200 "), client.received[:100])
        self.assertEqual(client.body, b"tok_1.thumbprint")

    async def test_plain_port_names_itself_hoodyproxy(self):
        """The 308 says ``Server: hoodyproxy`` (not TwistedWeb) and closes the connection."""
        client = await tcp_client(self, self.node.http_port)
        client.transport.write(b"GET /a?b=c HTTP/1.1\r\nHost: shop.example.com\r\n\r\n")
        await until(lambda: client.lost)
        self.assertIn(b"\r\nServer: hoodyproxy\r\n", client.head + b"\r\n")
        self.assertNotIn(b"TwistedWeb", client.received)
        self.assertIn(b"\r\nConnection: close\r\n", client.head + b"\r\n")
        self.assertEqual(json_body(client)["error"], "https_required")


class AdminBodyTests(NodeCase):
    """The admin API judges a request's token and length before reading its body."""

    async def admin(self):
        return await tcp_client(self, self.node.admin_port)

    def head(self, method: bytes, path: bytes, *, token: str | None, headers: bytes = b"") -> bytes:
        auth = b"Authorization: Bearer %s\r\n" % token.encode() if token is not None else b""
        return b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s%s\r\n" % (method, path, auth, headers)

    async def test_bad_token_is_refused_before_the_body(self):
        """A PUT announcing 200 MiB with a wrong token: 401 JSON at once, no temporary file,
        connection closed."""
        before = deleted_temp_files()
        client = await self.admin()
        client.transport.write(self.head(b"PUT", b"/api/v1/containers/" + CID.encode(), token="x" * 43,
                                         headers=b"Content-Length: %d\r\n" % HUGE) + b"{" * 65536)
        await until(lambda: client.lost)
        self.assertTrue(client.status_line.startswith(b"HTTP/1.1 401 Unauthorized"), client.received[:100])
        self.assertEqual(json_body(client)["error"], "unauthorized")
        self.assertIn(b"WWW-Authenticate: Bearer", client.head)
        self.assertEqual(deleted_temp_files() - before, set())

    async def test_missing_token_is_refused_before_a_chunked_body(self):
        """No token and a chunked body: 401 at once, without waiting for the body's end."""
        client = await self.admin()
        client.transport.write(self.head(b"POST", b"/api/v1/proxy/aliases", token=None,
                                         headers=b"Transfer-Encoding: chunked\r\n") + b"10000\r\n" + b"a" * 1000)
        await until(lambda: client.lost)
        self.assertTrue(client.status_line.startswith(b"HTTP/1.1 401 "), client.received[:100])

    async def test_announced_length_over_the_limit_is_413(self):
        """A good token with Content-Length 200 MiB: 413 JSON before a byte is read."""
        before = deleted_temp_files()
        client = await self.admin()
        client.transport.write(self.head(b"PUT", b"/api/v1/containers/" + CID.encode(), token=self.node.token,
                                         headers=b"Content-Length: %d\r\n" % HUGE) + b"{" * 1000)
        await until(lambda: client.lost)
        self.assertTrue(client.status_line.startswith(b"HTTP/1.1 413 Content Too Large"), client.received[:100])
        self.assertEqual(json_body(client)["error"], "payload_too_large")
        self.assertEqual(deleted_temp_files() - before, set())

    async def test_chunked_body_over_the_limit_is_413(self):
        """A chunked body (no length announced) is cut off at 1 MiB with 413 and close."""
        client = await self.admin()
        client.transport.write(self.head(b"PUT", b"/api/v1/containers/" + CID.encode(), token=self.node.token,
                                         headers=b"Transfer-Encoding: chunked\r\n"))
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b" " * 64 * 1024)
        for _ in range(24):  # 1.5 MiB
            client.transport.write(chunk)
        await until(lambda: client.lost)
        self.assertTrue(client.status_line.startswith(b"HTTP/1.1 413 "), client.received[:100])
        self.assertEqual(json_body(client)["error"], "payload_too_large")
        self.assertIsNone(self.node.directory.lookup(CID))

    async def test_accepted_body_is_held_in_memory(self):
        """A body the API accepts (here 300 kB, over twisted.web's 100 kB temporary-file
        threshold) is held in memory while it arrives, and the request succeeds."""
        body = json.dumps({"project": PROJECT, "address": "10.1.2.3", "state": "running"}).encode()
        body = body[:-1] + b" " * (300 * 1000) + b"}"
        before = deleted_temp_files()
        client = await self.admin()
        client.transport.write(self.head(b"PUT", b"/api/v1/containers/" + CID.encode(), token=self.node.token,
                                         headers=b"Content-Length: %d\r\nConnection: close\r\n" % len(body)))
        client.transport.write(body[:200 * 1000])
        await wait(0.2)  # let the node take the first 200 kB
        self.assertEqual(deleted_temp_files() - before, set())
        client.transport.write(body[200 * 1000:])
        await until(lambda: client.lost)
        self.assertTrue(client.status_line.startswith(b"HTTP/1.1 201 Created"), client.received[:300])
        self.assertEqual(self.node.directory.lookup(CID).address, "10.1.2.3")


# -- 5. names and reason phrases ------------------------------------------------------------

class AdminResponseLineTests(NodeCase):
    """Every status the admin API answers has its proper reason phrase and ``Server: hoodyproxy``."""

    async def exchange(self, request: bytes):
        client = await tcp_client(self, self.node.admin_port)
        client.transport.write(request)
        await until(lambda: client.lost)
        return client

    def request(self, method: str, path: str, body: bytes | None = None, token: bool = True) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        if token:
            head += f"Authorization: Bearer {self.node.token}\r\n"
        if body is not None:
            head += f"Content-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + (body or b"")

    async def test_every_status_has_its_reason_phrase(self):
        """422 is ``Unprocessable Content`` (not ``Unknown Status``), 413 ``Content Too
        Large``; each answer says ``Server: hoodyproxy``."""
        good = json.dumps({"project": PROJECT, "address": "10.1.2.3"}).encode()
        cases = [
            (self.request("GET", "/healthz", token=False), b"200 OK"),
            (self.request("PUT", f"/api/v1/containers/{CID}", good), b"201 Created"),
            (self.request("PUT", f"/api/v1/containers/{CID}", good), b"200 OK"),
            (self.request("DELETE", f"/api/v1/containers/{CID}"), b"204 No Content"),
            (self.request("PUT", f"/api/v1/containers/{CID}", b"{not json"), b"400 Bad Request"),
            (self.request("GET", "/api/v1/containers", token=False), b"401 Unauthorized"),
            (self.request("GET", "/api/v1/nothing"), b"404 Not Found"),
            (self.request("POST", "/api/v1/containers"), b"405 Method Not Allowed"),
            (self.request("PUT", f"/api/v1/containers/{CID}", b'{"project": "nope"}'),
             b"422 Unprocessable Content"),
            (self.request("GET", "/api/v1/containers?project=nope"), b"422 Unprocessable Content"),
            (self.request("PUT", f"/api/v1/containers/{CID}", b" " * (MiB + 1)), b"413 Content Too Large"),
        ]
        for request, status in cases:
            client = await self.exchange(request)
            self.assertEqual(client.status_line, b"HTTP/1.1 " + status, request[:60])
            self.assertIn(b"\r\nServer: hoodyproxy\r\n", client.head + b"\r\n", request[:60])
            self.assertNotIn(b"TwistedWeb", client.head)
            if not status.startswith(b"204"):
                self.assertIn(b"\r\nContent-Type: application/json\r\n", client.head + b"\r\n")


# -- 2. deadlines for a request head --------------------------------------------------------

class HeadDeadlineTests(NodeCase):
    """``[limits] request_head_timeout`` (1 s here) bounds every head, on every protocol."""

    config = {"limits": {"request_head_timeout": 1}}

    async def test_trickled_head_gets_408_and_close(self):
        """Slowloris over HTTP/1.1: a head sent a byte at a time (each byte would reset an
        idle timer) gets 408 JSON once the deadline passes, and the connection closes."""
        client = await self.https()
        head = f"GET /headers HTTP/1.1\r\nHost: {self.host}\r\nX-Slow: {'s' * 100}\r\n\r\n".encode()
        client.write_slowly([head[i:i + 1] for i in range(len(head))], 0.25)
        await until(lambda: client.lost, timeout=10)
        self.assertTrue(client.status_line.startswith(b"HTTP/1.1 408 "), client.received[:100])
        self.assertEqual(json_body(client)["error"], "request_timeout")
        self.assertIn(b"\r\nConnection: close", client.head)
        await until(lambda: any(line.get("reason") == "request head timeout" and line["status"] == 408
                                for line in audit_lines(self.node)))

    async def test_trickled_second_request_on_a_kept_alive_connection_gets_408(self):
        """The deadline applies to each request of a connection, not only the first."""
        client = await self.https()
        client.transport.write(f"GET /headers HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        await until(lambda: client.received.endswith(b"}"))
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "))
        first, client.received = client.received, b""
        head = f"GET /headers HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        client.write_slowly([head[i:i + 1] for i in range(len(head))], 0.25)
        await until(lambda: client.lost, timeout=10)
        self.assertTrue(client.status_line.startswith(b"HTTP/1.1 408 "), client.received[:100])

    async def test_slow_but_complete_head_is_served_and_idle_time_does_not_count(self):
        """A head that arrives in pieces within the deadline is served; time a kept-alive
        connection spends idle between requests is not head time."""
        client = await self.https()
        head = f"GET /headers HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        client.write_slowly([head[:10], head[10:30], head[30:]], 0.1)
        await until(lambda: client.received.endswith(b"}"))
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "))
        client.received = b""
        await wait(1.6)  # idle for longer than the head deadline
        client.transport.write(head)
        await until(lambda: client.received.endswith(b"}") or client.lost)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "), client.received[:100])

    async def test_tls_handshake_that_never_completes_is_cut_off(self):
        """A client that opens the HTTPS port and never completes its TLS handshake is
        disconnected after the head deadline (not the much longer idle timeout)."""
        silent = await tcp_client(self, self.node.https_port)
        partial = await tcp_client(self, self.node.https_port)
        partial.transport.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
        await until(lambda: silent.lost and partial.lost, timeout=10)

    async def test_h2_header_block_never_completed_gets_goaway(self):
        """HTTP/2: HEADERS without END_HEADERS, then CONTINUATION frames that never end the
        block (each one is activity): GOAWAY after the deadline, and the connection closes."""
        client = await h2_connect(self, self.node, self.host)
        client.flush()  # the SETTINGS acknowledgement goes before the header block, not inside it
        headers = HeadersFrame(1)
        headers.data = client.conn.encoder.encode([(b":method", b"GET"), (b":scheme", b"https"),
                                                   (b":path", b"/"), (b":authority", self.host.encode())])
        client.transport.write(headers.serialize())

        def continuation(n):
            frame = ContinuationFrame(1)
            frame.data = client.conn.encoder.encode([(b"x-slow-%d" % n, b"y")])
            return frame.serialize()
        for n in range(40):  # 10 s of CONTINUATION frames, well under h2's 64-frame bound
            if client.lost:
                break
            client.transport.write(continuation(n))
            await wait(0.25)
        await until(lambda: client.lost, timeout=10)
        self.assertIsNotNone(client.goaway)

    async def test_h3_stream_whose_headers_never_complete_is_reset(self):
        """HTTP/3: a request stream carrying the start of a HEADERS frame and nothing more is
        reset after the deadline; the connection itself goes on serving."""
        ports = self.node.ports.get("http3")
        if not ports:
            raise unittest.SkipTest("HTTP/3 is not enabled on this node")
        client = await h3_connect(self, reactor, ports[0].getHost().port, server_name=self.host,
                                  ca_path=self.node.ca_path)
        stream_id = client.quic.get_next_available_stream_id()
        stream = client.streams[stream_id] = ClientStream(client, stream_id, None, None)
        # HEADERS (type 0x01) announcing 100 bytes (varint 0x4064), of which 5 are sent.
        client.quic.send_stream_data(stream_id, b"\x01\x40\x64" + b"\x00" * 5)
        client.transmit()
        await within(stream.done, 10)
        self.assertIsNotNone(stream.reset_code if stream.reset_code is not None else stream.stop_code)
        ok = client.request("GET", "/headers", self.host)
        await within(ok.done, 10)
        self.assertEqual(ok.status, 200)

    async def test_plain_port_trickled_head_gets_408(self):
        """The plain-HTTP port has the same head deadline."""
        client = await tcp_client(self, self.node.http_port)
        head = b"GET / HTTP/1.1\r\nHost: shop.example.com\r\n\r\n"
        client.write_slowly([head[i:i + 1] for i in range(len(head))], 0.25)
        await until(lambda: client.lost, timeout=10)
        self.assertTrue(client.status_line.startswith(b"HTTP/1.1 408 "), client.received[:100])


# -- 3. after a GOAWAY ------------------------------------------------------------------------

class GoawayTests(NodeCase):
    """An HTTP/2 connection ended for abuse is no longer read, and is dropped soon after."""

    async def test_client_that_keeps_sending_after_goaway_is_cut_off(self):
        """A CONTINUATION flood earns a GOAWAY; the client ignores it (and the TLS close) and
        pushes 256 MiB more.  The node stops reading at once and drops the connection after
        a short grace: the client gets rid of only what the kernel buffers hold."""
        client = await h2_connect(self, self.node, self.host)
        client.flush()
        tls = client.transport
        # Deaf from now on: neither the GOAWAY nor the TLS close_notify is ever seen, as a
        # client that only wants to send would behave.
        tls.dataReceived = lambda data: None
        headers = HeadersFrame(1)
        headers.data = client.conn.encoder.encode([(b":method", b"GET"), (b":scheme", b"https"),
                                                   (b":path", b"/"), (b":authority", self.host.encode())])
        tls.write(headers.serialize())
        for n in range(100):  # over h2's bound of 64 CONTINUATION frames: a protocol error
            frame = ContinuationFrame(1)
            frame.data = b"\x00" * 100
            tls.write(frame.serialize())
        flood = Flood(tls, 256 * MiB).start()
        await until(lambda: client.lost, timeout=10)
        self.assertLess(flood.written, 64 * MiB)


# -- 4. malformed framing never reaches the container ----------------------------------------

MALFORMED = [
    # Two fields: together "chunked, identity", which does not end in chunked (RFC 9112 6.3).
    [b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: identity\r\n", b"X-After: 1\r\n"],
    [b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: chunked\r\n"],
    [b"Transfer-Encoding: chunked, identity\r\n"],
    [b"Transfer-Encoding: identity\r\n", b"Content-Length: 5\r\n"],
    [b"Transfer-Encoding : chunked\r\n", b"X-After: 1\r\n"],
    [b"Transfer-Encoding: xchunked\r\n", b"X-After: 1\r\n"],
    [b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"],
]


class FramingTests(NodeCase):
    """A request refused as malformed never reaches the container, not even its head."""

    async def send_line_by_line(self, port: int, lines: list[bytes]):
        """One TLS record per line, so the node sees the head in pieces (the race in which
        a head was forwarded before its framing was judged)."""
        host = host_for(index=port)
        client = await self.https(host)
        for line in [b"POST /smuggle HTTP/1.1\r\n", b"Host: %s\r\n" % host.encode(), *lines, b"\r\n",
                     b"5\r\nhello\r\n0\r\n\r\n"]:
            client.transport.write(line)
        await until(lambda: client.lost, timeout=10)
        return client

    async def test_malformed_framing_never_reaches_the_container(self):
        """Thirty rounds of each malformed form: each gets 400 and the connection closes,
        and the container stand-in never sees a connection, let alone a request line."""
        port, factory = raw_backend(self, lambda proto, data: None)
        for round_ in range(30):
            for lines in MALFORMED:
                client = await self.send_line_by_line(port, lines)
                self.assertTrue(client.status_line.startswith(b"HTTP/1.1 400 "), (round_, lines, client.received))
                self.assertEqual(json_body(client)["error"], "bad_request")
        self.assertEqual([conn.received for conn in factory.connections], [])

    async def test_two_transfer_encoding_fields_are_refused_and_audited(self):
        """``Transfer-Encoding: chunked`` then ``Transfer-Encoding: identity``: 400 with the
        reason in the audit line."""
        port, factory = raw_backend(self, lambda proto, data: None)
        client = await self.send_line_by_line(port, MALFORMED[0])
        self.assertTrue(client.status_line.startswith(b"HTTP/1.1 400 "), client.received[:100])
        self.assertIn(b"\r\nServer: hoodyproxy", client.head)
        await until(lambda: any(line.get("reason") == "transfer-encoding not chunked"
                                for line in audit_lines(self.node)))
        self.assertEqual(factory.connections, [])

    async def test_chunked_request_is_still_forwarded(self):
        """The one accepted form, ``Transfer-Encoding: chunked`` alone, still reaches the
        container with its body."""
        def answer(proto, data):
            if proto.received.endswith(b"0\r\n\r\n"):
                proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        port, factory = raw_backend(self, answer)
        host = host_for(index=port)
        client = await self.https(host)
        client.transport.write(f"POST /up HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
                               "5\r\nhello\r\n0\r\n\r\n".encode())
        await until(lambda: client.received.endswith(b"ok"))
        self.assertIn(b"hello", factory.connections[0].received)


class TamperedRecordTests(NodeCase):
    """A TLS record changed on the way, over a real socket to a real node."""

    async def test_a_tampered_record_reaches_no_container(self):
        """After one good request, a record with one bit of its authentication tag flipped:
        none of it reaches the container, the node ends that connection, and serves the
        next one; the container saw the request before the record and the one after."""
        factory, host = self.naive_ok_backend(b"\r\n\r\n")
        client = await self.https(host)
        client.transport.write(b"GET /first HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        await until(lambda: client.received.endswith(b"ok"))
        # Encrypted by the client's own TLS state, then changed between it and the socket.
        tls = client.transport
        tls._tlsConnection.send(b"GET /second HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        record = bytearray(tls._tlsConnection.bio_read(65536))
        record[-3] ^= 0x01
        tls.transport.write(bytes(record))
        await until(lambda: client.lost, timeout=10)
        self.assertEqual(client.received.count(b"HTTP/1.1 200 OK"), 1)
        after = await self.https(host)
        after.transport.write(b"GET /third HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
        await until(lambda: after.received.endswith(b"ok"))
        seen = b"".join(conn.received for conn in factory.connections)
        self.assertEqual(re.findall(rb"^GET (\S+) ", seen, re.MULTILINE), [b"/first", b"/third"])
        self.assertNotIn(b"/second", seen)
        after.transport.loseConnection()
        await until(lambda: after.lost)


# -- 5. what one TLS write can make the HTTP/1.1 frontend hold ---------------------------------

class PipeliningAndTrailerTests(NodeCase):
    """Attacks on the HTTP/1.1 frontend's memory: many requests in one write, a trailer
    field that never ends.  Both were unbounded before (the frontend parsed every
    pipelined request into an object at once, and httptools keeps a field whole)."""

    async def test_a_thousand_pipelined_requests_in_one_write(self):
        """1,000 GETs in one TLS write while none is answered: the container stand-in (a
        naive server answering each request line it reads) sees at most 33, the client gets
        that many answers in order, the last saying Connection: close, and the connection
        closes; the rest is never read."""
        from hoodyproxy.frontend.h1 import MAX_PIPELINED

        factory, host = self.naive_ok_backend(b"GET /")
        client = await self.https(host)
        client.transport.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (i, host.encode())
                                        for i in range(1000)))
        await until(lambda: client.lost, timeout=20)
        h1 = self.node.ports["https"][0].factory.wrappedFactory.h1
        await until(lambda: not h1.connections)  # (the gateway's side is closed too)
        seen = b"".join(conn.received for conn in factory.connections)
        self.assertEqual(seen.count(b"GET /"), MAX_PIPELINED + 1)
        self.assertEqual(client.received.count(b"HTTP/1.1 200 OK"), MAX_PIPELINED + 1)
        self.assertEqual(client.received.count(b"Connection: close"), 1)
        self.assertTrue(client.received.rpartition(b"HTTP/1.1 200 OK")[2].startswith(b"\r\n"))

    async def test_trailer_field_that_never_ends(self):
        """A chunked upload whose trailer field never ends: the connection is dropped
        after a bounded amount, not held while the client sends."""
        port, factory = raw_backend(self, lambda proto, data: None)
        host = host_for(index=port)
        client = await self.https(host)
        client.transport.write(b"POST /up HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"5\r\nhello\r\n0\r\nX-Trailer: " % host.encode())
        flood = Flood(client.transport, 256 * MiB).start()
        await until(lambda: client.lost, timeout=20)
        self.assertLess(flood.written, 16 * MiB)
