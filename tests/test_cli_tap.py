"""Specification of ``hoodyproxy tap`` (:mod:`hoodyproxy.admin.cli`, :mod:`hoodyproxy.admin.tapview`).

The options' mapping to the ``POST /api/v1/taps`` body and the line shown per event are
plain functions, tested as such.  The whole command runs as a subprocess against a small
twisted.web server in this process (in a thread, so the reactor serves meanwhile) that
checks the bearer token and streams the events of :mod:`tests.test_har` chunked, a line
split across chunks, then ends, or holds the stream open until the command goes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from haralyzer import HarPage, HarParser
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from hoodyproxy.admin.cli import build_parser, tap_body
from hoodyproxy.admin.tapview import TapOutput, format_event, human_duration, human_size, printable
from tests.test_har import END, EVENTS, FRAMES, GET, POST, TAP, WEBSOCKET, exchange

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "tap-test-token-0123456789abcdef"
CONTAINER = "890abcdef12345678901cdef"
PROJECT = "67e89abc123def456789abcd"
LINES = [json.dumps(event, ensure_ascii=False).encode() for event in EVENTS]


def parse(*argv: str):
    """``hoodyproxy tap ARGV``'s parsed arguments."""
    return build_parser().parse_args(["tap", *argv])


def body_of(*argv: str) -> dict:
    args = parse(*argv)
    return tap_body(args.parser, args)


def usage_error(*argv: str) -> str:
    """The usage error ``hoodyproxy tap ARGV`` exits with (status 2); its message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        body_of(*argv)
        raise AssertionError(f"no usage error for {argv}")
    return err.getvalue().splitlines()[-1]


class TapBodyTests(unittest.TestCase):
    """Options to the request body: only what is given, under the API's names."""

    def test_nothing_given(self):
        """No options: an empty match (everything) and nothing else; the node's defaults apply."""
        self.assertEqual(body_of(), {"match": {}})

    def test_every_option(self):
        """Every option lands at its key of match, capture or the tap."""
        self.assertEqual(body_of(
            "--project", PROJECT, "--container", CONTAINER, "--program", "http", "--index", "3000",
            "--host", "x.node.zone", "--alias", "my-api", "--path", "/api/", "--method", "get", "--method", "POST",
            "--status", "2xx", "--status", "404,5XX", "--ws-only", "--header", "X-Debug=1", "--bodies", "4096",
            "--no-headers", "--ws", "--ws-bytes", "128", "--ttl", "60", "--max-events", "500", "--no-redact"),
            {"match": {"project": PROJECT, "container": CONTAINER, "program": "http", "index": 3000,
                       "host": "x.node.zone", "alias": "my-api", "path_prefix": "/api/", "methods": ["GET", "POST"],
                       "status": ["2xx", "404", "5xx"], "websocket_only": True,
                       "header": {"name": "X-Debug", "value": "1"}},
             "capture": {"headers": False, "body_bytes": 4096, "websocket": True, "websocket_bytes": 128},
             "ttl_s": 60, "max_events": 500, "redact": False})

    def test_header_name_only(self):
        """--header NAME matches the header's presence: no value sent."""
        self.assertEqual(body_of("--header", "Authorization")["match"], {"header": {"name": "Authorization"}})

    def test_ws_alone(self):
        """--ws sends capture.websocket true and nothing else of capture."""
        self.assertEqual(body_of("--ws"), {"match": {}, "capture": {"websocket": True}})

    def test_fractional_ttl_and_zero_bodies(self):
        """A fractional --ttl is sent as is; --bodies 0 is sent (it is given)."""
        self.assertEqual(body_of("--ttl", "2.5", "--bodies", "0"),
                         {"match": {}, "capture": {"body_bytes": 0}, "ttl_s": 2.5})

    def test_repeated_values_once(self):
        """A method or status given twice is sent once."""
        self.assertEqual(body_of("--method", "GET,get", "--status", "2xx", "--status", "2xx")["match"],
                         {"methods": ["GET"], "status": ["2xx"]})

    def test_usage_errors(self):
        """Bad values are usage errors naming the option."""
        for argv in (("--status", "200x"), ("--status", "6xx"), ("--ttl", "0"), ("--ttl", "nan"),
                     ("--bodies", "-1"), ("--max-events", "0"), ("--path", "api"), ("--method", "G ET"),
                     ("--header", "=x"), ("--container", "nope")):
            self.assertIn(f"argument {argv[0]}", usage_error(*argv))

    def test_one_header(self):
        """A tap matches one header: --header twice is a usage error."""
        self.assertIn("give --header once", usage_error("--header", "A", "--header", "B=1"))


class FormatTests(unittest.TestCase):
    """The line shown per event."""

    def clock(self, seconds: float) -> str:
        import datetime
        return datetime.datetime.fromtimestamp(seconds).strftime("%H:%M:%S.%f")[:-3]

    def test_exchange(self):
        """CLOCK CLIENT METHOD host/path -> STATUS SIZE DURATION, the clock local with milliseconds."""
        self.assertEqual(format_event(GET), f"{self.clock(GET['time'])} 203.0.113.5 GET "
                                            "x.node.zone/api/items?a=1&b=two%20words&empty= -> 200 12B 8ms")

    def test_exchange_with_reason_and_larger_sizes(self):
        """A gateway reason is shown in parentheses; sizes and durations are human."""
        event = exchange(1, "0-1", 1765080000.25, method="POST", path="/up", status=413, bytes_out=3481,
                         duration_ms=1234.0, reason="body too large")
        self.assertEqual(format_event(event), f"{self.clock(1765080000.25)} 203.0.113.5 POST x.node.zone/up "
                                              "-> 413 3.4k 1.2s (body too large)")

    def test_websocket_exchange(self):
        """A WebSocket shows -> 101 ws, its frame count if known, and how long it was open."""
        self.assertTrue(format_event(WEBSOCKET, frames=3).endswith(
            "chat.node.zone/socket?room=1 -> 101 ws 3 frames 4.0s"))
        self.assertTrue(format_event(WEBSOCKET, frames=1).endswith("-> 101 ws 1 frame 4.0s"))
        self.assertTrue(format_event(WEBSOCKET).endswith("-> 101 ws 4.0s"))

    def test_ws_frames(self):
        """A frame: direction, kind, size and the start of its data, binary as escapes."""
        self.assertEqual(format_event(FRAMES[0]), "  ws client>container text 5B: hello")
        self.assertEqual(format_event(FRAMES[2]), "  ws container>client binary 4B: \\x00\\x01\\x02\\xff")
        frame = dict(FRAMES[1])
        del frame["data"]
        self.assertEqual(format_event(frame), "  ws container>client text 5B")

    def test_long_frame_data_cut_to_one_line(self):
        """Frame data is cut and kept to one line."""
        frame = dict(FRAMES[0], length=1000, data={"encoding": "text", "data": "line\n" * 200, "bytes": 1000,
                                                   "truncated": False})
        line = format_event(frame)
        self.assertEqual(line.count("\n"), 0)
        self.assertTrue(line.startswith("  ws client>container text 1000B: line\\nline\\n"))
        self.assertLess(len(line), 200)

    def test_control_characters_escaped(self):
        """A path or frame carrying terminal escapes is shown escaped (no terminal injection)."""
        event = exchange(1, "0-1", 1765080000.0, path="/\x1b[2J\x1b]0;owned\x07", method="G\rET")
        line = format_event(event)
        self.assertNotIn("\x1b", line)
        self.assertIn("G\\rET x.node.zone/\\x1b[2J\\x1b]0;owned\\x07 -> 200", line)
        self.assertEqual(printable("\u202eevil"), "\\u202eevil")

    def test_tap_and_end(self):
        """The first event names the tap and its match; the end says why, how many events, how many dropped."""
        self.assertEqual(format_event(TAP), "tap t-3f9a1c: host=x.node.zone (ttl 300s, max 100000 events)")
        self.assertEqual(format_event(END), "tap t-3f9a1c ended (ttl): 17 events, 5 dropped")
        self.assertEqual(format_event(dict(TAP, match={})), "tap t-3f9a1c: everything (ttl 300s, max 100000 events)")

    def test_not_shown(self):
        """Segments, unknown event types and non-objects give no line."""
        self.assertIsNone(format_event({"type": "segment", "exchange": "0-1", "offset": 0, "length": 3}))
        self.assertIsNone(format_event({"type": "heartbeat"}))
        self.assertIsNone(format_event(["not", "an", "object"]))  # type: ignore[arg-type]

    def test_human_units(self):
        """Sizes in B, k, M (1024s); durations in ms, s, m."""
        self.assertEqual([human_size(n) for n in (0, 12, 1023, 1024, 3481, 52000, 1258291, None)],
                         ["0B", "12B", "1023B", "1.0k", "3.4k", "51k", "1.2M", "-"])
        self.assertEqual([human_duration(ms) for ms in (0.4, 8.0, 999.4, 1200.0, 59_900.0, 125_000.0)],
                         ["0ms", "8ms", "999ms", "1.2s", "59.9s", "2m05s"])


class TapOutputTests(unittest.TestCase):
    """Routing the stream's lines (no network)."""

    def run_lines(self, lines, **kw) -> tuple[str, str]:
        out, err = io.StringIO(), io.StringIO()
        output = TapOutput(out, err, prefix="hoodyproxy: ", **kw)
        for line in lines:
            output.handle(line)
        return out.getvalue(), err.getvalue()

    def test_frames_counted_for_their_websocket(self):
        """The WebSocket's exchange line counts the ws events before it; ws lines only when asked."""
        out, _ = self.run_lines(LINES)
        self.assertIn("-> 101 ws 3 frames 4.0s", out)
        self.assertNotIn("  ws ", out)
        out, _ = self.run_lines(LINES, show_ws=True)
        self.assertEqual(out.count("  ws "), 5)

    def test_garbage_and_blank_lines(self):
        """A blank line is skipped quietly; a line that is not a JSON object is noted on stderr."""
        out, err = self.run_lines([b"\n", b"not json\x1b\n", b"[1]\n", LINES[1] + b"\n"])
        self.assertEqual(out.count("\n"), 1)
        self.assertEqual(err, "hoodyproxy: skipped a line that is not a JSON object: not json\\x1b\n"
                              "hoodyproxy: skipped a line that is not a JSON object: [1]\n")

    def test_dropped_noted(self):
        """An event after drops says how many were dropped."""
        _, err = self.run_lines(LINES)
        self.assertIn("hoodyproxy: 5 events dropped before this one\n", err)


# -- the whole command against a streaming server -----------------------------------------

class TapServer(Resource):
    """``POST /api/v1/taps``: checks the token, records the body, streams ``lines``
    chunked (the first line split across two chunks); ends the answer if ``finish``,
    else holds it open until the client goes."""

    isLeaf = True

    def __init__(self, lines: list[bytes], finish: bool = True, refuse: tuple[int, dict] | None = None) -> None:
        super().__init__()
        self.lines, self.finish, self.refuse = lines, finish, refuse
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.gone: list[defer.Deferred] = []

    def render_POST(self, request):
        self.headers.append({k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()})
        if request.getHeader("authorization") != f"Bearer {TOKEN}":
            request.setResponseCode(401)
            request.setHeader("content-type", "application/json")
            return json.dumps({"error": "unauthorized", "message": "missing or wrong bearer token"}).encode()
        if request.path != b"/api/v1/taps":
            request.setResponseCode(404)
            return b"{}"
        if self.refuse is not None:
            request.setResponseCode(self.refuse[0])
            request.setHeader("content-type", "application/json")
            return json.dumps(self.refuse[1]).encode()
        self.bodies.append(json.loads(request.content.read()))
        request.setHeader("content-type", "application/x-ndjson")
        first, *rest = self.lines
        request.write(first[:7])
        request.write(first[7:] + b"\n")
        for line in rest:
            request.write(line + b"\n")
        if self.finish:
            request.finish()
        else:
            self.gone.append(request.notifyFinish())
        return NOT_DONE_YET


class TrackingSite(Site):
    """A Site that can close every connection it accepted and wait until they are gone."""

    def __init__(self, resource) -> None:
        super().__init__(resource)
        self.closed: list[tuple[object, defer.Deferred]] = []

    def log(self, request) -> None:
        pass

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        closed = defer.Deferred()
        lost = protocol.connectionLost

        def connection_lost(reason):
            lost(reason)
            closed.callback(None)
        protocol.connectionLost = connection_lost
        self.closed.append((protocol, closed))
        return protocol

    async def close(self) -> None:
        for protocol, closed in self.closed:
            if not closed.called:
                protocol.transport.abortConnection()
            await closed


class CommandTests(unittest.TestCase):
    """``hoodyproxy tap`` run as a subprocess against :class:`TapServer`."""

    def serve(self, lines: list[bytes] = LINES, finish: bool = True,
              refuse: tuple[int, dict] | None = None) -> TapServer:
        self.server = TapServer(lines, finish, refuse)
        site = TrackingSite(self.server)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: defer.ensureDeferred(site.close()))
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        return self.server

    def setUp(self) -> None:
        self.home = tempfile.mkdtemp(prefix="hoodyproxy-tap-")
        self.addCleanup(shutil.rmtree, self.home, True)
        self.har = os.path.join(self.home, "tap.har")

    def argv(self, *args: str, token: str = TOKEN) -> list[str]:
        return [sys.executable, "-m", "hoodyproxy.admin.cli", "tap", "--admin-url", self.url, "--token", token,
                "--timeout", "20", *args]

    def environment(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("HOODYPROXY_") and k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
        env.update(HOME=self.home, HOODYPROXY_DATA_DIR=os.path.join(self.home, "data"), TZ="UTC",
                   PYTHONIOENCODING="utf-8",
                   PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        return env

    async def tap(self, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess:
        return await deferToThread(subprocess.run, self.argv(*args, token=token), capture_output=True,
                                   encoding="utf-8", env=self.environment(), timeout=60)

    async def test_json_prints_every_line_as_received(self):
        """--json: stdout is the stream's lines, byte for byte; the request had the body and the token."""
        self.serve()
        done = await self.tap("--json", "--host", "x.node.zone", "--bodies", "4096", "--ws")
        self.assertEqual((done.returncode, done.stderr), (0, ""), done)
        self.assertEqual(done.stdout.encode(), b"".join(line + b"\n" for line in LINES))
        self.assertEqual(self.server.bodies, [{"match": {"host": "x.node.zone"},
                                               "capture": {"body_bytes": 4096, "websocket": True}}])
        self.assertEqual((self.server.headers[0]["authorization"], self.server.headers[0]["content-type"]),
                         (f"Bearer {TOKEN}", "application/json"))

    async def test_default_output(self):
        """Without --json: one line per exchange on stdout; the tap and its end on stderr."""
        self.serve()
        done = await self.tap()
        self.assertEqual(done.returncode, 0, done)
        expected = []
        frames = 0
        for event in EVENTS:
            if event["type"] == "ws" and event["exchange"] == "1-4":
                frames += 1
            if event["type"] == "exchange":
                line = format_event(event, frames if event["websocket"] else None)
                expected.append(line.replace(line[:12], self.utc_clock(event["time"]), 1))
        self.assertEqual(done.stdout.splitlines(), expected)
        self.assertEqual(done.stderr.splitlines(), [
            "hoodyproxy: tap t-3f9a1c: host=x.node.zone (ttl 300s, max 100000 events)",
            "hoodyproxy: 5 events dropped before this one",
            "hoodyproxy: tap t-3f9a1c ended (ttl): 17 events, 5 dropped"])

    def utc_clock(self, seconds: float) -> str:
        import datetime
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]

    async def test_ws_lines(self):
        """--ws: a line per frame too, before the WebSocket's exchange line."""
        self.serve()
        done = await self.tap("--ws")
        lines = done.stdout.splitlines()
        self.assertEqual(lines[1:4], ["  ws client>container text 5B: hello", "  ws container>client text 5B: HELLO",
                                      "  ws container>client binary 4B: \\x00\\x01\\x02\\xff"])
        self.assertTrue(lines[7].endswith("chat.node.zone/socket?room=1 -> 101 ws 3 frames 4.0s"), lines)

    async def test_har_when_the_tap_ends(self):
        """--har FILE: when the end event comes, FILE is the HAR of the stream (haralyzer reads it)."""
        self.serve()
        done = await self.tap("--har", self.har, "--json")
        self.assertEqual(done.returncode, 0, done)
        self.assertEqual(done.stderr, f"hoodyproxy: wrote 8 entries to {self.har}\n")
        page = HarPage("unknown", har_parser=HarParser.from_file(self.har))
        self.assertEqual([(entry.url, entry.status) for entry in page.entries][:3],
                         [("https://x.node.zone/api/items?a=1&b=two%20words&empty=", 200),
                          ("https://chat.node.zone/socket?room=1", 101), ("https://x.node.zone/api/items", 201)])
        with open(self.har, encoding="utf-8") as f:
            self.assertEqual(json.load(f)["log"]["_hoodyproxy"]["end"]["reason"], "ttl")

    async def test_server_closes_without_an_end(self):
        """The node closing the stream without an end event ends the tap too: noted, HAR written, exit 0."""
        self.serve(LINES[:3])
        done = await self.tap("--har", self.har)
        self.assertEqual(done.returncode, 0, done)
        self.assertIn("hoodyproxy: tap t-3f9a1c closed by the node after 3 events\n", done.stderr)
        with open(self.har, encoding="utf-8") as f:
            entries = json.load(f)["log"]["entries"]
        self.assertEqual([entry["response"]["status"] for entry in entries], [200, 101])  # the GET, the open WebSocket

    async def test_ctrl_c_writes_the_har(self):
        """Ctrl-C while the tap runs: the connection is closed, the HAR written, exit 0."""
        # The GET last: once its line is out, every event sent has been read.
        server = self.serve([LINES[0], LINES[2], LINES[3], LINES[1]], finish=False)
        process = subprocess.Popen(self.argv("--har", self.har), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   encoding="utf-8", env=self.environment())
        self.addCleanup(lambda: process.poll() is None and process.kill())
        try:
            first = await deferToThread(process.stdout.readline)  # the GET: the tap is running
            self.assertIn(" GET x.node.zone/api/items", first)
            process.send_signal(signal.SIGINT)
            stdout, stderr = await deferToThread(process.communicate, timeout=30)
        finally:
            process.stdout.close()
            process.stderr.close()
        self.assertEqual(process.returncode, 0, stderr)
        self.assertIn("hoodyproxy: tap t-3f9a1c stopped (Ctrl-C) after 4 events\n", stderr)
        self.assertNotIn("Traceback", stderr)
        with self.assertRaises((ConnectionDone, ConnectionLost)):
            await server.gone[0]  # the node saw the connection go, before its answer's end
        with open(self.har, encoding="utf-8") as f:
            entries = json.load(f)["log"]["entries"]
        self.assertEqual([entry["request"]["url"] for entry in entries],
                         ["https://x.node.zone/api/items?a=1&b=two%20words&empty=",
                          "https://chat.node.zone/socket?room=1"])

    async def test_silent_node_after_the_ttl(self):
        """A node silent past the tap's ttl plus --timeout is lost: one line, exit 2, the HAR of what came."""
        tap = json.dumps(dict(TAP, ttl_s=0.2)).encode()
        server = self.serve([tap, LINES[1]], finish=False)
        done = await self.tap("--timeout", "0.3", "--har", self.har)
        self.assertEqual(done.returncode, 2, done)
        self.assertEqual(done.stderr.splitlines()[-2:], [
            f"hoodyproxy: wrote 1 entry to {self.har}",
            f"hoodyproxy: lost the admin API at {self.url}: no answer within 0.5 s"])
        with self.assertRaises((ConnectionDone, ConnectionLost)):
            await server.gone[0]

    async def test_api_error_is_one_line(self):
        """An error answer (a wrong token) prints the API's message in one line, exit 1, no HAR."""
        self.serve()
        done = await self.tap("--har", self.har, token="wrong-token")
        self.assertEqual((done.returncode, done.stdout), (1, ""), done)
        self.assertEqual(done.stderr, "hoodyproxy: 401 missing or wrong bearer token (the token sent: --token; "
                                      "for another node give --data-dir DIR (its --data-dir), set "
                                      "$HOODYPROXY_DATA_DIR, or give --token)\n")
        self.assertFalse(os.path.exists(self.har))

    async def test_refused_tap_names_the_field(self):
        """A 422 prints the field and the API's message in one line, exit 1."""
        self.serve(refuse=(422, {"error": "invalid", "message": "must be a whole number from 0 to 1048576",
                                 "field": "capture.body_bytes"}))
        done = await self.tap("--bodies", "99999999")
        self.assertEqual((done.returncode, done.stdout), (1, ""), done)
        self.assertEqual(done.stderr, "hoodyproxy: 422 capture.body_bytes: must be a whole number from 0 to 1048576\n")

    async def test_unreachable(self):
        """No API at the URL: one line, exit 2."""
        with socket.socket() as s:  # a loopback port nothing listens on (bound, then released)
            s.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{s.getsockname()[1]}"
        done = await self.tap()
        self.assertEqual((done.returncode, done.stdout), (2, ""), done)
        self.assertEqual(done.stderr, f"hoodyproxy: cannot reach the admin API at {self.url}: Connection refused\n")

    async def test_har_in_a_missing_directory(self):
        """--har into a directory that does not exist is a usage error before anything is sent."""
        server = self.serve()
        done = await self.tap("--har", os.path.join(self.home, "missing", "tap.har"))
        self.assertEqual(done.returncode, 2, done)
        self.assertIn("argument --har", done.stderr)
        self.assertEqual(server.bodies, [])
