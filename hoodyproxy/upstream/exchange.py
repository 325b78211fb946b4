"""One request forwarded to one container: connect, stream both ways, finish or fail.

The exchange sits between a frontend request (see :class:`FrontendRequest`) and an
:class:`~hoodyproxy.upstream.http11.UpstreamConnection`.  The request body flows up as
it arrives and the response flows down as it comes, each direction under backpressure:
the upstream socket's buffer pauses the client's reads, the client's buffer pauses the
upstream reads.  Nothing is held whole.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol as TypingProtocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.http import RESPONSES, datetimeToString
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from hoodyproxy import errors
from hoodyproxy.upstream.headers import response_headers
from hoodyproxy.upstream.tunnel import Tunnel

log = Logger()

#: Request body held while the upstream connection is being opened, before pausing the client.
PENDING_LIMIT = 64 * 1024
#: Request body kept to replay on a fresh connection when a pooled one turns out stale.
REPLAY_LIMIT = 64 * 1024
#: Request body read and thrown away after the response is complete, before giving up on the client.
DISCARD_LIMIT = 1024 * 1024


class FrontendRequest(TypingProtocol):
    """What the exchange needs from a request, whatever protocol carried it."""

    body_length: int | None
    body_complete: bool

    def pause_body(self) -> None: ...
    def resume_body(self) -> None: ...
    def start_response(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None: ...
    def write(self, data: bytes) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def finish_response(self) -> None: ...
    def send_error(self, error: errors.GatewayError) -> None: ...
    def abort(self) -> None: ...
    def take_over(self, headers: list[tuple[bytes, bytes]]) -> tuple[Any, bytes]: ...
    def attach_tunnel(self, tunnel: Tunnel) -> None: ...


@implementer(IPushProducer)
class _ClientBody:
    """The client's request body as a producer registered on the upstream socket."""

    def __init__(self, exchange: "Exchange") -> None:
        self.exchange = exchange

    def pauseProducing(self) -> None:
        self.exchange.body_paused = True
        self.exchange.request.pause_body()

    def resumeProducing(self) -> None:
        self.exchange.body_paused = False
        self.exchange.request.resume_body()

    def stopProducing(self) -> None:
        self.exchange.body_paused = False


class Exchange:
    """Forwards one request; calls ``done(record)`` exactly once when it is over."""

    # Slots: an exchange has over 30 attributes, past which CPython stops sharing the
    # instance dict's keys (about 1.6 KB per request in flight, and per WebSocket).
    __slots__ = ("request", "pool", "address", "port", "source", "head", "head_request", "upgrade",
                 "timeout", "record", "done", "clock", "tunnel_idle_timeout", "conn", "connecting",
                 "pending", "pending_size", "replay", "replay_size", "attempts", "body_paused",
                 "body_producer", "response_started", "response_done", "discarded", "over", "read_only",
                 "tunnel", "reusable", "reused", "producing", "switch_headers", "capture", "tunnels", "metrics")

    def __init__(self, request: FrontendRequest, pool, *, address: str, port: int, head: bytes,
                 head_request: bool, upgrade: bool, timeout: float, record: dict,
                 done: Callable[[dict], None], clock, tunnel_idle_timeout: float = 3600.0,
                 source=None, reusable: bool = True, tunnels: set | None = None) -> None:
        self.request = request
        self.pool = pool
        self.address = address
        self.port = port
        #: Whose connection to use (None: a shared one; see hoodyproxy.upstream.pool).
        self.source = source
        self.head = head
        self.head_request = head_request
        self.upgrade = upgrade
        self.timeout = timeout
        self.record = record
        self.done = done
        self.clock = clock
        self.tunnel_idle_timeout = tunnel_idle_timeout
        self.conn = None
        self.connecting: defer.Deferred | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.replay: list[bytes] | None = []
        self.replay_size = 0
        self.attempts = 0
        self.body_paused = False
        self.body_producer = None
        self.response_started = False
        self.response_done = False
        self.discarded = 0
        self.over = False
        self.read_only = False
        self.tunnel = None
        #: False: the upstream connection is closed after this exchange, never pooled.
        self.reusable = reusable
        self.reused = False
        #: The container's connection is registered as the client's producer (see
        #: upstream_streaming): only for a response longer than one read.
        self.producing = False
        self.switch_headers = None
        #: A running tap's view of this exchange (hoodyproxy.observe.capture), or None.
        self.capture = None
        #: The gateway's set of open tunnels (a WebSocket joins it), or None.
        self.tunnels = tunnels

    # -- connecting -------------------------------------------------------------------

    def start(self) -> None:
        self.attempts += 1
        conn = self.pool.acquire_idle(self.address, self.port, self.source)
        if conn is not None:
            self._connected(conn)
            return
        d = self.pool.acquire(self.address, self.port, self.source)
        self.connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn) -> None:
        self.connecting = None
        if self.over:
            conn.abort()
            return
        self.conn = conn
        self.reused = conn.requests > 0
        request = self.request
        conn.send_head(self.head, self, chunked_body=request.body_length is None,
                       has_body=request.body_length != 0, head_request=self.head_request,
                       upgrade=self.upgrade, timeout=self.timeout, reusable=self.reusable)
        if self.capture is not None:
            self.capture.sent_upstream()
        for chunk in self.pending:
            conn.write_body(chunk)
        self.pending = []
        self.pending_size = 0
        if request.body_complete:
            conn.end_body()
        elif request.body_length != 0:
            self.body_producer = _ClientBody(self)
            conn.transport.registerProducer(self.body_producer, True)
            if self.body_paused:
                self.body_paused = False
                request.resume_body()

    def _connect_failed(self, failure) -> None:
        self.connecting = None
        if self.over:
            return
        if failure.check(defer.CancelledError):
            return
        self._fail(errors.BadGateway(reason="connect failed: " + failure.getErrorMessage()[:120]))

    # -- the request body, from the frontend -------------------------------------------

    def body_data(self, data: bytes) -> None:
        if self.over or self.response_done:
            self.discarded += len(data)
            if self.discarded > DISCARD_LIMIT and not self.over:
                self.request.abort()
            return
        if self.capture is not None:
            self.capture.request_data(data)
        if self.replay is not None:
            self.replay_size += len(data)
            if self.replay_size > REPLAY_LIMIT:
                self.replay = None
            else:
                self.replay.append(data)
        conn = self.conn
        if conn is None:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > PENDING_LIMIT and not self.body_paused:
                self.body_paused = True
                self.request.pause_body()
            return
        conn.write_body(data)
        if self.body_paused:
            # A resume from the other direction let a read through; keep the client paused.
            self.request.pause_body()

    def body_end(self) -> None:
        self._unregister_body_producer()
        if self.conn is not None and not self.response_done:
            self.conn.end_body()
        if self.response_done and not self.over:
            self._finish_ok()

    def _unregister_body_producer(self) -> None:
        if self.body_producer is not None:
            self.body_producer = None
            conn = self.conn
            if conn is not None and conn.transport is not None:
                conn.transport.unregisterProducer()
            if self.body_paused:
                self.body_paused = False
                self.request.resume_body()

    def client_gone(self) -> None:
        """The client went away: stop everything upstream."""
        if self.over:
            return
        if self.connecting is not None:
            self.connecting.cancel()
        if self.conn is not None:
            self.conn.abort()
        self._end(499, "client closed the connection")

    # -- the response, from the container ----------------------------------------------

    def upstream_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.replay = None
        self.head = None  # no retry from here on
        if status == 101:
            self.switch_headers = response_headers(headers, upgrade=True)
            if self.capture is not None:
                self.capture.response_head(101, self.switch_headers)
            return  # upstream_upgraded follows at once
        self.response_started = True
        self.record["status"] = status
        forwarded = response_headers(headers, lnames=getattr(self.conn, "head_lnames", None))
        if self.capture is not None:
            self.capture.response_head(status, forwarded)
        self.request.start_response(status, reason or RESPONSES.get(status, b"Unknown"), forwarded)

    def upstream_streaming(self) -> None:
        """The response goes on past the container's read just handled: from now on a client
        slow to read pauses the container's connection.  (A response that ends within one
        read, most of them, never registers: what one read wrote is bounded by its size.)"""
        if self.capture is not None:
            self.capture.stream_goes_on()
        if not self.producing and self.conn is not None:
            self.producing = True
            self.request.registerProducer(self.conn, True)

    def upstream_data(self, data: bytes) -> None:
        if self.capture is not None:
            self.capture.response_data(data)
        self.request.write(data)

    def upstream_end(self) -> None:
        if self.producing:
            self.producing = False
            self.request.unregisterProducer()
        self.response_done = True
        if self.request.body_complete:
            self._finish_ok()
        else:
            # The container answered before the body was in: stop forwarding it, drain the
            # rest from the client (bounded) and finish when it is in; the answer goes out now.
            self._unregister_body_producer()
            flush = getattr(self.request, "flush", None)
            if flush is not None:
                flush()

    def _finish_ok(self) -> None:
        self.request.finish_response()
        self._end(self.record.get("status", 0), None)

    def upstream_failed(self, why: str, got_response: bool) -> None:
        if self.over:
            return
        conn, self.conn = self.conn, None
        if (not got_response and why == "closed" and getattr(self, "reused", False)
                and self.replay is not None and self.attempts < 3):
            # A pooled connection the container had already closed: try a fresh one.
            self.body_producer = None
            self.pending = list(self.replay)
            self.pending_size = self.replay_size
            self.start()
            return
        if self.response_started:
            if self.producing:
                self.producing = False
                self.request.unregisterProducer()
            self.request.abort()
            self._end(self.record.get("status", 0), "container failed mid-response: " + why)
            return
        if why == "timeout":
            self._fail(errors.GatewayTimeout(reason="no response headers in time"))
        else:
            self._fail(errors.BadGateway(reason="container " + why))

    def upstream_upgraded(self, leftover: bytes) -> None:
        conn, self.conn = self.conn, None
        self._unregister_body_producer()
        self.record["status"] = 101
        request = self.request
        transport, client_leftover = request.take_over(self.switch_headers)
        tunnel = Tunnel(transport, conn, self.clock, self.tunnel_idle_timeout, self._tunnel_closed,
                        read_only=self.read_only, registry=self.tunnels)
        if self.capture is not None:
            tunnel.frames = self.capture.frame_readers()
        request.attach_tunnel(tunnel)
        self.tunnel = tunnel
        self.switch_headers = None
        tunnel.start(client_leftover, leftover)
        metrics = getattr(self, "metrics", None)  # (set for an upgrade by the gateway)
        if metrics is not None:
            metrics.websocket_started(self.record["http"])
        # From here only the tunnel's end calls back (its record counts are its own): the
        # request, its head and body buffers are not needed while the WebSocket lives.
        self.request = None
        self.head = None
        self.pending = []
        self.replay = None
        self.body_producer = None

    def _tunnel_closed(self, bytes_up: int, bytes_down: int, reason: str | None) -> None:
        self.record["bytes_in"] = bytes_up
        self.record["bytes_out"] = bytes_down
        if self.tunnel is not None and self.tunnel.closed_by is not None:
            self.record["closed_by"] = self.tunnel.closed_by
        self._end(101, reason)

    # -- the end ------------------------------------------------------------------------

    def refuse(self, error: errors.GatewayError) -> None:
        """Refuse the request part-way: nothing more reaches the container (its connection
        is dropped, never pooled) and the client gets ``error`` (or a reset, if the
        response has begun)."""
        if self.over:
            return
        if self.connecting is not None:
            self.connecting.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        self.pending = []
        self._fail(error)

    def deny(self, error: errors.GatewayError) -> None:
        """Refuse the request before anything was sent to the container."""
        self.pending = []
        self._fail(error)

    def _fail(self, error: errors.GatewayError) -> None:
        self._unregister_body_producer()
        self.request.send_error(error)
        self._end(error.status, error.reason)

    def _end(self, status: int, reason: str | None) -> None:
        if self.over:
            return
        self.over = True
        record = self.record
        record["status"] = status
        if reason:
            record["reason"] = reason
        if "bytes_in" not in record:  # a tunnel sets its own counts
            record["bytes_in"] = self.request.bytes_in
            record["bytes_out"] = self.request.sentLength
        self.request = None
        self.done(record)
        if self.capture is not None:
            capture, self.capture = self.capture, None
            capture.finished(record)
