"""HTTP/1.1 frontend: twisted.web's channel, with a Request that hands itself to the gateway
at end of headers instead of waiting for the whole body.

Stock :class:`twisted.web.http.Request` buffers the body (to memory or a temporary file)
and renders only when it is complete.  :class:`GatewayRequest` starts the gateway in
``gotLength`` and passes each body chunk on as it arrives, so a 1 GiB upload streams
through.  It also offers the small frontend-neutral API the exchange uses
(:class:`hoodyproxy.upstream.exchange.FrontendRequest`).
"""

from __future__ import annotations

import ipaddress
import time

from twisted.web import http
from twisted.web.http_headers import Headers

from hoodyproxy import errors

SERVER = b"hoodyproxy"
_date_cache: list = [0, b""]


def http_date() -> bytes:
    """The current time as an HTTP date, formatted once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0], _date_cache[1] = now, http.datetimeToString(now)
    return _date_cache[1]


def client_ip_of(address) -> str:
    """The client's IP as a string, IPv4-mapped IPv6 addresses unwrapped."""
    host = getattr(address, "host", "")
    if host.startswith("::ffff:"):
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            mapped = None
        if mapped is not None:
            return str(mapped)
    return host


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
        channel = self.channel
        self.content = None
        self.body_length = length
        self.method = channel._command
        self.uri = channel._path
        self.clientproto = channel._version
        self.path = self.uri.split(b"?", 1)[0]
        self.args = {}
        channel.factory.gateway.begin(self)

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

    @property
    def client_ip(self) -> str:
        return client_ip_of(self.client)

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
        http.Request.write(self, data)

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
        no_body = self.method == b"HEAD" or code in http.NO_BODY_CODES
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
        self.code_message = http.RESPONSES.get(error.status, b"Error")
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


class GatewayChannel(http.HTTPChannel):
    """HTTPChannel with a cheaper idle timeout, that sends no ``100 Continue`` for a request
    already answered.

    Twisted's TimeoutMixin cancels its timer at every request and schedules a new one when
    the response is done, and moves it on every read: heap work on each request.  Here one
    timer per connection only notes activity; when it fires it checks how long the
    connection has really been idle and sleeps again for the rest.
    """

    _idle_timer = None
    _last_activity = 0.0

    def _now(self) -> float:
        return self.factory.reactor.seconds()

    def setTimeout(self, period):
        previous, self.timeOut = self.timeOut, period
        if period is not None:
            self._last_activity = self._now()
            if self._idle_timer is None:
                self._idle_timer = self.callLater(period, self._check_idle)
        return previous

    def resetTimeout(self) -> None:
        self._last_activity = self._now()

    def _check_idle(self) -> None:
        self._idle_timer = None
        period = self.timeOut
        if period is None:
            return  # a request is being handled; setTimeout re-arms when it is done
        idle = self._now() - self._last_activity
        if idle >= period:
            self.timeoutConnection()
        else:
            self._idle_timer = self.callLater(period - idle, self._check_idle)

    def stop_idle_timer(self) -> None:
        """No idle timeout from now on (the connection became a tunnel, or is gone)."""
        self.timeOut = None
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionLost(self, reason) -> None:
        self.stop_idle_timer()
        super().connectionLost(reason)

    def _send100Continue(self) -> None:
        if self.requests and self.requests[-1].startedWriting:
            return
        super()._send100Continue()


class GatewayHTTPFactory(http.HTTPFactory):
    """The HTTP/1.1 server factory: every request goes to ``gateway``."""

    protocol = GatewayChannel

    def __init__(self, gateway, reactor, timeout: float = 75.0) -> None:
        super().__init__(logPath=None, timeout=timeout, reactor=reactor)
        self.gateway = gateway

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        channel.requestFactory = GatewayRequest
        return channel

    def log(self, request) -> None:
        """The audit trail replaces the access log."""
