"""HTTP/2 frontend: a thin Twisted protocol over the h2 state machine.

Twisted ships an HTTP/2 server (``twisted.web._http2``), but it hands a request over only
when its body is complete, does not enable extended CONNECT (RFC 8441, WebSocket over
HTTP/2) and sends one 16 KiB frame per reactor turn.  This protocol drives
``h2.connection.H2Connection`` directly and turns each stream into a
:class:`~hoodyproxy.frontend.stream.StreamRequest` at end of its header block, handed to
the same :meth:`~hoodyproxy.gateway.Gateway.begin` as HTTP/1.1 requests.

Flow control, both directions:

- request bodies: received DATA is acknowledged (WINDOW_UPDATE) only while the exchange
  wants more; a paused upload holds at most one stream window (``[http2] stream_window``);
- responses: each stream's unsent bytes wait in a small queue that drains as the client's
  windows and the TLS transport allow; past ``HIGH_WATER`` the container's connection is
  paused, below ``LOW_WATER`` resumed.  A slow client never makes the gateway hold a whole
  response.

Guards: ``SETTINGS_MAX_CONCURRENT_STREAMS`` and ``SETTINGS_MAX_HEADER_LIST_SIZE`` from
``[http2]``; h2 bounds CONTINUATION frames per header block (a CONTINUATION flood is a
connection error); streams the client resets while the gateway still works on them are
counted, and past ``[http2] max_resets`` in ``RESET_WINDOW`` seconds the connection ends
with GOAWAY ENHANCE_YOUR_CALM (the rapid reset attack, CVE-2023-44487); a header block
still incomplete ``[limits] request_head_timeout`` seconds after it began (HEADERS without
END_HEADERS, CONTINUATION frames that never end it) ends the connection the same way.
After a GOAWAY nothing the client sends is decrypted any more: it is dropped as it comes
off the socket, and the connection is aborted past ``GOAWAY_DRAIN`` bytes or
``GOAWAY_GRACE`` seconds, so a client that keeps sending never keeps the gateway busy.
The TLS handshake itself must end within ``request_head_timeout``.

Per request, the costly parts of h2 are replaced, not skipped (see
:mod:`hoodyproxy.frontend.h2codec`): header blocks are checked by ``malformed`` (h2's
inbound validation, one pass), requests decoded by ``HeaderDecoder`` and responses encoded
by ``HeaderEncoder`` (HPACK with the same compression as hpack's, without its per-field
search); a connection's responses of one reactor turn share one deferred flush.
"""

from __future__ import annotations

from collections import deque

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from hoodyproxy.frontend.h2codec import DECODER_PARTS, HeaderDecoder, HeaderEncoder, ServerConnection, malformed
from hoodyproxy.frontend.http1 import client_ip_of
from hoodyproxy.frontend.stream import StreamRequest, parse_request_head
from hoodyproxy.tls.context import Coverage, server_name

log = Logger()


#: Unsent response bytes per stream above which the container's connection is paused.
HIGH_WATER = 256 * 1024
#: ... and below which it is resumed.
LOW_WATER = 64 * 1024
#: Seconds over which client-reset streams are counted against ``max_resets``.
RESET_WINDOW = 10.0
#: Connection-level receive window: per-stream windows are the real bound.
CONNECTION_WINDOW = (1 << 31) - 1
#: Seconds a connection is given, after its GOAWAY, to close before it is aborted ...
GOAWAY_GRACE = 1.0
#: ... and bytes the client may still send meanwhile (dropped unread).
GOAWAY_DRAIN = 256 * 1024
#: Frame types that carry a header block (HEADERS, PUSH_PROMISE, CONTINUATION).
_HEADER_FRAME_TYPES = frozenset({0x1, 0x5, 0x9})
#: While the node drains: seconds between the first GOAWAY (the notice, naming the
#: highest stream ID there is) and the second (naming the last stream that will be
#: served), for the requests the client sent before the notice reached it (RFC 9113 6.8).
DRAIN_NOTICE = 1.0
#: The highest stream ID (2^31 - 1).
_MAX_STREAM_ID = (1 << 31) - 1
#: A drained connection (every stream answered) has this long to write its last bytes
#: and close before it is aborted: unlike after an error, what is still being written is
#: answers.
DRAIN_CLOSE_GRACE = 15.0


class _Stream:
    """A stream's request and its unsent response bytes."""

    __slots__ = ("request", "queue", "queued", "end", "sent_end", "reset_after", "unacked", "paused_input",
                 "output_paused")

    def __init__(self, request: StreamRequest) -> None:
        self.request = request
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.end = False
        self.sent_end = False
        self.reset_after = False
        self.unacked = 0
        self.paused_input = False
        self.output_paused = False


@implementer(IPushProducer)
class H2ServerProtocol(Protocol):
    """One HTTP/2 connection from a client (after TLS negotiated ``h2``)."""

    #: The set of open connections this one is in while open (the factory's), or None.
    registry = None
    #: The node drains: GOAWAY is sent, and the connection ends when its streams have.
    draining = False
    #: After the second GOAWAY: the last stream served; higher ones are refused.
    last_stream: int | None = None
    _drain_call = None

    def __init__(self, gateway, settings, certificates=None, reactor=None) -> None:
        self.gateway = gateway
        self.settings = settings
        self.certificates = certificates
        self.reactor = reactor
        self.alt_svc = gateway.alt_svc
        self.streams: dict[int, _Stream] = {}
        self.transport_paused = False
        self.closed = False
        #: Whether the connection's certificate covers a host (made at the first request).
        self._coverage: Coverage | None = None
        self._resets = 0
        self._reset_window_start = 0.0
        self._last_activity = 0.0
        self._idle_timer = None
        self._idle_due = 0.0
        #: When the header block being received began (None: none is incomplete).
        self._head_started: float | None = None
        self._abort_call = None
        self._drain_left = 0
        #: Streams with something to send, flushed together on the next reactor turn
        #: unless their response ends first (then at once): a response's last bytes and
        #: END_STREAM go in one DATA frame, its head, body and end in one TLS write.
        self._dirty: dict[int, None] = {}
        self._flush_call = None
        #: Received DATA bytes to acknowledge per stream, summed over one read's frames.
        self._acks: dict[int, int] = {}
        # Inbound blocks are checked by malformed() (one pass) and cookies joined by
        # StreamRequest; outbound blocks are built lower-case and clean by response_fields.
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False,
                                           validate_inbound_headers=False,
                                           normalize_inbound_headers=False)
        self.conn = ServerConnection(config=config)
        self.conn.encoder = HeaderEncoder()
        stock = self.conn.decoder
        if all(hasattr(stock, part) for part in DECODER_PARTS):
            decoder = HeaderDecoder(max_header_list_size=stock.max_header_list_size)
            decoder.max_allowed_table_size = stock.max_allowed_table_size
            self.conn.decoder = decoder
        codes = h2.settings.SettingCodes
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            codes.MAX_CONCURRENT_STREAMS: settings.http2_max_concurrent_streams,
            codes.MAX_HEADER_LIST_SIZE: settings.http2_max_header_list_size,
            codes.INITIAL_WINDOW_SIZE: settings.http2_stream_window,
            codes.ENABLE_CONNECT_PROTOCOL: 1,
        })

    # -- connection ----------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()
        self.client_ip = client_ip_of(self.peer)
        self.local = self.transport.getHost()
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.transport.registerProducer(self, True)
        self._flush_wire()
        self._last_activity = self.reactor.seconds()
        self._sleep(self.settings.client_idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self._last_activity = self.reactor.seconds()
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # Includes CONTINUATION floods, oversized header lists, too many streams.
            self._goaway(getattr(e, "error_code", None) or h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        self._note_header_block()
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                self._data(event)
            elif kind is h2.events.RequestReceived:
                self._request(event)
            elif kind is h2.events.StreamEnded:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.request.body_ended()
            elif kind is h2.events.StreamReset:
                self._reset(event.stream_id)
            elif kind is h2.events.TrailersReceived:
                # (dropped: the container gets no trailers; a malformed block still ends
                # the connection, as any malformed block does)
                if malformed(event.headers, trailers=True) is not None:
                    self._goaway(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                    return
            elif kind is h2.events.WindowUpdated:
                if event.stream_id == 0:
                    self._flush_all()
                else:
                    self._flush(event.stream_id)
            elif kind is h2.events.RemoteSettingsChanged:
                self._flush_all()
            elif kind is h2.events.ConnectionTerminated:
                self._flush_wire()
                self._close_transport()
                return
            if self.closed:
                return
        if self._acks:
            acks, self._acks = self._acks, {}
            for stream_id, length in acks.items():
                self._ack(length, stream_id)
        self._flush_wire()

    def connectionLost(self, reason=None) -> None:
        self.closed = True
        if self.registry is not None:
            self.registry.discard(self)
        for call in (self._flush_call, self._idle_timer, self._abort_call, self._drain_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._idle_timer = self._abort_call = self._drain_call = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.request.stream_lost()

    # -- draining (hoodyproxy.drain) ----------------------------------------------------

    def drain(self) -> None:
        """Shut down gracefully: a GOAWAY notice now, the GOAWAY naming the last stream
        served :data:`DRAIN_NOTICE` seconds later; streams up to it finish, and the
        connection ends when they have (:meth:`drain_tick`)."""
        if self.closed or self.draining:
            return
        self.draining = True
        self._send_goaway(_MAX_STREAM_ID)
        self._drain_call = self.reactor.callLater(DRAIN_NOTICE, self._last_goaway)

    def _last_goaway(self) -> None:
        self._drain_call = None
        if self.closed:
            return
        self.last_stream = self.conn.highest_inbound_stream_id
        self._send_goaway(self.last_stream)
        self.drain_tick()

    def drain_tick(self) -> None:
        """End the connection if it is draining and its last stream is over."""
        if self.last_stream is not None and not self.streams and not self.closed:
            self._close_transport(DRAIN_CLOSE_GRACE)

    def _send_goaway(self, last_stream_id: int) -> None:
        """A GOAWAY(NO_ERROR) frame that leaves the connection open: written here, since
        h2's ``close_connection`` also closes its state machine to every stream."""
        from hyperframe.frame import GoAwayFrame
        self._flush_wire()
        if not self.transport.disconnecting:
            self.transport.write(GoAwayFrame(stream_id=0, last_stream_id=last_stream_id,
                                             error_code=h2.errors.ErrorCodes.NO_ERROR).serialize())

    def _goaway(self, code) -> None:
        if self.closed:
            return
        try:
            self.conn.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass
        self._flush_wire()
        self._close_transport()

    def _close_transport(self, grace: float = GOAWAY_GRACE) -> None:
        """Close after what is written (TLS waits for a registered producer to go first),
        and decrypt nothing more: abort past ``GOAWAY_DRAIN`` more bytes or
        ``GOAWAY_GRACE`` seconds.

        TLS waits for the client's close_notify before it closes; a client that ignores the
        GOAWAY and keeps sending would be read and decrypted for as long as it likes.  From
        here the socket's bytes no longer reach TLS: they are counted and dropped.  (Pausing
        the transport, the other way to stop, would also hide the end of a client that
        does close: the socket would be held the whole grace period.)
        """
        self.closed = True
        transport = self.transport
        transport.unregisterProducer()
        self._drain_left = GOAWAY_DRAIN
        if isinstance(transport, TLSMemoryBIOProtocol):
            transport.dataReceived = self._drain  # what the TCP connection delivers
        else:
            transport.pauseProducing()
        transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.reactor.callLater(grace, self._abort)

    def _drain(self, data: bytes) -> None:
        self._drain_left -= len(data)
        if self._drain_left < 0 and self._abort_call is not None:
            self._abort_call.cancel()
            self._abort()

    def _abort(self) -> None:
        self._abort_call = None
        self.transport.abortConnection()

    def _note_header_block(self) -> None:
        """Note when a header block began if one is incomplete (h2 holds its frames until
        END_HEADERS; a frame of one may also be only partly in)."""
        # h2's FrameBuffer holds the frames of an open block, and the bytes of a partial frame.
        buffer = self.conn.incoming_buffer
        data = getattr(buffer, "_data", b"")
        pending = bool(getattr(buffer, "_headers_buffer", None)) or (
            len(data) >= 4 and data[3] in _HEADER_FRAME_TYPES)
        if not pending:
            self._head_started = None
        elif self._head_started is None:
            self._head_started = now = self.reactor.seconds()
            due = now + self.settings.request_head_timeout
            if due < self._idle_due and self._idle_timer is not None:
                # (rare: a header block that does not come in one read)
                self._idle_timer.reset(max(due - now, 0.0))
                self._idle_due = due

    def _sleep(self, seconds: float) -> None:
        self._idle_due = self.reactor.seconds() + seconds
        self._idle_timer = self.reactor.callLater(seconds, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self.closed:
            return
        now = self.reactor.seconds()
        wake = None
        if self._head_started is not None:
            head_left = self._head_started + self.settings.request_head_timeout - now
            if head_left <= 0:
                log.info("HTTP/2 client {peer}: header block incomplete after {t:g} s: connection closed",
                         peer=self.client_ip, t=self.settings.request_head_timeout)
                self._goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                return
            wake = head_left
        period = self.settings.client_idle_timeout
        idle = now - self._last_activity
        if not self.streams and idle >= period:
            self._goaway(h2.errors.ErrorCodes.NO_ERROR)
            return
        idle_wake = max(period - idle, 1.0)
        self._sleep(idle_wake if wake is None else min(wake, idle_wake))

    def _flush_wire(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.transport.disconnecting:
            self.transport.write(data)

    # -- requests ------------------------------------------------------------------------

    def _covers(self, host: str) -> bool:
        """Whether this connection's certificate (or SNI name) covers ``host`` (else 421)."""
        coverage = self._coverage
        if coverage is None:
            names, sni = frozenset(), None
            handle = getattr(self.transport, "getHandle", None)
            if self.certificates is not None and handle is not None:
                connection = handle()
                names = self.certificates.names_of_context(connection.get_context())
                sni = server_name(connection)
            coverage = self._coverage = Coverage(names, sni)
        return coverage(host)

    def _request(self, event) -> None:
        stream_id = event.stream_id
        if self.last_stream is not None and stream_id > self.last_stream:
            # After the last GOAWAY: never served, so the client may send it again elsewhere.
            try:
                self.conn.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.REFUSED_STREAM)
            except h2.exceptions.ProtocolError:
                pass
            return
        if malformed(event.headers) is not None:
            self._goaway(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        fields, problem = parse_request_head(event.headers, event.stream_ended is not None)
        request = StreamRequest(self, stream_id, **fields, client=self.peer, host=self.local,
                                version=b"HTTP/2", covers=self._covers, client_ip=self.client_ip)
        request.problem = problem
        self.streams[stream_id] = _Stream(request)
        request.begin()

    def _data(self, event) -> None:
        """Request body bytes: acknowledged together at the end of the read (one call to
        h2 per stream, not per frame), unless the exchange paused this stream's input."""
        stream_id = event.stream_id
        stream = self.streams.get(stream_id)
        length = event.flow_controlled_length
        if stream is not None and stream.paused_input:
            stream.unacked += length
        else:
            acks = self._acks
            acks[stream_id] = acks.get(stream_id, 0) + length
        if stream is not None:
            stream.request.body_chunk(event.data)

    def _ack(self, length: int, stream_id: int) -> None:
        if length:
            try:
                self.conn.acknowledge_received_data(length, stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass

    def _reset(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        if not stream.request.finished:
            now = self.reactor.seconds()
            if now - self._reset_window_start > RESET_WINDOW:
                self._reset_window_start, self._resets = now, 0
            self._resets += 1
            if self._resets > self.settings.http2_max_resets:
                log.warn("HTTP/2 client {peer} reset {n} streams in {w:g} s: connection closed "
                         "(rapid reset guard)", peer=self.client_ip, n=self._resets,
                         w=RESET_WINDOW)
                stream.request.stream_lost()
                self._goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                return
        stream.request.stream_lost()

    # -- the StreamConnection API (called by StreamRequest) ------------------------------

    def send_head(self, stream_id: int, status: int, headers, end_stream: bool) -> None:
        if self.closed or stream_id not in self.streams:
            return
        try:
            self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError:
            self._lost_stream(stream_id)
            return
        if end_stream:
            self._flush_now(stream_id)
        else:
            self._schedule(stream_id)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or self.closed:
            return
        if data:
            stream.queue.append(data)
            stream.queued += len(data)
        if end_stream:
            stream.end = True
        if end_stream:
            self._flush_now(stream_id)
            return
        if stream.queued > HIGH_WATER and not stream.output_paused:
            self._flush(stream_id)
            if stream.queued > HIGH_WATER and not stream.output_paused:
                stream.output_paused = True
                stream.request.pause_output()
        self._schedule(stream_id)

    def _flush_now(self, stream_id: int) -> None:
        """The response is complete: send it now (its last bytes carry END_STREAM).

        A deferred flush already scheduled stays: it serves every response of this
        reactor turn (cancelling it, to schedule another for the next response, was a
        timer per request)."""
        self._dirty.pop(stream_id, None)
        self._flush(stream_id)
        self._flush_wire()

    def _schedule(self, stream_id: int) -> None:
        self._dirty[stream_id] = None
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._flush_call = None
        dirty, self._dirty = self._dirty, {}
        for stream_id in dirty:
            self._flush(stream_id)
        self._flush_wire()

    def reset_stream(self, stream_id: int, graceful: bool = False) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or self.closed:
            return
        if graceful and not stream.sent_end:
            # The answer must go out first; the reset follows when the queue is empty.
            stream.reset_after = True
            return
        code = h2.errors.ErrorCodes.NO_ERROR if graceful else h2.errors.ErrorCodes.CANCEL
        try:
            self.conn.reset_stream(stream_id, error_code=code)
        except h2.exceptions.ProtocolError:
            pass
        self.streams.pop(stream_id, None)
        self._flush_wire()

    def pause_stream_input(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.paused_input = True

    def resume_stream_input(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.paused_input = False
        unacked, stream.unacked = stream.unacked, 0
        self._ack(unacked, stream_id)
        self._flush_wire()

    def stream_closed(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and (stream.sent_end or not stream.end):
            # Done, or never answered (a reset); otherwise it goes when its queue is sent.
            del self.streams[stream_id]

    def _lost_stream(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.request.stream_lost()

    # -- sending, as the windows allow ----------------------------------------------------

    def _flush_all(self) -> None:
        for stream_id in list(self.streams):
            self._flush(stream_id)

    def _flush(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or self.transport_paused or self.closed:
            return
        conn = self.conn
        queue = stream.queue
        try:
            while queue:
                window = conn.local_flow_control_window(stream_id)
                if window <= 0:
                    break
                chunk = queue[0]
                size = min(window, conn.max_outbound_frame_size)
                if len(chunk) > size:
                    queue[0] = chunk[size:]
                    chunk = chunk[:size]
                else:
                    queue.popleft()
                stream.queued -= len(chunk)
                last = stream.end and not queue
                conn.send_data(stream_id, chunk, end_stream=last)
                stream.sent_end = last
            if not queue and stream.end and not stream.sent_end:
                conn.end_stream(stream_id)
                stream.sent_end = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._lost_stream(stream_id)
            return
        if stream.sent_end:
            self._stream_sent(stream_id, stream)
        elif stream.output_paused and stream.queued < LOW_WATER:
            stream.output_paused = False
            stream.request.resume_output()

    def _stream_sent(self, stream_id: int, stream: _Stream) -> None:
        """Every byte of the response is out."""
        if stream.reset_after:
            # The answer came before the whole request body: tell the client to stop
            # sending it (RFC 9113 8.1), now that the answer is complete.
            stream.reset_after = False
            try:
                self.conn.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass
        if stream.request.closed:
            self.streams.pop(stream_id, None)

    # -- IPushProducer: the TLS transport's buffer ---------------------------------------

    def pauseProducing(self) -> None:
        self.transport_paused = True

    def resumeProducing(self) -> None:
        self.transport_paused = False
        self._flush_all()
        self._flush_wire()

    def stopProducing(self) -> None:
        self.transport_paused = True


def _tls_version(transport) -> str:
    """The TLS version a connection negotiated (``TLSv1.3``...), or ``unknown``."""
    try:
        return transport.getHandle().get_protocol_version_name()
    except AttributeError:  # (not a TLS transport)
        return "unknown"


@implementer(IHandshakeListener)
class _Negotiator(Protocol):
    """Chooses HTTP/2 or HTTP/1.1 by the protocol ALPN settled on, then steps aside.

    It replaces itself as the TLS wrapper's protocol at the end of the handshake, so no
    request ever goes through it.
    """

    def __init__(self, factory: "NegotiatingFactory", addr) -> None:
        self.factory = factory
        self.addr = addr
        self._timer = None
        self.chosen = None
        self.timed_out = False

    def makeConnection(self, transport) -> None:
        self.transport = transport
        self.connected = True
        # A client that never completes the handshake does not hold the socket forever.
        self._timer = self.factory.reactor.callLater(self.factory.handshake_timeout, self._time_is_up)

    def _time_is_up(self) -> None:
        self._timer = None
        self.timed_out = True
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self._choose()

    def _choose(self):
        if self.chosen is not None:
            return self.chosen
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory.negotiating.discard(self)
        transport = self.transport
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.tls_handshake("ok", _tls_version(transport))
        if getattr(transport, "negotiatedProtocol", None) == b"h2" and self.factory.h2_enabled:
            protocol = self.factory.build_h2(self.addr)
        else:
            protocol = self.factory.h1.buildProtocol(self.addr)
        self.chosen = protocol
        transport.wrappedProtocol = protocol
        protocol.makeConnection(transport)
        return protocol

    def dataReceived(self, data: bytes) -> None:
        self._choose().dataReceived(data)

    def connectionLost(self, reason=None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory.negotiating.discard(self)
        if self.chosen is not None:
            self.chosen.connectionLost(reason)
        elif self.factory.metrics is not None:
            self.factory.metrics.tls_handshake("timeout" if self.timed_out else "failed", "unknown")


class NegotiatingFactory(Factory):
    """The protocol factory inside TLS on the HTTPS port: HTTP/2 or HTTP/1.1 by ALPN."""

    def __init__(self, h1_factory, gateway, settings, certificates, reactor) -> None:
        self.h1 = h1_factory
        self.gateway = gateway
        self.certificates = certificates
        self.reactor = reactor
        #: Where handshakes are counted (the gateway's RequestMetrics), or None.
        self.metrics = getattr(gateway, "metrics", None)
        #: Connections in their TLS handshake, and HTTP/2 connections, open now.
        self.negotiating: set[_Negotiator] = set()
        self.h2_connections: set[H2ServerProtocol] = set()
        self.draining = False
        self.use_settings(settings)

    def use_settings(self, settings) -> None:
        """Connections from now on take ``settings`` (``[http2]``, timeouts)."""
        self.settings = settings
        self.h2_enabled = settings.http2_enabled
        # The handshake is the head of a TLS connection: it gets the request head's deadline.
        self.handshake_timeout = settings.request_head_timeout

    def buildProtocol(self, addr):
        negotiator = _Negotiator(self, addr)
        self.negotiating.add(negotiator)
        return negotiator

    def build_h2(self, addr) -> H2ServerProtocol:
        protocol = H2ServerProtocol(self.gateway, self.settings, self.certificates, self.reactor)
        protocol.registry = self.h2_connections
        self.h2_connections.add(protocol)
        if self.draining:
            self.reactor.callLater(0, protocol.drain)  # (once its preface and settings are out)
        return protocol

    # -- draining (hoodyproxy.drain): HTTP/2 and HTTP/1.1 connections, and handshakes -----

    def drain(self) -> None:
        """HTTP/2 connections get GOAWAY, HTTP/1.1 ones end after their next answer; a
        handshake still in progress becomes a connection that drains."""
        self.draining = True
        self.h1.drain()
        for connection in list(self.h2_connections):
            connection.drain()

    def remaining(self) -> int:
        """Connections still open (and handshakes in progress)."""
        for connection in list(self.h2_connections):
            connection.drain_tick()
        return len(self.h1.connections) + len(self.h2_connections) + len(self.negotiating)

    def abort(self) -> None:
        self.h1.abort()
        for connection in list(self.h2_connections):
            if connection.transport is not None:
                connection.transport.abortConnection()
        for negotiator in list(self.negotiating):
            negotiator.transport.abortConnection()

    # The HTTP/1.1 factory's lifecycle follows this one's.
    def doStart(self) -> None:
        self.h1.doStart()

    def doStop(self) -> None:
        self.h1.doStop()


def connection_protocol(protocol) -> str:
    """What a TLS connection on the HTTPS port speaks, by the protocol it wraps now:
    ``tls`` (still in its handshake), ``h2`` or ``h1`` (a WebSocket over HTTP/1.1 too)."""
    if isinstance(protocol, _Negotiator):
        return "tls"
    if isinstance(protocol, H2ServerProtocol):
        return "h2"
    return "h1"
