"""The HTTPS port's HTTP/1.1 frontend: llhttp (httptools) parses, one request path serves.

:class:`H1Connection` feeds what the client sends to llhttp, Node.js's parser, in strict
mode: a request head is parsed in one pass in C and the request model
(:class:`~hoodyproxy.frontend.h1request.H1Request`) is built from its callbacks, with
no line-by-line parsing and no per-request objects beyond the request itself.  The
gateway sees the request at the end of its head (:meth:`hoodyproxy.gateway.Gateway.begin`),
and the body streams on as it arrives, paused when the container cannot keep up.

What it refuses, before anything reaches the gateway (400, or 431 for a head over
:data:`MAX_HEAD_BYTES`, and the connection ends): whatever llhttp's strict mode refuses
(obs-fold, a bare CR or LF, whitespace before a colon, an invalid token or value byte, a
duplicate or malformed Content-Length, Content-Length with Transfer-Encoding, a bad chunk
size or terminator), and, stricter than llhttp, any Transfer-Encoding but one field of
exactly ``chunked`` (RFC 9112 6.3), and HTTP versions other than 1.0 and 1.1.  The first
refusal stops the parser for good: nothing of a refused request goes anywhere.

Pipelined requests are parsed as they come but served one at a time, in order: one that
arrives while another is being answered waits (with its body, if it has one in the same
read), and the connection stops reading until it is served.  One timer per connection
keeps the idle timeout and the request-head deadline (``[limits] request_head_timeout``:
408): it notes activity and, when it fires, checks how long the connection has really
been idle, so nothing is scheduled or cancelled per request.  An answer given before a
request was read to its end closes the connection after lingering briefly (see
:meth:`H1Connection.linger_close`).  An upgrade (llhttp stops parsing at the end of its
head) hands the raw connection to a tunnel when the container answers 101; otherwise
the connection closes after the answer, since what follows is not known to be HTTP.
"""

from __future__ import annotations

import httptools
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from hoodyproxy import errors
from hoodyproxy.frontend.h1request import H1Request
from hoodyproxy.frontend.h1guard import H1Guard
from hoodyproxy.frontend.http1 import LINGER_BYTES
from hoodyproxy.listening import unmapped_ip

log = Logger()

#: The largest request head (request line and header fields) accepted: 431 beyond it.
MAX_HEAD_BYTES = 16 * 1024
#: The most header fields a request head may have: 431 beyond it.
MAX_FIELDS = 500
#: The fields a request's head is checked for as each field arrives: the framing fields,
#: and those looked up once the head is in (only when present: a lookup is a scan).
_NOTED = frozenset({b"transfer-encoding", b"content-length", b"connection", b"expect"})
#: Pipelined requests parsed ahead of the one being answered; past them the connection
#: reads no more and closes after answering them.
MAX_PIPELINED = 32

_Upgrade = httptools.HttpParserUpgrade
_ParserError = httptools.HttpParserError
_CallbackError = httptools.HttpParserCallbackError


class HeadTooLarge(errors.GatewayError):
    status = 431
    code = "request_header_fields_too_large"
    message = "the request head is too large"


class VersionNotSupported(errors.GatewayError):
    status = 505
    code = "http_version_not_supported"
    message = "only HTTP/1.1 and HTTP/1.0 are spoken here"


class _Refuse(Exception):
    """Raised in a parser callback: refuse the request being received with ``error``."""

    def __init__(self, error: errors.GatewayError) -> None:
        self.error = error


class _Stop(Exception):
    """Raised in a parser callback: parse nothing more on this connection."""


def _reason_of(problem: str) -> str:
    """The audit line's reason for a message of llhttp's."""
    lower = problem.lower()
    if "transfer-encoding" in lower and "content-length" in lower:
        return "conflicting framing"
    if "transfer-encoding" in lower:
        return "transfer-encoding not chunked"
    if "content-length" in lower:
        return "bad content-length"
    if "chunk" in lower:
        return "malformed chunked body"
    return "malformed request"


class H1Connection(H1Guard, Protocol):
    """One HTTP/1.1 client connection: parse, serve in order, pace, close."""

    #: The connection is ending: nothing it receives is parsed any more.
    closing = False
    #: Nothing more is parsed (what follows a request that ends the connection).
    parsing_over = False
    lost = False
    #: Requests after those parsed so far will be read (False after one that ends the
    #: connection, or past MAX_PIPELINED waiting): the last answer then says close.
    persistent = True
    #: The request whose head or body is being received (None between requests).
    receiving: H1Request | None = None
    #: The request being answered (the gateway has it).
    active: H1Request | None = None
    #: llhttp stopped at the end of an upgrade's head: what follows is held, not parsed.
    upgraded = False
    #: A producer is registered on the transport (see register_producer).
    producing = False
    _tunnel = None
    _timer = None
    _head_started: float | None = None
    _head_size = 0
    _fields = 0
    _fields_this_read = 0
    #: Bytes of a body read that produced nothing (see dataReceived), and trailer bytes.
    _unproductive = 0
    _trailer_size = 0
    _te_seen = False
    _length_seen = False
    _linger_left = 0
    _serving = False

    def __init__(self, factory: "H1Factory") -> None:
        self.factory = factory
        self.gateway = factory.gateway
        self.alt_svc = factory.gateway.alt_svc
        self.clock = factory.reactor
        self.parser = httptools.HttpRequestParser(self)
        #: Requests received whole (or their heads) while another is being answered.
        self.waiting: list[H1Request] = []
        #: Bytes after an upgrade's head, kept for the tunnel.
        self.held: list[bytes] = []
        self._paused: set[str] = set()
        self._last_activity = 0.0

    # -- connection events ------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        self.factory.connections.add(self)
        self.peer = transport.getPeer()
        self.local = transport.getHost()
        self.client_ip = unmapped_ip(getattr(self.peer, "host", ""))
        self._last_activity = self.clock.seconds()
        self._sleep(self.factory.timeout or self.factory.head_timeout or 60.0)
        if self.factory.draining:
            self.drain()

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.client_data(data)
            return
        if self.closing or self.parsing_over:
            self._drop(len(data))
            return
        now = self._last_activity = self.clock.seconds()
        if self.upgraded:
            self._hold(data)
            return
        if self._head_started is None and self.receiving is None and self.active is None:
            self._head_started = now  # (the first byte of a request, or of what precedes one)
        self._fields_this_read = 0
        try:
            self.parser.feed_data(data)
        except _Upgrade as upgrade:
            self.upgraded = True
            rest = data[upgrade.args[0]:]
            if self.closing:
                self._drop(len(rest))  # (answered and closing already: an upgrade with a body)
            elif rest:
                self._hold(rest)
            if self.active is None and not self.waiting:
                self.close()  # answered already, and what follows is not known to be HTTP
        except _CallbackError as failure:
            self._callback_failed(failure)
        except _ParserError as failure:
            self._malformed(str(failure))
        else:
            receiving = self.receiving
            if receiving is not None and not self.closing:
                if self._head_started is not None:
                    # A head still incomplete: llhttp holds at most the field being received.
                    if not self._fields_this_read:
                        self._head_size += len(data)
                    if self._head_size > MAX_HEAD_BYTES:
                        self.refuse(HeadTooLarge(reason="request head too large"))
                elif self._fields_this_read:
                    self._unproductive = 0
                else:
                    # A body read that gave no body byte and ended no field: chunk-size
                    # lines, extensions, or a trailer field being received (which httptools
                    # keeps whole until it ends).  Bounded like a head.
                    self._unproductive += len(data)
                    if self._unproductive > MAX_HEAD_BYTES:
                        self._malformed("chunked body framing or trailer too large")

    def connectionLost(self, reason=None) -> None:
        self.lost = True
        self.closing = True
        self._stop_timer()
        self.factory.connections.discard(self)
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.client_lost(reason)
            return
        active, self.active = self.active, None
        self.waiting = []
        self.receiving = None
        if active is not None and active.exchange is not None and not active.finished:
            active.exchange.client_gone()

    # -- llhttp's callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.closing or not self.persistent:
            raise _Stop()  # (nothing after a request that ends the connection is read)
        if len(self.waiting) >= MAX_PIPELINED:
            # One read can hold thousands of tiny pipelined requests, each an object here:
            # past this many, the rest is not read; those queued are answered, then the
            # connection closes (the client sends the others again on a new one).
            raise _Stop()
        request = H1Request(self)
        self.receiving = request
        self._head_size = 0
        self._fields = 0
        self._te_seen = self._length_seen = False
        if self._head_started is None:
            self._head_started = self._last_activity  # a pipelined head, in the same read

    def on_url(self, piece: bytes) -> None:
        request = self.receiving
        request.uri += piece
        self._head_size += len(piece)
        self._fields_this_read += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.receiving
        if request is None or request.method:
            # A chunked body's trailer field: not forwarded, and bounded like a head.
            self._trailer_size += len(name) + len(value) + 4
            if self._trailer_size > MAX_HEAD_BYTES:
                raise _Refuse(HeadTooLarge(reason="request trailer too large"))
            self._fields_this_read += 1
            return
        self._fields_this_read += 1
        size = self._head_size = self._head_size + len(name) + len(value) + 4
        count = self._fields = self._fields + 1
        if size > MAX_HEAD_BYTES or count > MAX_FIELDS:
            raise _Refuse(HeadTooLarge(reason="request head too large"))
        value = value.rstrip(b" \t")
        lname = name.lower()
        if lname in _NOTED:
            if lname == b"connection":
                request.has_connection = True
            elif lname == b"expect":
                request.has_expect = True
            elif lname == b"transfer-encoding":
                # RFC 9112 6.3: one field, exactly chunked; anything else leaves the length unknown.
                if self._te_seen or value.lower() != b"chunked":
                    raise _Refuse(errors.BadRequest(reason="transfer-encoding not chunked"))
                if self._length_seen:
                    raise _Refuse(errors.BadRequest(reason="conflicting framing"))
                self._te_seen = True
            else:
                if not value.isdigit():
                    raise _Refuse(errors.BadRequest(reason="bad content-length"))
                if self._te_seen or self._length_seen:
                    raise _Refuse(errors.BadRequest(reason="conflicting framing"))
                self._length_seen = True
        fields = request.requestHeaders
        # The pair and its lower-case name, together (Fields.lnames is one for one).
        fields.pairs.append((name, value))
        fields.lnames.append(lname)

    def on_headers_complete(self) -> None:
        request = self.receiving
        parser = self.parser
        self._head_started = None
        version = parser.get_http_version()
        if version == "1.0":
            request.clientproto, request.http_version = b"HTTP/1.0", "1.0"
        elif version != "1.1":
            raise _Refuse(VersionNotSupported(reason="http version " + version))
        request.method = parser.get_method()
        if self._te_seen:
            request.body_length = None
        elif self._length_seen:
            request.body_length = int(request.requestHeaders.getRawHeaders(b"content-length")[0])
        if request.body_length == 0:
            request.body_complete = True  # (no body; on_message_complete confirms)
        connection = request.requestHeaders.getRawHeaders(b"connection") if request.has_connection else None
        if version == "1.0" or (connection is not None and any(
                b"close" in [token.strip() for token in value.lower().split(b",")]
                for value in connection if b"close" in value.lower())):  # (the token only where the word is)
            request.keep_alive = False
            self.persistent = False
        if self.active is None:
            self._serve(request)
        else:
            self.waiting.append(request)
            self.pause_reading("waiting")

    def on_body(self, data: bytes) -> None:
        request = self.receiving
        request.bytes_in += len(data)
        self._fields_this_read += 1  # (progress: see dataReceived)
        if request is not self.active:
            if request.early_body is None:
                request.early_body = []
            request.early_body.append(data)
            return
        exchange = request.exchange
        if exchange is not None:
            exchange.body_data(data)

    def on_message_complete(self) -> None:
        request, self.receiving = self.receiving, None
        self._unproductive = self._trailer_size = 0
        if request.body_complete:
            return  # (a request without a body: complete at the end of its head)
        request.body_complete = True
        if request is not self.active:
            return  # (waiting: its body is handed over when it is served)
        if request.finished:
            self._next(request)  # answered before its body was in: now it is over
        elif request.exchange is not None:
            request.exchange.body_end()

    # -- serving in order ----------------------------------------------------------------

    def _serve(self, request: H1Request) -> None:
        """Hand ``request`` to the gateway, with whatever of its body came meanwhile."""
        self.active = request
        self.gateway.begin(request)
        expect = request.requestHeaders.getRawHeaders(b"expect") if request.has_expect else None
        if (expect is not None and not request.started and request.body_length != 0
                and not request.body_complete and request.clientproto == b"HTTP/1.1"
                and expect[0].lower() == b"100-continue"):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        early, request.early_body = request.early_body, None
        exchange = request.exchange
        if early is not None and exchange is not None and not request.finished:
            for chunk in early:
                exchange.body_data(chunk)
            if request.body_complete:
                exchange.body_end()

    def request_done(self, request: H1Request) -> None:
        """``request``'s answer is complete: close, or serve the next one."""
        if request is not self.active:
            return
        if request.answered_early:
            self.linger_close()
            return
        if not request.body_complete:
            return  # the rest of its body is read (and dropped) first: on_message_complete
        self._next(request)

    def _next(self, done: H1Request) -> None:
        """``done`` is answered: serve the next request waiting, read on, or close."""
        self.active = None
        if self.closing:
            return
        if self.upgraded or not done.keep_alive:
            self.close()
            return
        self._last_activity = self.clock.seconds()
        if self._serving:
            return  # (the loop below is running further up the stack)
        self._serving = True
        try:
            while self.waiting and self.active is None and not self.closing:
                self._serve(self.waiting.pop(0))
        finally:
            self._serving = False
        if not self.waiting and not self.closing:
            if self.persistent:
                if self._paused:  # (rarely: a pipelined request waited)
                    self.resume_reading("waiting")
            elif self.active is None:
                self.close()  # (every request read is answered, and no more will be read)
        if self.factory.draining and not self.closing and self.active is None:
            self.drain()  # (an answer begun before the drain did not say close: idle from now)

    # -- pacing ------------------------------------------------------------------------------

    def pause_reading(self, why: str) -> None:
        if not self._paused and self.transport is not None and not self.lost:
            self.transport.pauseProducing()
        self._paused.add(why)

    def resume_reading(self, why: str) -> None:
        paused = self._paused
        if why in paused:
            paused.discard(why)
            if not paused and self.transport is not None and not self.lost:
                self.transport.resumeProducing()

    def register_producer(self, producer, streaming: bool) -> None:
        """What writes the response (the container's connection) pauses while the client
        is slow to read it."""
        if self.transport is not None and not self.lost:
            self.unregister_producer()
            self.transport.registerProducer(producer, streaming)
            self.producing = True

    def unregister_producer(self) -> None:
        if self.producing:
            self.producing = False
            if self.transport is not None:
                self.transport.unregisterProducer()

    def _hold(self, data: bytes) -> None:
        """Keep bytes sent after an upgrade's head for the tunnel (bounded: reading stops)."""
        self.held.append(data)
        self.pause_reading("upgrade")

    # -- what llhttp refuses ----------------------------------------------------------------

    def _callback_failed(self, failure: Exception) -> None:
        cause = failure.__context__
        if isinstance(cause, _Refuse):
            self.refuse(cause.error)
        elif isinstance(cause, _Stop):
            # Nothing more is parsed; the connection closes once its last answer is out, and
            # what the client sends meanwhile is dropped (up to LINGER_BYTES).
            self.persistent = False
            self.parsing_over = True
            self._linger_left = LINGER_BYTES
            if self.active is None and not self.waiting:
                self.close()
        else:
            log.failure("HTTP/1.1 request handling failed; connection dropped", None)
            log.error("{cause!r}", cause=cause)
            self.abort()

    def _malformed(self, problem: str) -> None:
        if problem.startswith("Data after `Connection: close`"):
            # llhttp reads nothing after a request that ends the connection; neither do we:
            # what follows is dropped, and the connection closes after the answers due.
            self.persistent = False
            self.parsing_over = True
            self._linger_left = LINGER_BYTES
            if self.active is None and not self.waiting:
                self.close()
            return
        reason = _reason_of(problem)
        if self.receiving is not None and self.receiving is self.active:
            # The request is with the gateway (maybe its container) already, which may be
            # answering: only dropping the connection is safe (the exchange hears of it).
            self.closing = True
            self.abort()
            return
        self.refuse(errors.BadRequest(reason=reason))

    # -- becoming a tunnel ------------------------------------------------------------------

    def become_tunnel(self, head: list[bytes]):
        """Write the 101 and give the raw connection up: (transport, bytes held)."""
        if not self.upgraded:
            # llhttp parsed on past the head: those bytes were taken as HTTP, never tunnel them.
            self.abort()
            raise errors.BadGateway(reason="upgrade the parser did not see")
        self._stop_timer()
        transport = self.transport
        self.unregister_producer()
        transport.writeSequence(head)
        leftover = b"".join(self.held)
        self.held = []
        self.parser = None
        self.active = self.receiving = None
        self.waiting = []
        self._paused.clear()
        transport.resumeProducing()
        return transport, leftover

    def attach_tunnel(self, tunnel) -> None:
        wrapper = self.transport
        if getattr(wrapper, "wrappedProtocol", None) is self:
            # The TLS layer talks to the tunnel through a two-method end from now on: this
            # connection, its parser and its request are not kept for the WebSocket's life.
            wrapper.wrappedProtocol = _TunnelEnd(tunnel)
            self.lost = self.closing = True
            self.factory.connections.discard(self)
        else:
            self._tunnel = tunnel


class _TunnelEnd:
    """What the client's TLS layer delivers to, once the connection is a tunnel."""

    __slots__ = ("tunnel",)

    def __init__(self, tunnel) -> None:
        self.tunnel = tunnel

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.client_data(data)

    def connectionLost(self, reason=None) -> None:
        self.tunnel.client_lost(reason)


class H1Factory(Factory):
    """The HTTPS port's HTTP/1.1 protocol factory: every request goes to ``gateway``."""

    #: The node is draining (:mod:`hoodyproxy.drain`): answers say ``Connection: close``.
    draining = False

    def __init__(self, gateway, reactor, timeout: float | None = 75.0) -> None:
        self.gateway = gateway
        self.reactor = reactor
        #: The connections open now (those that became tunnels leave it).
        self.connections: set[H1Connection] = set()
        #: The idle timeout of a keep-alive connection (``[client] idle_timeout``).
        self.timeout = timeout

    def drain(self) -> None:
        """Every connection ends after its next answer, an idle one soon (see H1Guard.drain)."""
        self.draining = True
        for connection in list(self.connections):
            connection.drain()

    def abort(self) -> None:
        for connection in list(self.connections):
            connection.abort()

    @property
    def head_timeout(self) -> float:
        """``[limits] request_head_timeout``, as the gateway's settings say now."""
        return self.gateway.settings.request_head_timeout

    def buildProtocol(self, addr) -> H1Connection:
        return H1Connection(self)
