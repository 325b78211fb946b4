"""HTTP/2 end to end: curl --http2, h2load and an h2-based client through a real node.

The same request path as HTTP/1.1: routing, permissions, forwarding and audit are not
re-tested here in depth, only shown to apply to HTTP/2 streams.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import h2.errors
import h2.settings
import treq
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from wsproto.frame_protocol import FrameProtocol, Opcode

from tests import backends
from tests.h2client import h2_connect
from tests.support import (CONTAINER, PROJECT, Backend, audit_lines, curl, host_for, raw_backend, register,
                           start_node, until, url, wait)

OTHER = "0123456789abcdef01234567"
TOKEN = "robot-token-0123456789abcdefghijklmnop"


class CountingDownload(Resource):
    """``/count?size=N``: N bytes, pulled by the transport; ``written`` says how many went out."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.finished = False

    def render_GET(self, request):
        size = int(request.args[b"size"][0])
        request.setHeader(b"Content-Length", b"%d" % size)
        block = backends.pattern(1 << 16)
        resource = self

        class Producer:
            left = size

            def resumeProducing(self):
                if self.left <= 0:
                    request.unregisterProducer()
                    request.finish()
                    resource.finished = True
                    return
                piece = block[: min(len(block), self.left)]
                self.left -= len(piece)
                resource.written += len(piece)
                request.write(piece)

            def stopProducing(self):
                self.left = 0

        request.registerProducer(Producer(), False)
        return NOT_DONE_YET


class Http2Case(unittest.TestCase):
    config: dict = {}

    def setUp(self):
        self.node = start_node(self, self.config)
        self.counting = CountingDownload()
        root = backends.app()
        root.putChild(b"count", self.counting)
        self.backend = Backend(self, root)
        register(self.node, self.backend.number)
        self.host = host_for(index=self.backend.number)

    def url(self, path="/"):
        return url(self.node, path, index=self.backend.number)


class CurlTests(Http2Case):
    async def test_curl_http2_get(self):
        """curl negotiates h2 by ALPN and gets the container's answer; the audit line says HTTP/2."""
        result = await curl(self.node, "--http2", "-D", "-", "-o", "/dev/null", "-w", "%{http_version}",
                            self.url("/headers"), host=self.host)
        self.assertEqual(result.returncode, 0, result.stderr)
        head = result.stdout.decode()
        self.assertIn("HTTP/2 200", head)
        self.assertTrue(head.endswith("2"), head)
        self.assertIn(f'alt-svc: h3=":{self.node.https_port}"; ma=86400', head.lower())
        records = [r for r in audit_lines(self.node) if r["path"] == "/headers"]
        self.assertEqual(records[-1]["http"], "2")
        self.assertEqual(records[-1]["status"], 200)

    async def test_container_sees_http11_with_forwarding_headers(self):
        """Toward the container the gateway speaks HTTP/1.1 and the Host is the :authority."""
        result = await curl(self.node, "--http2", self.url("/headers?x=1"), host=self.host)
        seen = json.loads(result.stdout)
        self.assertEqual(seen["uri"], "/headers?x=1")
        self.assertEqual(seen["headers"]["host"], [f"{self.host}:{self.node.https_port}"])
        self.assertEqual(seen["headers"]["x-forwarded-proto"], ["https"])
        self.assertEqual(seen["headers"]["x-forwarded-for"], ["127.0.0.1"])

    async def test_cookies_are_joined(self):
        """Cookie crumbs sent as separate HTTP/2 fields reach the container as one header."""
        client = await h2_connect(self, self.node, self.host)
        stream = client.request(b"GET", b"/headers", self.host.encode(),
                                headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
        await stream.done
        seen = json.loads(stream.body)
        self.assertEqual(seen["headers"]["cookie"], ["a=1; b=2"])

    async def test_upload_and_download_stream(self):
        """32 MiB up and 32 MiB down over HTTP/2 arrive whole and unchanged."""
        size = 32 << 20
        data = backends.pattern(size)
        cmd = ["curl", "-sS", "--http2", "--max-time", "120", "--cacert", self.node.ca_path, "--resolve",
               f"{self.host}:{self.node.https_port}:127.0.0.1", "-T", "-", "-X", "POST", self.url("/digest")]
        result = await deferToThread(subprocess.run, cmd, input=data, capture_output=True, timeout=150)
        self.assertEqual(result.returncode, 0, result.stderr)
        digest = json.loads(result.stdout)
        self.assertEqual(digest, {"length": size, "sha256": hashlib.sha256(data).hexdigest()})
        result = await curl(self.node, "--http2", "-o", "-", self.url(f"/big?size={size}&chunked=1"),
                            host=self.host, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256(result.stdout).hexdigest(), hashlib.sha256(data).hexdigest())

    async def test_errors_are_json_over_http2(self):
        """Unknown host and stopped container answer as over HTTP/1.1, with a JSON body."""
        unknown = f"nothing-here.{self.node.settings.suffix}"
        result = await curl(self.node, "--http2", "-w", "\n%{http_code}", f"https://{unknown}:{self.node.https_port}/",
                            host=unknown)
        body, _, code = result.stdout.decode().rpartition("\n")
        self.assertEqual(code, "404")
        self.assertEqual(json.loads(body)["error"], "bad_route")
        register(self.node, self.backend.number, state="stopped")
        result = await curl(self.node, "--http2", "-w", "\n%{http_code}", self.url("/"), host=self.host)
        self.assertEqual(result.stdout.decode().rpartition("\n")[2], "503")

    async def test_h2load(self):
        """h2load: 2,000 requests over 4 connections, 10 streams each, all answered 2xx."""
        if shutil.which("h2load") is None:
            raise unittest.SkipTest("h2load is not installed (Debian package nghttp2-client)")
        cmd = ["h2load", "-n", "2000", "-c", "4", "-m", "10",
               f"--connect-to=127.0.0.1:{self.node.https_port}", self.url("/headers")]
        result = await deferToThread(subprocess.run, cmd, capture_output=True, timeout=120)
        out = result.stdout.decode()
        self.assertEqual(result.returncode, 0, out + result.stderr.decode())
        self.assertIn("2000 succeeded, 0 failed", out)
        self.assertIn("status codes: 2000 2xx", out)
        self.assertIn("Application protocol: h2", out)


class NoHttp2Tests(Http2Case):
    config = {"http2": {"enabled": False}, "http3": {"enabled": False}}

    async def test_http2_off_means_http11_and_no_alt_svc(self):
        result = await curl(self.node, "--http2", "-D", "-", "-o", "/dev/null", "-w", "%{http_version}",
                            self.url("/headers"), host=self.host)
        self.assertEqual(result.returncode, 0, result.stderr)
        head = result.stdout.decode()
        self.assertTrue(head.endswith("1.1"), head)
        self.assertNotIn("alt-svc", head.lower())
        self.assertEqual(self.node.ports["http3"], [])


class StreamTests(Http2Case):
    async def test_settings_advertise_extended_connect_and_limits(self):
        client = await h2_connect(self, self.node, self.host)
        remote = client.remote_settings
        self.assertEqual(remote[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL], 1)
        self.assertEqual(remote.max_concurrent_streams, 128)
        self.assertEqual(remote.max_header_list_size, 65536)

    async def test_coalesced_connection_routes_each_request_by_its_authority(self):
        """One connection, two containers under the wildcard: each stream reaches its own."""
        other = Backend(self, backends.app())
        register(self.node, other.number, container=OTHER)
        other_host = host_for(index=other.number, container=OTHER)
        client = await h2_connect(self, self.node, self.host)
        first = client.request(b"GET", b"/headers", self.host.encode())
        second = client.request(b"GET", b"/headers", other_host.encode())
        await first.done
        await second.done
        self.assertEqual((first.status, second.status), (200, 200))
        self.assertEqual(json.loads(first.body)["headers"]["host"], [self.host])
        self.assertEqual(json.loads(second.body)["headers"]["host"], [other_host])
        routes = {r["route"]["container"] for r in audit_lines(self.node) if r.get("route")}
        self.assertEqual(routes, {CONTAINER, OTHER})

    async def test_authority_not_covered_by_the_certificate_is_421(self):
        """A request for a host the connection's certificate does not cover gets 421."""
        client = await h2_connect(self, self.node, self.host)
        stream = client.request(b"GET", b"/", b"shop.example.com")
        await stream.done
        self.assertEqual(stream.status, 421)
        self.assertEqual(json.loads(stream.body)["error"], "misdirected_request")
        # The connection stays usable for hosts it does cover.
        ok = client.request(b"GET", b"/headers", self.host.encode())
        await ok.done
        self.assertEqual(ok.status, 200)

    async def test_each_host_keeps_its_own_answer(self):
        """The connection remembers which hosts its certificate covers: asked again, and
        past the number it remembers, a host not covered is still 421 and a covered one
        still served."""
        from hoodyproxy.tls.context import COVERED_HOSTS
        client = await h2_connect(self, self.node, self.host)
        own = self.host.encode()
        others = [b"shop-%d.example.com" % i for i in range(COVERED_HOSTS + 8)]
        for _ in range(2):
            for start in range(0, len(others), 10):
                streams = []
                for other in others[start:start + 10]:
                    streams.append((other, client.request(b"GET", b"/", other)))
                    streams.append((own, client.request(b"GET", b"/headers", own)))
                for _, stream in streams:
                    await stream.done
                self.assertEqual([(host, stream.status) for host, stream in streams],
                                 [(host, 200 if host == own else 421) for host, _ in streams])

    async def test_each_spelling_of_a_host_is_checked_as_that_host(self):
        """Upper case, a port and a trailing dot name the same covered host (200, twice:
        the hostname is kept per spelling), the same spellings of a host not covered are
        421, and an authority that names no host (an IPv6 literal: 404; a port alone: 400)
        is refused every time it is asked."""
        client = await h2_connect(self, self.node, self.host)
        own = self.host.encode()
        spellings = [own, own.upper(), own + b":443", own + b".", b"shop.example.com", b"SHOP.example.com:443",
                     b"shop.example.com.", b"[2001:db8::1]", b":443"]
        expected = [200, 200, 200, 200, 421, 421, 421, 404, 400]
        for _ in range(2):
            streams = [client.request(b"GET", b"/", host) for host in spellings]
            for stream in streams:
                await stream.done
            self.assertEqual([stream.status for stream in streams], expected)

    async def test_the_sni_name_itself_is_not_misdirected(self):
        """A client that asked for a name in its handshake and took the certificate it got
        (no certificate of its own yet, verification off) is routed as over HTTP/1.1; only
        other names on that connection are misdirected."""
        client = await h2_connect(self, self.node, "shop.example.com", verify=False)
        same = client.request(b"GET", b"/", b"shop.example.com")
        other = client.request(b"GET", b"/", b"other.example.com")
        await same.done
        await other.done
        self.assertEqual(json.loads(same.body)["error"], "unknown_host")
        self.assertEqual(other.status, 421)

    async def test_permissions_apply_to_http2(self):
        """A bearer-token permission set guards HTTP/2 streams exactly as HTTP/1.1 requests."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        admin = f"http://127.0.0.1:{self.node.admin_port}/api/v1/containers/{CONTAINER}/proxy/permissions"
        body = {"project": PROJECT, "groups": {"robots": {"type": "token", "value": TOKEN}},
                "permissions": {"robots": {"http": True}}, "default": "deny"}
        response = await treq.request("PUT", admin, agent=Agent(reactor, pool=pool),
                                      headers={"Authorization": f"Bearer {self.node.token}"},
                                      data=json.dumps(body).encode())
        self.assertIn(response.code, (200, 201), await response.content())
        client = await h2_connect(self, self.node, self.host)
        denied = client.request(b"GET", b"/headers", self.host.encode())
        allowed = client.request(b"GET", b"/headers", self.host.encode(),
                                 headers=[(b"authorization", b"Bearer " + TOKEN.encode())])
        await denied.done
        await allowed.done
        self.assertEqual(denied.status, 401)
        self.assertIn(b"bearer", (denied.header(b"www-authenticate") or b"").lower())
        self.assertEqual(allowed.status, 200)
        self.assertNotIn("authorization", json.loads(allowed.body)["headers"])

    async def test_head_and_no_body_statuses(self):
        client = await h2_connect(self, self.node, self.host)
        stream = client.request(b"HEAD", b"/big?size=1000", self.host.encode())
        await stream.done
        self.assertEqual(stream.status, 200)
        self.assertEqual(stream.body, b"")
        self.assertEqual(stream.header(b"content-length"), b"1000")

    async def test_plain_connect_is_refused(self):
        client = await h2_connect(self, self.node, self.host)
        sid = client.conn.get_next_available_stream_id()
        from tests.h2client import StreamResult
        stream = client.streams[sid] = StreamResult()
        stream.id = sid
        client.conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"example.com:443")])
        client.flush()
        await stream.head
        self.assertEqual(stream.status, 405)


class FlowControlTests(Http2Case):
    async def test_slow_client_does_not_make_the_gateway_buffer_the_response(self):
        """A client that reads nothing stalls the container: the gateway holds little of it.

        The client takes one flow-control window and stops.  What the container gets to
        write is then that window, the kernel's socket buffers on both hops (a few MiB on
        loopback, at most ~20 MiB with Linux's default autotuning limits) and whatever the
        gateway holds; a gateway that ignored backpressure would pull all 64 MiB.  Reading
        again must set the container writing again.  Nothing here waits for the whole body:
        through a 64 KiB window it would only measure the client's pace (it once made this
        test take two minutes), not the gateway's buffering.
        """
        size = 64 << 20
        client = await h2_connect(self, self.node, self.host, auto_ack=False)
        stream = client.request(b"GET", b"/count?size=%d" % size, self.host.encode())
        stream.keep = False
        await stream.head
        await until(lambda: stream.received >= 65535 - 16384, timeout=30)
        # Give a gateway that ignored backpressure every chance to show it: wait until the
        # container has written nothing for half a second.
        previous = -1
        while previous != self.counting.written:
            previous = self.counting.written
            await wait(0.5)
        stalled = self.counting.written
        self.assertLess(stalled, 48 << 20)
        self.assertFalse(self.counting.finished)
        # Reading again drains what was held and the container writes again.
        client.auto_ack = True
        client.ack(stream, stream.received)
        await until(lambda: stream.received > stalled and self.counting.written > stalled + (1 << 20),
                    timeout=30)

    async def test_slow_container_does_not_make_the_gateway_buffer_the_upload(self):
        """A container that reads nothing stops the client's upload at the stream window."""
        accepted = []

        class Silent(Protocol):
            def connectionMade(self):
                accepted.append(self)
                self.transport.pauseProducing()

        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: [p.transport.abortConnection() for p in accepted])
        register(self.node, 0, container=OTHER, ports={"http-9000": port.getHost().port})
        host = host_for(index=9000, container=OTHER)
        client = await h2_connect(self, self.node, host)
        size = 256 << 20
        stream = client.request(b"POST", b"/upload", host.encode(),
                                headers=[(b"content-length", b"%d" % size)], end_stream=False)
        block = b"u" * (1 << 20)
        for _ in range(size >> 20):
            client.send(stream.id, block)
        await until(lambda: client.conn.local_flow_control_window(stream.id) <= 0, timeout=60)
        previous = -1
        while previous != stream.sent:
            previous = stream.sent
            await wait(0.5)
        self.assertLess(stream.sent, 48 << 20)


class WebSocketOverHttp2Tests(Http2Case):
    async def open_ws(self, client, path=b"/echo", headers=()):
        stream = client.request(b"CONNECT", path, self.host.encode(), protocol=b"websocket",
                                headers=[(b"sec-websocket-version", b"13"), *headers], end_stream=False)
        await stream.head
        return stream

    async def test_websocket_echo_over_extended_connect(self):
        """RFC 8441: CONNECT with :protocol websocket reaches the container as an Upgrade, and echoes."""
        client = await h2_connect(self, self.node, self.host)
        stream = await self.open_ws(client)
        self.assertEqual(stream.status, 200)
        self.assertIsNone(stream.header(b"sec-websocket-accept"))
        frames = FrameProtocol(client=True, extensions=[])
        got = []

        def on_data(data):
            frames.receive_bytes(data)
            got.extend(frames.received_frames())
        stream.on_data = on_data
        client.send(stream.id, frames.send_data("hello over h2", fin=True))
        await until(lambda: any(f.opcode == Opcode.TEXT for f in got))
        text = [f for f in got if f.opcode == Opcode.TEXT][0]
        self.assertEqual(text.payload, "hello over h2")
        # The closing handshake as a browser does it: close, then the container's close.
        client.send(stream.id, frames.close(1000, "bye"))
        await until(lambda: any(f.opcode == Opcode.CLOSE for f in got))
        await stream.done
        await until(lambda: any(r["status"] == 101 for r in audit_lines(self.node)))
        record = [r for r in audit_lines(self.node) if r["status"] == 101][-1]
        self.assertEqual(record["http"], "2")
        self.assertGreater(record["bytes_in"], 0)

    async def test_websocket_and_requests_share_a_connection(self):
        client = await h2_connect(self, self.node, self.host)
        stream = await self.open_ws(client)
        self.assertEqual(stream.status, 200)
        plain = client.request(b"GET", b"/headers", self.host.encode())
        await plain.done
        self.assertEqual(plain.status, 200)

    async def test_websocket_to_a_plain_http_service_fails_cleanly(self):
        """The container answers 200 without switching protocols: the client must not take
        that for an open tunnel (a 2xx is what opens one in RFC 8441), so it gets 502."""
        client = await h2_connect(self, self.node, self.host)
        stream = await self.open_ws(client, path=b"/headers")
        await stream.done
        self.assertEqual(stream.status, 502)
        self.assertEqual(json.loads(stream.body)["error"], "bad_gateway")

    async def test_unknown_protocol_is_refused(self):
        client = await h2_connect(self, self.node, self.host)
        stream = client.request(b"CONNECT", b"/echo", self.host.encode(), protocol=b"something-else",
                                end_stream=False)
        await stream.head
        self.assertEqual(stream.status, 400)


class GuardTests(Http2Case):
    config = {"http2": {"max_resets": 50}}

    async def test_rapid_reset_closes_the_connection(self):
        """CVE-2023-44487: streams opened and reset at once end the connection with ENHANCE_YOUR_CALM."""
        client = await h2_connect(self, self.node, self.host)
        for _ in range(200):
            stream = client.request(b"GET", b"/headers", self.host.encode())
            client.conn.reset_stream(stream.id, error_code=h2.errors.ErrorCodes.CANCEL)
            client.flush()
            if client.lost:
                break
        await client.closed
        self.assertEqual(client.goaway, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        # The node still serves.
        result = await curl(self.node, "--http2", "-o", "/dev/null", "-w", "%{http_code}",
                            self.url("/headers"), host=self.host)
        self.assertEqual(result.stdout, b"200")

    async def test_continuation_flood_closes_the_connection(self):
        """A header block that never ends (CONTINUATION frames without END_HEADERS) is cut off."""
        from hyperframe.frame import ContinuationFrame, HeadersFrame
        client = await h2_connect(self, self.node, self.host)
        headers = HeadersFrame(1)
        headers.data = client.conn.encoder.encode([(b":method", b"GET"), (b":scheme", b"https"),
                                                   (b":path", b"/"), (b":authority", self.host.encode())])
        client.transport.write(headers.serialize())
        for _ in range(1000):
            if client.lost:
                break
            cont = ContinuationFrame(1)
            cont.data = client.conn.encoder.encode([(b"x-flood", b"y" * 1000)])
            client.transport.write(cont.serialize())
        await client.closed
        result = await curl(self.node, "--http2", "-o", "/dev/null", "-w", "%{http_code}",
                            self.url("/headers"), host=self.host)
        self.assertEqual(result.stdout, b"200")

    async def test_oversized_header_list_is_refused(self):
        client = await h2_connect(self, self.node, self.host)
        stream = client.request(b"GET", b"/headers", self.host.encode(),
                                headers=[(b"x-big-%d" % i, b"v" * 4000) for i in range(40)])
        await stream.done
        self.assertNotEqual(stream.status, 200)
        result = await curl(self.node, "--http2", "-o", "/dev/null", "-w", "%{http_code}",
                            self.url("/headers"), host=self.host)
        self.assertEqual(result.stdout, b"200")


class StreamLimitTests(Http2Case):
    config = {"http2": {"max_concurrent_streams": 4}}

    async def test_a_stream_past_the_limit_ends_the_connection(self):
        """Five requests opened at once, their bodies still to come, on a connection that
        allows four (written raw: h2's client would hold the fifth back): the fifth is a
        connection error, PROTOCOL_ERROR, as h2 answers it, and the node still serves."""
        from hyperframe.frame import HeadersFrame
        client = await h2_connect(self, self.node, self.host)
        self.assertEqual(client.remote_settings.max_concurrent_streams, 4)
        frames = []
        for stream_id in (1, 3, 5, 7, 9):
            headers = HeadersFrame(stream_id)
            headers.data = client.conn.encoder.encode([
                (b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/echo"),
                (b":authority", self.host.encode()), (b"content-length", b"5")])
            headers.flags.add("END_HEADERS")
            frames.append(headers.serialize())
        client.transport.write(b"".join(frames))
        await client.closed
        self.assertEqual(client.goaway, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        result = await curl(self.node, "--http2", "-o", "/dev/null", "-w", "%{http_code}",
                            self.url("/headers"), host=self.host)
        self.assertEqual(result.stdout, b"200")


class IdleTests(Http2Case):
    config = {"client": {"idle_timeout": 0.5}}

    async def test_idle_connection_gets_goaway_and_is_closed(self):
        client = await h2_connect(self, self.node, self.host)
        stream = client.request(b"GET", b"/headers", self.host.encode())
        await stream.done
        self.assertEqual(stream.status, 200)
        await client.closed
        self.assertEqual(client.goaway, h2.errors.ErrorCodes.NO_ERROR)


class AdvertisedPortTests(Http2Case):
    config = {"http3": {"advertised_port": 4433}}

    async def test_alt_svc_names_the_advertised_port(self):
        """Behind NAT the public UDP port differs: Alt-Svc names the configured one."""
        client = await h2_connect(self, self.node, self.host)
        stream = client.request(b"GET", b"/headers", self.host.encode())
        await stream.done
        self.assertEqual(stream.header(b"alt-svc"), b'h3=":4433"; ma=86400')
        self.assertEqual(len(self.node.ports["http3"]), 1)


class OptionsTests(unittest.SynchronousTestCase):
    def test_command_line_overrides(self):
        from hoodyproxy.config import settings_from_mapping
        from hoodyproxy.service import Options
        options = Options()
        options.parseOptions(["--no-http3", "--no-http2", "--http3-advertised-port", "4433"])
        settings = settings_from_mapping({}, options.overrides())
        self.assertEqual((settings.http3_enabled, settings.http2_enabled, settings.http3_advertised_port),
                         (False, False, 4433))
        self.assertIsNone(settings.alt_svc_for(8443))
        self.assertEqual(settings_from_mapping({}).alt_svc_for(8443), b'h3=":8443"; ma=86400')

    def test_bad_values_name_their_key(self):
        from hoodyproxy.config import ConfigError, settings_from_mapping
        for doc, key in (({"http3": {"retry": "sometimes"}}, "[http3] retry"),
                         ({"http3": {"advertised_port": 70000}}, "[http3] advertised_port"),
                         ({"http2": {"max_concurrent_streams": 0}}, "[http2] max_concurrent_streams"),
                         ({"http2": {"enabled": "yes"}}, "[http2] enabled"),
                         ({"http2": {"stream_window": 100}}, "[http2] stream_window")):
            with self.assertRaises(ConfigError) as caught:
                settings_from_mapping(doc)
            self.assertEqual(caught.exception.key, key)


class LargeResponseHeadTests(unittest.TestCase):
    """A naive container's head larger than one HTTP/2 frame: the gateway packs the
    HEADERS and CONTINUATION frames itself (h2codec.ServerConnection)."""

    #: 40,000 hex digits: past a 16 KiB frame after HPACK's Huffman coding too.
    BIG = hashlib.sha256(b"seed").hexdigest().encode() * 625

    def setUp(self):
        self.node = start_node(self)
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Big: " + self.BIG
                + b"\r\nContent-Length: 2\r\n\r\n")

        def script(proto, data):
            while b"\r\n\r\n" in proto.received:
                request, proto.received = proto.received.split(b"\r\n\r\n", 1)
                proto.transport.write(head + (b"" if request.startswith(b"HEAD ") else b"ok"))
        self.port, _ = raw_backend(self, script)
        register(self.node, self.port)

    async def test_a_head_past_one_frame_arrives_whole(self):
        """GET twice (the second head from the gateway's memory and HPACK's table) and
        HEAD (END_STREAM on the HEADERS frame that CONTINUATION frames follow): h2's own
        client, which checks every frame and field, reads each head whole."""
        host = host_for(program="http", index=self.port)
        client = await h2_connect(self, self.node, host)
        for method in (b"GET", b"GET", b"HEAD"):
            stream = client.request(method, b"/", host.encode())
            await stream.done
            self.assertEqual((stream.status, stream.header(b"x-big")), (200, self.BIG), method)
            self.assertEqual(stream.body, b"" if method == b"HEAD" else b"ok", method)


class StreamBookkeepingTests(Http2Case):
    async def test_finished_streams_are_forgotten(self):
        """Many requests on one connection (GET, HEAD, errors, early answers) leave no stream
        state behind in the gateway."""
        client = await h2_connect(self, self.node, self.host)
        streams = []
        for i in range(30):
            streams.append(client.request(b"GET", b"/headers", self.host.encode()))
            streams.append(client.request(b"HEAD", b"/big?size=100", self.host.encode()))
            streams.append(client.request(b"GET", b"/", b"nothing-%d.example.com" % i))
        for stream in streams:
            await stream.done
        self.assertEqual({s.status for s in streams}, {200, 421})
        protocols = _h2_protocols()
        self.assertEqual(len(protocols), 1)
        await until(lambda: not protocols[0].streams)


def _h2_protocols():
    import gc

    from hoodyproxy.frontend.http2 import H2ServerProtocol
    return [o for o in gc.get_objects() if isinstance(o, H2ServerProtocol) and not o.closed]
