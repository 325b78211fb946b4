"""Taps end to end: a real node, real containers, real clients over HTTP/1.1, HTTP/2,
HTTP/3 and WebSocket, and a tap client reading the admin API's NDJSON stream raw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

from autobahn.twisted.websocket import (WebSocketClientFactory, WebSocketClientProtocol,
                                        WebSocketServerFactory, WebSocketServerProtocol)
from autobahn.twisted.resource import WebSocketResource
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests import backends
from tests.h3client import connect, within
from tests.support import (CONTAINER, Backend, audit_lines, curl, host_for, register, start_node, until,
                           wait)

OTHER_CONTAINER = "aaaaaaaaaaaaaaaaaaaaaaaa"
SECRETS = ("s3cr3t-bearer-value", "c00kie-value", "qu3ry-token-value", "hoody-t0ken-value", "api-k3y-value",
           "form-passw0rd-value", "set-c00kie-value")


class TapClient(Protocol):
    """A tap's client as raw as it gets: one POST, a chunked NDJSON body decoded by hand.

    ``read=False`` never reads past the head: the gateway sees a client whose socket fills."""

    def __init__(self, token: str, body: dict | None, read: bool = True) -> None:
        self.request = json.dumps(body).encode() if body is not None else b""
        self.token = token
        self.raw = b""
        self.status: int | None = None
        self.body = b""
        self.lines: list[dict] = []
        self.text = b""  # every byte of the decoded body, to look for secrets in
        self.started = defer.Deferred()
        self.closed = defer.Deferred()
        self.read = read

    def connectionMade(self) -> None:
        self.transport.write(b"POST /api/v1/taps HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer %s\r\n"
                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (self.token.encode(), len(self.request), self.request))

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        if self.status is None:
            head, sep, rest = self.raw.partition(b"\r\n\r\n")
            if not sep:
                return
            self.status = int(head.split(b" ")[1])
            self.headers = head
            self.raw = rest
            if not self.read:
                self.transport.pauseProducing()
        self._dechunk()

    def _dechunk(self) -> None:
        while True:
            size_line, sep, rest = self.raw.partition(b"\r\n")
            if not sep:
                return
            size = int(size_line.split(b";")[0], 16) if self.status == 200 else len(self.raw)
            if self.status != 200:
                self.body += self.raw
                self.raw = b""
                return
            if len(rest) < size + 2:
                return
            self.body += rest[:size]
            self.text += rest[:size]
            self.raw = rest[size + 2:]
            while b"\n" in self.body:
                line, _, self.body = self.body.partition(b"\n")
                event = json.loads(line)
                self.lines.append(event)
                if event["type"] == "tap" and not self.started.called:
                    self.started.callback(event)
            if size == 0:
                self.transport.loseConnection()
                return

    def resume(self) -> None:
        self.transport.resumeProducing()

    def connectionLost(self, reason=None) -> None:
        if not self.started.called:
            self.started.callback(None)
        self.closed.callback(None)

    def events(self, kind: str = "exchange") -> list[dict]:
        return [e for e in self.lines if e["type"] == kind]


class Drip(Resource):
    """A server-sent event stream: one event every 0.3 s, five in all."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/event-stream")
        left = [5]

        def tick():
            request.write(b"data: tick %d\n\n" % left[0])
            left[0] -= 1
            if left[0]:
                reactor.callLater(0.3, tick)
            else:
                request.finish()
        tick()
        return NOT_DONE_YET


class Echo(WebSocketServerProtocol):
    def onOpen(self):
        self.sendMessage(b"hello from the container")

    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


class Login(Resource):
    """Answers with a cookie (for Set-Cookie redaction) and echoes nothing of the body."""

    isLeaf = True

    def render_POST(self, request):
        request.content.read()
        request.setHeader(b"Set-Cookie", b"session=set-c00kie-value; Path=/; HttpOnly")
        return b'{"ok": true}'


class WSClient(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.factory.messages.append(payload)
        if len(self.factory.messages) == 2:
            self.sendClose(1000)

    def onClose(self, wasClean, code, reason):
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"closed before open: {code}"))
        if not self.factory.closed.called:
            self.factory.closed.callback(code)


class TapTestCase(unittest.TestCase):
    config: dict = {}

    def setUp(self):
        self.node = start_node(self, self.config)
        root = backends.app()
        root.putChild(b"drip", Drip())
        root.putChild(b"login", Login())
        ws = WebSocketServerFactory(reactor=reactor)
        ws.protocol = Echo
        ws.setProtocolOptions(allowedOrigins=["*"], allowNullOrigin=True, webStatus=False)
        root.putChild(b"ws", WebSocketResource(ws))
        self.backend = Backend(self, root)
        register(self.node, self.backend.number)
        register(self.node, self.backend.number, container=OTHER_CONTAINER)
        self.token = self.node.token

    def host(self, **kw) -> str:
        kw.setdefault("index", self.backend.number)
        return host_for(**kw)

    async def tap(self, body: dict | None, read: bool = True) -> TapClient:
        client = TapClient(self.token, body, read)
        factory = ClientFactory.forProtocol(lambda: client)
        connector = reactor.connectTCP("127.0.0.1", self.node.admin_port, factory)
        self.addCleanup(connector.disconnect)
        await client.started
        return client

    def get(self, path: str = "/headers", *args: str, **kw):
        return curl(self.node, "-o", "/dev/null", "-w", "%{http_code}", *args,
                    f"https://{self.host(**kw)}:{self.node.https_port}{path}", host=self.host(**kw))

    def admin(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.node.admin_port}{path}", data=data,
                                         method=method, headers={"Authorization": f"Bearer {self.token}"})
        from twisted.internet.threads import deferToThread

        def call():
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()
        return deferToThread(call)


class ExchangeTests(TapTestCase):

    async def test_http1_exchange_with_headers_and_bodies(self):
        """An HTTP/1.1 POST shows with its request and response heads, bodies, timings, route."""
        tap = await self.tap({"match": {"container": CONTAINER}, "capture": {"body_bytes": 8}})
        started = tap.lines[0]
        self.assertEqual(started["type"], "tap")
        self.assertTrue(started["id"].startswith("t-"))
        result = await curl(self.node, "--http1.1", "-s", "-d", "0123456789abcdef", "-H", "Content-Type: text/plain",
                            f"https://{self.host()}:{self.node.https_port}/digest", host=self.host())
        self.assertEqual(result.returncode, 0)
        await until(lambda: tap.events())
        event = tap.events()[0]
        self.assertEqual((event["method"], event["path"], event["status"], event["http"]),
                         ("POST", "/digest", 200, "HTTP/1.1"))
        self.assertEqual(event["route"]["container"], CONTAINER)
        self.assertEqual(event["client"], "127.0.0.1")
        self.assertEqual(event["request"]["body"],
                         {"encoding": "text", "data": "01234567", "bytes": 8, "truncated": True})
        self.assertIn(["Content-Type", "text/plain"], event["request"]["headers"])
        self.assertEqual(event["response"]["status"], 200)
        self.assertEqual(event["response"]["body"]["bytes"], 8)
        timings = event["timings"]
        self.assertLessEqual(timings["start"], timings["upstream_sent"])
        self.assertLessEqual(timings["upstream_sent"], timings["first_byte"])
        self.assertLessEqual(timings["first_byte"], timings["end"])
        self.assertEqual(event["bytes_in"], 16)

    async def test_http2_exchange(self):
        tap = await self.tap({})
        result = await self.get("/headers", "--http2")
        self.assertEqual(result.stdout, b"200")
        await until(lambda: tap.events())
        self.assertEqual(tap.events()[0]["http"], "HTTP/2")

    async def test_http3_exchange(self):
        tap = await self.tap({"capture": {"body_bytes": 0}})
        port = self.node.ports["http3"][0].getHost().port
        client = await connect(self, reactor, port, server_name=self.host(), ca_path=self.node.ca_path)
        stream = client.request("GET", "/headers", self.host())
        await within(stream.done)
        await until(lambda: tap.events())
        event = tap.events()[0]
        self.assertEqual((event["http"], event["status"]), ("HTTP/3", 200))
        self.assertNotIn("body", event["response"])

    async def test_binary_body_is_base64(self):
        tap = await self.tap({"capture": {"body_bytes": 4}})
        await self.get("/big?size=10")
        await until(lambda: tap.events())
        body = tap.events()[0]["response"]["body"]
        self.assertEqual(body["encoding"], "base64")
        self.assertEqual(body["bytes"], 4)
        self.assertTrue(body["truncated"])

    async def test_refused_requests_show_too(self):
        """A 503 for a stopped container is an exchange a tap on that container sees."""
        tap = await self.tap({"match": {"container": CONTAINER}})
        register(self.node, self.backend.number, state="stopped")
        result = await self.get()
        self.assertEqual(result.stdout, b"503")
        await until(lambda: tap.events())
        self.assertEqual(tap.events()[0]["status"], 503)


class RedactionTests(TapTestCase):

    async def test_credentials_never_leave_the_gateway(self):
        """Authorization, cookies, the gateway's token and token-like query parameters and
        form fields are redacted in the raw stream; the container still got them."""
        tap = await self.tap({"capture": {"body_bytes": 4096}})
        result = await curl(self.node, "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            "-H", "Authorization: Bearer s3cr3t-bearer-value",
                            "-H", "X-Api-Key: api-k3y-value",
                            "-b", "sid=c00kie-value; hoody_token=hoody-t0ken-value",
                            "-d", "user=alice&password=form-passw0rd-value",
                            f"https://{self.host()}:{self.node.https_port}/login?access_token=qu3ry-token-value"
                            f"&hoody_token=hoody-t0ken-value&page=2", host=self.host())
        self.assertEqual(result.stdout, b"200")
        await until(lambda: tap.events())
        for secret in SECRETS:
            self.assertNotIn(secret.encode(), tap.text, secret)
        event = tap.events()[0]
        self.assertTrue(event["redacted"])
        headers = dict((n.lower(), v) for n, v in event["request"]["headers"])
        self.assertEqual(headers["authorization"], "[redacted]")
        self.assertIn("sid=[redacted]", headers["cookie"])
        self.assertIn("page=2", event["path"])
        self.assertIn("user=alice", event["request"]["body"]["data"])
        set_cookie = dict((n.lower(), v) for n, v in event["response"]["headers"])["set-cookie"]
        self.assertEqual(set_cookie, "session=[redacted]; Path=/; HttpOnly")

    async def test_unredacted_needs_the_node_to_allow_it(self):
        status, body = await self.admin("POST", "/api/v1/taps", {"redact": False})
        self.assertEqual(status, 422)
        self.assertEqual(json.loads(body)["field"], "redact")


class UnredactedTests(TapTestCase):
    config = {"tap": {"allow_unredacted": True}}

    async def test_a_tap_may_ask_for_credentials_when_allowed(self):
        tap = await self.tap({"redact": False})
        await self.get("/headers", "-H", "Authorization: Bearer s3cr3t-bearer-value")
        await until(lambda: tap.events())
        self.assertIn(b"s3cr3t-bearer-value", tap.text)
        self.assertFalse(tap.events()[0]["redacted"])


class MatchTests(TapTestCase):

    async def test_filters(self):
        """Each filter lets through what it names and nothing else."""
        taps = {
            "container": await self.tap({"match": {"container": OTHER_CONTAINER}}),
            "path": await self.tap({"match": {"path_prefix": "/big"}}),
            "method": await self.tap({"match": {"methods": ["POST"]}}),
            "status": await self.tap({"match": {"status": ["4xx"]}}),
            "header": await self.tap({"match": {"header": {"name": "X-Debug", "value": "yes"}}}),
            "websocket": await self.tap({"match": {"websocket_only": True}}),
            "program": await self.tap({"match": {"program": "terminal"}}),
        }
        await self.get("/headers")                                       # 200, GET, this container
        await self.get("/big?size=3")                               # path
        await curl(self.node, "-s", "-o", "/dev/null", "-d", "x",        # method
                   f"https://{self.host()}:{self.node.https_port}/digest", host=self.host())
        await self.get("/no-such-page")                                  # 404
        await self.get("/headers", "-H", "X-Debug: yes")                 # header
        await self.get("/headers", "-H", "X-Debug: no")
        await self.get("/headers", container=OTHER_CONTAINER)            # the other container
        everything = await self.tap({})
        await self.get("/headers")
        await until(lambda: everything.events())
        await wait(0.2)
        paths = {name: [(e["path"], e["route"]["container"]) for e in tap.events()] for name, tap in taps.items()}
        self.assertEqual(paths["container"], [("/headers", OTHER_CONTAINER)])
        self.assertEqual(paths["path"], [("/big?size=3", CONTAINER)])
        self.assertEqual(paths["method"], [("/digest", CONTAINER)])
        self.assertEqual(paths["status"], [("/no-such-page", CONTAINER)])
        self.assertEqual(len(paths["header"]), 1)
        self.assertEqual(paths["websocket"], [])
        self.assertEqual(paths["program"], [])

    async def test_bad_taps_get_422_naming_the_field(self):
        for body, field in (({"match": {"container": "xyz"}}, "match.container"),
                            ({"match": {"status": ["6xx"]}}, "match.status"),
                            ({"capture": {"body_bytes": 2 * 1024 * 1024}}, "capture.body_bytes"),
                            ({"ttl_s": 7200}, "ttl_s"),
                            ({"match": {"colour": "red"}}, "match.colour"),
                            ([1, 2], "body")):
            status, answer = await self.admin("POST", "/api/v1/taps", body)
            self.assertEqual(status, 422, body)
            self.assertEqual(json.loads(answer)["field"], field)
        tap = await self.tap(None)  # no body at all: every container, the default capture
        self.assertEqual(tap.status, 200)
        self.assertEqual(tap.lines[0]["match"], {})
        self.assertEqual(tap.lines[0]["capture"]["body_bytes"], 4096)

    async def test_without_the_admin_token_401(self):
        client = TapClient("wrong-token", {})
        factory = ClientFactory.forProtocol(lambda: client)
        connector = reactor.connectTCP("127.0.0.1", self.node.admin_port, factory)
        self.addCleanup(connector.disconnect)
        await until(lambda: client.status is not None)
        self.assertEqual(client.status, 401)
        self.assertEqual(self.node.stack.taps.taps, {})


class StreamTests(TapTestCase):

    async def test_long_response_shows_as_segments_while_it_runs(self):
        tap = await self.tap({"capture": {"body_bytes": 1024}})
        result = await curl(self.node, "-s", f"https://{self.host()}:{self.node.https_port}/drip", host=self.host())
        self.assertIn(b"tick 1", result.stdout)
        await until(lambda: tap.events())
        segments = tap.events("segment")
        self.assertGreaterEqual(len(segments), 2)
        exchange = tap.events()[0]
        self.assertLess(segments[0]["time"], exchange["timings"]["end"])
        self.assertLess(tap.lines.index(segments[-1]), tap.lines.index(exchange))
        joined = "".join(s["data"]["data"] for s in segments)
        self.assertEqual(joined, "".join(f"data: tick {n}\n\n" for n in (5, 4, 3, 2, 1)))
        self.assertEqual(sum(s["length"] for s in segments), len(joined))
        self.assertEqual([s["offset"] for s in segments][0], 0)


class WebSocketTests(TapTestCase):

    async def test_frames_both_ways(self):
        tap = await self.tap({"match": {"websocket_only": True}, "capture": {"websocket": True}})
        host = self.host()
        factory = WebSocketClientFactory(f"wss://{host}:{self.node.https_port}/ws")
        factory.protocol = WSClient
        factory.opened, factory.closed, factory.messages = defer.Deferred(), defer.Deferred(), []
        with open(self.node.ca_path, "rb") as f:
            ca = ssl.Certificate.loadPEM(f.read())
        endpoint = wrapClientTLS(ssl.optionsForClientTLS(host, trustRoot=ca),
                                 TCP4ClientEndpoint(reactor, "127.0.0.1", self.node.https_port))
        proto = await endpoint.connect(factory)
        self.addCleanup(lambda: proto.transport.loseConnection())
        client = await factory.opened
        client.sendMessage("ping from the client".encode())
        await factory.closed
        await until(lambda: tap.events())
        frames = [(f["from"], f["opcode"], f.get("data", {}).get("data")) for f in tap.events("ws")]
        self.assertIn(("container", 1, "hello from the container"), frames)
        self.assertIn(("client", 1, "ping from the client"), frames)
        self.assertIn(("container", 1, "ping from the client"), frames)
        self.assertIn("client", [sender for sender, opcode, _ in frames if opcode == 8])
        exchange = tap.events()[0]
        self.assertEqual((exchange["status"], exchange["websocket"]), (101, True))
        self.assertGreater(tap.lines.index(exchange), tap.lines.index(tap.events("ws")[-1]))


class LifecycleTests(TapTestCase):

    async def test_time_limit_ends_the_tap(self):
        tap = await self.tap({"ttl_s": 0.5})
        await tap.closed
        self.assertEqual(tap.lines[-1]["type"], "end")
        self.assertEqual(tap.lines[-1]["reason"], "ttl")

    async def test_delete_ends_the_tap_and_the_list_shows_it_until_then(self):
        tap = await self.tap({"match": {"container": CONTAINER}})
        status, body = await self.admin("GET", "/api/v1/taps")
        listed = json.loads(body)["taps"]
        self.assertEqual([t["id"] for t in listed], [tap.lines[0]["id"]])
        self.assertEqual(listed[0]["match"], {"container": CONTAINER})
        status, _ = await self.admin("DELETE", f"/api/v1/taps/{tap.lines[0]['id']}")
        self.assertEqual(status, 204)
        await tap.closed
        self.assertEqual(tap.lines[-1]["reason"], "deleted")
        status, body = await self.admin("GET", "/api/v1/taps")
        self.assertEqual(json.loads(body)["taps"], [])
        status, _ = await self.admin("DELETE", f"/api/v1/taps/{tap.lines[0]['id']}")
        self.assertEqual(status, 404)

    async def test_event_limit(self):
        tap = await self.tap({"max_events": 2})
        for _ in range(3):
            await self.get()
        await tap.closed
        self.assertEqual(len(tap.events()), 2)
        self.assertEqual(tap.lines[-1]["reason"], "max_events")

    async def test_client_leaving_ends_the_tap_and_both_ends_are_audited(self):
        tap = await self.tap({"match": {"path_prefix": "/x"}})
        tap.transport.loseConnection()
        await tap.closed
        await until(lambda: not self.node.stack.taps.taps)
        self.assertFalse(self.node.gateway.taps.active)
        events = [line for line in audit_lines(self.node) if line.get("tap") == tap.lines[0]["id"]]
        self.assertEqual([e["event"] for e in events], ["tap_start", "tap_end"])
        self.assertEqual(events[0]["match"], {"path_prefix": "/x"})
        self.assertEqual(events[0]["client"], "127.0.0.1")
        self.assertEqual(events[1]["ended"], "client closed")


class SlowConsumerTests(TapTestCase):
    config = {"tap": {"queue_events": 5}}

    async def test_a_tap_that_does_not_read_drops_and_counts_and_slows_nobody(self):
        """A tap client that stops reading: every request is still served, and when it
        reads again it is told how many events it missed."""
        slow = await self.tap({"capture": {"body_bytes": 256 * 1024}}, read=False)
        # Each event carries a 256 KiB body (about 350 kB of base64): loopback's buffers
        # fill within a few dozen, and past them the tap holds 5 and drops the rest.
        url = f"https://{self.host()}:{self.node.https_port}/big?size=262144"
        one = ["-sS", "-o", "/dev/null", "-w", "%{http_code}\\n", url]
        again = ["--cacert", self.node.ca_path, "--resolve", f"{self.host()}:{self.node.https_port}:127.0.0.1", *one]
        args = [*one]
        for _ in range(59):
            args += ["--next", *again]  # (--next starts the options afresh)
        result = await curl(self.node, *args, host=self.host(), timeout=120)
        self.assertEqual(result.stdout.split(), [b"200"] * 60, result.stderr[:500])
        taps = list(self.node.stack.taps.taps.values())
        self.assertEqual(len(taps), 1)
        self.assertGreater(taps[0].dropped, 0)
        self.assertLessEqual(len(taps[0].queue), 5)
        slow.resume()
        status, _ = await self.admin("DELETE", f"/api/v1/taps/{slow.lines[0]['id']}")
        await slow.closed
        end = slow.lines[-1]
        self.assertEqual(end["type"], "end")
        self.assertEqual(end["dropped"], taps[0].dropped)
        self.assertEqual(len(slow.events()) + end["dropped"], 60)
        self.assertTrue(any(e.get("dropped") for e in slow.events()))


class WorkersTests(unittest.SynchronousTestCase):
    """With two workers, a tap sees the exchanges either worker served."""

    def test_exchanges_of_both_workers_reach_the_tap(self):
        from bench.procs import Gateway, start_backend
        backend, backend_port = start_backend()
        self.addCleanup(backend.stop)
        gateway = Gateway(["--workers", "2"])
        self.addCleanup(gateway.stop)
        host = gateway.register(backend_port)
        import http.client
        import threading
        conn = http.client.HTTPConnection("127.0.0.1", gateway.admin_port, timeout=90)
        conn.request("POST", "/api/v1/taps", body=json.dumps({"ttl_s": 120}),
                     headers={"Authorization": f"Bearer {gateway.token}"})
        response = conn.getresponse()
        tap_id = json.loads(response.readline())["id"]
        seen: dict[int, int] = {}

        def read():  # until the tap ends (the DELETE below, or the gateway stopping)
            try:
                for line in response:
                    event = json.loads(line)
                    if event["type"] == "end":
                        return
                    if event["type"] == "exchange":
                        seen[event["worker"]] = seen.get(event["worker"], 0) + 1
            except (OSError, AttributeError, ValueError):
                return  # (the connection closed under the reader)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        self.addCleanup(reader.join, 30)
        self.addCleanup(conn.close)
        url = f"https://{host}:{gateway.https_port}/"
        deadline = time.monotonic() + 60
        # Fresh connections, so that the kernel spreads them; until each worker served some.
        while len(seen) < 2 and time.monotonic() < deadline:
            for _ in range(6):
                subprocess.run(["curl", *gateway.curl_args(host), "-s", "-o", "/dev/null", url], timeout=30)
            time.sleep(0.3)
        self.assertEqual(sorted(seen), [0, 1])
        req = urllib.request.Request(f"http://127.0.0.1:{gateway.admin_port}/api/v1/taps/{tap_id}",
                                     method="DELETE", headers={"Authorization": f"Bearer {gateway.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            self.assertEqual(r.status, 204)


class CommandTests(TapTestCase):
    """``hoodyproxy tap`` against a real node: found through the node's data directory."""

    def command(self, *args: str):
        from twisted.internet.threads import deferToThread
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        env.pop("HOODYPROXY_DATA_DIR", None)
        argv = [sys.executable, "-m", "hoodyproxy.admin.cli", "tap", "--data-dir", self.node.data_dir, *args]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        return process, deferToThread(process.communicate, timeout=60)

    async def started(self, count: int = 1) -> None:
        await until(lambda: len(self.node.stack.taps.taps) == count)

    async def test_readable_lines_and_a_har_file_a_har_reader_reads(self):
        from haralyzer import HarParser
        har = os.path.join(self.node.data_dir, "tap.har")
        process, done = self.command("--container", CONTAINER, "--bodies", "64", "--max-events", "2",
                                     "--har", har)
        await self.started()
        await self.get("/headers")
        await curl(self.node, "-s", "-o", "/dev/null", "-d", "hello",
                   f"https://{self.host()}:{self.node.https_port}/digest", host=self.host())
        out, err = await done
        self.assertEqual(process.returncode, 0, err)
        lines = out.decode().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn(f"GET {self.host()}:{self.node.https_port}/headers -> 200", lines[0])
        self.assertIn("POST", lines[1])
        self.assertIn(b"max_events", err)
        with open(har) as f:
            parsed = HarParser(json.load(f))
        entries = parsed.har_data["entries"]
        self.assertEqual([e["request"]["method"] for e in entries], ["GET", "POST"])
        self.assertEqual(entries[1]["request"]["postData"]["text"], "hello")
        self.assertEqual(entries[0]["response"]["status"], 200)

    async def test_json_prints_the_raw_events(self):
        process, done = self.command("--json", "--max-events", "1")
        await self.started()
        await self.get("/headers")
        out, err = await done
        self.assertEqual(process.returncode, 0, err)
        kinds = [json.loads(line)["type"] for line in out.decode().splitlines()]
        self.assertEqual(kinds, ["tap", "exchange", "end"])
