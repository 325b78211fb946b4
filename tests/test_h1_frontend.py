"""The HTTP/1.1 frontend on llhttp (hoodyproxy.frontend.h1), on a fake transport and clock.

What reaches the gateway, in what order, and what is refused before anything does: the
smuggling corpus byte by byte and whole, pipelining, bodies, upgrades, the head's size
and deadline.  End-to-end behaviour over real TLS is in test_gateway,
test_frontend_hardening and test_enforcement_bypass.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from hoodyproxy import errors
from hoodyproxy.frontend.h1 import MAX_HEAD_BYTES, H1Factory


class _Settings:
    request_head_timeout = 10.0


class FakeExchange:
    """What the exchange receives of a request's body."""

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.ended = False
        self.gone = False

    def body_data(self, data: bytes) -> None:
        self.body.append(data)

    def body_end(self) -> None:
        self.ended = True

    def client_gone(self) -> None:
        self.gone = True


class FakeGateway:
    """Records the requests it is given; answers only when a test says so."""

    alt_svc = None

    def __init__(self, clock: Clock) -> None:
        self.settings = _Settings()
        self.clock = clock
        self.begun: list = []
        self.records: list[dict] = []
        #: Answer each request at once with this status (None: leave it open).
        self.answer_at_once: int | None = None

    def now(self) -> float:
        return self.clock.seconds()

    def begin(self, request) -> None:
        self.begun.append(request)
        request.exchange = FakeExchange()
        if self.answer_at_once is not None:
            answer(request, self.answer_at_once)

    def emit_record(self, record: dict) -> None:
        self.records.append(record)

    emit_refusal = emit_record


def answer(request, status: int = 200, body: bytes = b"ok") -> None:
    request.start_response(status, b"OK", [(b"Content-Length", b"%d" % len(body))])
    request.write(body)
    request.finish_response()


class Frontend:
    """One connection to the frontend over a StringTransport."""

    def __init__(self, timeout: float = 75.0) -> None:
        self.clock = Clock()
        self.gateway = FakeGateway(self.clock)
        self.factory = H1Factory(self.gateway, self.clock, timeout=timeout)
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000),
                                         hostAddress=IPv4Address("TCP", "198.51.100.1", 443))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes, one_byte_at_a_time: bool = False) -> None:
        if one_byte_at_a_time:
            for i in range(len(data)):
                self.protocol.dataReceived(data[i:i + 1])
        else:
            self.protocol.dataReceived(data)

    @property
    def written(self) -> bytes:
        return self.transport.value()

    def close(self) -> None:
        if not self.protocol.lost:
            self.protocol.connectionLost(None)


MALFORMED = {
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX: v\r\n  w\r\n\r\n",
    "bare LF line ends": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare LF in a field": b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
    "bare CR in a field": b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "Content-Length and chunked": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunked and Content-Length": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                                  b"Content-Length: 5\r\n\r\n0\r\n\r\n",
    "Transfer-Encoding identity": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
    "chunked, identity": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    "two Transfer-Encoding fields": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunked then identity": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                             b"Transfer-Encoding: identity\r\nX-After: 1\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "xchunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "two Content-Length fields": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
    "Content-Length list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\na",
    "signed Content-Length": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\na",
    "Content-Length overflow": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "control byte in a value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
    "bad field name": b"GET / HTTP/1.1\r\nHost: a\r\nX(y): a\r\n\r\n",
    "empty field name": b"GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n",
    "space in the target": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    "unknown version": b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
    "lower-case method": b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
}


class RefusalTests(unittest.TestCase):
    """A malformed head is refused before the gateway sees it, and the connection ends."""

    def check_refused(self, name: str, data: bytes, trickle: bool) -> None:
        front = Frontend()
        front.send(data, one_byte_at_a_time=trickle)
        self.assertEqual(front.gateway.begun, [], name)
        self.assertTrue(front.written.startswith(b"HTTP/1.1 400 ") or front.written.startswith(b"HTTP/1.1 505 "),
                        (name, front.written[:40]))
        self.assertIn(b"Connection: close", front.written)
        self.assertTrue(front.protocol.closing, name)
        front.close()

    def test_each_malformed_head_sent_whole_is_refused(self):
        """Every form of the corpus, in one read: 400 (or 505), nothing forwarded."""
        for name, data in MALFORMED.items():
            self.check_refused(name, data, trickle=False)

    def test_each_malformed_head_sent_a_byte_at_a_time_is_refused(self):
        """The same one byte per read: the parser's state never lets a part through."""
        for name, data in MALFORMED.items():
            self.check_refused(name, data, trickle=True)

    def test_http_2_0_on_an_http_1_connection_is_505(self):
        """A request line saying HTTP/2.0 is answered 505, not served as HTTP/1.1."""
        front = Frontend()
        front.send(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
        self.assertTrue(front.written.startswith(b"HTTP/1.1 505 "), front.written[:40])
        self.assertEqual(front.gateway.begun, [])
        front.close()

    def test_refusal_is_audited_with_its_reason(self):
        """Two Transfer-Encoding fields: the audit line has the refusal and its reason."""
        front = Frontend()
        front.send(MALFORMED["chunked then identity"])
        [record] = front.gateway.records
        self.assertEqual((record["status"], record["reason"]), (400, "transfer-encoding not chunked"))
        self.assertEqual((record["method"], record["path"], record["host"]), ("POST", "/", "a"))
        self.assertEqual(record["client"], "192.0.2.7")
        front.close()

    def test_refusal_body_is_json(self):
        """The refusal is a short JSON body."""
        front = Frontend()
        front.send(MALFORMED["obs-fold"])
        body = front.written.partition(b"\r\n\r\n")[2]
        self.assertEqual(json.loads(body)["error"], "bad_request")
        front.close()

    def test_head_over_the_limit_is_431(self):
        """A head larger than MAX_HEAD_BYTES: 431, even when it arrives in small pieces and
        a single field never ends."""
        for head in (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n",
                     b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * (4 * MAX_HEAD_BYTES)):
            front = Frontend()
            for i in range(0, len(head), 1000):
                front.send(head[i:i + 1000])
            self.assertTrue(front.written.startswith(b"HTTP/1.1 431 "), front.written[:40])
            self.assertEqual(front.gateway.begun, [])
            front.close()

    def test_too_many_fields_is_431(self):
        """More than MAX_FIELDS fields: 431."""
        front = Frontend()
        front.send(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"A: b\r\n" * 600 + b"\r\n")
        self.assertTrue(front.written.startswith(b"HTTP/1.1 431 "), front.written[:40])
        front.close()

    def test_endless_trailer_field_is_cut_off(self):
        """A chunked body whose trailer field never ends (httptools would keep it whole):
        once 16 KiB have gone by with no field ended, the connection is dropped."""
        front = Frontend()
        front.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: ")
        [request] = front.gateway.begun
        for _ in range(40):
            if front.protocol.closing:
                break
            front.send(b"a" * 1000)
        self.assertTrue(front.protocol.closing)
        front.close()
        self.assertTrue(request.exchange.gone)

    def test_many_trailer_fields_are_cut_off(self):
        """Trailer fields past 16 KiB in all: the connection is dropped."""
        front = Frontend()
        front.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
        for i in range(2000):
            if front.protocol.closing:
                break
            front.send(b"X-T%d: value\r\n" % i)
        self.assertTrue(front.protocol.closing)
        front.close()

    def test_endless_chunk_extension_is_cut_off(self):
        """A chunk-size line whose extension never ends: dropped past 16 KiB."""
        front = Frontend()
        front.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=")
        for _ in range(40):
            if front.protocol.closing:
                break
            front.send(b"y" * 1000)
        self.assertTrue(front.protocol.closing)
        front.close()

    def test_malformed_chunked_body_after_the_head_drops_the_connection(self):
        """A chunked body that turns malformed once the gateway has the request: the
        connection is dropped (an answer may be on its way) and the exchange hears of it."""
        front = Frontend()
        front.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
        [request] = front.gateway.begun
        self.assertTrue(front.transport.disconnecting or front.protocol.closing)
        front.close()
        self.assertTrue(request.exchange.gone)


class RequestModelTests(unittest.TestCase):
    """What the gateway receives."""

    def test_head_fields_in_order_and_spelling(self):
        """Method, target, version, fields in the order and spelling sent (values without
        surrounding whitespace), the client's address."""
        front = Frontend()
        front.send(b"GET /a?b=1 HTTP/1.1\r\nHost: h.example\r\nX-Two:  v  \r\nx-one: 1\r\nX-Two: w\r\n\r\n")
        [request] = front.gateway.begun
        self.assertEqual((request.method, request.uri, request.http_version), (b"GET", b"/a?b=1", "1.1"))
        self.assertEqual(request.requestHeaders.pairs,
                         [(b"Host", b"h.example"), (b"X-Two", b"v"), (b"x-one", b"1"), (b"X-Two", b"w")])
        self.assertEqual(request.requestHeaders.getRawHeaders(b"x-two"), [b"v", b"w"])
        self.assertTrue(request.requestHeaders.hasHeader(b"X-ONE"))
        self.assertEqual(request.client_ip, "192.0.2.7")
        self.assertEqual(request.body_length, 0)
        front.close()

    def test_head_a_byte_at_a_time(self):
        """A head trickled one byte per read arrives whole."""
        front = Frontend()
        front.send(b"GET /trickle HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 300 + b"\r\n\r\n", one_byte_at_a_time=True)
        [request] = front.gateway.begun
        self.assertEqual(request.uri, b"/trickle")
        self.assertEqual(request.requestHeaders.getRawHeaders(b"x-long"), [b"v" * 300])
        front.close()

    def test_content_length_body_streams_to_the_exchange(self):
        """A body with a length goes to the exchange as it arrives, and its end is told."""
        front = Frontend()
        front.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
        [request] = front.gateway.begun
        self.assertEqual(request.body_length, 10)
        self.assertEqual(request.exchange.body, [b"hello"])
        self.assertFalse(request.exchange.ended)
        front.send(b"world")
        self.assertEqual(b"".join(request.exchange.body), b"helloworld")
        self.assertTrue(request.exchange.ended)
        front.close()

    def test_chunked_body_is_unframed_and_trailers_are_not_fields(self):
        """A chunked body reaches the exchange without its framing; trailer fields are not
        added to the request's fields."""
        front = Frontend()
        front.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n")
        [request] = front.gateway.begun
        self.assertIsNone(request.body_length)
        self.assertEqual(b"".join(request.exchange.body), b"hello")
        self.assertTrue(request.exchange.ended)
        self.assertFalse(request.requestHeaders.hasHeader(b"x-trailer"))
        front.close()

    def test_expect_100_continue_is_answered(self):
        """``Expect: 100-continue`` with a body: 100 Continue is written once the gateway
        has the request and has not answered."""
        front = Frontend()
        front.send(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        self.assertEqual(front.written, b"HTTP/1.1 100 Continue\r\n\r\n")
        front.close()

    def test_no_100_continue_after_an_answer(self):
        """A request answered at once gets no 100 Continue."""
        front = Frontend()
        front.gateway.answer_at_once = 403
        front.send(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        self.assertNotIn(b"100 Continue", front.written)
        front.close()


class PipeliningTests(unittest.TestCase):
    """Requests sent before the previous answer are served one at a time, in order."""

    def test_second_request_waits_for_the_first_answer(self):
        """Two GETs in one read: the gateway gets the second only when the first is
        answered, reading is paused meanwhile, and the answers are in order."""
        front = Frontend()
        front.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual([r.uri for r in front.gateway.begun], [b"/1"])
        self.assertEqual(front.transport.producerState, "paused")
        answer(front.gateway.begun[0], body=b"one")
        self.assertEqual([r.uri for r in front.gateway.begun], [b"/1", b"/2"])
        self.assertEqual(front.transport.producerState, "producing")
        answer(front.gateway.begun[1], body=b"two")
        written = front.written
        self.assertLess(written.index(b"one"), written.index(b"two"))
        front.close()

    def test_body_of_a_waiting_request_reaches_its_own_exchange(self):
        """A pipelined POST whose body came in the same read: its body goes to its own
        exchange when it is served, never to the first request's."""
        front = Frontend()
        front.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                   b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody")
        first = front.gateway.begun[0]
        self.assertEqual(first.exchange.body, [])
        answer(first)
        second = front.gateway.begun[1]
        self.assertEqual(b"".join(second.exchange.body), b"body")
        self.assertTrue(second.exchange.ended)
        front.close()

    def test_a_get_body_is_a_body_not_a_request(self):
        """A GET with a Content-Length body that looks like a request: the body is body,
        and only what follows it is the next request."""
        front = Frontend()
        hidden = b"GET /hidden HTTP/1.1\r\nHost: a\r\n\r\n"
        front.send(b"GET /1 HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(hidden) + hidden
                   + b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        answer(front.gateway.begun[0])
        self.assertEqual([r.uri for r in front.gateway.begun], [b"/1", b"/2"])
        self.assertEqual(b"".join(front.gateway.begun[0].exchange.body), hidden)
        front.close()

    def test_nothing_after_connection_close_is_read(self):
        """A request with ``Connection: close`` is the last: a request pipelined after it
        never reaches the gateway, and the connection closes after the answer."""
        front = Frontend()
        front.send(b"GET /1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertFalse(front.transport.disconnecting)  # (the answer is still to come)
        answer(front.gateway.begun[0])
        self.assertEqual([r.uri for r in front.gateway.begun], [b"/1"])
        self.assertIn(b"Connection: close", front.written)
        self.assertTrue(front.transport.disconnecting)
        front.close()

    def test_close_in_any_case_or_list_is_the_last_request(self):
        """``close`` in any case, among other tokens or in a second Connection field, makes
        the request the last (its answer says so and the connection closes, whether or not
        anything was sent after it); a word that only contains it does not."""
        for fields, last in ((b"Connection: Keep-Alive, CLOSE\r\n", True), (b"Connection: TE,Close \r\n", True),
                             (b"Connection: keep-alive\r\nConnection: cLoSe\r\n", True),
                             (b"Connection: closed, x-close\r\n", False)):
            for after in (b"", b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"):
                front = Frontend()
                front.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n" + after)
                answer(front.gateway.begun[0])
                expected = [b"/1"] if last or not after else [b"/1", b"/2"]
                self.assertEqual([r.uri for r in front.gateway.begun], expected, (fields, after))
                self.assertEqual(b"Connection: close" in front.written, last, (fields, after))
                self.assertEqual(front.transport.disconnecting, last, (fields, after))
                front.close()

    def test_pipelining_ahead_is_bounded(self):
        """A thousand tiny requests in one read while the first is unanswered: at most
        MAX_PIPELINED wait (not one object per request sent); they are answered in order,
        then the connection closes, the rest never read."""
        from hoodyproxy.frontend.h1 import MAX_PIPELINED
        front = Frontend()
        front.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(1000)))
        self.assertEqual(len(front.protocol.waiting), MAX_PIPELINED)
        while front.gateway.begun and not front.transport.disconnecting:
            request = front.gateway.begun[-1]
            if request.finished:
                break
            answer(request)
        self.assertEqual([r.uri for r in front.gateway.begun], [b"/%d" % i for i in range(MAX_PIPELINED + 1)])
        self.assertTrue(front.transport.disconnecting)
        self.assertIn(b"Connection: close", front.written.rpartition(b"HTTP/1.1 200")[2])
        self.assertEqual(front.written.count(b"Connection: close"), 1)  # (the last answer only)
        front.close()

    def test_a_close_request_behind_another_is_still_served(self):
        """A, then B with ``Connection: close``, then C, in one read: A is answered without
        ``Connection: close``, B with it, C is never read, and the connection closes."""
        front = Frontend()
        front.send(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                   b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n")
        answer(front.gateway.begun[0], body=b"AAA")
        first = front.written
        self.assertNotIn(b"Connection: close", first)
        self.assertFalse(front.transport.disconnecting)
        answer(front.gateway.begun[1], body=b"BBB")
        self.assertIn(b"Connection: close", front.written[len(first):])
        self.assertEqual([r.uri for r in front.gateway.begun], [b"/a", b"/b"])
        self.assertTrue(front.transport.disconnecting)
        front.close()

    def test_many_pipelined_requests_answered_at_once(self):
        """Five hundred pipelined requests answered as soon as the gateway has each: all
        served in order without growing the stack."""
        front = Frontend()
        front.gateway.answer_at_once = 204
        front.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(500)))
        self.assertEqual([r.uri for r in front.gateway.begun], [b"/%d" % i for i in range(500)])
        self.assertEqual(front.written.count(b"HTTP/1.1 204 "), 500)
        front.close()


class ResponseTests(unittest.TestCase):
    """How answers are framed."""

    def test_response_without_a_length_is_chunked(self):
        """No Content-Length from the container: chunked to an HTTP/1.1 client."""
        front = Frontend()
        front.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        [request] = front.gateway.begun
        request.start_response(200, b"OK", [(b"Content-Type", b"text/plain")])
        request.write(b"abc")
        request.finish_response()
        head, _, body = front.written.partition(b"\r\n\r\n")
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertEqual(body, b"3\r\nabc\r\n0\r\n\r\n")
        front.close()

    def test_http_1_0_client_gets_1_0_and_close(self):
        """An HTTP/1.0 request: the status line says HTTP/1.0 and the connection closes."""
        front = Frontend()
        front.send(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        answer(front.gateway.begun[0])
        self.assertTrue(front.written.startswith(b"HTTP/1.0 200 "))
        self.assertTrue(front.transport.disconnecting)
        front.close()

    def test_error_before_the_body_closes_the_connection(self):
        """An error answered before a body was read: ``Connection: close`` and the rest of
        the body is never parsed as a request."""
        front = Frontend()
        front.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
        [request] = front.gateway.begun
        request.send_error(errors.BadRequest("no"))
        self.assertIn(b"Connection: close", front.written)
        front.send(b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n" + b"x" * 63)
        self.assertEqual(len(front.gateway.begun), 1)
        front.close()

    def test_error_to_a_content_length_0_request_keeps_the_connection(self):
        """A POST with Content-Length: 0 answered with an error: the body is complete, so
        the connection stays open for the next request."""
        front = Frontend()
        front.gateway.answer_at_once = None
        front.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
        [request] = front.gateway.begun
        self.assertTrue(request.body_complete)
        request.send_error(errors.BadRequest("no"))
        self.assertNotIn(b"Connection: close", front.written)
        front.send(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual([r.uri for r in front.gateway.begun], [b"/", b"/next"])
        front.close()

    def test_head_response_has_no_body(self):
        """A HEAD answer carries the head only."""
        front = Frontend()
        front.send(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        [request] = front.gateway.begun
        request.start_response(200, b"OK", [(b"Content-Length", b"5")])
        request.write(b"hello")
        request.finish_response()
        self.assertTrue(front.written.endswith(b"\r\n\r\n"))
        front.close()


class RecordingTunnel:
    """A tunnel's client side that notes what it is given (None: the client went away)."""

    def __init__(self, received: list) -> None:
        self.received = received

    def client_data(self, data: bytes) -> None:
        self.received.append(data)

    def client_lost(self, reason=None) -> None:
        self.received.append(None)


class UpgradeTests(unittest.TestCase):
    """An upgrade's raw bytes go to the tunnel, never to the parser."""

    UPGRADE = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"

    def test_bytes_after_the_head_are_handed_to_the_tunnel(self):
        """Bytes sent after the upgrade's head, in the same read and after, are the
        tunnel's first bytes; none is parsed as HTTP."""
        front = Frontend()
        front.send(self.UPGRADE + b"\x81\x05early")
        front.send(b"GET /not-http HTTP/1.1\r\n\r\n")
        [request] = front.gateway.begun
        transport, leftover = request.take_over([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")])
        self.assertEqual(leftover, b"\x81\x05earlyGET /not-http HTTP/1.1\r\n\r\n")
        self.assertIn(b"HTTP/1.1 101 Switching Protocols\r\n", front.written)
        received = []

        request.attach_tunnel(RecordingTunnel(received))
        front.send(b"more")
        self.assertEqual(received, [b"more"])
        self.assertEqual(len(front.gateway.begun), 1)
        front.close()
        self.assertEqual(received[-1], None)

    def test_tls_layer_is_handed_to_the_tunnel(self):
        """Under TLS (a wrapper whose wrappedProtocol is the connection) the wrapper then
        delivers straight to the tunnel: the HTTP/1.1 connection is not kept alive by it."""
        front = Frontend()
        front.transport.wrappedProtocol = front.protocol
        front.send(self.UPGRADE)
        [request] = front.gateway.begun
        request.take_over([])
        received = []

        request.attach_tunnel(RecordingTunnel(received))
        end = front.transport.wrappedProtocol
        self.assertIsNot(end, front.protocol)
        end.dataReceived(b"frame")
        end.connectionLost(None)
        self.assertEqual(received, [b"frame", None])

    def test_refused_upgrade_closes_the_connection(self):
        """An upgrade answered without 101: what follows is not known to be HTTP, so the
        connection closes after the answer."""
        front = Frontend()
        front.send(self.UPGRADE + b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        answer(front.gateway.begun[0], status=403)
        self.assertEqual(len(front.gateway.begun), 1)
        self.assertTrue(front.transport.disconnecting)
        front.close()


class TimerTests(unittest.TestCase):
    """One timer per connection: the head's deadline and the idle timeout."""

    def test_trickled_head_gets_408(self):
        """A head still incomplete after the head timeout: 408 and close, even though
        bytes keep arriving."""
        front = Frontend()
        for byte in b"GET / HTTP/1.1\r\nHost: a\r\n":
            front.send(bytes([byte]))
            front.clock.advance(1.0)
        self.assertTrue(front.written.startswith(b"HTTP/1.1 408 "), front.written[:40])
        front.close()

    def test_idle_keep_alive_closes_after_the_idle_timeout(self):
        """A kept-alive connection with nothing sent for the idle timeout is closed."""
        front = Frontend(timeout=30.0)
        front.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        answer(front.gateway.begun[0])
        front.clock.advance(20.0)
        self.assertFalse(front.transport.disconnecting)
        front.clock.advance(15.0)
        self.assertTrue(front.transport.disconnecting)
        front.close()

    def test_waiting_for_the_answer_is_not_idle(self):
        """A request waiting for its answer is not idle, however long the container takes
        (the exchange has its own response timeout)."""
        front = Frontend(timeout=30.0)
        front.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        front.clock.advance(100.0)
        self.assertFalse(front.transport.disconnecting)
        answer(front.gateway.begun[0])
        front.close()

    def test_no_timer_left_after_the_connection_is_gone(self):
        """connectionLost leaves nothing scheduled."""
        front = Frontend()
        front.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        front.close()
        self.assertEqual(front.clock.getDelayedCalls(), [])
