"""A request carried on one stream of a multiplexed connection (HTTP/2 or HTTP/3).

The HTTP/2 and HTTP/3 frontends turn a stream's header block into a
:class:`StreamRequest` and hand it to :meth:`hoodyproxy.gateway.Gateway.begin`, exactly as
the HTTP/1.1 frontend hands over its :class:`~hoodyproxy.frontend.h1request.H1Request`:
the same attributes (``method``, ``uri``, ``requestHeaders``, ``client``, ``body_length``
...) and the same :class:`~hoodyproxy.upstream.exchange.FrontendRequest` API.  What
differs per protocol is only how bytes reach the wire, which the connection object
provides (:class:`StreamConnection`).

An extended CONNECT for WebSocket (RFC 8441 over HTTP/2, RFC 9220 over HTTP/3) becomes,
in the request model, the ``GET`` with ``Upgrade: websocket`` that the container will
receive; the container's ``101`` becomes the stream's ``200`` and the stream itself is the
tunnel's client side (:class:`StreamTunnelTransport`).
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any, Protocol as TypingProtocol

from twisted.internet.interfaces import IPushProducer
from twisted.web.http import NO_BODY_CODES
from zope.interface import implementer

from hoodyproxy import errors
from hoodyproxy.frontend.fields import Fields
from hoodyproxy.frontend.http1 import SERVER, client_ip_of, http_date

#: Response headers that are meaningless (and forbidden) on an HTTP/2 or HTTP/3 stream.
CONNECTION_SPECIFIC = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te",
})
#: Headers of a container's 101 that the stream's 200 does not carry (RFC 8441 5).
_UPGRADE_ONLY = frozenset({b"sec-websocket-accept"}) | CONNECTION_SPECIFIC
#: Request body a client may still send after its answer, read and dropped before a reset.
DISCARD_LIMIT = 1024 * 1024
#: WebSocket bytes a client may send before the container accepted the upgrade.
WEBSOCKET_EARLY_LIMIT = 64 * 1024
#: Methods forwarded as bodiless when the stream declares no length (see StreamRequest).
_BODYLESS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))
#: A field name the container can parse: an HTTP token (RFC 9110 5.1), lower case as
#: HTTP/2 and HTTP/3 require.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
#: Request fields the gateway sets itself on a WebSocket stream (the client's are dropped).
_WEBSOCKET_OWNED = frozenset({b"connection", b"upgrade", b"sec-websocket-key"})


class StreamConnection(TypingProtocol):
    """What a :class:`StreamRequest` needs from its connection (the protocol-specific part)."""

    gateway: Any
    alt_svc: bytes | None

    def send_head(self, stream_id: int, status: int, headers: list[tuple[bytes, bytes]],
                  end_stream: bool) -> None: ...
    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None: ...
    def reset_stream(self, stream_id: int, graceful: bool = False) -> None:
        """End the stream abruptly: an error reset, or with ``graceful`` a NO_ERROR reset
        of the request side after a complete answer (RFC 9113 8.1, RFC 9114 4.1)."""
    def stream_closed(self, stream_id: int) -> None:
        """The request is done with the stream; forget it."""
    def pause_stream_input(self, stream_id: int) -> None: ...
    def resume_stream_input(self, stream_id: int) -> None: ...


def response_fields(status: int, headers: list[tuple[bytes, bytes]], *, alt_svc: bytes | None = None,
                    drop: frozenset = CONNECTION_SPECIFIC) -> list[tuple[bytes, bytes]]:
    """A response header list as HTTP/2 and HTTP/3 carry it: ``:status`` first, lower-case
    names, no connection-specific fields, a ``date`` and a ``server``."""
    out = [(b":status", b"%d" % status)]
    has_date = has_server = False
    for name, value in headers:
        lname = name.lower()
        if lname in drop:
            continue
        if lname == b"date":
            has_date = True
        elif lname == b"server":
            has_server = True
        elif lname == b"alt-svc" and alt_svc is not None:
            continue  # the gateway's own advertisement wins over a container's
        out.append((lname, value))
    if not has_date:
        out.append((b"date", http_date()))
    if not has_server:
        out.append((b"server", SERVER))
    if alt_svc is not None:
        out.append((b"alt-svc", alt_svc))
    return out


def _not_a_proxy() -> errors.GatewayError:
    error = errors.GatewayError("the gateway is not a forward proxy", reason="plain CONNECT")
    error.status, error.code = 405, "method_not_allowed"
    return error


def parse_request_head(headers: list[tuple[bytes, bytes]], ended: bool) -> tuple[dict, errors.GatewayError | None]:
    """The StreamRequest arguments of a request header block, and what is wrong with it
    (the gateway answers that on its one path, with an audit line).

    Shared by HTTP/2 and HTTP/3: the frontend has already checked what makes a header
    block malformed (characters, duplicate and misplaced pseudo-headers; or ended the
    connection).  What is left is what the container must not be sent: a field name
    that is not a token (RFC 9110 5.1; HTTP/2 allows ``"`` or ``(`` in one).
    """
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[bytes, bytes]] = []
    lengths: set[bytes] = set()
    bad_name = False
    name_ok = _FIELD_NAME.fullmatch
    for name, value in headers:
        if name[:1] == b":":
            pseudo[name] = value
            continue
        if name == b"content-length":
            lengths.add(value.strip())
        elif name_ok(name) is None:
            bad_name = True
        regular.append((name, value))
    method = pseudo.get(b":method", b"")
    protocol = pseudo.get(b":protocol")
    path = pseudo.get(b":path")
    websocket = False
    problem: errors.GatewayError | None = None
    if bad_name:
        problem = errors.BadRequest("a header name is malformed", reason="bad header name")
    elif method == b"CONNECT" and protocol is None:
        problem = _not_a_proxy()
    elif method == b"CONNECT" and protocol != b"websocket":
        problem = errors.BadRequest("only the websocket protocol can be tunnelled",
                                    reason="extended CONNECT: unknown :protocol")
    elif protocol is not None and method != b"CONNECT":
        problem = errors.BadRequest(":protocol is only allowed with CONNECT", reason="stray :protocol")
    elif pseudo.get(b":scheme") != b"https":
        problem = errors.BadRequest("the request must have :scheme https", reason="scheme not https")
    elif not path:
        problem = errors.BadRequest("the request has no :path", reason="no :path")
    elif len(lengths) > 1:
        problem = errors.BadRequest("conflicting content-length", reason="conflicting content-length")
    elif method == b"CONNECT" and lengths:
        # The stream's DATA are WebSocket bytes, read-only filtered once the container
        # accepts; a declared body would reach it before the filter (RFC 6455: none).
        problem = errors.BadRequest("a WebSocket handshake carries no body", reason="upgrade with a body")
    else:
        websocket = method == b"CONNECT"
    if ended:
        body_length: int | None = 0
    elif len(lengths) == 1 and problem is None:
        length = next(iter(lengths))
        if length.isdigit():
            body_length = int(length)
        else:
            body_length = None
            problem = errors.BadRequest("the content-length is malformed", reason="bad content-length")
    else:
        body_length = None
    fields = {"method": method, "uri": path or b"/", "authority": pseudo.get(b":authority"),
              "headers": regular, "body_length": body_length, "websocket": websocket}
    return fields, problem


class StreamRequest:
    """One request on one stream; speaks the FrontendRequest API to the exchange."""

    proto = b"https"
    exchange = None
    audit_record = None
    code = 0
    sentLength = 0
    bytes_in = 0
    body_complete = False
    started = False
    finished = False
    closed = False
    producer = None
    tunnel = None
    _discarded = 0
    _answered_early = False
    _input_paused = False
    _no_body = False  # a HEAD or a no-body status: the head ends the stream
    _body_forbidden = False  # a GET, HEAD, OPTIONS or TRACE that declared no length
    #: A GatewayError only the frontend could detect (the gateway answers it on the one path).
    problem = None

    def __init__(self, connection: StreamConnection, stream_id: int, *, method: bytes, uri: bytes,
                 authority: bytes | None, headers: list[tuple[bytes, bytes]], body_length: int | None,
                 client, host, version: bytes, websocket: bool = False, covers=None,
                 client_ip: str | None = None) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.client = client
        #: The client's address, IPv4-mapped IPv6 given as IPv4 (``client_ip``: worked out
        #: once per connection by the caller).
        self.client_ip = client_ip if client_ip is not None else client_ip_of(client)
        self.host = host
        self.clientproto = version
        self.http_version = version[5:].decode("ascii")
        self.websocket = websocket
        #: Whether the connection's certificate covers a host name (None: no check).
        self.certificate_covers = covers
        # The fields as the gateway reads them: a list, and never a copy of it.
        fields: list[tuple[bytes, bytes]] = []
        cookies = None
        for pair in headers:
            name = pair[0]
            if name == b"cookie":
                # split crumbs are joined again (RFC 9113 8.2.3)
                if cookies is None:
                    cookies = [pair[1]]
                else:
                    cookies.append(pair[1])
                continue
            if name == b"host" and authority is not None:
                continue  # :authority wins (RFC 9113 8.3.1); no Host at all: routing answers 400
            if websocket and name in _WEBSOCKET_OWNED:
                continue
            fields.append(pair)
        if cookies is not None:
            fields.append((b"cookie", b"; ".join(cookies)))
        if authority is not None:
            fields.append((b"host", authority))
        if websocket:
            # The container gets the HTTP/1.1 Upgrade it understands.
            method = b"GET"
            fields += ((b"connection", b"Upgrade"), (b"upgrade", b"websocket"),
                       (b"sec-websocket-key", base64.b64encode(os.urandom(16))))
            # The upgrade request itself has no body: the stream's bytes are tunnel bytes,
            # held until the container has switched protocols.
            body_length = 0
            self._early: list[bytes] | None = []
        self.requestHeaders = Fields(fields)
        self.method = method
        self.uri = uri
        self.path = uri.split(b"?", 1)[0]
        if body_length is None and method in _BODYLESS and not websocket:
            # A GET whose HEADERS did not end the stream almost always ends it with an
            # empty DATA frame: forward it as bodiless, and reset the stream if a body
            # comes after all (a body small servers do not read is a smuggled request).
            body_length = 0
            self._body_forbidden = True
        self.body_length = body_length
        if body_length == 0 and not websocket and not self._body_forbidden:
            self.body_complete = True

    def begin(self) -> None:
        """Hand the request to the gateway (at end of the header block)."""
        self.connection.gateway.begin(self)

    # -- events from the connection ------------------------------------------------------

    def body_chunk(self, data: bytes) -> None:
        """Request body bytes (or, on a WebSocket stream after the 200, tunnel bytes)."""
        self.bytes_in += len(data)
        if self._body_forbidden and data:
            exchange = self.exchange
            if exchange is not None:
                exchange.refuse(errors.BadRequest("a body needs a content-length on this method",
                                                  reason="body on a bodiless request without length"))
            elif not self.finished:
                self.abort()
            return
        if self.tunnel is not None:
            self.tunnel.client_data(data)
            return
        if self.websocket:
            # WebSocket bytes sent before the 200: for the tunnel, bounded.
            self._early.append(data)
            if self.bytes_in > WEBSOCKET_EARLY_LIMIT:
                self.abort()
            return
        exchange = self.exchange
        if exchange is not None and not self._answered_early:
            exchange.body_data(data)
            return
        self._discarded += len(data)
        if self._discarded > DISCARD_LIMIT:
            self.abort()

    def body_ended(self) -> None:
        """The client ended its side of the stream."""
        if self.websocket and self.tunnel is None:
            if self.exchange is not None:
                self.exchange.client_gone()  # gave up before the tunnel opened
            self._close()
            return
        if self.body_complete and self.tunnel is None:
            return
        self.body_complete = True
        if self.tunnel is not None:
            self.tunnel.client_lost()
        elif self._answered_early:
            self._close()
        elif self.exchange is not None:
            self.exchange.body_end()

    def stream_lost(self) -> None:
        """The stream was reset by the client, or the connection is gone."""
        if self.closed:
            return
        self._close()
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.client_lost()
        elif self.exchange is not None:
            self.exchange.client_gone()

    def pause_output(self) -> None:
        """The connection holds enough of this stream's response: stop its producer."""
        if self.producer is not None:
            self.producer.pauseProducing()

    def resume_output(self) -> None:
        if self.producer is not None:
            self.producer.resumeProducing()

    # -- the FrontendRequest API ----------------------------------------------------------

    def pause_body(self) -> None:
        if not self._input_paused and not self.closed:
            self._input_paused = True
            self.connection.pause_stream_input(self.stream_id)

    def resume_body(self) -> None:
        if self._input_paused and not self.closed:
            self._input_paused = False
            self.connection.resume_stream_input(self.stream_id)

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def start_response(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        if self.websocket and 200 <= status < 300:
            # Any 2xx opens the tunnel for an extended CONNECT client: a container that
            # answered without switching protocols must not look like one that did.
            error = errors.BadGateway("the container did not accept the WebSocket",
                                      reason="websocket: container answered %d" % status)
            self.send_error(error)
            if self.audit_record is not None:
                self.audit_record.update(status=error.status, reason=error.reason)
            return
        self.code = status
        self._head = headers

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.started:
            self._send_head(end_stream=False)
        if data and not self._no_body:
            self.sentLength += len(data)
            self.connection.send_data(self.stream_id, data, False)

    def _send_head(self, end_stream: bool) -> None:
        self.started = True
        self._no_body = self.method == b"HEAD" or self.code in NO_BODY_CODES
        fields = response_fields(self.code, self._head, alt_svc=self.connection.alt_svc)
        self.connection.send_head(self.stream_id, self.code, fields, end_stream or self._no_body)
        self._head = None
        if self._no_body:
            self.finished = True

    def finish_response(self) -> None:
        if self.closed:
            return
        if not self.finished:  # (a HEAD or no-body answer finished with its head)
            if not self.started:
                self._send_head(end_stream=True)
            else:
                self.connection.send_data(self.stream_id, b"", True)
            self.finished = True
        self._end_input_if_needed()

    def _end_input_if_needed(self) -> None:
        """Our answer is complete: a body still coming is no longer wanted."""
        if self.body_complete:
            self._close()
        else:
            # RFC 9113 8.1: a server may answer before the request is complete and then
            # reset the stream with NO_ERROR; the connection does that in reset_stream.
            self._answered_early = True
            self.resume_body()
            self.connection.reset_stream(self.stream_id, graceful=True)
            self._close()

    def send_error(self, error: errors.GatewayError) -> None:
        if self.closed or self.finished:
            return
        if self.started:
            self.abort()
            return
        body = error.body()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                   (b"cache-control", b"no-store")]
        for name, value in error.headers.items():
            for one in value if isinstance(value, list) else (value,):
                headers.append((name.lower(), one))
        self.code = error.status
        self._head = headers
        self._send_head(end_stream=self.method == b"HEAD")
        if not self.finished:
            self.sentLength += len(body)
            self.connection.send_data(self.stream_id, body, True)
            self.finished = True
        self._end_input_if_needed()

    def abort(self) -> None:
        """Reset the stream (never a silently truncated response)."""
        if self.closed:
            return
        self.connection.reset_stream(self.stream_id)
        self.stream_lost()

    def take_over(self, headers: list[tuple[bytes, bytes]]):
        """The container switched to WebSocket: answer 200 and become the tunnel's client side."""
        self.code = 200
        self._head = [(n, v) for n, v in headers if n.lower() not in _UPGRADE_ONLY]
        self.started = True
        fields = response_fields(200, self._head, alt_svc=self.connection.alt_svc, drop=_UPGRADE_ONLY)
        self.connection.send_head(self.stream_id, 200, fields, False)
        self._head = None
        self.exchange = None
        early, self._early = b"".join(self._early or ()), None
        return StreamTunnelTransport(self), early

    def attach_tunnel(self, tunnel) -> None:
        self.tunnel = tunnel

    def _close(self) -> None:
        self.closed = True
        self.producer = None
        self.connection.stream_closed(self.stream_id)


@implementer(IPushProducer)
class StreamTunnelTransport:
    """A WebSocket stream as the client "transport" of a :class:`~hoodyproxy.upstream.tunnel.Tunnel`."""

    disconnecting = False

    def __init__(self, request: StreamRequest) -> None:
        self.request = request

    def write(self, data: bytes) -> None:
        request = self.request
        if data and not request.closed:
            request.sentLength += len(data)
            request.connection.send_data(request.stream_id, data, False)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        # Ending the tunnel is ending the response: END_STREAM, and the client's side
        # reset gracefully if it is still open.
        self.request.finish_response()

    def abortConnection(self) -> None:
        self.request.abort()

    def registerProducer(self, producer, streaming: bool) -> None:
        self.request.producer = producer

    def unregisterProducer(self) -> None:
        self.request.producer = None

    # the tunnel pauses the client side when the container's socket is full
    def pauseProducing(self) -> None:
        self.request.pause_body()

    def resumeProducing(self) -> None:
        self.request.resume_body()

    def stopProducing(self) -> None:
        self.abortConnection()
