"""The parts of a tap that need no network: spec checking, matching, the queue, redaction,
body display and the WebSocket frame reader."""

from __future__ import annotations

import base64
import json

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from hoodyproxy.observe.capture import body_json
from hoodyproxy.observe.frames import FrameReader
from hoodyproxy.observe.redact import redact_headers, redact_target
from hoodyproxy.observe.tap import InvalidTap, Tap, TapHub, TapSpec
from hoodyproxy.routing import Target

PROJECT, CONTAINER = "67e89abc123def456789abcd", "890abcdef12345678901cdef"
TARGET = Target(PROJECT, CONTAINER, "terminal", 1, f"{PROJECT}-{CONTAINER}-terminal-1.node.zone")


def frame(opcode: int, payload: bytes, mask: bytes | None = None, fin: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    bit = 0x80 if mask else 0
    if size < 126:
        head += bytes([bit | size])
    elif size < 65536:
        head += bytes([bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + size.to_bytes(8, "big")
    if mask:
        head += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


class FrameReaderTests(unittest.TestCase):

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 8, 9, 10]), st.binary(max_size=300),
                              st.one_of(st.none(), st.binary(min_size=4, max_size=4)), st.booleans()),
                    max_size=8),
           st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=20),
           st.integers(min_value=0, max_value=64))
    def test_any_split_gives_every_frame_once(self, frames, cuts, keep):
        """However the bytes arrive, each frame is reported once, with its opcode, fin,
        length and the first ``keep`` bytes of its payload unmasked."""
        stream = b"".join(frame(op, payload, mask, fin) for op, payload, mask, fin in frames)
        seen = []
        reader = FrameReader(keep, lambda *f: seen.append(f))
        position, i = 0, 0
        while position < len(stream):
            step = cuts[i % len(cuts)]
            reader.feed(stream[position:position + step])
            position += step
            i += 1
        self.assertEqual(seen, [(op, fin, len(payload), payload[:keep]) for op, payload, _m, fin in frames])

    def test_long_frame_is_reported_when_its_captured_part_is_in(self):
        seen = []
        reader = FrameReader(4, lambda *f: seen.append(f))
        data = frame(2, b"x" * 100000)
        reader.feed(data[:20])
        self.assertEqual(seen, [(2, True, 100000, b"xxxx")])
        reader.feed(data[20:] + frame(1, b"next"))
        self.assertEqual(seen[1], (1, True, 4, b"next"))


class BodyTests(unittest.TestCase):

    def test_text_binary_and_a_cut_character(self):
        self.assertEqual(body_json(b"hello", False), {"encoding": "text", "data": "hello", "bytes": 5,
                                                      "truncated": False})
        self.assertEqual(body_json(b"\x00\x01\x02", False)["encoding"], "base64")
        self.assertEqual(base64.b64decode(body_json(b"\xff\xfe", False)["data"]), b"\xff\xfe")
        cut = "é".encode()[:1]
        shown = body_json(b"caf" + cut, True)
        self.assertEqual((shown["encoding"], shown["data"], shown["bytes"]), ("text", "caf", 3))
        self.assertEqual(body_json(b"\x1b[1mbold\x1b[0m\r\n", False)["encoding"], "text")


class RedactionTests(unittest.TestCase):

    def test_headers(self):
        shown = dict(redact_headers([(b"Authorization", b"Basic dXNlcjpwYXNz"), (b"Proxy-Authorization", b"x"),
                                     (b"Cookie", b"a=1; hoody_token=abc"), (b"X-Auth-Token", b"t"),
                                     (b"Set-Cookie", b"id=42; Secure"), (b"Referer", b"https://h/?sig=1&a=2"),
                                     (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                                     (b"Accept", b"*/*")]))
        self.assertEqual(shown["Authorization"], "[redacted]")
        self.assertEqual(shown["Proxy-Authorization"], "[redacted]")
        self.assertEqual(shown["Cookie"], "a=[redacted]; hoody_token=[redacted]")
        self.assertEqual(shown["X-Auth-Token"], "[redacted]")
        self.assertEqual(shown["Set-Cookie"], "id=[redacted]; Secure")
        self.assertEqual(shown["Referer"], "https://h/?sig=[redacted]&a=2")
        self.assertEqual(shown["Sec-WebSocket-Key"], "dGhlIHNhbXBsZSBub25jZQ==")
        self.assertEqual(shown["Accept"], "*/*")

    def test_headers_unredacted(self):
        self.assertEqual(redact_headers([(b"Authorization", b"Bearer x")], redact=False),
                         [["Authorization", "Bearer x"]])

    def test_query(self):
        self.assertEqual(redact_target("/p?access_token=a&x=1&API_KEY=b&hoody_token=c&password=d#frag"),
                         "/p?access_token=[redacted]&x=1&API_KEY=[redacted]&hoody_token=[redacted]"
                         "&password=[redacted]#frag")
        self.assertEqual(redact_target("/p?%74oken=a"), "/p?%74oken=[redacted]")
        self.assertEqual(redact_target("/plain"), "/plain")


class SpecTests(unittest.TestCase):

    def test_defaults(self):
        spec = TapSpec.from_json(None)
        self.assertEqual(spec.to_json()["capture"], {"headers": True, "body_bytes": 4096, "websocket": False,
                                                     "websocket_bytes": 4096})
        self.assertEqual((spec.ttl, spec.redact), (300.0, True))

    def test_round_trip_through_the_relay(self):
        body = {"match": {"project": PROJECT, "container": CONTAINER, "program": "terminal", "index": 1,
                          "path_prefix": "/api", "methods": ["get", "POST"], "status": ["5xx", 404],
                          "websocket_only": True, "header": {"name": "X-Debug", "value": "1"}},
                "capture": {"headers": False, "body_bytes": 10, "websocket": True, "websocket_bytes": 0},
                "ttl_s": 10, "max_events": 5}
        spec = TapSpec.from_json(body)
        spec.id, spec.started, spec.expires = "t-1", 1.0, 11.0
        again = TapSpec.from_relay(json.loads(json.dumps(spec.to_json())))
        self.assertEqual(again.to_json(), spec.to_json())
        self.assertEqual(spec.to_json()["match"]["methods"], ["GET", "POST"])

    def test_refusals_name_the_field(self):
        for body, field in (({"match": {"index": -1}}, "match.index"),
                            ({"match": {"path_prefix": "api"}}, "match.path_prefix"),
                            ({"match": {"methods": []}}, "match.methods"),
                            ({"match": {"header": {"name": "bad name"}}}, "match.header.name"),
                            ({"capture": {"websocket": "yes"}}, "capture.websocket"),
                            ({"max_events": 0}, "max_events"),
                            ({"ttl_s": 0}, "ttl_s"),
                            ({"redact": False}, "redact"),
                            ({"extra": 1}, "extra")):
            with self.assertRaises(InvalidTap) as caught:
                TapSpec.from_json(body)
            self.assertEqual(caught.exception.field, field)

    def test_matching(self):
        def spec(**match):
            return TapSpec.from_json({"match": match})
        pairs = [(b"X-Debug", b" 1 ")]
        self.assertTrue(spec().matches_request(TARGET, b"GET", b"/", [], False))
        self.assertTrue(spec(program="terminal", index=1).matches_request(TARGET, b"GET", b"/", [], False))
        self.assertFalse(spec(index=2).matches_request(TARGET, b"GET", b"/", [], False))
        self.assertTrue(spec(header={"name": "x-debug", "value": "1"}).matches_request(TARGET, b"GET", b"/",
                                                                                       pairs, False))
        self.assertFalse(spec(header="x-other").matches_request(TARGET, b"GET", b"/", pairs, False))
        self.assertTrue(spec(host=TARGET.host.upper()).matches_request(TARGET, b"GET", b"/", [], False))
        alias = Target(PROJECT, CONTAINER, "http", 3000, "my-api.node.zone")
        self.assertTrue(spec(alias="my-api").matches_request(alias, b"GET", b"/", [], False))
        self.assertFalse(spec(alias="my").matches_request(alias, b"GET", b"/", [], False))
        statuses = spec(status=["4xx", 502])
        self.assertEqual([statuses.matches_status(s) for s in (404, 200, 502, 503, None)],
                         [True, False, True, False, False])


class QueueTests(unittest.TestCase):

    def make(self, **body):
        spec = TapSpec.from_json(body)
        spec.id = "t-1"
        lines = []
        finished = []
        tap = Tap(spec, lines.append, lambda: finished.append(True), queue_events=3)
        return tap, lines, finished

    def test_a_paused_client_gets_the_queue_then_a_dropped_count(self):
        tap, lines, finished = self.make()
        tap.pauseProducing()
        for n in range(10):
            tap.offer({"type": "exchange", "n": n})
        self.assertEqual(lines, [])
        self.assertEqual((len(tap.queue), tap.dropped), (3, 7))
        tap.resumeProducing()
        tap.offer({"type": "exchange", "n": 99})
        events = [json.loads(line) for line in lines]
        self.assertEqual([e["n"] for e in events], [0, 1, 2, 99])
        self.assertEqual(events[0]["dropped"], 7)
        self.assertNotIn("dropped", events[1])
        tap.end("deleted")
        end = json.loads(lines[-1])
        self.assertEqual((end["type"], end["reason"], end["events"], end["dropped"]), ("end", "deleted", 4, 7))
        self.assertEqual(finished, [True])

    def test_event_limit_ends_the_tap(self):
        tap, lines, finished = self.make(max_events=2)
        for n in range(5):
            tap.offer({"type": "exchange"})
        self.assertEqual([json.loads(line)["type"] for line in lines], ["exchange", "exchange", "end"])
        self.assertEqual(tap.ended, "max_events")

    def test_hub_is_active_only_while_a_tap_runs_and_ends_it_at_its_time_limit(self):
        clock = Clock()
        hub = TapHub(clock, now=clock.seconds, max_taps=1)
        self.assertFalse(hub.active)
        lines = []
        tap = hub.add(TapSpec.from_json({"ttl_s": 5}), lines.append, lambda: None)
        self.assertTrue(hub.active)
        with self.assertRaises(InvalidTap):
            hub.add(TapSpec.from_json({}), lines.append, lambda: None)
        clock.advance(5)
        self.assertEqual(tap.ended, "ttl")
        self.assertFalse(hub.active)
        self.assertEqual(hub.taps, {})
        self.assertEqual(json.loads(lines[-1])["reason"], "ttl")
