"""Tests for :mod:`hoodyproxy.upstream.http11`, the HTTP/1.1 client protocol to containers.

No sockets and no real time: an :class:`UpstreamConnection` is attached to a
``StringTransport`` and driven by hand, with a ``MemoryReactorClock`` as its clock.
A :class:`RecordingListener` collects the events the connection reports.

Every test that parses a response feeds it twice (see :meth:`UpstreamClientTestCase.both`):
once in a single ``dataReceived`` and once one byte at a time, because a parser that
is only right for one packetization is wrong.  When the byte-at-a-time feed sees the
connection being closed or aborted it stops feeding, as a real transport stops
reading once ``loseConnection``/``abortConnection`` has been called.
"""

from __future__ import annotations

import traceback

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from hoodyproxy.upstream.http11 import MAX_CHUNK_LINE, MAX_HEAD, UpstreamConnection
from hoodyproxy.upstream.http11 import LARGE_READ_SIZE, READ_SIZE

WHOLE = "whole"
BYTEWISE = "one byte at a time"

REQUEST = b"GET /path HTTP/1.1\r\nHost: container\r\n\r\n"
TIMEOUT = 10.0


class RecordingListener:
    """A ResponseListener that writes down every event, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def upstream_head(self, status, reason, headers):
        self.events.append(("head", status, reason, list(headers)))

    def upstream_data(self, data):
        self.events.append(("data", data))

    def upstream_end(self):
        self.events.append(("end",))

    def upstream_failed(self, why, got_response):
        self.events.append(("failed", why, got_response))

    def upstream_upgraded(self, leftover):
        self.events.append(("upgraded", leftover))

    # -- views ------------------------------------------------------------------------

    def merged(self) -> list[tuple]:
        """The events with consecutive data events joined (packetization-independent)."""
        out: list[tuple] = []
        for event in self.events:
            if event[0] == "data" and out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + event[1])
            else:
                out.append(event)
        return out

    def body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "data")

    def kinds(self) -> list[str]:
        return [e[0] for e in self.merged()]

    def failures(self) -> list[tuple]:
        return [e for e in self.events if e[0] == "failed"]


class AbortingListener(RecordingListener):
    """A listener that drops the connection from inside one of its callbacks."""

    def __init__(self, conn: UpstreamConnection, on: str) -> None:
        super().__init__()
        self.conn = conn
        self.on = on

    def upstream_head(self, status, reason, headers):
        super().upstream_head(status, reason, headers)
        if self.on == "head":
            self.conn.abort()

    def upstream_data(self, data):
        super().upstream_data(data)
        if self.on == "data":
            self.conn.abort()


class Harness:
    """One UpstreamConnection on a StringTransport, with its hooks recorded."""

    def __init__(self, mode: str = WHOLE) -> None:
        self.mode = mode
        self.clock = MemoryReactorClock()
        self.conn = UpstreamConnection(("10.1.2.3", 8080), self.clock)
        self.listener = RecordingListener()
        self.reusable: list[UpstreamConnection] = []
        self.closed: list[UpstreamConnection] = []
        self.conn.on_reusable = self.reusable.append
        self.conn.on_closed = self.closed.append
        self.transport = StringTransport()
        self.conn.makeConnection(self.transport)
        self.head_written = b""

    def send(self, head: bytes = REQUEST, *, chunked_body: bool = False, has_body: bool = False,
             head_request: bool = False, upgrade: bool = False, timeout: float = TIMEOUT) -> None:
        """Start an exchange; what the head wrote is kept in ``head_written``."""
        self.conn.send_head(head, self.listener, chunked_body=chunked_body, has_body=has_body,
                            head_request=head_request, upgrade=upgrade, timeout=timeout)
        self.head_written = self.transport.value()
        self.transport.clear()

    def feed(self, data: bytes) -> None:
        """Deliver ``data`` as this harness's mode says."""
        if self.mode == WHOLE:
            self.conn.dataReceived(data)
            return
        for i in range(len(data)):
            if self.transport.disconnecting:
                return  # a real transport stops reading once it is closing
            self.conn.dataReceived(data[i:i + 1])

    def lose(self, reason=ConnectionDone) -> None:
        self.conn.connectionLost(Failure(reason()))

    @property
    def aborted(self) -> bool:
        return self.transport.disconnected

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting


class UpstreamClientTestCase(unittest.SynchronousTestCase):
    """Shared helpers."""

    def both(self, response: bytes, check, **send) -> None:
        """Run one exchange per feeding mode (whole, then byte by byte) and ``check`` each."""
        problems = []
        for mode in (WHOLE, BYTEWISE):
            h = Harness(mode)
            try:
                h.send(**send)
                h.feed(response)
                check(h)
            except self.failureException as e:
                problems.append(f"[response fed {mode}] {e}")
            except Exception as e:
                problems.append(f"[response fed {mode}] raised {type(e).__name__}: {e}\n"
                                + traceback.format_exc())
        if problems:
            raise self.failureException("\n".join(problems))

    def assertFailedWith(self, h: Harness, why: str | None = None, got_response: bool | None = None):
        """Exactly one failure, nothing after it, no end; and the transport is aborted."""
        failures = h.listener.failures()
        self.assertEqual(len(failures), 1, short(h.listener.merged()))
        self.assertEqual(h.listener.events[-1], failures[0], "events after the failure")
        self.assertNotIn("end", h.listener.kinds())
        if why is not None:
            self.assertEqual(failures[0][1], why)
        if got_response is not None:
            self.assertIs(failures[0][2], got_response)
        self.assertTrue(h.aborted, "transport not aborted")
        self.assertEqual(h.reusable, [])

    def assertRejectedHead(self, h: Harness) -> None:
        """A malformed head: failure, no head event, transport aborted."""
        self.assertFailedWith(h)
        self.assertNotIn("head", h.listener.kinds())
        self.assertIsInstance(h.listener.failures()[0][2], bool)


def short(events: list[tuple], limit: int = 60) -> str:
    """A readable repr of events, long byte strings cut down."""
    def cut(value):
        if isinstance(value, bytes) and len(value) > limit:
            return value[:limit] + b"...(%d bytes)" % len(value)
        if isinstance(value, list):
            return [cut(v) for v in value]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        return value
    return repr([cut(e) for e in events])


def head(status: int, reason: bytes, *headers: tuple[bytes, bytes]) -> tuple:
    return ("head", status, reason, list(headers))


class ContentLengthTests(UpstreamClientTestCase):
    """Responses framed by Content-Length."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-A: b\r\n\r\nhello world"

    def test_bodyDeliveredExactlyThenEnd(self):
        """The head, exactly Content-Length bytes of body, then upstream_end, nothing else."""
        def check(h):
            self.assertEqual(h.listener.merged(), [
                head(200, b"OK", (b"Content-Length", b"11"), (b"X-A", b"b")),
                ("data", b"hello world"),
                ("end",),
            ])
        self.both(self.RESPONSE, check)

    def test_keepAliveResponseMakesConnectionReusable(self):
        """A complete keep-alive response hands the connection to on_reusable, still open."""
        def check(h):
            self.assertEqual(h.reusable, [h.conn])
            self.assertFalse(h.closing)
            self.assertEqual(h.conn.state, "idle")
        self.both(self.RESPONSE, check)

    def test_reusableOnlyAfterWholeBody(self):
        """on_reusable is not called while part of the body is still to come."""
        def check(h):
            self.assertEqual(h.reusable, [])
            self.assertEqual(h.listener.body(), b"hello")
            self.assertNotIn("end", h.listener.kinds())
        self.both(self.RESPONSE[:-6], check)

    def test_connectionCloseMakesConnectionNotReusable(self):
        """``Connection: close`` ends the response normally but closes the connection."""
        response = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"

        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
            self.assertEqual(h.listener.body(), b"ok")
            self.assertEqual(h.reusable, [])
            self.assertTrue(h.closing)
        self.both(response, check)

    def test_extraBytesAfterBodyMakeConnectionNotReusable(self):
        """Bytes after the Content-Length body are not delivered and the connection is closed."""
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA"

        def check(h):
            self.assertEqual(h.listener.merged(),
                             [head(200, b"OK", (b"Content-Length", b"5")), ("data", b"hello"), ("end",)])
            self.assertTrue(h.closing)
            if h.mode == WHOLE:
                # Byte by byte, the body completes (and is offered for reuse) before the extra
                # bytes exist; they then arrive on an idle connection, which closes it.
                self.assertEqual(h.reusable, [])
        self.both(response, check)

    def test_extraBytesAfterEmptyBodyMakeConnectionNotReusable(self):
        """Bytes after a ``Content-Length: 0`` head close the connection."""
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nEXTRA"

        def check(h):
            self.assertEqual(h.listener.merged(), [head(200, b"OK", (b"Content-Length", b"0")), ("end",)])
            self.assertTrue(h.closing, "connection with unread garbage left open")
            if h.mode == WHOLE:
                self.assertEqual(h.reusable, [])
        self.both(response, check)

    def test_repeatedIdenticalContentLengthAccepted(self):
        """Content-Length repeated with one value (as a list or as two fields) is that value."""
        response = (b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\nabc")

        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
            self.assertEqual(h.listener.body(), b"abc")
            self.assertEqual(h.reusable, [h.conn])
        self.both(response, check)

    def test_http10ResponseWithoutKeepAliveNotReusable(self):
        """An HTTP/1.0 response closes the connection unless it says ``Connection: keep-alive``."""
        response = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"

        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
            self.assertEqual(h.reusable, [], "HTTP/1.0 connection offered for reuse")
            self.assertTrue(h.closing)
        self.both(response, check)

    def test_http10ResponseWithKeepAliveReusable(self):
        """An HTTP/1.0 response with ``Connection: keep-alive`` may be reused."""
        response = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"

        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
            self.assertEqual(h.reusable, [h.conn])
        self.both(response, check)

    def test_statusLineWithoutReason(self):
        """A status line with no reason phrase gives an empty reason."""
        def check(h):
            self.assertEqual(h.listener.merged(), [head(204, b""), ("end",)])
        self.both(b"HTTP/1.1 204\r\n\r\n", check)


class ChunkedTests(UpstreamClientTestCase):
    """Responses framed by ``Transfer-Encoding: chunked``."""

    HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    def test_chunkedBodyDecoded(self):
        """Chunks are delivered without their framing, then upstream_end, and it is reusable."""
        response = self.HEAD + b"5\r\nhello\r\n6\r\n world\r\nA\r\n0123456789\r\n0\r\n\r\n"

        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
            self.assertEqual(h.listener.body(), b"hello world0123456789")
            self.assertEqual(h.reusable, [h.conn])
            self.assertFalse(h.closing)
        self.both(response, check)

    def test_chunkExtensionsIgnored(self):
        """Chunk extensions after ``;`` are skipped."""
        response = self.HEAD + b"5;name=value\r\nhello\r\n1 ; a=\"b;c\"\r\n!\r\n0;last\r\n\r\n"

        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
            self.assertEqual(h.listener.body(), b"hello!")
            self.assertEqual(h.reusable, [h.conn])
        self.both(response, check)

    def test_trailersConsumed(self):
        """Trailer fields after the last chunk are read and dropped; the connection is reusable."""
        response = self.HEAD + b"3\r\nabc\r\n0\r\nX-Checksum: 123\r\nX-Other: y\r\n\r\n"

        def check(h):
            self.assertEqual(h.listener.merged(), [
                head(200, b"OK", (b"Transfer-Encoding", b"chunked")), ("data", b"abc"), ("end",)])
            self.assertEqual(h.reusable, [h.conn])
            self.assertFalse(h.closing)
        self.both(response, check)

    def test_uppercaseHexChunkSize(self):
        """Chunk sizes are hexadecimal in either case."""
        response = self.HEAD + b"1A\r\n" + b"z" * 26 + b"\r\n0\r\n\r\n"

        def check(h):
            self.assertEqual(h.listener.body(), b"z" * 26)
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
        self.both(response, check)

    def test_lastChunkWithoutEmptyLineNotComplete(self):
        """The response is not over until the blank line that ends the trailers."""
        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "data"])
            self.assertEqual(h.reusable, [])
        self.both(self.HEAD + b"3\r\nabc\r\n0\r\n", check)

    def test_extraBytesAfterLastChunkMakeConnectionNotReusable(self):
        """Bytes after the end of a chunked body close the connection."""
        response = self.HEAD + b"3\r\nabc\r\n0\r\n\r\nEXTRA"

        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
            self.assertEqual(h.listener.body(), b"abc")
            self.assertTrue(h.closing)
            if h.mode == WHOLE:
                self.assertEqual(h.reusable, [])
        self.both(response, check)

    def _bad_size(self, size: bytes) -> None:
        response = self.HEAD + size + b"\r\nhello\r\n0\r\n\r\n"

        def check(h):
            self.assertFailedWith(h, "bad chunk size", True)
            self.assertEqual(h.listener.body(), b"")
        self.both(response, check)

    def test_nonHexChunkSizeFails(self):
        """A chunk size that is not hexadecimal fails the exchange."""
        self._bad_size(b"zz")

    def test_emptyChunkSizeFails(self):
        """An empty chunk-size line fails the exchange."""
        self._bad_size(b"")

    def test_negativeChunkSizeFails(self):
        """A negative chunk size (``-5``) fails the exchange instead of mis-framing the body."""
        self._bad_size(b"-5")

    def test_signedChunkSizeFails(self):
        """A chunk size with a ``+`` sign is not ``1*HEXDIG`` and fails the exchange."""
        self._bad_size(b"+5")

    def test_hexPrefixedChunkSizeFails(self):
        """A chunk size with a ``0x`` prefix is not ``1*HEXDIG`` and fails the exchange."""
        self._bad_size(b"0x5")

    def test_underscoreInChunkSizeFails(self):
        """A chunk size with an underscore (``0_5``) is not ``1*HEXDIG`` and fails the exchange."""
        self._bad_size(b"0_5")

    def test_oversizedChunkSizeFails(self):
        """A chunk size of more than 15 hex digits fails the exchange."""
        self._bad_size(b"1" * 16)

    def test_missingCrlfAfterChunkDataFails(self):
        """Chunk data not followed by CRLF fails the exchange."""
        response = self.HEAD + b"5\r\nhelloXX\r\n0\r\n\r\n"

        def check(h):
            self.assertFailedWith(h, "bad chunk terminator", True)
            self.assertEqual(h.listener.body(), b"hello")
        self.both(response, check)

    def test_chunkSizeLineTooLongFails(self):
        """A chunk-size line longer than MAX_CHUNK_LINE fails the exchange."""
        response = self.HEAD + b"5;ext=" + b"x" * (MAX_CHUNK_LINE + 100) + b"\r\nhello\r\n0\r\n\r\n"

        def check(h):
            self.assertFailedWith(h, "chunk line too long", True)
            self.assertEqual(h.listener.body(), b"")
        self.both(response, check)

    def test_trailerLineTooLongFails(self):
        """A trailer line longer than MAX_CHUNK_LINE fails the exchange."""
        response = self.HEAD + b"0\r\nX-T: " + b"x" * (MAX_CHUNK_LINE + 100) + b"\r\n\r\n"

        def check(h):
            self.assertFailedWith(h, "chunk line too long", True)
        self.both(response, check)

    def test_unterminatedChunkLineTooLongFails(self):
        """A chunk-size line that grows past MAX_CHUNK_LINE without a CRLF fails at once."""
        response = self.HEAD + b"5" + b";" * (MAX_CHUNK_LINE + 100)

        def check(h):
            self.assertFailedWith(h, "chunk line too long", True)
        self.both(response, check)

    def test_chunkedWinsOverContentLength(self):
        """With both Transfer-Encoding: chunked and Content-Length, the body is chunked."""
        response = (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n0\r\n\r\n")

        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
            self.assertEqual(h.listener.body(), b"abc")
        self.both(response, check)


class ReadUntilCloseTests(UpstreamClientTestCase):
    """Responses with no framing: the body runs until the container closes."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nX-A: b\r\n\r\nsome body bytes"

    def test_unframedBodyEndsAtClose(self):
        """connectionLost ends an unframed body with upstream_end, not a failure."""
        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "data"])
            h.lose()
            self.assertEqual(h.listener.merged(), [
                head(200, b"OK", (b"X-A", b"b")), ("data", b"some body bytes"), ("end",)])
        self.both(self.RESPONSE, check)

    def test_unframedBodyEndsAtUncleanClose(self):
        """Even an unclean close ends an unframed body: there is no way to tell it apart."""
        def check(h):
            h.lose(ConnectionLost)
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
        self.both(self.RESPONSE, check)

    def test_unframedBodyConnectionNotReusable(self):
        """A connection whose body ran until close is never offered for reuse."""
        def check(h):
            h.lose()
            self.assertEqual(h.reusable, [])
            self.assertEqual(h.closed, [h.conn])
        self.both(self.RESPONSE, check)

    def test_nonChunkedTransferEncodingReadsUntilClose(self):
        """A Transfer-Encoding that does not end in chunked means the body runs until close."""
        response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabcdef"

        def check(h):
            self.assertEqual(h.listener.body(), b"abcdef")
            self.assertNotIn("end", h.listener.kinds())
            h.lose()
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
            self.assertEqual(h.reusable, [])
        self.both(response, check)


class NoBodyTests(UpstreamClientTestCase):
    """Responses that have no body whatever their headers say."""

    def test_headResponseHasNoBody(self):
        """A response to HEAD ends at its head even with a Content-Length."""
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"

        def check(h):
            self.assertEqual(h.listener.merged(), [head(200, b"OK", (b"Content-Length", b"1234")), ("end",)])
            self.assertEqual(h.reusable, [h.conn])
        self.both(response, check, head_request=True)

    def test_headResponseWithChunkedHasNoBody(self):
        """A response to HEAD ends at its head even with Transfer-Encoding: chunked."""
        response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "end"])
            self.assertEqual(h.reusable, [h.conn])
        self.both(response, check, head_request=True)

    def test_noContentHasNoBody(self):
        """A 204 ends at its head even with a Content-Length."""
        response = b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"

        def check(h):
            self.assertEqual(h.listener.merged(),
                             [head(204, b"No Content", (b"Content-Length", b"10")), ("end",)])
            self.assertEqual(h.reusable, [h.conn])
        self.both(response, check)

    def test_notModifiedHasNoBody(self):
        """A 304 ends at its head even with a Content-Length."""
        response = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"

        def check(h):
            self.assertEqual(h.listener.merged(),
                             [head(304, b"Not Modified", (b"Content-Length", b"10")), ("end",)])
            self.assertEqual(h.reusable, [h.conn])
        self.both(response, check)

    def test_extraBytesAfterBodilessResponseMakeConnectionNotReusable(self):
        """Bytes after a 204 head are not a next response: the connection is closed."""
        response = b"HTTP/1.1 204 No Content\r\n\r\nGARBAGE"

        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "end"])
            self.assertTrue(h.closing, "connection with unread garbage left open")
            if h.mode == WHOLE:
                self.assertEqual(h.reusable, [])
        self.both(response, check)


class InterimAndUpgradeTests(UpstreamClientTestCase):
    """1xx responses."""

    FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def test_continueSkipped(self):
        """A 100 Continue is not reported; the final response is."""
        def check(h):
            self.assertEqual(h.listener.merged(),
                             [head(200, b"OK", (b"Content-Length", b"2")), ("data", b"ok"), ("end",)])
            self.assertEqual(h.reusable, [h.conn])
        self.both(b"HTTP/1.1 100 Continue\r\n\r\n" + self.FINAL, check)

    def test_earlyHintsSkipped(self):
        """103 Early Hints (with headers), even several, are not reported."""
        hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"

        def check(h):
            self.assertEqual(h.listener.merged(),
                             [head(200, b"OK", (b"Content-Length", b"2")), ("data", b"ok"), ("end",)])
        self.both(hints + hints + self.FINAL, check)

    def test_interimResponseDoesNotStopTimeout(self):
        """An interim response alone does not satisfy the response timeout."""
        def check(h):
            self.assertEqual(h.listener.events, [])
            h.clock.advance(TIMEOUT + 1)
            self.assertEqual([f[1] for f in h.listener.failures()], ["timeout"])
        self.both(b"HTTP/1.1 100 Continue\r\n\r\n", check)

    UPGRADE = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    FRAMES = b"\x81\x05hello\x81\x00"

    def test_switchingProtocolsReportsHeadThenUpgraded(self):
        """With upgrade=True, a 101 gives upstream_head(101, ...) then upstream_upgraded."""
        def check(h):
            events = h.listener.events
            self.assertEqual(events[0], head(101, b"Switching Protocols",
                                             (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")))
            self.assertEqual(events[1][0], "upgraded")
            self.assertEqual(h.listener.failures(), [])
        self.both(self.UPGRADE + self.FRAMES, check, upgrade=True)

    def test_switchingProtocolsHandsOverLeftover(self):
        """The bytes that followed the 101 head are the leftover, and later bytes are data."""
        def check(h):
            events = h.listener.events
            leftover = events[1][1]
            later = b"".join(e[1] for e in events[2:] if e[0] == "data")
            self.assertEqual(leftover + later, self.FRAMES)
            if h.mode == WHOLE:
                self.assertEqual(leftover, self.FRAMES)
                self.assertEqual(len(events), 2)
        self.both(self.UPGRADE + self.FRAMES, check, upgrade=True)

    def test_upgradedConnectionNeverReusable(self):
        """An upgraded connection is a byte pipe: not reused, timer gone, close ends it."""
        def check(h):
            self.assertEqual(h.reusable, [])
            self.assertEqual(h.clock.getDelayedCalls(), [])
            h.lose()
            self.assertEqual(h.listener.events[-1], ("end",))
            self.assertEqual(h.reusable, [])
        self.both(self.UPGRADE, check, upgrade=True)

    def test_switchingProtocolsWithoutUpgradeFails(self):
        """A 101 to a request that did not ask to upgrade fails the exchange."""
        def check(h):
            self.assertFailedWith(h, "unexpected 101", True)
            self.assertNotIn("head", h.listener.kinds())
        self.both(self.UPGRADE + self.FRAMES, check)


class MalformedHeadTests(UpstreamClientTestCase):
    """Heads that are not HTTP/1.1 fail the exchange and abort the connection."""

    def test_malformedStatusLineFails(self):
        """A status line with no status code fails."""
        self.both(b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n", self.assertRejectedHead)

    def test_nonHttpStatusLineFails(self):
        """A status line that is not HTTP/1.x fails."""
        self.both(b"ICY 200 OK\r\nContent-Length: 0\r\n\r\n", self.assertRejectedHead)

    def test_fourDigitStatusFails(self):
        """A status code that is not three digits fails."""
        self.both(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", self.assertRejectedHead)

    def test_statusBelow100Fails(self):
        """A status code below 100 is not a valid status and fails."""
        self.both(b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n", self.assertRejectedHead)

    def test_headerWithoutColonFails(self):
        """A header line without a colon fails."""
        self.both(b"HTTP/1.1 200 OK\r\nNoColonHere\r\nContent-Length: 0\r\n\r\n", self.assertRejectedHead)

    def test_headerWithEmptyNameFails(self):
        """A header line starting with a colon fails."""
        self.both(b"HTTP/1.1 200 OK\r\n: value\r\nContent-Length: 0\r\n\r\n", self.assertRejectedHead)

    def test_whitespaceBeforeColonFails(self):
        """Whitespace between the field name and the colon fails (RFC 9112 5.1)."""
        self.both(b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n", self.assertRejectedHead)

    def test_obsFoldFails(self):
        """A folded header (a line starting with whitespace) fails."""
        self.both(b"HTTP/1.1 200 OK\r\nX-A: one\r\n  two\r\nContent-Length: 0\r\n\r\n",
                  self.assertRejectedHead)

    def test_obsFoldWithColonFails(self):
        """A folded line that happens to contain a colon fails too."""
        self.both(b"HTTP/1.1 200 OK\r\nX-A: one\r\n\tX-B: two\r\nContent-Length: 0\r\n\r\n",
                  self.assertRejectedHead)

    def test_bareLfInHeaderValueFails(self):
        """A bare LF inside a header value fails."""
        self.both(b"HTTP/1.1 200 OK\r\nX-A: one\nX-B: two\r\nContent-Length: 0\r\n\r\n",
                  self.assertRejectedHead)

    def test_conflictingContentLengthFieldsFail(self):
        """Two Content-Length fields with different values fail."""
        self.both(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                  self.assertRejectedHead)

    def test_conflictingContentLengthListFails(self):
        """One Content-Length field listing different values fails."""
        self.both(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!", self.assertRejectedHead)

    def test_nonNumericContentLengthFails(self):
        """A Content-Length that is not a number fails."""
        self.both(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", self.assertRejectedHead)

    def test_negativeContentLengthFails(self):
        """A negative Content-Length fails."""
        self.both(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", self.assertRejectedHead)

    def test_signedContentLengthFails(self):
        """A Content-Length with a ``+`` sign fails."""
        self.both(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", self.assertRejectedHead)

    def test_emptyContentLengthFails(self):
        """An empty Content-Length fails."""
        self.both(b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n", self.assertRejectedHead)

    def test_hugeContentLengthFails(self):
        """A Content-Length of more than 18 digits fails."""
        self.both(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 19 + b"\r\n\r\n", self.assertRejectedHead)

    def test_headLargerThanLimitFails(self):
        """A complete head larger than MAX_HEAD (64 KiB) fails, however it arrives."""
        big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD + 1000) + b"\r\nContent-Length: 0\r\n\r\n"

        def check(h):
            self.assertFailedWith(h, "response head too large")
            self.assertNotIn("head", h.listener.kinds())
        self.both(big, check)

    def test_unterminatedHeadLargerThanLimitFails(self):
        """Head bytes past MAX_HEAD with no end in sight fail without waiting for more.

        The container has begun answering, so ``got_response`` is True: never resend."""
        big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD + 1000)

        def check(h):
            self.assertFailedWith(h, "response head too large", True)
        self.both(big, check)

    def test_headUnderLimitAccepted(self):
        """A head comfortably under MAX_HEAD is accepted."""
        response = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD // 2) + b"\r\nContent-Length: 0\r\n\r\n"

        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "end"])
        self.both(response, check)


class TimeoutTests(UpstreamClientTestCase):
    """The response timeout covers the wait for the response head only, counted from the
    end of the request body; while the body goes up, from its last progress."""

    def test_noHeadInTimeFails(self):
        """No head within ``timeout`` fails with ("timeout", False) and aborts."""
        h = Harness()
        h.send(timeout=TIMEOUT)
        h.clock.advance(TIMEOUT - 0.5)
        self.assertEqual(h.listener.events, [])
        self.assertFalse(h.aborted)
        h.clock.advance(1)
        self.assertEqual(h.listener.events, [("failed", "timeout", False)])
        self.assertTrue(h.aborted)

    def test_partialHeadInTimeStillTimesOut(self):
        """Half a head does not stop the timeout (and counts as the container having answered)."""
        def check(h):
            self.assertEqual(h.listener.events, [])
            h.clock.advance(TIMEOUT + 1)
            self.assertEqual(h.listener.events, [("failed", "timeout", True)])
            self.assertTrue(h.aborted)
        self.both(b"HTTP/1.1 200 OK\r\nContent-Len", check)

    def test_headInTimeCancelsTimer(self):
        """A head before the timeout ends the deadline: the connection may then wait as
        long as it likes (for the rest of the body, or idle in the pool) without failing."""
        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "data"])
            h.clock.advance(TIMEOUT * 10)
            self.assertEqual(h.listener.failures(), [])
            self.assertFalse(h.aborted)
            h.feed(b"defghij")
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
            self.assertEqual(h.listener.body(), b"abcdefghij")
            h.clock.advance(TIMEOUT * 10)
            self.assertEqual(h.listener.failures(), [])
            self.assertFalse(h.aborted)
        self.both(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", check)

    def test_failureCancelsTimer(self):
        """A failed head leaves no pending call on the clock."""
        def check(h):
            self.assertEqual(len(h.listener.failures()), 1)
            self.assertEqual(h.clock.getDelayedCalls(), [])
        self.both(b"HTTP/1.1 xyz OK\r\n\r\n", check)

    def test_closeCancelsTimer(self):
        """A connection lost before the head leaves no pending call on the clock."""
        h = Harness()
        h.send()
        h.lose()
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_slowUploadIsNotLate(self):
        """While the body keeps moving the response is not due: a slow upload longer than
        ``timeout`` succeeds, and the wait for the head counts from the end of the body."""
        h = Harness()
        h.send(has_body=True, timeout=5)
        for _ in range(10):  # 40 s of upload, a piece every 4 s
            h.clock.advance(4)
            h.conn.write_body(b"x" * 100)
        self.assertEqual(h.listener.failures(), [])
        h.conn.end_body()
        h.clock.advance(4.5)
        self.assertEqual(h.listener.failures(), [])
        h.clock.advance(1)
        self.assertEqual(h.listener.failures(), [("failed", "timeout", False)])

    def test_stalledUploadTimesOut(self):
        """A body that stops moving (the container reads nothing) times out after ``timeout``."""
        h = Harness()
        h.send(has_body=True, timeout=5)
        h.clock.advance(3)
        h.conn.write_body(b"x" * 100)
        h.clock.advance(4.5)
        self.assertEqual(h.listener.failures(), [])
        h.clock.advance(1)
        self.assertEqual(h.listener.failures(), [("failed", "timeout", False)])
        self.assertTrue(h.aborted)

    def test_timeoutIsPerExchange(self):
        """A reused connection gets a fresh timeout, and only one timer at a time."""
        h = Harness()
        h.send(timeout=5)
        h.clock.advance(4)
        h.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        h.send(timeout=5)
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.clock.advance(4)
        self.assertEqual(h.listener.failures(), [])
        h.clock.advance(1)
        self.assertEqual(h.listener.failures(), [("failed", "timeout", False)])


class ConnectionLostTests(UpstreamClientTestCase):
    """The container closing the connection."""

    def test_closedBeforeResponseFails(self):
        """Closed with no response at all: upstream_failed("closed", False)."""
        h = Harness()
        h.send()
        h.lose()
        self.assertEqual(h.listener.events, [("failed", "closed", False)])

    def test_closedDuringHeadFails(self):
        """Closed halfway through the head: upstream_failed("closed", True).

        Part of a response arrived, so the request reached the container: it must not be
        resent on another connection."""
        def check(h):
            h.lose()
            self.assertEqual(h.listener.events, [("failed", "closed", True)])
        self.both(b"HTTP/1.1 200 OK\r\nContent-", check)

    def test_closedMidContentLengthBodyFails(self):
        """Closed before the Content-Length body is complete: upstream_failed("closed", True)."""
        def check(h):
            h.lose()
            self.assertEqual(h.listener.kinds(), ["head", "data", "failed"])
            self.assertEqual(h.listener.events[-1], ("failed", "closed", True))
            self.assertEqual(h.reusable, [])
        self.both(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", check)

    def test_closedMidChunkedBodyFails(self):
        """Closed before the last chunk: upstream_failed("closed", True)."""
        def check(h):
            h.lose()
            self.assertEqual(h.listener.events[-1], ("failed", "closed", True))
            self.assertNotIn("end", h.listener.kinds())
        self.both(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", check)

    def test_closedWhileIdleReportsNothing(self):
        """Closed after a complete response: no listener event, on_closed called once."""
        def check(h):
            events = list(h.listener.events)
            h.lose()
            self.assertEqual(h.listener.events, events)
            self.assertEqual(h.closed, [h.conn])
        self.both(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", check)

    def test_onClosedCalledOnConnectionLost(self):
        """on_closed is called with the connection when it is lost mid-exchange."""
        h = Harness()
        h.send()
        self.assertEqual(h.closed, [])
        h.lose()
        self.assertEqual(h.closed, [h.conn])
        self.assertEqual(h.conn.state, "closed")


class RequestBodyTests(UpstreamClientTestCase):
    """Writing the request."""

    def test_headWrittenAsGiven(self):
        """send_head writes the head bytes unchanged."""
        h = Harness()
        h.send(REQUEST)
        self.assertEqual(h.head_written, REQUEST)

    def test_chunkedBodyWrittenWithHexSizeFraming(self):
        """With chunked_body=True each write_body is one chunk with a hex size line."""
        h = Harness()
        h.send(chunked_body=True, has_body=True)
        h.conn.write_body(b"hello")
        h.conn.write_body(b"x" * 26)
        self.assertEqual(h.transport.value(), b"5\r\nhello\r\n1a\r\n" + b"x" * 26 + b"\r\n")

    def test_endOfChunkedBodyWritesLastChunk(self):
        """end_body with a chunked body writes ``0\\r\\n\\r\\n``."""
        h = Harness()
        h.send(chunked_body=True, has_body=True)
        h.conn.write_body(b"abc")
        h.transport.clear()
        h.conn.end_body()
        self.assertEqual(h.transport.value(), b"0\r\n\r\n")

    def test_emptyWriteDoesNotEndChunkedBody(self):
        """write_body(b"") writes nothing (an empty chunk would end the body)."""
        h = Harness()
        h.send(chunked_body=True, has_body=True)
        h.conn.write_body(b"")
        self.assertEqual(h.transport.value(), b"")

    def test_contentLengthBodyWrittenRaw(self):
        """Without chunked framing the body bytes are written as they are."""
        h = Harness()
        h.send(chunked_body=False, has_body=True)
        h.conn.write_body(b"hello ")
        h.conn.write_body(b"world")
        h.conn.end_body()
        self.assertEqual(h.transport.value(), b"hello world")

    def test_nothingWrittenAfterEnd(self):
        """write_body and end_body after end_body write nothing."""
        for chunked in (True, False):
            h = Harness()
            h.send(chunked_body=chunked, has_body=True)
            h.conn.write_body(b"a")
            h.conn.end_body()
            written = h.transport.value()
            h.conn.write_body(b"more")
            h.conn.end_body()
            self.assertEqual(h.transport.value(), written, f"chunked={chunked}")

    def test_noBodyWrittenWithoutBody(self):
        """With has_body=False, write_body and end_body write nothing."""
        h = Harness()
        h.send(chunked_body=True, has_body=False)
        h.conn.write_body(b"abc")
        h.conn.end_body()
        self.assertEqual(h.transport.value(), b"")

    def test_nothingWrittenAfterUpgrade(self):
        """After a 101 the request body writer goes quiet (the tunnel owns the socket)."""
        h = Harness()
        h.send(chunked_body=True, has_body=True, upgrade=True)
        h.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        h.conn.write_body(b"abc")
        h.conn.end_body()
        self.assertEqual(h.transport.value(), b"")

    def test_responseBeforeBodyEndNotReusable(self):
        """A response complete before the request body was sent closes the connection."""
        def check(h):
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
            self.assertEqual(h.reusable, [])
            self.assertTrue(h.closing)
        self.both(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno", check,
                  chunked_body=True, has_body=True)

    def test_responseAfterBodyEndReusable(self):
        """Body sent, then a complete keep-alive response: the connection is reusable."""
        h = Harness()
        h.send(chunked_body=True, has_body=True)
        h.conn.write_body(b"abc")
        h.conn.end_body()
        h.feed(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(h.listener.kinds(), ["head", "end"])
        self.assertEqual(h.reusable, [h.conn])


class IdleTests(UpstreamClientTestCase):
    """Data nobody asked for."""

    def test_dataWhileIdleClosesConnection(self):
        """Bytes on a connection with no request outstanding close it."""
        h = Harness()
        h.feed(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertTrue(h.closing)
        self.assertEqual(h.reusable, [])

    def test_dataAfterCompletedExchangeClosesConnection(self):
        """Bytes after a finished exchange close the (pooled) connection."""
        h = Harness()
        h.send()
        h.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertFalse(h.closing)
        h.conn.dataReceived(b"x")
        self.assertTrue(h.closing)
        self.assertEqual(h.listener.kinds(), ["head", "end"])


class ProducerTests(UpstreamClientTestCase):
    """The connection as the push producer of the response body."""

    def test_pauseProducingPausesTransport(self):
        """pauseProducing pauses the transport's reading."""
        h = Harness()
        h.conn.pauseProducing()
        self.assertEqual(h.transport.producerState, "paused")
        self.assertTrue(h.conn.paused)

    def test_resumeProducingResumesTransport(self):
        """resumeProducing resumes the transport's reading."""
        h = Harness()
        h.conn.pauseProducing()
        h.conn.resumeProducing()
        self.assertEqual(h.transport.producerState, "producing")
        self.assertFalse(h.conn.paused)

    def test_stopProducingAbortsConnection(self):
        """stopProducing aborts the connection, which is then never reused."""
        h = Harness()
        h.send()
        h.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
        h.conn.stopProducing()
        self.assertTrue(h.aborted)
        h.lose(ConnectionLost)
        self.assertEqual(h.reusable, [])

    def test_reusedConnectionIsResumed(self):
        """A connection paused during the body is resumed when it becomes reusable."""
        h = Harness()
        h.send()
        h.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        h.conn.pauseProducing()
        h.feed(b"cd")
        self.assertEqual(h.reusable, [h.conn])
        self.assertEqual(h.transport.producerState, "producing")
        self.assertFalse(h.conn.paused)


class ConnectedHookTests(UpstreamClientTestCase):

    def test_onConnectedFiresOnConnectionMade(self):
        """on_connected is called with the connection from connectionMade, once."""
        calls = []
        conn = UpstreamConnection(("10.1.2.3", 80), MemoryReactorClock())
        conn.on_connected = calls.append
        self.assertEqual(calls, [])
        conn.makeConnection(StringTransport())
        self.assertEqual(calls, [conn])
        self.assertIsNone(conn.on_connected)


class ListenerAbortTests(UpstreamClientTestCase):
    """The owner may drop the connection from inside a listener callback."""

    def _abortDuring(self, response: bytes, on: str) -> None:
        for mode in (WHOLE, BYTEWISE):
            h = Harness(mode)
            h.listener = AbortingListener(h.conn, on)
            try:
                h.send()
                h.feed(response)
            except Exception as e:
                raise self.failureException(
                    f"[response fed {mode}] raised {type(e).__name__}: {e}\n"
                    + traceback.format_exc()) from e
            self.assertTrue(h.aborted, mode)
            self.assertEqual(h.listener.kinds()[-1], on, f"[{mode}] events after abort")
            self.assertEqual(h.reusable, [], mode)

    def test_abortInHeadCallbackStopsDelivery(self):
        """abort() from upstream_head: no body is delivered afterwards, no exception."""
        self._abortDuring(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "head")

    def test_abortInChunkedDataCallbackStopsDelivery(self):
        """abort() from upstream_data of a chunked body: no more data, no exception."""
        self._abortDuring(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n", "data")


class SharedDeadlineTests(UpstreamClientTestCase):
    """The response timeout is checked by one sweep per clock, not a timer per request."""

    def _pair(self):
        clock = MemoryReactorClock()
        harnesses = []
        for _ in range(2):
            h = Harness()
            h.clock = clock
            h.conn = UpstreamConnection(("10.1.2.3", 8080), clock)
            h.conn.makeConnection(h.transport)
            harnesses.append(h)
        return clock, harnesses

    def test_waitingExchangesShareOneTimer(self):
        """Two exchanges waiting for their heads on one clock make one pending call."""
        clock, (a, b) = self._pair()
        a.send()
        b.send()
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_timerGoneWithTheLastConnection(self):
        """The sweep stays while a connection is open, and goes with the last one."""
        clock, (a, b) = self._pair()
        a.send()
        b.send()
        a.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        b.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        a.conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        b.conn.close()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_oneRequestAtATimeMakesNoTimer(self):
        """Request after request on one connection, no timer is made or cancelled: the
        connection's place in the sweep is its deadline (the issue's "no per-request
        timers", at one request in flight too), and a late answer still times out."""
        clock, (a, _) = self._pair()
        calls = clock.getDelayedCalls()
        self.assertEqual(len(calls), 1)
        for _ in range(3):
            a.send(timeout=5)
            a.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            a.listener.events.clear()
            clock.advance(2)
        self.assertEqual(clock.getDelayedCalls(), calls)
        self.assertFalse(calls[0].cancelled)
        a.send(timeout=5)
        clock.advance(6)
        self.assertEqual(a.listener.failures(), [("failed", "timeout", False)])

    def test_eachExchangeTimesOutOnItsOwnDeadline(self):
        """Exchanges started at different times time out at their own deadlines."""
        clock, (a, b) = self._pair()
        a.send(timeout=5)
        clock.advance(3)
        b.send(timeout=5)
        clock.advance(2.5)
        self.assertEqual(a.listener.failures(), [("failed", "timeout", False)])
        self.assertEqual(b.listener.failures(), [])
        clock.advance(3)
        self.assertEqual(b.listener.failures(), [("failed", "timeout", False)])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeoutNeverEarly(self):
        """However the clock is advanced, no exchange fails before its timeout."""
        h = Harness()
        h.send(timeout=3)
        for _ in range(29):
            h.clock.advance(0.1)
        self.assertEqual(h.listener.failures(), [])


class StrictHeadTests(UpstreamClientTestCase):
    """What llhttp's parse of the head adds to the rules above, and what stays ours."""

    def test_fieldNameNotATokenFails(self):
        """A field name with a character outside ``tchar`` (here ``@``) fails."""
        self.both(b"HTTP/1.1 200 OK\r\nX@Y: z\r\nContent-Length: 0\r\n\r\n", self.assertRejectedHead)

    def test_controlByteInValueFails(self):
        """A control byte other than tab inside a field value fails."""
        self.both(b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 0\r\n\r\n", self.assertRejectedHead)

    def test_otherHttpVersionFails(self):
        """Only HTTP/1.1 and HTTP/1.0 status lines are accepted (llhttp alone would take 2.0 and 0.9)."""
        for version in (b"HTTP/2.0", b"HTTP/0.9"):
            self.both(version + b" 200 OK\r\nContent-Length: 0\r\n\r\n", self.assertRejectedHead)

    def test_blankLineBeforeStatusLineFails(self):
        """A response must start with its status line, not with an empty line."""
        self.both(b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", self.assertRejectedHead)

    def test_trailingWhitespaceStrippedFromValues(self):
        """Whitespace around a field value is not part of it, on either side."""
        def check(h):
            self.assertEqual(h.listener.merged(), [
                head(200, b"OK", (b"X-A", b"spaced  out"), (b"Content-Length", b"0")), ("end",)])
        self.both(b"HTTP/1.1 200 OK\r\nX-A: \t spaced  out \t \r\nContent-Length: 0 \r\n\r\n", check)

    def test_obsTextInValueAccepted(self):
        """Bytes above 0x7f in a value are passed through as they are."""
        def check(h):
            self.assertEqual(h.listener.merged(), [
                head(200, b"OK", (b"X-A", b"caf\xc3\xa9"), (b"Content-Length", b"0")), ("end",)])
        self.both(b"HTTP/1.1 200 OK\r\nX-A: caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n", check)

    def test_repeatedContentLengthWithOtherFlawFails(self):
        """A repeated Content-Length takes the hand-written parser, which still refuses obs-fold."""
        self.both(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\nX-A: a\r\n b\r\n\r\nabc",
                  self.assertRejectedHead)

    def test_contentLengthBesideNonChunkedCodingReadsUntilClose(self):
        """Content-Length beside a Transfer-Encoding not ending in chunked: the length is
        ignored, the body runs until close (llhttp refuses the pair; the framing is ours)."""
        def check(h):
            h.lose()
            self.assertEqual(h.listener.body(), b"abcdef")
            self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
        self.both(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: gzip\r\n\r\nabcdef", check)

    def test_switchingProtocolsWithoutUpgradeFieldsUpgrades(self):
        """A 101 to a request that asked to upgrade switches even without Upgrade fields."""
        def check(h):
            self.assertEqual(h.listener.kinds()[:2], ["head", "upgraded"])
            self.assertEqual(h.listener.failures(), [])
        self.both(b"HTTP/1.1 101 Switching Protocols\r\n\r\nxyz", check, upgrade=True)


class ReadSizeTests(UpstreamClientTestCase):
    """Large bodies are read in larger pieces; heads and small bodies in Twisted's."""

    def test_fullReadSwitchesToLargeReads(self):
        """A body read that fills a whole read switches the transport to LARGE_READ_SIZE."""
        h = Harness()
        h.send()
        h.feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (3 * READ_SIZE))
        self.assertFalse(hasattr(h.transport, "bufferSize") and h.transport.bufferSize == LARGE_READ_SIZE)
        h.feed(b"x" * READ_SIZE)
        self.assertEqual(h.transport.bufferSize, LARGE_READ_SIZE)

    def test_completeResponseRestoresReadSize(self):
        """Once the large response is over, reads are back to READ_SIZE for the next head."""
        h = Harness()
        h.send()
        h.feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * READ_SIZE))
        h.feed(b"x" * READ_SIZE)
        h.feed(b"x" * READ_SIZE)
        self.assertEqual(h.listener.kinds(), ["head", "data", "end"])
        self.assertEqual(h.transport.bufferSize, READ_SIZE)

    def test_smallResponseLeavesReadSizeAlone(self):
        """A small response never touches the read size."""
        h = Harness()
        h.send()
        h.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertFalse(hasattr(h.transport, "bufferSize"))

    def test_upgradeRestoresReadSize(self):
        """A tunnel after a 101 reads in READ_SIZE pieces even if its head came in a full read."""
        h = Harness()
        h.send(upgrade=True)
        h.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + b"x" * READ_SIZE)
        self.assertEqual(h.listener.kinds()[:2], ["head", "upgraded"])
        self.assertEqual(h.transport.bufferSize, READ_SIZE)


class StreamingListener(RecordingListener):
    """A listener that also hears when a response goes on past a read."""

    def upstream_streaming(self):
        self.events.append(("streaming",))


class StreamingNoticeTests(UpstreamClientTestCase):
    """The listener learns that a response goes on past the read just handled (the
    exchange then paces it with the client); a response complete in one read never says so."""

    def test_response_in_one_read_is_not_streaming(self):
        """Head and whole body in one read: head, data, end, and no streaming notice."""
        h = Harness()
        h.listener = StreamingListener()
        h.send()
        h.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(h.listener.kinds(), ["head", "data", "end"])

    def test_response_longer_than_a_read_is_streaming_once(self):
        """A body that goes on past the first read: one notice, after that read, and the
        next response on the connection starts without one."""
        h = Harness()
        h.listener = StreamingListener()
        h.send()
        h.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        self.assertEqual(h.listener.kinds(), ["head", "data", "streaming"])
        h.conn.dataReceived(b"wor")
        h.conn.dataReceived(b"ld")
        self.assertEqual(h.listener.kinds(), ["head", "data", "streaming", "data", "end"])
        h.listener = StreamingListener()
        h.send()
        h.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(h.listener.kinds(), ["head", "data", "end"])

    def test_head_alone_then_body_is_streaming(self):
        """A head whose body comes in a later read: the notice follows the head's read."""
        h = Harness()
        h.listener = StreamingListener()
        h.send()
        h.conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(h.listener.kinds(), ["head", "streaming"])
