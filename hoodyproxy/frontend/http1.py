"""HTTP/1.1 on twisted.web for the admin API and the plain-HTTP port, and what the HTTPS
port's frontend (:mod:`hoodyproxy.frontend.h1`) shares with them.

:class:`GuardedChannel`, the channel under the plain-HTTP port and the admin API, bounds
what a client can make it wait for or hold: one cheap timer per connection enforces the
idle timeout and the request-head deadline (``[limits] request_head_timeout``: 408); the
framing of a request is judged, all of its head, before the request goes anywhere (400);
and an answer given before a request was read to its end closes the connection without
reading the rest.  The HTTPS port, the hot path, parses with llhttp instead
(:mod:`hoodyproxy.frontend.h1`) and shares the error answers, the date and the lingering
close's bounds defined here.
"""

from __future__ import annotations

import time
from urllib.parse import unquote

from twisted.internet.interfaces import ITCPTransport
from twisted.protocols import basic
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web import http
from twisted.web.http import datetimeToString
from twisted.web.server import Site

from hoodyproxy import errors
from hoodyproxy.listening import unmapped_ip

SERVER = b"hoodyproxy"
_date_cache: list = [0, b""]
#: After an answer given before the request was read to its end, what the client still
#: sends is read and dropped (so that closing does not reset the connection under the
#: answer) for at most this many seconds ...
LINGER_SECONDS = 2.0
#: ... and at most this many bytes; then the connection is aborted.
LINGER_BYTES = 1024 * 1024
#: Read on every line, bound once: ``twisted.web.http`` is a deprecation proxy module, and
#: each attribute read through it costs about 3 us.
_channel_line_received = http.HTTPChannel.lineReceived
#: Reason phrases of RFC 9110 where twisted.web has none or an older one.
REASONS = {**http.RESPONSES, 408: b"Request Timeout", 413: b"Content Too Large", 422: b"Unprocessable Content"}


class RequestTimeout(errors.GatewayError):
    """The request head did not arrive within ``[limits] request_head_timeout``."""

    status = 408
    code = "request_timeout"
    message = "the request head did not arrive in time"


def http_date() -> bytes:
    """The current time as an HTTP date, formatted once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0], _date_cache[1] = now, datetimeToString(now)
    return _date_cache[1]


def client_ip_of(address) -> str:
    """The client's IP as a string, IPv4-mapped IPv6 addresses unwrapped."""
    return unmapped_ip(getattr(address, "host", ""))


def take_request_line(request) -> None:
    """Give ``request`` its method, target and version at end of head (``gotLength``),
    before stock twisted.web would (``requestReceived``, once the body is in)."""
    channel = request.channel
    request.method = channel._command
    request.uri = channel._path
    request.clientproto = channel._version
    request.path = request.uri.split(b"?", 1)[0]
    request.args = {}


def take_site_request_line(request) -> None:
    """:func:`take_request_line` for a twisted.web.server Request, with what resource
    traversal needs (its site, ``prepath`` and ``postpath``)."""
    take_request_line(request)
    request.site = request.channel.site
    request.prepath = []
    request.postpath = list(map(unquote, request.path[1:].split(b"/")))


def end_sending(transport) -> None:
    """End what is sent on ``transport`` once its answer is out, reading on (a lingering
    close): a FIN on plain TCP, a close_notify under TLS (whose reading goes on until the
    peer's own)."""
    transport.resumeProducing()  # reading may have been paused
    if ITCPTransport.providedBy(transport) and not isinstance(transport, TLSMemoryBIOProtocol):
        transport.loseWriteConnection()
    else:
        transport.loseConnection()


def error_response(error: errors.GatewayError) -> list[bytes]:
    """A complete HTTP/1.1 response for ``error`` that closes the connection."""
    body = error.body()
    head = [b"HTTP/1.1 %d " % error.status, REASONS.get(error.status, b"Error"), b"\r\n",
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
            b"Cache-Control: no-store\r\nDate: ", http_date(), b"\r\nServer: ", SERVER, b"\r\n"]
    for name, value in error.headers.items():
        for one in value if isinstance(value, list) else (value,):
            head += (name, b": ", one, b"\r\n")
    return head + [b"Connection: close\r\n\r\n", body]


class GuardedChannel(http.HTTPChannel):
    """HTTPChannel with one cheap timer per connection (idle timeout and request-head
    deadline), a strict judgement of a request's framing, and answers that end the
    connection without reading the rest of the request.

    Twisted's TimeoutMixin cancels its timer at every request and schedules a new one when
    the response is done, and moves it on every read: heap work on each request.  Here one
    timer per connection only notes activity; when it fires it checks how long the
    connection has really been idle and how long the head being received has taken
    (``head_timeout``, the factory's: from the first byte of a request to the end of its
    head), and sleeps again for the rest.  It never sleeps longer than ``head_timeout``,
    so a head that begins while it sleeps is caught on time without the timer being moved
    for each request.

    twisted.web answers a malformed header that is not the last one with a bare 400 but
    goes on parsing the lines after it, so a head that TLS delivers in several records
    could still reach its end, and the gateway.  Here the first refusal stops the parser
    for good: nothing of a refused request goes anywhere.
    """

    _idle_timer = None
    _last_activity = 0.0
    #: When the head being received began (None: not receiving a head).
    _head_started: float | None = None
    #: Whether the head being received had a Transfer-Encoding field already.
    _transfer_encoding_seen = False
    #: Why the head being parsed is refused, for the audit line.
    _refusal_reason: str | None = None
    _linger_left = 0
    _linger_timer = None
    #: The connection is ending: nothing it receives is parsed any more.
    closing = False

    @property
    def head_timeout(self) -> float | None:
        return getattr(self.factory, "head_timeout", None)

    def _now(self) -> float:
        return self.factory.reactor.seconds()

    # -- the one timer ------------------------------------------------------------------

    def setTimeout(self, period):
        previous, self.timeOut = self.timeOut, period
        if period is not None:
            self._last_activity = self._now()
            if self._idle_timer is None:
                self._sleep(period)
        return previous

    def resetTimeout(self) -> None:
        self._last_activity = self._now()

    def _sleep(self, seconds: float) -> None:
        head_timeout = self.head_timeout
        if head_timeout is not None and head_timeout < seconds:
            seconds = head_timeout
        self._idle_timer = self.callLater(max(seconds, 0.0), self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self.closing:
            return
        now = self._now()
        started, head_timeout = self._head_started, self.head_timeout
        head_left = None
        if started is not None and head_timeout is not None:
            head_left = started + head_timeout - now
            if head_left <= 0:
                self.head_timed_out()
                return
        period = self.timeOut
        if period is None:
            # A request is being handled (setTimeout re-arms when it is done), or there is
            # no idle timeout at all.
            if head_left is not None:
                self._sleep(head_left)
            return
        idle = now - self._last_activity
        if idle >= period:
            self.timeoutConnection()
        else:
            self._sleep(period - idle if head_left is None else min(period - idle, head_left))

    def stop_idle_timer(self) -> None:
        """No idle timeout from now on (the connection became a tunnel, or is gone)."""
        self.timeOut = None
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- parsing, with the head's start and end noted -----------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            self._drop(len(data))
            return
        now = self._last_activity = self._now()
        if self._head_started is None and self.line_mode and not self._handlingRequest:
            self._head_started = now
        basic.LineReceiver.dataReceived(self, data)

    def lineReceived(self, line: bytes):
        if self.closing:
            return True  # (stops LineReceiver's loop over what it has buffered)
        if self._head_started is None:
            self._head_started = self._now()  # a pipelined head, replayed from the buffer
        _channel_line_received(self, line)
        return True if self.closing else None

    def rawDataReceived(self, data: bytes) -> None:
        if not self.closing:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        self._head_started = None
        self._transfer_encoding_seen = False
        if not self.closing:
            super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self.closing:  # (answered early: the request is over already)
            super().allContentReceived()

    def _send100Continue(self) -> None:
        if self.closing or (self.requests and self.requests[-1].startedWriting):
            return  # answered already: the body is not wanted
        super()._send100Continue()

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        """Twisted's choice of body framing, stricter about Transfer-Encoding.

        RFC 9112 6.3: unless the request's Transfer-Encoding (all its fields, combined)
        ends in chunked, its length cannot be known: 400 and close.  Twisted accepts
        ``identity`` alone, and a second field (``chunked`` then ``identity``: combined
        ``chunked, identity``) as if it were absent.  Only one field, ``chunked``, passes.
        """
        if header == b"Transfer-Encoding":
            if self._transfer_encoding_seen or data.lower() != b"chunked":
                self._refusal_reason = "transfer-encoding not chunked"
                return self._failChooseTransferDecoder()
            self._transfer_encoding_seen = True
        elif header == b"Content-Length" and not data.isdigit():
            self._refusal_reason = "bad content-length"
        if self._transferDecoder is not None and header in (b"Content-Length", b"Transfer-Encoding"):
            self._refusal_reason = "conflicting framing"
        return super()._maybeChooseTransferDecoder(header, data)

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Every malformation twisted.web finds (request line, header, framing, head size,
        chunked body) ends here."""
        reason, self._refusal_reason = self._refusal_reason or "malformed request", None
        if self.line_mode and not self._handlingRequest:
            self.refuse(errors.BadRequest(reason=reason))
        else:
            self.body_malformed(reason)

    def body_malformed(self, reason: str) -> None:
        """A request body (chunked) turned out malformed while it was being received."""
        self.refuse(errors.BadRequest("the request body is malformed", reason=reason))

    # -- answering early, and closing without reading on ----------------------------------

    def head_timed_out(self) -> None:
        """The head being received took longer than ``head_timeout``."""
        self.refuse(RequestTimeout(reason="request head timeout"))

    def refuse(self, error: errors.GatewayError) -> None:
        """Answer ``error`` to the request being received, and end the connection without
        reading any more of it."""
        if self.closing:
            return
        request = self.requests[-1] if self.requests else None
        if request is not None and request.startedWriting:
            self.closing = True
            self.transport.abortConnection()  # never an answer inside another
            return
        self.transport.writeSequence(error_response(error))
        self.refused(error)
        self.linger_close()

    def refused(self, error: errors.GatewayError) -> None:
        """Called when :meth:`refuse` has answered ``error`` (the gateway audits it)."""

    def linger_close(self) -> None:
        """Stop parsing, close once what is written is out, and meanwhile drop what the
        client still sends, for at most :data:`LINGER_SECONDS` and :data:`LINGER_BYTES`.

        Closing a socket with unread bytes in it, or that more bytes reach, makes the
        kernel reset the connection, and a reset can destroy the answer before the client
        reads it; reading and dropping for a while lets it arrive.
        """
        if self.closing:
            return
        self.stop_parsing()
        self.persistent = False
        self.stop_idle_timer()
        self._linger_timer = self.callLater(LINGER_SECONDS, self._linger_over)
        self._networkProducer.unregisterProducer()
        end_sending(self.transport)

    def stop_parsing(self) -> None:
        """Parse nothing more on this connection: what arrives is dropped (at most
        :data:`LINGER_BYTES`, then the connection is aborted)."""
        self.closing = True
        self._head_started = None
        self._linger_left = LINGER_BYTES

    def _drop(self, size: int) -> None:
        self._linger_left -= size
        if self._linger_left < 0:
            self._linger_over()

    def _linger_over(self) -> None:
        self._linger_timer = None
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self.stop_idle_timer()
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        super().connectionLost(reason)


class EarlyAnswerChannel(GuardedChannel):
    """The channel of the plain-HTTP port and the admin API, whose requests may be answered
    before their body is read: closing after such an answer lingers."""

    def loseConnection(self) -> None:
        if self.length != 0 and not self._handlingRequest:
            self.linger_close()  # answered before the end of the body
        else:
            self.stop_parsing()  # (answered, maybe at end of head: the head is not parsed on)
            super().loseConnection()


def early_answer_site(resource, request_factory, reactor, head_timeout: float | None) -> Site:
    """A Site for ``resource`` whose requests (``request_factory``) may answer before their
    body is read, on :class:`EarlyAnswerChannel`; ``head_timeout`` bounds how long a
    request head may take (408)."""
    site = Site(resource, reactor=reactor)
    site.protocol = EarlyAnswerChannel
    site.requestFactory = request_factory
    site.head_timeout = head_timeout
    site.log = lambda request: None  # (no access log)
    return site
