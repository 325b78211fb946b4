"""Attacks on the enforcement point, replayed against a real node and a naive container.

Each test replays one way round the gateway's permission check that was found by
attacking it from outside (issue 11), over HTTP/1.1 (raw TLS sockets), HTTP/2 and HTTP/3
where the attack applies, and asserts what the attacker would check: the answer, and what
reached the container (:mod:`tests.naive`, a stand-in that parses pipelined requests,
never reads ``GET`` bodies and reads WebSocket frames from the first byte after the head).

The credentials used are restricted ones: a token granting ``terminal`` without ``exec``,
``display`` at ``view``, ``files`` at ``read``; a second token grants everything.
"""

from __future__ import annotations

import json

import h2.errors
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from hoodyproxy.upstream import http11
from hoodyproxy.upstream.readonly import masked_frame
from tests import backends
from tests.h2client import h2_connect
from tests.h3client import connect as h3_connect, within
from tests.naive import NaiveContainer
from tests.support import (CONTAINER, PROJECT, Backend, audit_lines, host_for, raw_backend, register, start_node,
                           tls_exchange, until, wait)

RESTRICTED = "restricted-token-0123456789abcdef"
FULL = "full-token-0123456789abcdefghijklm"
CONFIG = {"programs": {"files": {"index": "instance", "port": 8222, "kind": "files"}}}
PERMISSIONS = {
    "groups": {"viewer": {"type": "token", "value": RESTRICTED}, "owner": {"type": "token", "value": FULL}},
    "permissions": {
        "viewer": {"terminal": True, "exec": False, "display": "view", "files": "read", "sqlite": "query",
                   "http": True},
        "owner": {"terminal": True, "exec": True, "display": True, "files": True, "sqlite": True, "http": True},
    },
    "default": "deny",
}
INSTANCE_PROGRAMS = ("terminal", "display", "sqlite", "files")


def status_of(response: bytes) -> int:
    """The status code of the first response in ``response`` (0 if none)."""
    line = response.split(b"\r\n", 1)[0].split(b" ")
    return int(line[1]) if len(line) > 1 and line[1].isdigit() else 0


def body_of(response: bytes) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    return json.loads(body.split(b"\r\n\r\n")[0] or b"null")


class BypassTestCase(unittest.TestCase):
    """A node whose container's every program is one naive container; ``PERMISSIONS`` set."""

    def setUp(self):
        self.node = start_node(self, CONFIG)
        self.container = NaiveContainer(self)
        self.ports = {name: self.container.port for name in INSTANCE_PROGRAMS}
        register(self.node, 0, ports=self.ports)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.admin_agent = Agent(reactor, pool=pool)

    async def put_permissions(self, body: dict = PERMISSIONS) -> None:
        response = await treq.put(
            f"http://127.0.0.1:{self.node.admin_port}/api/v1/projects/{PROJECT}/proxy/permissions",
            data=json.dumps(body).encode(), agent=self.admin_agent,
            headers={"Authorization": f"Bearer {self.node.token}"})
        content = await response.content()
        self.assertIn(response.code, (200, 201), content)

    def host(self, program: str = "terminal", index: int | None = None) -> str:
        if index is None:
            index = self.container.port if program == "http" else 1
        return host_for(program=program, index=index)

    async def raw(self, payload: bytes, program: str = "terminal", **kw) -> bytes:
        return await deferToThread(tls_exchange, self.node, self.host(program), payload, **kw)

    def head(self, method: str, path: str, program: str = "terminal", token: str = RESTRICTED,
             extra: str = "") -> bytes:
        return (f"{method} {path} HTTP/1.1\r\nHost: {self.host(program)}\r\n"
                f"Authorization: Bearer {token}\r\n{extra}").encode("latin-1")

    def audit_for(self, path_fragment: str) -> dict:
        lines = [line for line in audit_lines(self.node) if path_fragment in (line.get("path") or "")]
        self.assertTrue(lines, f"no audit line for {path_fragment}")
        return lines[-1]

    async def h2(self, program: str = "terminal"):
        return await h2_connect(self, self.node, self.host(program))

    async def h3(self, program: str = "terminal"):
        port = self.node.ports["http3"][0].getHost().port
        return await h3_connect(self, reactor, port, server_name=self.host(program), ca_path=self.node.ca_path)


class WebSocketUpgradeBodyTests(BypassTestCase):
    """Attack 1: WebSocket frames hidden in the body of an upgrade request, which the
    container reads as client messages before the read-only filter sees anything."""

    UPGRADE = ("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")

    async def test_upgrade_with_a_content_length_body_is_refused(self):
        """A view-only WebSocket upgrade carrying masked frames as its body: 400, and the
        container receives neither the upgrade nor a message; the audit line says why and
        counts the bytes that went up."""
        await self.put_permissions()
        frames = masked_frame(1, b"rm -rf /") * 3
        payload = self.head("GET", "/ws?x=up1", "display",
                            extra=self.UPGRADE + f"Content-Length: {len(frames)}\r\n\r\n") + frames
        response = await self.raw(payload, "display")
        self.assertEqual(status_of(response), 400, response)
        self.assertEqual(self.container.messages, [])
        self.assertFalse(self.container.received(b"/ws"))
        line = self.audit_for("x=up1")
        self.assertEqual(line["status"], 400)
        self.assertEqual(line["reason"], "upgrade with a body")

    async def test_upgrade_with_a_chunked_body_is_refused(self):
        """The same with a chunked body."""
        await self.put_permissions()
        frame = masked_frame(1, b"control")
        body = b"%x\r\n" % len(frame) + frame + b"\r\n0\r\n\r\n"
        payload = self.head("GET", "/ws?x=up2", "display",
                            extra=self.UPGRADE + "Transfer-Encoding: chunked\r\n\r\n") + body
        response = await self.raw(payload, "display")
        self.assertEqual(status_of(response), 400, response)
        self.assertEqual(self.container.messages, [])
        self.assertFalse(self.container.received(b"/ws"))

    async def test_upgrade_with_a_body_is_refused_without_a_permission_set(self):
        """An upgrade with a body is malformed whoever sends it: 400 with no set too."""
        payload = self.head("GET", "/ws?x=up3", "display", extra=self.UPGRADE + "Content-Length: 3\r\n\r\n") + b"abc"
        response = await self.raw(payload, "display")
        self.assertEqual(status_of(response), 400, response)
        self.assertFalse(self.container.received(b"/ws"))

    async def test_upgrade_without_a_body_still_works_read_only(self):
        """A plain view-only upgrade still opens (101), and a data frame sent after it is
        stopped by the read-only filter (1008), never reaching the container."""
        await self.put_permissions()
        payload = self.head("GET", "/ws?x=up4", "display", extra=self.UPGRADE + "\r\n") + masked_frame(1, b"typed")
        response = await self.raw(payload, "display")
        self.assertEqual(status_of(response), 101, response)
        self.assertIn(b"\x88", response.partition(b"\r\n\r\n")[2][:2])  # a close frame
        self.assertEqual(self.container.messages, [])

    async def test_upgrade_spelled_in_any_case_is_still_a_read_only_websocket(self):
        """Field names in odd case (``uPgRaDe``, ``cOnNeCtIoN``): still the upgrade the
        read-only filter governs.  With a body, 400 and nothing reaches the container;
        without, 101 and the typed frame is stopped (1008), never reaching it."""
        await self.put_permissions()
        odd = self.UPGRADE.replace("Connection:", "cOnNeCtIoN:").replace("Upgrade: websocket", "uPgRaDe: websocket")
        frames = masked_frame(1, b"rm -rf /")
        with_body = self.head("GET", "/ws?x=up7", "display",
                              extra=odd + f"Content-Length: {len(frames)}\r\n\r\n") + frames
        response = await self.raw(with_body, "display")
        self.assertEqual(status_of(response), 400, response)
        self.assertFalse(self.container.received(b"x=up7"))
        plain = self.head("GET", "/ws?x=up8", "display", extra=odd + "\r\n") + masked_frame(1, b"typed")
        response = await self.raw(plain, "display")
        self.assertEqual(status_of(response), 101, response)
        self.assertIn(b"\x88", response.partition(b"\r\n\r\n")[2][:2])  # a close frame
        self.assertEqual(self.container.messages, [])

    async def test_extended_connect_with_a_content_length_is_refused_over_http2(self):
        """HTTP/2: an extended CONNECT declaring a body (content-length): 400."""
        await self.put_permissions()
        client = await self.h2("display")
        stream = client.request(b"CONNECT", b"/ws?x=up5", self.host("display").encode(),
                                headers=[(b"authorization", b"Bearer " + RESTRICTED.encode()),
                                         (b"sec-websocket-version", b"13"), (b"content-length", b"6")],
                                end_stream=False, protocol=b"websocket")
        client.send(stream.id, masked_frame(1, b""))
        await within(stream.head, 10)
        self.assertEqual(stream.status, 400)
        self.assertFalse(self.container.received(b"/ws"))

    async def test_extended_connect_with_a_content_length_is_refused_over_http3(self):
        """HTTP/3: the same."""
        await self.put_permissions()
        client = await self.h3("display")
        stream = client.open([(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                              (b":authority", self.host("display").encode()), (b":path", b"/ws?x=up6"),
                              (b"authorization", b"Bearer " + RESTRICTED.encode()),
                              (b"sec-websocket-version", b"13"), (b"content-length", b"6")], end_stream=False)
        await within(stream.head, 10)
        self.assertEqual(stream.status, 400)
        self.assertFalse(self.container.received(b"/ws"))


SMUGGLED = b"POST /exec/run HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nid"


class BodyOnReadMethodTests(BypassTestCase):
    """Attack 2: a request hidden in the body of a read-method request, run by a container
    that does not read GET bodies."""

    async def test_get_with_a_hidden_exec_request_is_refused(self):
        """``GET /`` under terminal-without-exec, its body a ``POST /exec/run``: 400, and
        the container never sees the hidden request."""
        await self.put_permissions()
        payload = self.head("GET", "/?x=b1", extra=f"Content-Length: {len(SMUGGLED)}\r\n\r\n") + SMUGGLED
        response = await self.raw(payload)
        self.assertEqual(status_of(response), 400, response)
        self.assertEqual(body_of(response)["error"], "ambiguous_request")
        self.assertFalse(self.container.received(b"/exec"))
        self.assertFalse(self.container.received(b"x=b1"))
        line = self.audit_for("x=b1")
        self.assertIn("a body on a GET request", line["decision"]["reason"])

    async def test_head_options_and_chunked_bodies_are_refused_too(self):
        """HEAD and OPTIONS with a body, and a GET with a chunked body: 400 each."""
        await self.put_permissions()
        for method, framing, body in (
                ("HEAD", f"Content-Length: {len(SMUGGLED)}", SMUGGLED),
                ("OPTIONS", f"Content-Length: {len(SMUGGLED)}", SMUGGLED),
                ("GET", "Transfer-Encoding: chunked", b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n")):
            response = await self.raw(self.head(method, "/?x=b2", extra=framing + "\r\n\r\n") + body)
            self.assertEqual(status_of(response), 400, (method, response))
        self.assertFalse(self.container.received(b"/exec"))

    async def test_view_grant_refuses_a_get_body_on_display_and_read_grant_on_files(self):
        """display at view and files at read: a GET body is refused the same way."""
        await self.put_permissions()
        hidden = b"POST /input HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        for program in ("display", "files"):
            payload = self.head("GET", "/?x=b3", program, extra=f"Content-Length: {len(hidden)}\r\n\r\n") + hidden
            response = await self.raw(payload, program)
            self.assertEqual(status_of(response), 400, (program, response))
        self.assertFalse(self.container.received(b"/input"))

    async def test_a_grant_covering_exec_forwards_the_body(self):
        """The owner (exec granted) may send a GET with a body: it is forwarded."""
        await self.put_permissions()
        payload = self.head("GET", "/?x=b4", token=FULL, extra="Content-Length: 5\r\n\r\n") + b"hello"
        response = await self.raw(payload)
        self.assertEqual(status_of(response), 200, response)
        self.assertTrue(self.container.received(b"x=b4"))

    async def test_get_with_a_body_over_http2_is_refused(self):
        """HTTP/2: a GET with a content-length body under terminal-without-exec: 400."""
        await self.put_permissions()
        client = await self.h2()
        stream = client.request(b"GET", b"/?x=b5", self.host().encode(),
                                headers=[(b"authorization", b"Bearer " + RESTRICTED.encode()),
                                         (b"content-length", b"%d" % len(SMUGGLED))], body=SMUGGLED)
        await within(stream.done, 10)
        self.assertEqual(stream.status, 400)
        self.assertFalse(self.container.received(b"/exec"))
        self.assertFalse(self.container.received(b"x=b5"))

    async def test_get_with_an_undeclared_body_over_http2_never_reaches_the_container(self):
        """HTTP/2: a GET that declares no length and then sends DATA: the body never
        reaches the container (the stream is refused), while an empty DATA end is fine."""
        await self.put_permissions()
        client = await self.h2()
        auth = [(b"authorization", b"Bearer " + RESTRICTED.encode())]
        ok = client.request(b"GET", b"/?x=b6", self.host().encode(), headers=auth, end_stream=False)
        client.send(ok.id, b"", end=True)
        await within(ok.done, 10)
        self.assertEqual(ok.status, 200)
        bad = client.request(b"GET", b"/?x=b7", self.host().encode(), headers=auth, end_stream=False)
        client.send(bad.id, SMUGGLED, end=True)
        await within(bad.done, 10)
        await wait(0.3)
        self.assertNotEqual(bad.status, 200)
        self.assertFalse(self.container.received(b"/exec"))

    async def test_two_hosts_in_different_case_are_refused(self):
        """``Host`` and ``hOsT`` naming different containers: which one routes?  Neither:
        400, and the naive container sees nothing, whichever comes first."""
        other = host_for(program="terminal", index=2)
        for first, second, marker in ((self.host(), other, "h1"), (other, self.host(), "h2")):
            payload = (f"GET /?x={marker} HTTP/1.1\r\nHost: {first}\r\nhOsT: {second}\r\n"
                       f"Authorization: Bearer {FULL}\r\n\r\n").encode()
            response = await self.raw(payload)
            self.assertEqual(status_of(response), 400, response)
            self.assertFalse(self.container.received(b"x=" + marker.encode()))

    async def test_http2_body_longer_than_its_content_length_never_reaches_the_container(self):
        """HTTP/2, raw frames: a POST declaring 5 bytes whose one DATA frame carries a
        request after them.  The gateway forwards the declared length, so the rest would be
        the naive container's next request: the connection ends (PROTOCOL_ERROR) first and
        no byte past the declared five is forwarded."""
        from hyperframe.frame import DataFrame, HeadersFrame
        client = await self.h2()
        headers = HeadersFrame(1)
        headers.data = client.conn.encoder.encode([
            (b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/?x=cl1"),
            (b":authority", self.host().encode()), (b"content-length", b"5")])
        headers.flags.add("END_HEADERS")
        data = DataFrame(1, b"hello" + SMUGGLED)
        data.flags.add("END_STREAM")
        client.transport.write(headers.serialize() + data.serialize())
        await within(client.closed, 10)
        await wait(0.3)
        self.assertEqual(client.goaway, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        self.assertFalse(self.container.received(b"/exec"))

    async def test_http2_headers_frames_around_the_short_parse_never_reach_the_container(self):
        """HTTP/2, raw frames, each on its own connection: the frames the receive buffer
        makes itself (whole, END_HEADERS, no padding or priority) next to the ones it must
        leave to h2 or refuse.  A request whose header block waits for CONTINUATION, then a
        whole HEADERS frame; a HEADERS frame longer than the frame size the gateway allows
        (16,384); one on stream 0.  Each ends the connection, and the naive container never
        sees any of those requests; a plain GET on the same terms reaches it."""
        from hpack import Encoder
        from hyperframe.frame import HeadersFrame

        def headers(client, stream_id: int, path: bytes, flags=("END_HEADERS", "END_STREAM")) -> HeadersFrame:
            # (each block from a fresh encoder: one that a gateway decodes alone)
            frame = HeadersFrame(stream_id)
            frame.data = Encoder().encode([
                (b":method", b"GET"), (b":scheme", b"https"), (b":path", path),
                (b":authority", self.host().encode())], huffman=False)
            for flag in flags:
                frame.flags.add(flag)
            return frame

        # A plain GET on the same terms first: answered (its upstream connection pooled).
        client = await self.h2()
        stream = client.request(b"GET", b"/?x=c4", self.host().encode())
        await within(stream.done, 10)
        self.assertTrue(self.container.received(b"x=c4"))

        client = await self.h2()
        pending = headers(client, 1, b"/?x=c0", flags=("END_STREAM",))  # (no END_HEADERS)
        client.transport.write(pending.serialize() + headers(client, 3, b"/exec/run?x=c1").serialize())
        await within(client.closed, 10)
        self.assertEqual(client.goaway, h2.errors.ErrorCodes.PROTOCOL_ERROR)

        client = await self.h2()
        large = headers(client, 1, b"/exec/run?x=c2&pad=" + b"a" * 17000)
        self.assertGreater(len(large.data), 16384)
        client.transport.write(large.serialize())
        await within(client.closed, 10)
        self.assertEqual(client.goaway, h2.errors.ErrorCodes.FRAME_SIZE_ERROR)

        client = await self.h2()
        zero = headers(client, 1, b"/exec/run?x=c3").serialize()
        client.transport.write(zero[:5] + b"\x00\x00\x00\x00" + zero[9:])  # (stream 0)
        await within(client.closed, 10)
        self.assertEqual(client.goaway, h2.errors.ErrorCodes.PROTOCOL_ERROR)

        await wait(0.3)
        for marker in (b"x=c0", b"x=c1", b"x=c2", b"x=c3"):
            self.assertFalse(self.container.received(marker), marker)

    async def test_get_with_a_body_over_http3_is_refused(self):
        """HTTP/3: the same as over HTTP/2."""
        await self.put_permissions()
        client = await self.h3()
        stream = client.request("GET", "/?x=b8", self.host(), headers=[("authorization", "Bearer " + RESTRICTED)],
                                body=SMUGGLED)
        await within(stream.done, 10)
        self.assertEqual(stream.status, 400)
        self.assertFalse(self.container.received(b"/exec"))

    async def test_a_connection_that_carried_a_get_body_is_never_reused(self):
        """With no permission set, a GET body is forwarded; the container answers the
        hidden request too, and that answer must never reach the next client: the upstream
        connection is not pooled."""
        hidden = b"GET /smuggled?delay HTTP/1.1\r\nHost: x\r\n\r\n"
        first = self.head("GET", "/?x=first", "http", extra=f"Content-Length: {len(hidden)}\r\n\r\n") + hidden
        # The next request follows at once, while the container is still busy with the
        # hidden one (it answers that 1.5 s later).
        response = await self.raw(first, "http", linger=0.2)
        self.assertEqual(status_of(response), 200, response)
        self.assertIn("x=first", body_of(response)["request"])
        for n in range(3):
            response = await self.raw(self.head("GET", f"/?x=next{n}", "http", extra="\r\n"), "http")
            self.assertEqual(status_of(response), 200, response)
            self.assertIn(f"x=next{n}", body_of(response)["request"])
        self.assertTrue(self.container.received(b"/smuggled"))


class ExecuteEndpointTests(BypassTestCase):
    """Attack 3: the platform's own execute API is ``exec``."""

    async def test_platform_execute_needs_exec(self):
        """``POST /api/v1/terminal/execute`` with terminal but no exec: 403; with exec: 200."""
        await self.put_permissions()
        body = '{"command": "id"}'
        extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        response = await self.raw(self.head("POST", "/api/v1/terminal/execute?x=e1", extra=extra))
        self.assertEqual(status_of(response), 403, response)
        self.assertFalse(self.container.received(b"x=e1"))
        response = await self.raw(self.head("POST", "/api/v1/terminal/execute?x=e2", token=FULL, extra=extra))
        self.assertEqual(status_of(response), 200, response)
        self.assertTrue(self.container.received(b"/api/v1/terminal/execute?x=e2"))

    async def test_reading_the_terminal_stays_allowed(self):
        """``GET /api/v1/terminal/execute`` and the session itself need only terminal."""
        await self.put_permissions()
        for path in ("/api/v1/terminal/execute?x=e3", "/?x=e4"):
            response = await self.raw(self.head("GET", path, extra="\r\n"))
            self.assertEqual(status_of(response), 200, (path, response))


class ConfiguredExecPathsTests(BypassTestCase):
    """The exec paths are set per program in the config."""

    def setUp(self):
        self.node = start_node(self, {"programs": {
            "files": {"index": "instance", "port": 8222, "kind": "files"},
            "terminal": {"exec_paths": ["/run"]}}})
        self.container = NaiveContainer(self)
        register(self.node, 0, ports={name: self.container.port for name in INSTANCE_PROGRAMS})
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.admin_agent = Agent(reactor, pool=pool)

    async def test_configured_exec_paths_replace_the_defaults(self):
        """With ``exec_paths = ["/run"]``: ``POST /run`` needs exec, ``POST /exec`` does not."""
        await self.put_permissions()
        extra = "Content-Length: 2\r\n\r\nid"
        response = await self.raw(self.head("POST", "/run/x?x=c1", extra=extra))
        self.assertEqual(status_of(response), 403, response)
        response = await self.raw(self.head("POST", "/exec/x?x=c2", extra=extra))
        self.assertEqual(status_of(response), 200, response)


AMBIGUOUS_PATHS = ["/EXEC/run", "/Exec", "/exec;x/run", "/exec%5Crun", "/exec%00/run", "/%2565xec/run",
                   "/exec./run", "/API/v1/terminal/execute", "/api/v1/terminal/execute%20/"]


class AmbiguousSpellingTests(BypassTestCase):
    """Attack 4: spellings of a restricted path or method that a container's router may
    read as the restricted one."""

    async def test_ambiguous_paths_are_refused_under_a_restricted_grant(self):
        """Every spelling is refused with 400 for terminal-without-exec, and none reaches
        the container."""
        await self.put_permissions()
        for n, path in enumerate(AMBIGUOUS_PATHS):
            marker = f"x=a{n}"
            response = await self.raw(self.head("POST", f"{path}?{marker}", extra="Content-Length: 2\r\n\r\nid"))
            self.assertEqual(status_of(response), 400, (path, response))
            self.assertFalse(self.container.received(marker.encode()), path)
            self.assertIn("ambiguous request refused", self.audit_for(marker)["decision"]["reason"])

    async def test_method_overrides_are_refused_under_a_restricted_grant(self):
        """``GET /exec/run`` with an override header (any spelling) or ``_method``: 400."""
        await self.put_permissions()
        for n, (path, extra) in enumerate((
                ("/exec/run", "X-HTTP-Method-Override: POST\r\n"),
                ("/exec/run", "X-HTTP-Method: POST\r\n"),
                ("/exec/run", "X-Method-Override: POST\r\n"),
                ("/exec/run", "X_HTTP_Method_Override: POST\r\n"),
                ("/exec/run?_method=POST", ""),
                ("/exec/run?%5Fmethod=post", ""))):
            marker = f"x=o{n}"
            target = f"{path}{'&' if '?' in path else '?'}{marker}"
            response = await self.raw(self.head("GET", target, extra=extra + "\r\n"))
            self.assertEqual(status_of(response), 400, (path, extra, response))
            self.assertFalse(self.container.received(marker.encode()))

    async def test_a_full_grant_forwards_every_spelling_untouched(self):
        """Under the owner's grant (exec) the same requests pass to the container as sent."""
        await self.put_permissions()
        for n, path in enumerate(AMBIGUOUS_PATHS[:3]):
            marker = f"x=f{n}"
            response = await self.raw(self.head("POST", f"{path}?{marker}", token=FULL,
                                                extra="Content-Length: 2\r\n\r\nid"))
            self.assertEqual(status_of(response), 200, (path, response))
            self.assertTrue(self.container.received(f"POST {path}?{marker}".encode()))
        response = await self.raw(self.head("GET", "/exec/run?x=f9", token=FULL,
                                            extra="X-HTTP-Method-Override: POST\r\n\r\n"))
        self.assertEqual(status_of(response), 200, response)

    async def test_plain_restricted_requests_still_pass(self):
        """Ordinary requests under the restricted grant are untouched: paths with a query,
        percent-encoded letters that decode to nothing restricted, a terminal GET with ';'."""
        await self.put_permissions()
        for n, (method, path) in enumerate((("POST", "/input/%41"), ("POST", "/session/new"),
                                            ("GET", "/static/app.js;v=1"), ("GET", "/EXEC/log"))):
            extra = "Content-Length: 2\r\n\r\nok" if method == "POST" else "\r\n"
            response = await self.raw(self.head(method, f"{path}?x=p{n}", extra=extra))
            self.assertEqual(status_of(response), 200, (path, response))

    async def test_ambiguous_path_is_refused_over_http2_and_http3(self):
        """The same rules over HTTP/2 and HTTP/3."""
        await self.put_permissions()
        auth = [(b"authorization", b"Bearer " + RESTRICTED.encode()), (b"content-length", b"2")]
        client = await self.h2()
        stream = client.request(b"POST", b"/EXEC/run?x=h2", self.host().encode(), headers=auth, body=b"id")
        await within(stream.done, 10)
        self.assertEqual(stream.status, 400)
        h3 = await self.h3()
        stream = h3.request("POST", "/exec;a/run?x=h3", self.host(),
                            headers=[("authorization", "Bearer " + RESTRICTED)], body=b"id")
        await within(stream.done, 10)
        self.assertEqual(stream.status, 400)
        self.assertFalse(self.container.received(b"x=h2"))
        self.assertFalse(self.container.received(b"x=h3"))


class AuditTokenTests(BypassTestCase):
    """Leak 6: ``?hoody_token=`` in the audit log on error answers."""

    async def test_query_token_is_never_logged(self):
        """503 (absent container), 404 (unknown host), 400 (malformed) and a normal answer
        over HTTP/1.1, and 503s over HTTP/2 and HTTP/3: the token appears in no audit
        line; other parameters stay."""
        secret = "s3cret-token-value-0123456789"
        absent = host_for(program="terminal", index=1, container="bbbbbbbbbbbbbbbbbbbbbbbb")
        requests = [
            (self.host(), f"GET /?hoody_token={secret}&keep=1 HTTP/1.1\r\nHost: {absent}\r\n\r\n"),
            (self.host(), f"GET /?hoody_token={secret} HTTP/1.1\r\nHost: nowhere.example\r\n\r\n"),
            (self.host(), f"GET /?Hoody%5Ftoken={secret} HTTP/1.1\r\nHost: {self.host()}\r\nHost: x\r\n\r\n"),
            (self.host(), f"GET /?hoody_token={secret} HTTP/1.1\r\nHost: {self.host()}\r\n\r\n"),
            # another case and no escape: not a credential, still kept out of the line
            (self.host(), f"GET /?HOODY_TOKEN={secret}&keep=2 HTTP/1.1\r\nHost: {self.host()}\r\n\r\n"),
        ]
        for host, payload in requests:
            await deferToThread(tls_exchange, self.node, host, payload.encode())
        client = await self.h2()
        stream = client.request(b"GET", f"/?hoody_token={secret}".encode(), absent.encode())
        await within(stream.done, 10)
        h3 = await self.h3()
        stream = h3.request("GET", f"/?hoody_token={secret}", absent)
        await within(stream.done, 10)
        await until(lambda: len(audit_lines(self.node)) >= 7)
        with open(self.node.settings.audit_file) as f:
            log = f.read()
        self.assertNotIn(secret, log)
        self.assertIn("keep=1", log)
        self.assertIn("keep=2", log)
        statuses = sorted(line["status"] for line in audit_lines(self.node))
        self.assertEqual(statuses, [200, 200, 400, 404, 503, 503, 503])


class ForwardingHeaderSpellingTests(unittest.TestCase):
    """Leak 7: client-sent address headers in other spellings reach the container."""

    async def test_address_headers_in_any_spelling_are_dropped(self):
        """Every header naming a client address, in any spelling, is dropped; the gateway's
        own forwarding headers say the real peer."""
        node = start_node(self)
        backend = Backend(self, backends.app())
        register(node, backend.number)
        spoofed = ["X_Forwarded_For", "X_Real_IP", "True-Client-IP", "X-Client-IP", "X-Cluster-Client-IP",
                   "CF-Connecting-IP", "Fastly-Client-IP", "X-Original-Forwarded-For", "x-forwarded_for",
                   "X_Forwarded_Host", "Forwarded", "X-Forwarded-For", "Client-IP", "X_HOODY_INSTANCE"]
        host = host_for(index=backend.number)
        extra = "".join(f"{name}: 203.0.113.9\r\n" for name in spoofed)
        response = await deferToThread(tls_exchange, node, host,
                                       f"GET /headers HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        self.assertEqual(status_of(response), 200, response)
        headers = json.loads(response.partition(b"\r\n\r\n")[2])["headers"]
        self.assertNotIn("203.0.113.9", json.dumps(headers))
        self.assertEqual(headers["x-forwarded-for"], ["127.0.0.1"])
        self.assertEqual(headers["x-real-ip"], ["127.0.0.1"])
        for name in spoofed:
            if name.lower().replace("_", "-") not in ("x-forwarded-for", "x-real-ip", "forwarded",
                                                      "x-forwarded-host"):
                self.assertNotIn(name.lower(), headers)

    async def test_address_headers_are_dropped_where_credentials_are_consumed(self):
        """The same spellings sent among credentials the gateway takes out (a bearer
        Authorization, a token cookie beside another cookie) and a field the client's
        Connection names: the gateway rewrites the field list for the credentials, and not
        one spoofed address, credential or Connection-named field reaches the container."""
        node = start_node(self)
        backend = Backend(self, backends.app())
        register(node, backend.number)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        response = await treq.put(
            f"http://127.0.0.1:{node.admin_port}/api/v1/projects/{PROJECT}/proxy/permissions",
            data=json.dumps(PERMISSIONS).encode(), agent=Agent(reactor, pool=pool),
            headers={"Authorization": f"Bearer {node.token}"})
        self.assertEqual(response.code, 201, await response.content())
        host = host_for(index=backend.number)
        spoofed = ["X_Forwarded_For", "True-Client-IP", "x-real-ip", "X-Forwarded-For", "Forwarded",
                   "CF-Connecting-IP", "X_Real_IP"]
        for credential in (f"Authorization: Bearer {RESTRICTED}\r\nCookie: a=1; hoody_token=nope\r\n",
                           f"Cookie: hoody_token={RESTRICTED}; a=1\r\n"):
            lines = [f"{spoofed[0]}: 203.0.113.9\r\n", credential, "Connection: keep-alive, X-Secret\r\n"]
            lines += [f"{name}: 203.0.113.9\r\n" for name in spoofed[1:]] + ["X-Secret: 198.51.100.7\r\n"]
            answer = await deferToThread(tls_exchange, node, host, (
                f"GET /headers HTTP/1.1\r\nHost: {host}\r\n{''.join(lines)}\r\n").encode())
            self.assertEqual(status_of(answer), 200, answer)
            headers = json.loads(answer.partition(b"\r\n\r\n")[2])["headers"]
            seen = json.dumps(headers)
            for secret in ("203.0.113.9", "198.51.100.7", RESTRICTED, "hoody_token"):
                self.assertNotIn(secret, seen)
            self.assertNotIn("authorization", headers)
            self.assertNotIn("x-secret", headers)
            self.assertEqual(headers["x-forwarded-for"], ["127.0.0.1"])
            self.assertEqual(headers["x-real-ip"], ["127.0.0.1"])
            self.assertEqual(headers["cookie"], ["a=1"])


class ContainerStateOracleTests(BypassTestCase):
    """Leak 10: unknown, stopped and another project's containers answered alike."""

    async def test_absent_stopped_and_foreign_containers_answer_the_same(self):
        """The three answers have the same status and body; the audit keeps the reasons."""
        stopped = "cccccccccccccccccccccccc"
        register(self.node, 0, container=stopped, state="stopped", ports=self.ports)
        hosts = {"absent": host_for(program="terminal", index=1, container="bbbbbbbbbbbbbbbbbbbbbbbb"),
                 "stopped": host_for(program="terminal", index=1, container=stopped),
                 "foreign": host_for(program="terminal", index=1, project="0000000000000000000000aa")}
        answers = {}
        for name, host in hosts.items():
            response = await deferToThread(tls_exchange, self.node, host,
                                           f"GET /?x={name} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head, _, body = response.partition(b"\r\n\r\n")
            answers[name] = (status_of(response), body.split(b"\r\n\r\n")[0])
        self.assertEqual(answers["absent"][0], 503)
        self.assertEqual(answers["absent"], answers["stopped"])
        self.assertEqual(answers["absent"], answers["foreign"])
        reasons = {self.audit_for(f"x={name}")["reason"] for name in hosts}
        self.assertEqual(reasons, {"container absent", "container stopped",
                                   "container belongs to another project"})
        client = await self.h2()
        stream = client.request(b"GET", b"/", hosts["stopped"].encode())
        await within(stream.done, 10)
        self.assertEqual((stream.status, stream.body), answers["absent"])


class RepeatedResponseHeadTests(unittest.TestCase):
    """A container that answers every request with the same head (as nginx does within a
    second) and, once, smuggles a second response after its body: the gateway answers that
    head from memory after the first time, and must still judge every response's framing
    itself.  The smuggled response never reaches a client; the connection it came on is
    not used again."""

    HEAD = b"HTTP/1.1 200 OK\r\nServer: liar\r\nContent-Length: 2\r\n\r\n"
    SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPWNED!"

    def setUp(self):
        http11._heads.clear()
        self.addCleanup(http11._heads.clear)
        self.node = start_node(self)
        self.requests = 0

        def script(proto, data):
            while b"\r\n\r\n" in proto.received:
                _, proto.received = proto.received.split(b"\r\n\r\n", 1)
                self.requests += 1
                proto.transport.write(self.HEAD + b"ok" + (self.SMUGGLED if self.requests == 2 else b""))
        self.port, self.factory = raw_backend(self, script)
        register(self.node, self.port)

    async def test_a_smuggled_response_after_a_remembered_head_reaches_nobody(self):
        host = host_for(program="http", index=self.port)
        answers = []
        for i in range(4):
            answers.append(await deferToThread(
                tls_exchange, self.node, host,
                f"GET /?n={i} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()))
            if i == 0:
                self.assertIn(self.HEAD, http11._heads)  # the next ones are answered from memory
        for answer in answers:
            self.assertEqual(status_of(answer), 200, answer)
            self.assertTrue(answer.endswith(b"\r\n\r\nok"), answer)
            self.assertNotIn(b"PWNED", answer)
        self.assertEqual(self.requests, 4)
        # The connection that carried the smuggled bytes was closed, and another opened.
        self.assertGreaterEqual(len(self.factory.connections), 2)
