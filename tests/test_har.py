"""Specification of the HAR 1.2 export of a tap's events (:mod:`hoodyproxy.observe.har`).

Every test builds from :data:`EVENTS`, a tap's stream as the node sends it (a plain GET,
a POST with a JSON body, a truncated binary download, a denied request, a WebSocket with
frames both ways, an event stream in segments, a WebSocket still open when the tap
ended, and events and keys of a newer node), and checks the result against a JSON Schema
written here from the HAR 1.2 spec (http://www.softwareishard.com/blog/har-12-spec/) and
through ``haralyzer``, a HAR reader written by others.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import tempfile

import jsonschema
from haralyzer import HarPage, HarParser
from twisted.trial import unittest

import hoodyproxy
from hoodyproxy.observe.har import HarBuilder, build_har, entry_time, entry_timings

T = 1765080000.5
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def body(data: str | bytes, size: int | None = None) -> dict:
    """A captured BODY as the tap sends it (bytes: base64)."""
    if isinstance(data, bytes):
        captured = {"encoding": "base64", "data": base64.b64encode(data).decode(), "bytes": len(data)}
    else:
        captured = {"encoding": "text", "data": data, "bytes": len(data.encode())}
    captured["truncated"] = size is not None and size > captured["bytes"]
    return captured


def timings(start: float, sent: float | None, first: float | None, end: float) -> dict:
    return {"start": start, "upstream_sent": sent, "first_byte": first, "end": end}


def exchange(seq: int, ident: str, start: float, **fields) -> dict:
    event = {"type": "exchange", "tap": "t-3f9a1c", "seq": seq, "worker": 0, "id": ident, "time": start,
             "timings": timings(start, start + 0.001, start + 0.007, start + 0.008), "duration_ms": 8.0,
             "client": "203.0.113.5", "http": "HTTP/1.1", "method": "GET", "host": "x.node.zone", "path": "/",
             "route": {"project": "p", "container": "c", "program": "http", "index": 3000},
             "decision": {"allowed": True}, "status": 200, "websocket": False, "bytes_in": 0, "bytes_out": 0,
             "redacted": True}
    event.update(fields)
    return event


def ws(seq: int, exchange_id: str, when: float, sender: str, opcode: int, data: str | bytes, **fields) -> dict:
    payload = data.encode() if isinstance(data, str) else data
    event = {"type": "ws", "tap": "t-3f9a1c", "seq": seq, "worker": 1, "exchange": exchange_id, "time": when,
             "host": "chat.node.zone", "path": "/socket?room=1", "from": sender, "opcode": opcode, "fin": True,
             "length": len(payload), "data": body(data)}
    event.update(fields)
    return event


TAP = {"type": "tap", "id": "t-3f9a1c", "match": {"host": "x.node.zone"},
       "capture": {"headers": True, "body_bytes": 4096, "websocket": True, "websocket_bytes": 4096},
       "ttl_s": 300, "max_events": 100000, "redact": True, "started": T, "expires": T + 300}

GET = exchange(
    1, "0-17", T + 1.0, path="/api/items?a=1&b=two%20words&empty=", bytes_out=12,
    timings=timings(T + 1.0, T + 1.001, T + 1.007, T + 1.008),
    request={"headers": [["Host", "x.node.zone"], ["Accept", "*/*"], ["Cookie", "session=[redacted]; theme=dark"]]},
    response={"status": 200, "headers": [["content-type", "text/plain; charset=utf-8"],
                                         ["set-cookie", "id=[redacted]; Path=/; Domain=x.node.zone; "
                                                        "Expires=Wed, 09 Jun 2027 10:18:14 GMT; HttpOnly; Secure"]],
              "body": body("hello world\n")})

POST = exchange(
    2, "0-18", T + 3.0, method="POST", path="/api/items", status=201, bytes_in=13, bytes_out=9, http="HTTP/2",
    request={"headers": [[":authority", "x.node.zone"], ["content-type", "application/json"]],
             "body": body('{"name":"é"}')},
    response={"status": 201, "headers": [["content-type", "application/json"], ["location", "/api/items/7"]],
              "body": body('{"id":7}\n')})

DOWNLOAD = exchange(
    3, "0-19", T + 4.0, path="/logo.png", bytes_out=10000, http="HTTP/3",
    timings=timings(T + 4.0, T + 4.002, T + 4.010, T + 4.250), duration_ms=250.0,
    response={"status": 200, "headers": [["content-type", "image/png"]], "body": body(PNG, size=10000)})

DENIED = exchange(
    4, "0-20", T + 5.0, path="/admin", status=403, reason="denied", bytes_out=0,
    decision={"allowed": False}, timings=timings(T + 5.0, None, None, T + 5.0005), duration_ms=0.5,
    request={"headers": [["Host", "x.node.zone"]]}, response={"status": 403, "headers": []})

FRAMES = [ws(5, "1-4", T + 2.1, "client", 1, "hello"), ws(6, "1-4", T + 2.2, "container", 1, "HELLO"),
          ws(7, "1-4", T + 2.3, "container", 2, b"\x00\x01\x02\xff")]
WEBSOCKET = exchange(
    8, "1-4", T + 2.0, worker=1, host="chat.node.zone", path="/socket?room=1", status=101, websocket=True,
    bytes_in=11, bytes_out=20, timings=timings(T + 2.0, T + 2.001, T + 2.004, T + 6.0), duration_ms=4000.0,
    request={"headers": [["Host", "chat.node.zone"], ["Upgrade", "websocket"]]},
    response={"status": 101, "headers": [["Upgrade", "websocket"], ["Connection", "Upgrade"]]})

SEGMENTS = [{"type": "segment", "tap": "t-3f9a1c", "seq": 9, "worker": 0, "exchange": "0-21", "time": T + 6.5,
             "host": "x.node.zone", "path": "/events", "status": 200, "offset": offset, "length": 100}
            for offset in (0, 100)]
STREAM = exchange(11, "0-21", T + 6.0, path="/events", bytes_out=200, dropped=5,
                  timings=timings(T + 6.0, T + 6.001, T + 6.002, T + 7.0), duration_ms=1000.0,
                  response={"status": 200, "headers": [["content-type", "text/event-stream"]],
                            "body": body("data: 1\n\n")})

OPEN_FRAMES = [ws(12, "0-30", T + 8.0, "client", 1, "still there?", host="live.node.zone", path="/ws"),
               ws(13, "0-30", T + 8.5, "container", 1, "yes", host="live.node.zone", path="/ws")]

FUTURE = [{"type": "heartbeat", "tap": "t-3f9a1c", "seq": 14},
          exchange(15, "0-31", T + 9.0, path="/new", new_key={"nested": True})]

END = {"type": "end", "tap": "t-3f9a1c", "reason": "ttl", "events": 17, "dropped": 5}

#: The whole stream, in the order the node sends it.
EVENTS = [TAP, GET, *FRAMES, POST, DOWNLOAD, DENIED, WEBSOCKET, *SEGMENTS, STREAM, *OPEN_FRAMES, *FUTURE, END]


# -- the HAR 1.2 structure, from the spec -------------------------------------------------

def obj(required: dict, optional: dict | None = None) -> dict:
    """An object schema: these keys required with these types (custom ``_`` keys allowed)."""
    return {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}


STRING, NUMBER, INTEGER, BOOLEAN = {"type": "string"}, {"type": "number"}, {"type": "integer"}, {"type": "boolean"}
COMMENT = {"comment": STRING}
ISO_8601 = {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)$"}
NAME_VALUE = {"type": "array", "items": obj({"name": STRING, "value": STRING}, COMMENT)}
COOKIES = {"type": "array", "items": obj({"name": STRING, "value": STRING},
                                         {"path": STRING, "domain": STRING, "expires": ISO_8601,
                                          "httpOnly": BOOLEAN, "secure": BOOLEAN, **COMMENT})}
POST_DATA = {"allOf": [obj({"mimeType": STRING}, {"text": STRING, "params": {"type": "array"}, **COMMENT}),
                       {"oneOf": [{"required": ["text"]}, {"required": ["params"]}]}]}
CONTENT = obj({"size": INTEGER, "mimeType": STRING},
              {"compression": NUMBER, "text": STRING, "encoding": STRING, **COMMENT})
REQUEST = obj({"method": STRING, "url": {"type": "string", "pattern": "^https://"}, "httpVersion": STRING,
               "cookies": COOKIES, "headers": NAME_VALUE, "queryString": NAME_VALUE, "headersSize": INTEGER,
               "bodySize": INTEGER}, {"postData": POST_DATA, **COMMENT})
RESPONSE = obj({"status": INTEGER, "statusText": STRING, "httpVersion": STRING, "cookies": COOKIES,
                "headers": NAME_VALUE, "content": CONTENT, "redirectURL": STRING, "headersSize": INTEGER,
                "bodySize": INTEGER}, COMMENT)
NON_NEGATIVE = {"type": "number", "minimum": 0}
OPTIONAL_TIMING = {"type": "number", "minimum": -1}
TIMINGS = obj({"send": NON_NEGATIVE, "wait": NON_NEGATIVE, "receive": NON_NEGATIVE},
              {"blocked": OPTIONAL_TIMING, "dns": OPTIONAL_TIMING, "connect": OPTIONAL_TIMING,
               "ssl": OPTIONAL_TIMING, **COMMENT})
CACHE = obj({}, {"beforeRequest": {"type": ["object", "null"]}, "afterRequest": {"type": ["object", "null"]},
                 **COMMENT})
WS_MESSAGES = {"type": "array", "items": obj({"type": {"enum": ["send", "receive"]}, "time": NUMBER,
                                              "opcode": INTEGER, "data": STRING})}
ENTRY = obj({"startedDateTime": ISO_8601, "time": NON_NEGATIVE, "request": REQUEST, "response": RESPONSE,
             "cache": CACHE, "timings": TIMINGS},
            {"pageref": STRING, "serverIPAddress": STRING, "connection": STRING, "_webSocketMessages": WS_MESSAGES,
             **COMMENT})
HAR_SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              **obj({"log": obj({"version": {"const": "1.2"}, "creator": obj({"name": STRING, "version": STRING},
                                                                             COMMENT),
                                 "entries": {"type": "array", "items": ENTRY}},
                                {"browser": obj({"name": STRING, "version": STRING}, COMMENT),
                                 "pages": {"type": "array"}, **COMMENT})})}


def entries_by_path(har: dict) -> dict[str, dict]:
    return {entry["request"]["url"].split("node.zone", 1)[1]: entry for entry in har["log"]["entries"]}


class HarStructureTests(unittest.TestCase):
    """The log as a whole: the spec's required structure, order, creator, comments."""

    def setUp(self) -> None:
        self.har = build_har(EVENTS)

    def test_schema_of_the_spec(self):
        """The HAR of the whole stream has every field HAR 1.2 requires, with its type."""
        jsonschema.Draft202012Validator.check_schema(HAR_SCHEMA)
        jsonschema.validate(self.har, HAR_SCHEMA, cls=jsonschema.Draft202012Validator)

    def test_the_schema_catches_a_missing_field(self):
        """The schema is not vacuous: an entry without its timings fails it."""
        del self.har["log"]["entries"][0]["timings"]
        with self.assertRaises(jsonschema.ValidationError):
            jsonschema.validate(self.har, HAR_SCHEMA, cls=jsonschema.Draft202012Validator)

    def test_version_and_creator(self):
        """log.version is 1.2; the creator is hoodyproxy, at the package's version."""
        log = self.har["log"]
        self.assertEqual((log["version"], log["creator"]), ("1.2", {"name": "hoodyproxy",
                                                                    "version": hoodyproxy.__version__}))

    def test_one_entry_per_exchange_and_open_websocket(self):
        """Each exchange is an entry, and so is the WebSocket the tap ended on."""
        self.assertEqual(sorted(entries_by_path(self.har)),
                         sorted(["/api/items?a=1&b=two%20words&empty=", "/api/items", "/logo.png", "/admin",
                                 "/socket?room=1", "/events", "/ws", "/new"]))

    def test_entries_sorted_by_start(self):
        """Entries come by startedDateTime, not by arrival (a WebSocket's exchange comes at its close)."""
        started = [entry["startedDateTime"] for entry in self.har["log"]["entries"]]
        self.assertEqual(started, sorted(started))
        self.assertEqual(self.har["log"]["entries"][1]["request"]["url"], "https://chat.node.zone/socket?room=1")

    def test_started_date_time(self):
        """startedDateTime is ISO 8601 with milliseconds and a timezone."""
        self.assertEqual(entries_by_path(self.har)["/api/items"]["startedDateTime"], "2025-12-07T04:00:03.500+00:00")

    def test_tap_end_and_drops_in_the_log(self):
        """The log's comment names the tap, how it ended and the drops; _hoodyproxy keeps them as data."""
        log = self.har["log"]
        self.assertEqual(log["comment"], "hoodyproxy tap t-3f9a1c; ended: ttl; 5 events dropped (not in this log)")
        self.assertEqual((log["_hoodyproxy"]["tap"]["id"], log["_hoodyproxy"]["end"]["reason"],
                          log["_hoodyproxy"]["dropped"]), ("t-3f9a1c", "ttl", 5))

    def test_unknown_events_and_keys_ignored(self):
        """A newer node's event types are skipped and its new keys do not get in the way."""
        entry = entries_by_path(self.har)["/new"]
        self.assertEqual(entry["response"]["status"], 200)
        self.assertNotIn("new_key", json.dumps(entry))

    def test_empty(self):
        """No events: a valid log with no entries."""
        har = HarBuilder().har()
        jsonschema.validate(har, HAR_SCHEMA, cls=jsonschema.Draft202012Validator)
        self.assertEqual(har["log"]["entries"], [])


class HarEntryTests(unittest.TestCase):
    """What one exchange event becomes."""

    def setUp(self) -> None:
        self.entries = entries_by_path(build_har(EVENTS))

    def test_plain_get(self):
        """URL (https://host + path), method, version, headers as name/value, the body as content text."""
        entry = self.entries["/api/items?a=1&b=two%20words&empty="]
        request, response = entry["request"], entry["response"]
        self.assertEqual((request["method"], request["url"], request["httpVersion"]),
                         ("GET", "https://x.node.zone/api/items?a=1&b=two%20words&empty=", "HTTP/1.1"))
        self.assertEqual(request["headers"][1], {"name": "Accept", "value": "*/*"})
        self.assertEqual((request["headersSize"], request["bodySize"]), (-1, 0))
        self.assertNotIn("postData", request)
        self.assertEqual((response["status"], response["statusText"], response["bodySize"]), (200, "OK", 12))
        self.assertEqual(response["content"], {"size": 12, "mimeType": "text/plain; charset=utf-8",
                                               "text": "hello world\n"})
        self.assertEqual(response["redirectURL"], "")

    def test_query_string(self):
        """queryString is parsed from the path: decoded, blank values kept."""
        self.assertEqual(self.entries["/api/items?a=1&b=two%20words&empty="]["request"]["queryString"],
                         [{"name": "a", "value": "1"}, {"name": "b", "value": "two words"},
                          {"name": "empty", "value": ""}])

    def test_cookies(self):
        """Cookie and Set-Cookie fill the cookies, redacted values kept as given; Set-Cookie's attributes read."""
        request, response = (self.entries["/api/items?a=1&b=two%20words&empty="][k] for k in ("request", "response"))
        self.assertEqual(request["cookies"], [{"name": "session", "value": "[redacted]"},
                                              {"name": "theme", "value": "dark"}])
        self.assertEqual(response["cookies"], [{"name": "id", "value": "[redacted]", "path": "/",
                                                "domain": "x.node.zone", "expires": "2027-06-09T10:18:14.000+00:00",
                                                "httpOnly": True, "secure": True}])

    def test_post_with_a_json_body(self):
        """A captured request body is postData (its Content-Type, its text); Location is the redirectURL."""
        entry = self.entries["/api/items"]
        self.assertEqual(entry["request"]["postData"], {"mimeType": "application/json", "text": '{"name":"é"}'})
        self.assertEqual((entry["request"]["bodySize"], entry["request"]["httpVersion"]), (13, "HTTP/2"))
        self.assertEqual((entry["response"]["status"], entry["response"]["statusText"],
                          entry["response"]["redirectURL"]), (201, "Created", "/api/items/7"))

    def test_binary_body(self):
        """A base64 body stays base64, says so, and says it is the first bytes of a longer body."""
        content = self.entries["/logo.png"]["response"]["content"]
        self.assertEqual(content, {"size": 10000, "mimeType": "image/png", "text": base64.b64encode(PNG).decode(),
                                   "encoding": "base64", "comment": f"truncated: the first {len(PNG)} of 10000 bytes"})
        self.assertEqual(self.entries["/logo.png"]["request"]["httpVersion"], "HTTP/3")

    def test_base64_request_body(self):
        """A base64 request body keeps its base64 text, marked _encoding (postData has no encoding field)."""
        event = exchange(1, "0-1", T, method="PUT", bytes_in=4, request={"body": body(b"\x00\xff\x10\x20")})
        post = build_har([event])["log"]["entries"][0]["request"]["postData"]
        self.assertEqual(post, {"mimeType": "", "text": "AP8QIA==", "_encoding": "base64"})

    def test_timings(self):
        """blocked, wait and receive from the event's points, send 0; time is their sum and the duration."""
        entry = self.entries["/logo.png"]
        self.assertEqual(entry["timings"], {"blocked": 2.0, "dns": -1, "connect": -1, "ssl": -1, "send": 0,
                                            "wait": 8.0, "receive": 240.0})
        self.assertAlmostEqual(entry["time"], 250.0, places=2)

    def test_timings_of_an_answer_from_the_gateway(self):
        """A request never sent upstream (denied): blocked -1, all the time is wait; the reason kept."""
        entry = self.entries["/admin"]
        self.assertEqual((entry["timings"]["blocked"], entry["timings"]["wait"], entry["timings"]["receive"]),
                         (-1, 0.5, 0))
        self.assertEqual((entry["time"], entry["response"]["status"], entry["_hoodyproxy"]["reason"]),
                         (0.5, 403, "denied"))

    def test_timings_never_negative(self):
        """Points out of order (clocks of two workers) give 0, not a negative time."""
        event = exchange(1, "0-1", T, timings=timings(T, T + 0.002, T + 0.001, T + 0.0005))
        result = entry_timings(event)
        self.assertTrue(all(result[k] >= 0 for k in ("send", "wait", "receive", "blocked")), result)
        self.assertEqual(entry_time(result), round(sum(v for v in result.values() if v >= 0), 3))

    def test_timings_without_points(self):
        """An event without timings: its duration_ms is the wait."""
        event = exchange(1, "0-1", T, duration_ms=12.5)
        del event["timings"]
        self.assertEqual(entry_timings(event)["wait"], 12.5)

    def test_headers_not_captured(self):
        """Without captured headers the lists are empty and the mimeType is empty, still valid."""
        har = build_har([exchange(1, "0-1", T, bytes_out=3)])
        jsonschema.validate(har, HAR_SCHEMA, cls=jsonschema.Draft202012Validator)
        entry = har["log"]["entries"][0]
        self.assertEqual((entry["request"]["headers"], entry["response"]["headers"],
                          entry["response"]["content"]), ([], [], {"size": 3, "mimeType": ""}))

    def test_own_fields(self):
        """The exchange id, client, route, decision and redaction are kept under _hoodyproxy."""
        own = self.entries["/api/items"]["_hoodyproxy"]
        self.assertEqual((own["id"], own["client"], own["route"]["index"], own["decision"], own["redacted"]),
                         ("0-18", "203.0.113.5", 3000, {"allowed": True}, True))

    def test_segments_counted(self):
        """Segments are counted on their exchange; its captured body is the content."""
        entry = self.entries["/events"]
        self.assertEqual((entry["_hoodyproxy"]["segments"], entry["response"]["content"]["text"]),
                         (2, "data: 1\n\n"))


class WebSocketTests(unittest.TestCase):
    """WebSocket exchanges: Chrome's _webSocketMessages."""

    def setUp(self) -> None:
        self.entries = entries_by_path(build_har(EVENTS))

    def test_messages_both_ways(self):
        """Frames before the exchange event are its messages: send from the client, receive from the
        container, unix-seconds times, binary frames in base64."""
        entry = self.entries["/socket?room=1"]
        self.assertEqual(entry["_resourceType"], "websocket")
        self.assertEqual(entry["_webSocketMessages"], [
            {"type": "send", "time": T + 2.1, "opcode": 1, "data": "hello", "_length": 5},
            {"type": "receive", "time": T + 2.2, "opcode": 1, "data": "HELLO", "_length": 5},
            {"type": "receive", "time": T + 2.3, "opcode": 2, "data": "AAEC/w==", "_length": 4}])

    def test_exchange_of_a_websocket(self):
        """The 101 entry: its status, its headers, no body sizes (the frames are not a body)."""
        entry = self.entries["/socket?room=1"]
        self.assertEqual((entry["response"]["status"], entry["response"]["statusText"],
                          entry["request"]["bodySize"], entry["response"]["bodySize"]),
                         (101, "Switching Protocols", 0, 0))
        self.assertIn({"name": "Upgrade", "value": "websocket"}, entry["request"]["headers"])

    def test_websocket_still_open_when_the_tap_ended(self):
        """Frames whose exchange never came make an entry of their own: 101, the URL, the frames."""
        entry = self.entries["/ws"]
        self.assertEqual((entry["request"]["url"], entry["response"]["status"], entry["startedDateTime"]),
                         ("https://live.node.zone/ws", 101, "2025-12-07T04:00:08.500+00:00"))
        self.assertEqual([m["data"] for m in entry["_webSocketMessages"]], ["still there?", "yes"])
        self.assertEqual((entry["time"], entry["_hoodyproxy"]), (500.0, {"id": "0-30", "open": True}))
        self.assertIn("tap ended", entry["comment"])

    def test_websocket_without_frames_captured(self):
        """A WebSocket exchange of a tap not capturing frames has an empty message list."""
        har = build_har([exchange(1, "0-1", T, status=101, websocket=True)])
        self.assertEqual(har["log"]["entries"][0]["_webSocketMessages"], [])

    def test_text_frame_not_utf8(self):
        """A text frame the node sent as base64 keeps it, marked _encoding; a truncated frame says so."""
        frame = ws(1, "0-1", T, "client", 1, b"\xc3", length=2)
        frame["data"]["truncated"] = True
        har = build_har([frame])
        self.assertEqual(har["log"]["entries"][0]["_webSocketMessages"],
                         [{"type": "send", "time": T, "opcode": 1, "data": "ww==", "_encoding": "base64",
                           "_truncated": True, "_length": 2}])


class ReadBackTests(unittest.TestCase):
    """The written file, read by haralyzer (an independent HAR reader)."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="hoodyproxy-har-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.path = os.path.join(directory, "tap.har")
        builder = HarBuilder()
        for event in EVENTS:
            builder.add(event)
        self.written = builder.dump(self.path)

    def test_dump_is_utf8_json_for_its_owner(self):
        """dump writes the HAR as UTF-8 JSON (non-ASCII as is), readable by its owner only, and says how
        many entries."""
        with open(self.path, "rb") as f:
            raw = f.read()
        self.assertIn('"text": "{\\"name\\":\\"é\\"}"'.encode(), raw)
        self.assertEqual(json.loads(raw.decode("utf-8")), build_har(EVENTS))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(self.written, 8)

    def test_haralyzer_reads_entries(self):
        """haralyzer finds every entry (one page: the entries have no pageref) with its URL, status and timings."""
        parser = HarParser.from_file(self.path)
        self.assertEqual((parser.version, parser.creator["name"]), ("1.2", "hoodyproxy"))
        page = HarPage("unknown", har_parser=parser)
        self.assertEqual(len(page.entries), 8)
        first = page.entries[0]
        self.assertEqual((first.url, first.status, first.request.method),
                         ("https://x.node.zone/api/items?a=1&b=two%20words&empty=", 200, "GET"))
        self.assertEqual(first.timings["wait"], 6.0)
        self.assertEqual(first.response.get_header_value("Content-Type"), "text/plain; charset=utf-8")
        self.assertEqual([entry.startTime for entry in page.entries], sorted(entry.startTime for entry in page.entries))

    def test_haralyzer_reads_post_data_and_websocket_messages(self):
        """haralyzer gives the posted text, the redirect and (as raw entry fields) the WebSocket messages."""
        page = HarPage("unknown", har_parser=HarParser.from_file(self.path))
        by_url = {entry.url: entry for entry in page.entries}
        post = by_url["https://x.node.zone/api/items"]
        self.assertEqual((post.request.text, post.request.mimeType, post.response.redirectURL),
                         ('{"name":"é"}', "application/json", "/api/items/7"))
        socket = by_url["https://chat.node.zone/socket?room=1"]
        self.assertEqual((socket.status, [m["type"] for m in socket["_webSocketMessages"]]),
                         (101, ["send", "receive", "receive"]))
        self.assertEqual(len(page.post_requests), 1)
