"""One HTTP/1.1 request as the gateway sees it: the request model and its response writer.

:class:`H1Request` speaks the frontend-neutral API the exchange uses
(:class:`hoodyproxy.upstream.exchange.FrontendRequest`) and carries the same attributes as
an HTTP/2 or HTTP/3 :class:`~hoodyproxy.frontend.stream.StreamRequest` (``method``,
``uri``, ``requestHeaders``, ``client``, ``body_length`` ...), so the gateway keeps one
request path.  Its connection (:class:`hoodyproxy.frontend.h1.H1Connection`) parses,
paces and closes; the request only turns the gateway's answer into bytes: the status
line and the header block in one write with the first body bytes, chunked framing when
the container gave no length, and a JSON error answer that ends the connection when the
request was not read to its end.

Its header fields are a :class:`~hoodyproxy.frontend.fields.Fields`, as HTTP/2's and
HTTP/3's are: the pairs as the client sent them (forwarded in that order and spelling).
"""

from __future__ import annotations

from twisted.web.http import NO_BODY_CODES

from hoodyproxy import errors
from hoodyproxy.frontend.fields import Fields
from hoodyproxy.frontend.http1 import REASONS, SERVER, http_date


#: First letters of the response fields the head writer looks at (Content-Length, Date, Alt-Svc).
_CDA = frozenset((b"c", b"C", b"d", b"D", b"a", b"A"))


class H1Request:
    """One request on an HTTP/1.1 connection; speaks the FrontendRequest API."""

    proto = b"https"
    exchange = None
    audit_record = None
    code = 0
    sentLength = 0
    bytes_in = 0
    body_length: int | None = 0
    body_complete = False
    #: The status line and headers are written.
    started = False
    #: The response is complete (or the request was answered and dropped).
    finished = False
    chunked = False
    method = b""
    #: What only an HTTP/2 or HTTP/3 stream has (read by the gateway without a getattr
    #: that would fail: a failed attribute lookup costs an exception inside).
    problem = None
    certificate_covers = None
    websocket = None
    _head: tuple | None = None
    #: The response's bytes so far, while it has not gone on past one read of the container's.
    _held: list[bytes] | None = None
    _no_body = False
    #: An error answer given before the body was in: the connection lingers and closes.
    answered_early = False
    #: The connection may carry another request after this one (False: HTTP/1.0, a
    #: ``Connection: close``, an answer given before the body was in).
    keep_alive = True
    #: The head has a Connection field, an Expect field (set as the fields arrive).
    has_connection = False
    has_expect = False

    def __init__(self, connection) -> None:
        self.connection = connection
        self.client = connection.peer
        self.host = connection.local
        #: The client's address, IPv4-mapped IPv6 given as IPv4 (worked out once per connection).
        self.client_ip = connection.client_ip
        self.uri = b""
        self.requestHeaders = Fields()
        self.clientproto = b"HTTP/1.1"
        self.http_version = "1.1"
        #: Body bytes received before the gateway had the request (a pipelined request).
        self.early_body: list[bytes] | None = None

    @property
    def path(self) -> bytes:
        return self.uri.split(b"?", 1)[0]

    # -- the request body's pace ---------------------------------------------------------

    def pause_body(self) -> None:
        self.connection.pause_reading("body")

    def resume_body(self) -> None:
        self.connection.resume_reading("body")

    def registerProducer(self, producer, streaming: bool) -> None:
        # The response goes on past the container's read (see Exchange.upstream_streaming):
        # what was held of it goes out now, and the rest as it comes.
        held, self._held = self._held, None
        if held and not self.connection.lost:
            self.connection.transport.writeSequence(held)
        self.connection.register_producer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.connection.unregister_producer()

    # -- the response ---------------------------------------------------------------------

    def start_response(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.code = status
        self._head = (reason, headers)

    def _head_parts(self) -> list[bytes]:
        """The status line and header block, written once, with the first body bytes."""
        self.started = True
        code = self.code
        reason, headers = self._head
        self._head = None
        version = self.clientproto
        parts = [version, b" %d " % code, reason, b"\r\n"]
        has_length = has_date = False
        alt_svc = self.connection.alt_svc
        for name, value in headers:
            if name[:1] in _CDA:  # (only such names need a look: no lower() for the others)
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
        self._no_body = no_body = self.method == b"HEAD" or code in NO_BODY_CODES
        if version == b"HTTP/1.1":
            if not has_length and not no_body:
                parts.append(b"Transfer-Encoding: chunked\r\n")
                self.chunked = True
            if self.last_on_connection():
                parts.append(b"Connection: close\r\n")
        elif not has_length and not no_body:
            self.keep_alive = False  # an HTTP/1.0 body without a length ends with the connection
        parts.append(b"\r\n")
        return parts

    def last_on_connection(self) -> bool:
        """Whether this answer is the connection's last (it then says ``Connection: close``).

        While the node drains, the answer to the last request read is the last: nothing
        more is read after it."""
        connection = self.connection
        if not self.keep_alive:
            return True
        if connection.waiting or connection.receiving is not None:
            return False
        if connection.factory.draining:
            connection.persistent = False
        return not connection.persistent

    def write(self, data: bytes) -> None:
        connection = self.connection
        if self.finished or connection.lost:
            return
        parts = self._head_parts() if not self.started else []
        if data and not self._no_body:
            self.sentLength += len(data)
            if self.chunked:
                parts += (b"%x\r\n" % len(data), data, b"\r\n")
            else:
                parts.append(data)
        if not parts:
            return
        if connection.producing:
            connection.transport.writeSequence(parts)
        elif self._held is None:
            # Until the response turns out longer than one read of the container's, it is
            # held (at most that read) and written whole when it ends: one TLS record and
            # one send, in this reactor turn.
            self._held = parts
        else:
            self._held += parts

    def flush(self) -> None:
        """Write what is held of the response now (it is complete, but the request is not:
        the answer must not wait for the rest of an upload)."""
        held, self._held = self._held, None
        if held and not self.connection.lost:
            self.connection.transport.writeSequence(held)

    def finish_response(self) -> None:
        connection = self.connection
        if self.finished or connection.lost:
            return
        parts = self._head_parts() if not self.started else []
        if self.chunked:
            parts.append(b"0\r\n\r\n")
        held, self._held = self._held, None
        if held:
            parts = held + parts
        if parts:
            write_now = getattr(connection.transport, "write_now", None)
            if write_now is not None:
                write_now(b"".join(parts))
            else:
                connection.transport.writeSequence(parts)
        self.finished = True
        connection.request_done(self)

    def send_error(self, error: errors.GatewayError) -> None:
        """Answer with ``error``'s status and JSON body (or abort if a response has begun)."""
        connection = self.connection
        if self.finished or connection.lost:
            return
        if self.started:
            self.abort()
            return
        body = error.body()
        self.code = error.status
        head = [self.clientproto, b" %d " % error.status, REASONS.get(error.status, b"Error"), b"\r\n",
                b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
                b"Cache-Control: no-store\r\nDate: ", http_date(), b"\r\nServer: ", SERVER, b"\r\n"]
        alt_svc = connection.alt_svc
        if alt_svc is not None:
            head += (b"Alt-Svc: ", alt_svc, b"\r\n")
        for name, value in error.headers.items():
            for one in value if isinstance(value, list) else (value,):
                head += (name, b": ", one, b"\r\n")
        if not self.body_complete:
            # The client is still sending a body that will not be read: close after answering.
            self.keep_alive = False
            connection.persistent = False
            self.answered_early = True
        if self.last_on_connection():
            head.append(b"Connection: close\r\n")
        head += (b"\r\n", body if self.method != b"HEAD" else b"")
        self.started = self.finished = True
        connection.transport.writeSequence(head)
        connection.request_done(self)

    def abort(self) -> None:
        """Drop the client's connection at once (never a silently truncated response)."""
        self.connection.abort()

    # -- WebSocket --------------------------------------------------------------------------

    def take_over(self, headers: list[tuple[bytes, bytes]]):
        """Answer 101 with ``headers`` and hand the raw connection to a tunnel.

        Returns (client transport, bytes the client already sent after the request).
        """
        head = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        self.started = self.finished = True
        self.exchange = None
        return self.connection.become_tunnel(head)

    def attach_tunnel(self, tunnel) -> None:
        self.connection.attach_tunnel(tunnel)
