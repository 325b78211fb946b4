"""End to end: a real node over real TLS on loopback, forwarding to real container services."""

from __future__ import annotations

import hashlib
import json

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet import ssl
from twisted.trial import unittest

from tests import backends
from tests.support import (CONTAINER, OTHER_PROJECT, PROJECT, Backend, audit_lines, curl,
                           host_for, https_agent, raw_backend, register, start_node, until, url, wait)


class TLSClient(Protocol):
    """A raw HTTP/1.1-over-TLS client: the test writes bytes and reads what comes back."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = defer.Deferred()
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost = True
        self.reason = reason
        self.closed.callback(None)


async def tls_client(case, node, hostname: str | None = None) -> TLSClient:
    with open(node.ca_path, "rb") as f:
        ca = ssl.Certificate.loadPEM(f.read())
    hostname = hostname or host_for()
    endpoint = wrapClientTLS(ssl.optionsForClientTLS(hostname, trustRoot=ca),
                             TCP4ClientEndpoint(reactor, "127.0.0.1", node.https_port))
    client = await connectProtocol(endpoint, TLSClient())

    def close():
        if not client.lost:
            client.transport.abortConnection()
            return client.closed
    case.addCleanup(close)
    return client


class GatewayTestCase(unittest.TestCase):
    config: dict = {}

    def setUp(self):
        self.node = start_node(self, self.config)
        self.backend = Backend(self, backends.app())
        register(self.node, self.backend.number)
        self.agent = https_agent(self, self.node)

    def url(self, path="/", **kw):
        kw.setdefault("index", self.backend.number)
        return url(self.node, path, **kw)

    async def get_json(self, path="/headers", **kw):
        response = await treq.get(self.url(path, **kw), agent=self.agent, headers=kw.pop("headers", None))
        return response, json.loads(await response.content())


class ForwardingTests(GatewayTestCase):

    async def test_request_reaches_container_and_response_comes_back(self):
        """A GET on the route hostname reaches the container's port and its answer returns."""
        response = await treq.get(self.url("/headers?x=1"), agent=self.agent)
        self.assertEqual(response.code, 200)
        seen = json.loads(await response.content())
        self.assertEqual(seen["uri"], "/headers?x=1")
        self.assertEqual(seen["method"], "GET")

    async def test_host_is_preserved(self):
        """The container sees the Host the client sent."""
        response = await treq.get(self.url("/headers"), agent=self.agent)
        seen = json.loads(await response.content())
        self.assertEqual(seen["headers"]["host"], [f"{host_for(index=self.backend.number)}:{self.node.https_port}"])

    async def test_forwarding_headers_are_the_gateways_own(self):
        """X-Forwarded-* and Forwarded are set by the gateway; what the client sent is dropped."""
        response = await treq.get(self.url("/headers"), agent=self.agent, headers={
            "X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "http", "Forwarded": "for=1.2.3.4",
            "X-Forwarded-Host": "evil.example", "X-Real-IP": "198.51.100.8"})
        headers = json.loads(await response.content())["headers"]
        self.assertEqual(headers["x-forwarded-for"], ["127.0.0.1"])
        self.assertEqual(headers["x-forwarded-proto"], ["https"])
        self.assertEqual(headers["x-real-ip"], ["127.0.0.1"])
        self.assertEqual(headers["x-forwarded-host"], [f"{host_for(index=self.backend.number)}:{self.node.https_port}"])
        self.assertEqual(len(headers["forwarded"]), 1)
        self.assertTrue(headers["forwarded"][0].startswith("for=127.0.0.1;"))

    async def test_hop_by_hop_headers_are_not_forwarded(self):
        """Headers named in Connection, Keep-Alive, TE and Proxy-Connection stop at the gateway."""
        client = await tls_client(self, self.node)
        host = f"{host_for(index=self.backend.number)}:{self.node.https_port}"
        client.transport.write(
            f"GET /headers HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive, X-Secret\r\n"
            "X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\n"
            "X-Kept: yes\r\n\r\n".encode())
        await until(lambda: b"}" in client.received)
        headers = json.loads(client.received.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[-1]
                             if b"chunked" in client.received.split(b"\r\n\r\n")[0].lower()
                             else client.received.split(b"\r\n\r\n", 1)[1])["headers"]
        for name in ("x-secret", "keep-alive", "te", "proxy-connection"):
            self.assertNotIn(name, headers)
        self.assertEqual(headers["x-kept"], ["yes"])

    async def test_fields_a_containers_connection_names_stop_at_the_gateway(self):
        """A container's only hop-by-hop field is ``Connection: keep-alive, ...`` (nginx's
        usual answer, with more names): the fields it names, in either spelling, are not
        passed to the client; the others are, in order."""
        answer = (b"HTTP/1.1 200 OK\r\nX-Before: 1\r\nConnection: keep-alive, X-Internal, X_Debug\r\n"
                  b"X-Internal: secret\r\nX-Debug: trace\r\nX-After: 2\r\nContent-Length: 2\r\n\r\nok")
        port, _ = raw_backend(self, lambda proto, data: proto.transport.write(answer))
        client = await tls_client(self, self.node, host_for(index=port))
        client.transport.write(f"GET / HTTP/1.1\r\nHost: {host_for(index=port)}\r\n\r\n".encode())
        await until(lambda: client.received.endswith(b"\r\n\r\nok"))
        head = client.received.split(b"\r\n\r\n", 1)[0].lower()
        for name in (b"x-internal", b"x-debug", b"secret", b"trace", b"keep-alive"):
            self.assertNotIn(name, head)
        self.assertLess(head.index(b"\r\nx-before: 1"), head.index(b"\r\nx-after: 2"))

    async def test_each_request_is_routed_by_its_own_host(self):
        """Two requests on one kept-alive connection go where their own Host says."""
        other = Backend(self, backends.app())
        other_container = "aaaaaaaaaaaaaaaaaaaaaaaa"
        register(self.node, other.number, container=other_container)
        client = await tls_client(self, self.node)
        first = f"{host_for(index=self.backend.number)}:{self.node.https_port}"
        second = f"{host_for(index=other.number, container=other_container)}:{self.node.https_port}"
        client.transport.write(f"GET /headers HTTP/1.1\r\nHost: {first}\r\n\r\n".encode())
        await until(lambda: client.received.count(b"HTTP/1.1 200") == 1 and client.received.endswith(b"}"))
        client.transport.write(f"GET /headers HTTP/1.1\r\nHost: {second}\r\n\r\n".encode())
        await until(lambda: client.received.count(b"HTTP/1.1 200") == 2 and client.received.endswith(b"}"))
        hosts = [line for line in client.received.split(b'"host": ["')[1:]]
        self.assertTrue(hosts[0].startswith(first.encode()))
        self.assertTrue(hosts[1].startswith(second.encode()))
        routes = [line["route"]["container"] for line in audit_lines(self.node)]
        self.assertEqual(routes, [CONTAINER, other_container])

    async def test_instance_program_goes_to_its_port_with_instance_header(self):
        """terminal-2 goes to the terminal port (here overridden) and the service learns the instance."""
        register(self.node, 0, ports={"terminal": self.backend.number})
        response = await treq.get(url(self.node, "/headers", program="terminal", index=2), agent=self.agent)
        seen = json.loads(await response.content())
        self.assertEqual(response.code, 200)
        self.assertEqual(seen["headers"]["x-hoody-instance"], ["2"])

    async def test_client_cannot_forge_the_instance_header(self):
        """A client-sent X-Hoody-Instance is replaced by the gateway's."""
        register(self.node, 0, ports={"terminal-3": self.backend.number})
        response = await treq.get(url(self.node, "/headers", program="terminal", index=3), agent=self.agent,
                                  headers={"X-Hoody-Instance": "9"})
        self.assertEqual(json.loads(await response.content())["headers"]["x-hoody-instance"], ["3"])

    async def test_upstream_connections_are_kept_alive(self):
        """Sequential requests to one service reuse one pooled connection to the container."""
        for _ in range(3):
            response = await treq.get(self.url("/headers"), agent=self.agent)
            await response.content()
        self.assertEqual(self.node.pool.opened, 1)

    async def test_absolute_form_uri_is_routed_by_its_authority(self):
        """An absolute-form request target is routed by its authority, and forwarded in origin form."""
        client = await tls_client(self, self.node)
        host = host_for(index=self.backend.number)
        client.transport.write(
            f"GET https://{host}/headers HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n".encode())
        await until(lambda: client.received.endswith(b"}"))
        body = json.loads(client.received.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[1].rsplit(b"\r\n", 3)[0]) \
            if b"chunked" in client.received.lower() else json.loads(client.received.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body["uri"], "/headers")
        self.assertEqual(body["headers"]["host"], [host])

    async def test_curl_gets_the_page(self):
        """A real curl over TLS, trusting the node's CA, reaches the container."""
        result = await curl(self.node, "--http1.1", "-i", self.url("/headers"), host=host_for(index=self.backend.number))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"HTTP/1.1 200", result.stdout)

    async def test_audit_line_for_each_exchange(self):
        """One JSON audit line per exchange with who, what, where and how it went."""
        response = await treq.post(self.url("/digest"), b"x" * 1000, agent=self.agent)
        await response.content()
        [line] = audit_lines(self.node)
        self.assertEqual(line["client"], "127.0.0.1")
        self.assertEqual(line["method"], "POST")
        self.assertEqual(line["path"], "/digest")
        self.assertEqual(line["status"], 200)
        self.assertEqual(line["bytes_in"], 1000)
        self.assertGreater(line["bytes_out"], 0)
        self.assertEqual(line["route"], {"project": PROJECT, "container": CONTAINER,
                                         "program": "http", "index": self.backend.number})
        self.assertIn("duration_ms", line)
        self.assertIn("time", line)


class RoutingErrorTests(GatewayTestCase):

    async def assertError(self, response, status, code):
        self.assertEqual(response.code, status)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        body = json.loads(await response.content())
        self.assertEqual(body["error"], code)
        return body

    async def test_unknown_program_is_404(self):
        """An unknown program name is a 404 saying so."""
        response = await treq.get(url(self.node, "/", program="nosuch", index=1), agent=self.agent)
        await self.assertError(response, 404, "unknown_program")

    async def test_index_out_of_range_is_404(self):
        """http-0 names no port: 404."""
        response = await treq.get(url(self.node, "/", program="http", index=0), agent=self.agent)
        await self.assertError(response, 404, "index_out_of_range")

    async def test_host_of_another_node_is_404(self):
        """A host under another node of the zone is not served here."""
        client = await tls_client(self, self.node)
        other = host_for(index=self.backend.number, suffix="node-eu.containers.localhost")
        client.transport.write(f"GET / HTTP/1.1\r\nHost: {other}\r\n\r\n".encode())
        await until(lambda: b"}" in client.received)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 404"))
        self.assertIn(b'"wrong_node"', client.received)

    async def test_missing_host_is_400(self):
        """An HTTP/1.0 request without Host gets 400."""
        client = await tls_client(self, self.node)
        client.transport.write(b"GET / HTTP/1.0\r\n\r\n")
        await client.closed
        self.assertTrue(client.received.startswith(b"HTTP/1.0 400"), client.received[:40])
        self.assertIn(b'"missing_host"', client.received)

    async def test_container_absent_is_503_with_retry_after(self):
        """A container the live map does not know: 503, JSON, Retry-After."""
        response = await treq.get(url(self.node, "/", container="bbbbbbbbbbbbbbbbbbbbbbbb", index=80),
                                  agent=self.agent)
        await self.assertError(response, 503, "container_unavailable")
        self.assertTrue(response.headers.getRawHeaders(b"retry-after")[0].isdigit())

    async def test_container_stopped_is_503(self):
        """A stopped container: 503."""
        register(self.node, 0, state="stopped")
        response = await treq.get(self.url("/"), agent=self.agent)
        await self.assertError(response, 503, "container_unavailable")

    async def test_container_of_another_project_is_503_like_an_absent_one(self):
        """The right container id under the wrong project does not reveal the container: the
        same 503 as a container the live map does not know."""
        response = await treq.get(self.url("/", project=OTHER_PROJECT), agent=self.agent)
        await self.assertError(response, 503, "container_unavailable")

    async def test_change_in_live_map_applies_to_next_request(self):
        """Stopping and starting a container takes effect on the very next request."""
        response = await treq.get(self.url("/headers"), agent=self.agent)
        self.assertEqual(response.code, 200)
        await response.content()
        register(self.node, 0, state="stopped")
        response = await treq.get(self.url("/headers"), agent=self.agent)
        self.assertEqual(response.code, 503)
        await response.content()
        register(self.node, 0, state="running")
        response = await treq.get(self.url("/headers"), agent=self.agent)
        self.assertEqual(response.code, 200)
        await response.content()

    async def test_error_body_does_not_echo_input(self):
        """A hostile label is not reflected in the error body."""
        client = await tls_client(self, self.node)
        client.transport.write(b"GET / HTTP/1.1\r\nHost: <script>x</script>.node-local.containers.localhost\r\n\r\n")
        await until(lambda: b"}" in client.received)
        self.assertNotIn(b"<script>", client.received)
        self.assertIn(b" 404 ", client.received.split(b"\r\n")[0])


class UpstreamFailureTests(GatewayTestCase):
    config = {"upstream": {"response_timeout": 1.0}}

    async def test_refused_is_502_without_internal_address(self):
        """A container port nobody listens on: 502, and the body names no address or port."""
        # Find a closed port: listen, then stop listening.
        from twisted.internet.protocol import Factory
        closed = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        number = closed.getHost().port
        await closed.stopListening()
        response = await treq.get(self.url("/", index=number), agent=self.agent)
        body = await response.content()
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"], "bad_gateway")
        self.assertNotIn(b"127.0.0.1", body)
        self.assertNotIn(str(number).encode(), body)

    async def test_no_response_headers_in_time_is_504(self):
        """A container that accepts and never answers: 504 after the response timeout."""
        port, factory = raw_backend(self, lambda p, d: None)
        response = await treq.get(self.url("/", index=port), agent=self.agent)
        self.assertEqual(response.code, 504)
        self.assertEqual(json.loads(await response.content())["error"], "gateway_timeout")
        [line] = audit_lines(self.node)
        self.assertEqual(line["status"], 504)
        self.assertIn("reason", line)

    async def test_kept_connection_that_stops_answering_is_504(self):
        """A container that answers once, then hangs on the next request of the same
        keep-alive connection (a deadlocked worker): that request is timed out too, on the
        pooled connection's deadline, and the connection is closed."""
        def script(proto, data):
            if proto.received.count(b"\r\n\r\n") == 1:
                proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        port, factory = raw_backend(self, script)
        first = await treq.get(self.url("/", index=port), agent=self.agent)
        self.assertEqual((first.code, await first.content()), (200, b"ok"))
        second = await treq.get(self.url("/again", index=port), agent=self.agent)
        self.assertEqual(second.code, 504)
        self.assertEqual(json.loads(await second.content())["error"], "gateway_timeout")
        self.assertEqual(len(factory.connections), 1)  # the same, pooled connection
        self.assertIn(b"GET /again ", factory.connections[0].received)
        await until(lambda: len(factory.lost) == 1)
        self.assertEqual([line["status"] for line in audit_lines(self.node)], [200, 504])

    async def test_client_going_away_cancels_upstream_request(self):
        """When the client disconnects, the gateway closes its connection to the container."""
        port, factory = raw_backend(self, lambda p, d: None)
        client = await tls_client(self, self.node, host_for(index=port))
        client.transport.write(f"GET /slow HTTP/1.1\r\nHost: {host_for(index=port)}\r\n\r\n".encode())
        await until(lambda: factory.connections and b"\r\n\r\n" in factory.connections[0].received)
        client.transport.loseConnection()
        await until(lambda: len(factory.lost) == 1)
        await until(lambda: len(audit_lines(self.node)) == 1)
        self.assertEqual(audit_lines(self.node)[0]["status"], 499)

    async def test_container_dying_mid_body_aborts_the_client(self):
        """Content-Length promised, connection dropped: the client's connection is aborted, no clean end."""
        def script(proto, data):
            if b"\r\n\r\n" in proto.received:
                proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
                proto.transport.loseConnection()
        port, factory = raw_backend(self, script)
        result = await curl(self.node, self.url("/", index=port), host=host_for(index=port))
        self.assertNotEqual(result.returncode, 0)
        self.assertLess(len(result.stdout), 100000)

    async def test_container_dying_mid_chunked_body_aborts_the_client(self):
        """A chunked response cut before its last chunk is never turned into a complete one."""
        def script(proto, data):
            if b"\r\n\r\n" in proto.received:
                proto.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                proto.transport.loseConnection()
        port, factory = raw_backend(self, script)
        result = await curl(self.node, self.url("/", index=port), host=host_for(index=port))
        self.assertNotEqual(result.returncode, 0)

    async def test_garbage_from_container_is_502(self):
        """A container that does not speak HTTP: 502."""
        def script(proto, data):
            proto.transport.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        port, factory = raw_backend(self, script)
        response = await treq.get(self.url("/", index=port), agent=self.agent)
        self.assertEqual(response.code, 502)
        await response.content()

    async def test_stale_pooled_connection_is_retried(self):
        """A kept-alive connection the container closed meanwhile is replaced without an error."""
        def script(proto, data):
            if proto.received.endswith(b"\r\n\r\n"):
                proto.received = b""
                proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        port, factory = raw_backend(self, script)
        response = await treq.get(self.url("/", index=port), agent=self.agent)
        self.assertEqual(await response.content(), b"ok")
        # The container drops the idle connection silently (no FIN seen by the pool yet).
        factory.connections[0].transport.abortConnection()
        response = await treq.get(self.url("/", index=port), agent=self.agent)
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.content(), b"ok")


class StreamingTests(GatewayTestCase):

    async def test_request_body_flows_before_it_is_complete(self):
        """The container receives the head and the first body bytes while the client is still sending."""
        port, factory = raw_backend(self, lambda p, d: None)
        client = await tls_client(self, self.node, host_for(index=port))
        client.transport.write(f"POST /up HTTP/1.1\r\nHost: {host_for(index=port)}\r\n"
                               "Content-Length: 10\r\n\r\nhello".encode())
        await until(lambda: factory.connections and factory.connections[0].received.endswith(b"hello"))
        self.assertIn(b"Content-Length: 10\r\n", factory.connections[0].received)
        client.transport.write(b"world")
        await until(lambda: factory.connections[0].received.endswith(b"helloworld"))

    async def test_chunked_request_body_flows_chunked(self):
        """A chunked upload of unknown length is forwarded chunked, piece by piece."""
        port, factory = raw_backend(self, lambda p, d: None)
        client = await tls_client(self, self.node, host_for(index=port))
        client.transport.write(f"POST /up HTTP/1.1\r\nHost: {host_for(index=port)}\r\n"
                               "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode())
        await until(lambda: factory.connections and factory.connections[0].received.endswith(b"5\r\nhello\r\n"))
        self.assertIn(b"Transfer-Encoding: chunked", factory.connections[0].received)
        client.transport.write(b"0\r\n\r\n")
        await until(lambda: factory.connections[0].received.endswith(b"0\r\n\r\n"))

    async def test_response_flows_before_it_is_complete(self):
        """The client gets the first part of the response while the container is still writing."""
        def script(proto, data):
            if proto.received.endswith(b"\r\n\r\n"):
                proto.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst!\r\n")
        port, factory = raw_backend(self, script)
        client = await tls_client(self, self.node, host_for(index=port))
        client.transport.write(f"GET /stream HTTP/1.1\r\nHost: {host_for(index=port)}\r\n\r\n".encode())
        await until(lambda: b"first!" in client.received)
        factory.connections[0].transport.write(b"5\r\nlast!\r\n0\r\n\r\n")
        await until(lambda: client.received.endswith(b"0\r\n\r\n"))
        self.assertIn(b"last!", client.received)

    async def test_large_upload_streams_through(self):
        """A 64 MiB upload arrives whole and unchanged (checked by length and SHA-256)."""
        size = 64 << 20
        data = backends.pattern(size)
        result = await self._curl_upload(data)
        self.assertEqual(result.returncode, 0, result.stderr)
        body = json.loads(result.stdout)
        self.assertEqual(body, {"length": size, "sha256": hashlib.sha256(data).hexdigest()})

    def _curl_upload(self, data):
        import subprocess
        from twisted.internet.threads import deferToThread
        host = host_for(index=self.backend.number)
        cmd = ["curl", "-sS", "--max-time", "60", "--cacert", self.node.ca_path, "--resolve",
               f"{host}:{self.node.https_port}:127.0.0.1", "-T", "-", "-X", "POST", self.url("/digest")]
        return deferToThread(subprocess.run, cmd, input=data, capture_output=True, timeout=90)

    async def test_large_download_streams_through(self):
        """A 64 MiB download arrives whole and unchanged, with Content-Length and chunked framing."""
        size = 64 << 20
        expected = hashlib.sha256(backends.pattern(size)).hexdigest()
        for chunked in ("0", "1"):
            result = await curl(self.node, "-o", "-", self.url(f"/big?size={size}&chunked={chunked}"),
                                host=host_for(index=self.backend.number))
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(len(result.stdout), size)
            self.assertEqual(hashlib.sha256(result.stdout).hexdigest(), expected)

    async def test_expect_100_continue(self):
        """A client that waits for 100 Continue gets it and its body goes through."""
        result = await curl(self.node, "-H", "Expect: 100-continue", "--data-binary", "x" * 5000,
                            self.url("/digest"), host=host_for(index=self.backend.number))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["length"], 5000)

    async def test_head_request(self):
        """HEAD gets the headers and no body, and the connection stays usable."""
        response = await treq.head(self.url("/big?size=1000"), agent=self.agent)
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.content(), b"")
        response = await treq.get(self.url("/headers"), agent=self.agent)
        self.assertEqual(response.code, 200)
        await response.content()


class EchoClient(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.factory.messages.append(payload)

    def onClose(self, wasClean, code, reason):
        if not self.factory.closed.called:
            self.factory.closed.callback((wasClean, code))


async def ws_connect(case, node, port, path="/echo"):
    host = host_for(index=port)
    factory = WebSocketClientFactory(f"wss://{host}:{node.https_port}{path}")
    factory.protocol = EchoClient
    factory.opened = defer.Deferred()
    factory.closed = defer.Deferred()
    factory.messages = []
    with open(node.ca_path, "rb") as f:
        ca = ssl.Certificate.loadPEM(f.read())
    endpoint = wrapClientTLS(ssl.optionsForClientTLS(host, trustRoot=ca),
                             TCP4ClientEndpoint(reactor, "127.0.0.1", node.https_port))
    await endpoint.connect(factory)
    proto = await factory.opened

    def close():
        if not factory.closed.called:
            proto.dropConnection(abort=True)
            return factory.closed
    case.addCleanup(close)
    return proto, factory


class WebSocketTests(GatewayTestCase):
    config = {"websocket": {"handshake_timeout": 1.0}}

    async def test_websocket_echo(self):
        """A real autobahn client opens a WebSocket through the gateway and gets its echo."""
        proto, factory = await ws_connect(self, self.node, self.backend.number)
        proto.sendMessage(b"hello")
        await until(lambda: factory.messages == [b"hello"])
        proto.sendMessage(b"\x00\x01binary", isBinary=True)
        await until(lambda: len(factory.messages) == 2)
        self.assertEqual(factory.messages[1], b"\x00\x01binary")
        proto.sendClose(1000)
        self.assertEqual((await factory.closed)[1], 1000)
        await until(lambda: any(line["status"] == 101 for line in audit_lines(self.node)))

    async def test_many_websockets_to_one_service(self):
        """Twenty simultaneous WebSockets to the same service URL each get their own echoes."""
        clients = [await ws_connect(self, self.node, self.backend.number) for _ in range(20)]
        for i, (proto, factory) in enumerate(clients):
            proto.sendMessage(f"player {i}".encode())
        for i, (proto, factory) in enumerate(clients):
            await until(lambda f=factory: len(f.messages) == 1)
            self.assertEqual(factory.messages, [f"player {i}".encode()])

    async def test_websocket_handshake_timeout(self):
        """A container that never answers the upgrade: 504 after the handshake timeout."""
        port, factory = raw_backend(self, lambda p, d: None)
        client = await tls_client(self, self.node, host_for(index=port))
        client.transport.write(
            f"GET /ws HTTP/1.1\r\nHost: {host_for(index=port)}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        await until(lambda: b"\r\n\r\n" in client.received)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 504"))
        self.assertIn(b"Upgrade: websocket", factory.connections[0].received)

    async def test_refused_upgrade_is_an_ordinary_response(self):
        """A container answering an upgrade with 400 is relayed as a normal response."""
        client = await tls_client(self, self.node, host_for(index=self.backend.number))
        client.transport.write(
            f"GET /headers HTTP/1.1\r\nHost: {host_for(index=self.backend.number)}\r\nConnection: Upgrade\r\n"
            "Upgrade: websocket\r\n\r\n".encode())
        await until(lambda: client.received.endswith(b"}") or client.received.endswith(b"0\r\n\r\n"))
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200"))


class WebSocketIdleTests(GatewayTestCase):
    config = {"websocket": {"idle_timeout": 0.5}}

    async def test_idle_websocket_is_closed(self):
        """A tunnel with no traffic for the idle timeout is closed on both sides."""
        proto, factory = await ws_connect(self, self.node, self.backend.number)
        await factory.closed
        await until(lambda: any(line.get("reason") == "idle timeout" for line in audit_lines(self.node)))


class RequestHygieneTests(GatewayTestCase):

    async def raw(self, request: bytes, port: int | None = None) -> bytes:
        client = await tls_client(self, self.node, host_for(index=port or self.backend.number))
        client.transport.write(request)
        await until(lambda: b"\r\n\r\n" in client.received)
        return client.received

    async def test_content_length_with_transfer_encoding_is_rejected(self):
        """A request with both Content-Length and chunked framing (a smuggling vector) gets 400
        and never reaches the container."""
        port, factory = raw_backend(self, lambda p, d: None)
        received = await self.raw(
            f"POST / HTTP/1.1\r\nHost: {host_for(index=port)}\r\nContent-Length: 5\r\n"
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(), port)
        self.assertTrue(received.startswith(b"HTTP/1.1 400"), received[:30])
        self.assertEqual(factory.connections, [])

    async def test_two_content_lengths_are_rejected(self):
        """Two Content-Length headers: 400, nothing forwarded."""
        port, factory = raw_backend(self, lambda p, d: None)
        received = await self.raw(
            f"POST / HTTP/1.1\r\nHost: {host_for(index=port)}\r\nContent-Length: 1\r\n"
            "Content-Length: 2\r\n\r\nab".encode(), port)
        self.assertTrue(received.startswith(b"HTTP/1.1 400"), received[:30])
        self.assertEqual(factory.connections, [])

    async def test_two_hosts_are_rejected(self):
        """Two Host headers: 400 (which one would be the route?)."""
        host = host_for(index=self.backend.number)
        received = await self.raw(f"GET / HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n".encode())
        self.assertTrue(received.startswith(b"HTTP/1.1 400"), received[:30])


class IPv6ContainerTests(GatewayTestCase):

    async def test_container_on_ipv6_address(self):
        """A container whose internal address is IPv6 is reached the same way."""
        from twisted.web.server import Site
        site = Site(backends.app())
        site.log = lambda request: None
        try:
            port = reactor.listenTCP(0, site, interface="::1")
        except Exception as e:  # pragma: no cover - hosts without IPv6 loopback
            raise unittest.SkipTest(f"no IPv6 loopback here: {e}")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        register(self.node, 0, container="cccccccccccccccccccccccc", address="::1")
        response = await treq.get(url(self.node, "/headers", container="cccccccccccccccccccccccc", index=number),
                                  agent=self.agent)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(await response.content())["peer"], "::1")


class ClientIdleTimeoutTests(GatewayTestCase):
    config = {"client": {"idle_timeout": 0.5}}

    async def test_idle_client_connection_is_closed(self):
        """A kept-alive client connection with nothing to do is closed after the idle timeout."""
        client = await tls_client(self, self.node)
        client.transport.write(f"GET /headers HTTP/1.1\r\nHost: {host_for(index=self.backend.number)}\r\n\r\n".encode())
        await until(lambda: client.received.endswith(b"}"))
        await client.closed
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200"))

    async def test_request_in_flight_is_not_cut_by_the_idle_timeout(self):
        """A response that takes longer than the idle timeout still arrives."""
        def script(proto, data):
            if proto.received.endswith(b"\r\n\r\n"):
                reactor.callLater(1.0, proto.transport.write,
                                  b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        port, factory = raw_backend(self, script)
        client = await tls_client(self, self.node, host_for(index=port))
        client.transport.write(f"GET / HTTP/1.1\r\nHost: {host_for(index=port)}\r\n\r\n".encode())
        await until(lambda: client.received.endswith(b"slow") or client.lost)
        self.assertTrue(client.received.endswith(b"slow"))
