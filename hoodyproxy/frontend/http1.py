"""HTTP/1.1 frontend: twisted.web's channel, with a Request that hands itself to the gateway
at end of headers instead of waiting for the whole body.

Stock :class:`twisted.web.http.Request` buffers the body (to memory or a temporary file)
and renders only when it is complete.  :class:`GatewayRequest` starts the gateway in
``gotLength`` and passes each body chunk on as it arrives, so a 1 GiB upload streams
through.  It also offers the small frontend-neutral API the exchange uses
(:class:`hoodyproxy.upstream.exchange.FrontendRequest`).

:class:`GuardedChannel`, the channel under it (and under the plain-HTTP port and the
admin API), bounds what a client can make it wait for or hold: one cheap timer per
connection enforces the idle timeout and the request-head deadline (``[limits]
request_head_timeout``: 408); the framing of a request is judged, all of its head, before
the request goes anywhere (400); and an answer given before a request was read to its end
closes the connection without reading the rest.
"""

from __future__ import annotations

import time
from urllib.parse import unquote

from twisted.internet.interfaces import ITCPTransport
from twisted.protocols import basic
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web import http
from twisted.web.http import NO_BODY_CODES, datetimeToString
from twisted.web.http_headers import Headers
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
#: Names read on every request, bound once: ``twisted.web.http`` is a deprecation proxy
#: module, and each attribute read through it costs about 3 us.
_request_write = http.Request.write
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


class GatewayRequest(http.Request):
    """A request that streams: the gateway sees it at end of headers."""

    def __init__(self, channel, queued=None) -> None:
        # Request.__init__ without a fresh address object per request (the peer does not
        # change on a kept-alive connection) and without form parsing.
        self.notifications = []
        self.channel = channel
        addresses = getattr(channel, "_addresses", None)
        if addresses is None:
            addresses = channel._addresses = (channel.getPeer(), channel.getHost())
        self.client, self.host = addresses
        self.requestHeaders = Headers()
        self.received_cookies = {}
        self.responseHeaders = Headers()
        self.cookies = []
        self.transport = channel.transport
        self.queued = False
        self._parsePOSTFormSubmission = False

    exchange = None
    body_length: int | None = 0
    body_complete = False
    bytes_in = 0
    _finish_on_body = False
    _head_headers: list[tuple[bytes, bytes]] | None = None
    _discarded = 0
    proto = b"https"

    @property
    def http_version(self) -> str:
        """"1.1" or "1.0", as the audit trail records it."""
        return self.clientproto[5:].decode("latin-1") if self.clientproto.startswith(b"HTTP/") else "1.1"

    def gotLength(self, length: int | None) -> None:
        self.content = None
        self.body_length = length
        take_request_line(self)
        self.channel.factory.gateway.begin(self)

    # -- body events from the channel -------------------------------------------------

    def handleContentChunk(self, data: bytes) -> None:
        self.bytes_in += len(data)
        exchange = self.exchange
        if exchange is not None:
            exchange.body_data(data)
            return
        self._discarded += len(data)
        if self._discarded > 1024 * 1024:
            self.abort()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.body_complete = True
        if self._finish_on_body:
            # Answered (an error) before the body was in: now the answer can end.
            self.finish()
        elif self.exchange is not None:
            self.exchange.body_end()

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        if self.exchange is not None:
            self.exchange.client_gone()

    # -- the FrontendRequest API ------------------------------------------------------

    _client_ip: str | None = None

    @property
    def client_ip(self) -> str:
        # Read several times per request; on a dual-stack socket an IPv4 peer is
        # ::ffff:a.b.c.d, which takes an address parse to unwrap: once is enough.
        ip = self._client_ip
        if ip is None:
            ip = self._client_ip = client_ip_of(self.client)
        return ip

    def pause_body(self) -> None:
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.pauseProducing()

    def resume_body(self) -> None:
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.resumeProducing()

    def start_response(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.code = status
        self.code_message = reason
        self._head_headers = headers

    def write(self, data: bytes) -> None:
        if not self.startedWriting and self._head_headers is not None:
            if self._write_head():
                return
        _request_write(self, data)

    def _write_head(self) -> bool:
        """Write the status line and headers in one go; True if the response has no body.

        Does what ``Request.write`` does on its first call, without building a Headers
        object from the list the container sent (the hot path of every response).
        """
        self.startedWriting = 1
        code = self.code
        version = self.clientproto
        parts = [version, b" %d " % code, self.code_message, b"\r\n"]
        has_length = has_date = False
        alt_svc = self.channel.factory.gateway.alt_svc
        for name, value in self._head_headers:
            lname = name.lower()
            if lname == b"content-length":
                has_length = True
            elif lname == b"date":
                has_date = True
            elif lname == b"alt-svc" and alt_svc is not None:
                continue  # the gateway's own advertisement wins over a container's
            parts += (name, b": ", value, b"\r\n")
        if not has_date:
            parts += (b"Date: ", http_date(), b"\r\n")
        if alt_svc is not None:
            parts += (b"Alt-Svc: ", alt_svc, b"\r\n")
        no_body = self.method == b"HEAD" or code in NO_BODY_CODES
        if version == b"HTTP/1.1":
            if not has_length and not no_body:
                parts.append(b"Transfer-Encoding: chunked\r\n")
                self.chunked = 1
            if not self.channel.persistent:
                parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        self.channel.writeSequence(parts)
        if no_body:
            self.write = lambda data: None
        return no_body

    def finish_response(self) -> None:
        if not self._disconnected and not self.finished:
            self.finish()

    def send_error(self, error: errors.GatewayError) -> None:
        """Answer with ``error``'s status and JSON body (or abort if a response has begun)."""
        if self._disconnected or self.finished:
            return
        if self.startedWriting:
            self.abort()
            return
        body = error.body()
        self.code = error.status
        self.code_message = REASONS.get(error.status, b"Error")
        headers = Headers()
        headers.addRawHeader(b"Content-Type", b"application/json")
        headers.addRawHeader(b"Content-Length", b"%d" % len(body))
        headers.addRawHeader(b"Cache-Control", b"no-store")
        headers.addRawHeader(b"Date", http_date())
        headers.addRawHeader(b"Server", SERVER)
        alt_svc = self.channel.factory.gateway.alt_svc
        if alt_svc is not None:
            headers.addRawHeader(b"Alt-Svc", alt_svc)
        for name, value in error.headers.items():
            for one in value if isinstance(value, list) else (value,):
                headers.addRawHeader(name, one)
        if not self.body_complete:
            # The client is still sending a body we will not read: close after answering.
            self.channel.persistent = False
            headers.addRawHeader(b"Connection", b"close")
        self.responseHeaders = headers
        self.write(body)
        if self.body_complete:
            self.finish()
        else:
            self._finish_on_body = True

    def abort(self) -> None:
        """Drop the client's connection at once (never a silently truncated response)."""
        channel = self.channel
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()

    def take_over(self, headers: list[tuple[bytes, bytes]]):
        """Answer 101 with ``headers`` and hand the raw connection to a tunnel.

        Returns (client transport, bytes the client already sent after the request).
        The tunnel installs itself with :meth:`attach_tunnel`.
        """
        channel = self.channel
        transport = channel.transport
        channel.stop_idle_timer()
        transport.unregisterProducer()
        head = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        transport.writeSequence(head)
        leftover = b"".join(channel._dataBuffer)
        channel._dataBuffer = []
        self.exchange = None
        self._channel_for_tunnel = channel
        return transport, leftover

    def attach_tunnel(self, tunnel) -> None:
        channel = self._channel_for_tunnel
        channel.dataReceived = tunnel.client_data
        channel.connectionLost = tunnel.client_lost
        if self in channel.requests:
            channel.requests.remove(self)
        del self._channel_for_tunnel


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
        transport = self.transport
        self._networkProducer.unregisterProducer()
        transport.resumeProducing()  # reading may have been paused for backpressure
        if ITCPTransport.providedBy(transport) and not isinstance(transport, TLSMemoryBIOProtocol):
            transport.loseWriteConnection()  # FIN after the answer; reading goes on
        else:
            transport.loseConnection()  # TLS: close_notify; reading goes on until the peer's

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


class GatewayChannel(GuardedChannel):
    """The HTTPS port's HTTP/1.1 channel: its refusals are audited like every answer."""

    def refused(self, error: errors.GatewayError) -> None:
        gateway = self.factory.gateway
        started = self._head_started
        took = self._now() - started if started is not None else 0.0
        request = self.requests[-1] if self.requests else None
        hosts = request.requestHeaders.getRawHeaders(b"host") if request is not None else None
        command, path = getattr(self, "_command", None), getattr(self, "_path", None)
        version = getattr(self, "_version", None) or b"HTTP/1.1"
        gateway.emit_record({
            "time": gateway.now() - took, "client": client_ip_of(self.transport.getPeer()),
            "host": hosts[0].decode("latin-1") if hosts else None, "route": None,
            "method": command.decode("latin-1") if command else None,
            "path": path.decode("latin-1") if path else None,
            "http": version[5:].decode("latin-1") if version.startswith(b"HTTP/") else "1.1",
            "status": error.status, "reason": error.reason, "bytes_in": 0, "bytes_out": len(error.body())})

    def body_malformed(self, reason: str) -> None:
        # The request is with the gateway (and maybe its container) already, which may be
        # answering: only dropping the connection is safe; the exchange learns of it from
        # connectionLost.
        self.closing = True
        self.transport.abortConnection()


class GatewayHTTPFactory(http.HTTPFactory):
    """The HTTP/1.1 server factory: every request goes to ``gateway``."""

    protocol = GatewayChannel

    def __init__(self, gateway, reactor, timeout: float = 75.0) -> None:
        super().__init__(logPath=None, timeout=timeout, reactor=reactor)
        self.gateway = gateway

    @property
    def head_timeout(self) -> float:
        """``[limits] request_head_timeout``, as the gateway's settings say now."""
        return self.gateway.settings.request_head_timeout

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        channel.requestFactory = GatewayRequest
        return channel

    def log(self, request) -> None:
        """The audit trail replaces the access log."""
