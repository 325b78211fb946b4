"""HTTP/3 on UDP: aioquic's sans-I/O QUIC and HTTP/3 state machines driven by Twisted.

aioquic ships an asyncio driver; this is its Twisted twin.  One
:class:`HTTP3Listener` (a ``DatagramProtocol``) owns the UDP port and routes each
datagram by destination connection ID to an :class:`H3Session`, the per-connection
adapter that feeds ``QuicConnection``/``H3Connection``, sends what they want sent and
keeps one ``callLater`` timer armed from ``get_timer()``.  The dispatch logic (version
negotiation, Retry, connection ID issuance and retirement) is ported from
``aioquic/asyncio/server.py``.

Each request stream becomes a :class:`~hoodyproxy.frontend.stream.StreamRequest`, the
request model HTTP/2 shares; the session implements its
:class:`~hoodyproxy.frontend.stream.StreamConnection` side.  Two aioquic gaps are filled
by :class:`GatewayQuicConnection`:

- certificates by SNI: aioquic takes one certificate per configuration, so the TLS
  ClientHello is peeked before aioquic handles it and the certificate served for its
  server name is swapped in;
- request body backpressure: aioquic extends a stream's receive credit as data arrives,
  whoever reads it.  Here a request stream's credit is a sliding window over what
  arrived, extended only while the request accepts input, so a paused stream can have at
  most one window (:data:`STREAM_WINDOW`) in flight, which the session holds for it.

A request stream on which bytes arrived but no complete HEADERS frame (a head that never
ends) is reset ``[limits] request_head_timeout`` seconds after its first byte; the deadline
rides on the session's one timer.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from typing import Any, Callable

from aioquic.asyncio.server import _encode_invalid_token_close
from aioquic.buffer import Buffer, encode_uint_var
from aioquic.h3 import events as h3events
from aioquic.h3.connection import H3_ALPN, ErrorCode, FrameType, H3Connection, encode_frame
from aioquic.quic import events as quicevents
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
    stream_is_unidirectional,
)
from aioquic.quic.packet import (
    QuicFrameType,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler
from aioquic.tls import pull_client_hello
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from hoodyproxy.frontend.http1 import client_ip_of
from hoodyproxy.frontend.stream import StreamRequest, parse_request_head
from hoodyproxy.tls.context import Coverage

__all__ = ["listen_http3", "HTTP3Listener", "H3Session", "GatewayQuicConnection"]

log = Logger()

#: Request body a stream may have in flight beyond what the gateway has taken.
STREAM_WINDOW = 1024 * 1024
#: Unacknowledged response bytes on a stream above which the container is paused ...
OUTPUT_HIGH = 256 * 1024
#: ... and below which it is resumed.
OUTPUT_LOW = 64 * 1024
#: Socket buffers asked for (best effort): bursts of a fast sender are not dropped.
SOCKET_BUFFER = 4 * 1024 * 1024
#: While the node drains: seconds between the GOAWAY notice and the GOAWAY naming the
#: first request stream that will not be served (RFC 9114 5.2).
DRAIN_NOTICE = 1.0
#: The notice's identifier: the highest client-initiated bidirectional stream ID.
_NOTICE_ID = (1 << 62) - 4


class GatewayQuicConnection(QuicConnection):
    """A server ``QuicConnection`` that picks its certificate by SNI and lets the session
    decide when a request stream's receive credit grows."""

    #: The DNS names of the certificate served on this connection (for the 421 check).
    dns_names: frozenset[str] = frozenset()
    #: The name the client asked for in its ClientHello (SNI), if any.
    sni: str | None = None
    #: ``may_extend(stream_id)``: whether the stream's credit may grow now.
    may_extend: Callable[[int], bool] | None = None

    def __init__(self, *, certificates, max_streams: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.certificates = certificates
        # aioquic hardcodes 128 concurrent bidirectional streams.
        self._local_max_streams_bidi.value = max_streams

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        original = self.tls._server_handle_hello

        def handle_hello(input_buf: Buffer, initial_buf: Buffer, handshake_buf: Buffer) -> None:
            pos = input_buf.tell()
            try:
                hello = pull_client_hello(input_buf)
            except Exception:
                hello = None  # the original handler reports the malformed hello
            input_buf.seek(pos)
            if hello is not None:
                self._use_certificate_for(hello.server_name)
            original(input_buf, initial_buf, handshake_buf)

        self.tls._server_handle_hello = handle_hello

    def _use_certificate_for(self, server_name: str | None) -> None:
        try:
            certificate, chain, key, names = self.certificates.material(server_name)
        except Exception:
            log.failure("QUIC: no certificate material for {name}; serving the default",
                        name=server_name)
            return
        self.tls.certificate = certificate
        self.tls.certificate_chain = list(chain)
        self.tls.certificate_private_key = key
        self.dns_names = names
        self.sni = server_name

    def _write_stream_limits(self, builder, space, stream) -> None:
        """MAX_STREAM_DATA for a request stream: the highest offset received plus one
        window, raised in half-window steps and only when the session allows it."""
        may_extend = self.may_extend
        if stream_is_unidirectional(stream.stream_id) or may_extend is None:
            super()._write_stream_limits(builder, space, stream)
            return
        if may_extend(stream.stream_id):
            wanted = stream.receiver.highest_offset + STREAM_WINDOW
            if wanted - stream.max_stream_data_local >= STREAM_WINDOW // 2:
                stream.max_stream_data_local = wanted
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA, capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery, handler_args=(stream,))
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


class _Stream:
    """What the session knows about one request stream."""

    __slots__ = ("request", "paused", "held", "held_end", "output_paused")

    def __init__(self, request: StreamRequest) -> None:
        self.request = request
        self.paused = False
        #: Body chunks not yet handed over: this turn's, or those that arrived while
        #: paused (at most about one window).
        self.held: deque[bytes] = deque()
        self.held_end = False
        self.output_paused = False


def _address(host: str, port: int):
    return (IPv6Address if ":" in host else IPv4Address)("UDP", host, port)


class H3Session:
    """One QUIC connection: drives aioquic and is the StreamConnection of its requests."""

    alt_svc = None
    #: The node drains: GOAWAY is sent, and the connection ends when its requests have.
    draining = False
    #: After the last GOAWAY: the first request stream ID not served.
    goaway_id: int | None = None
    _goaway_sent = False
    _drain_call = None
    #: The request stream ID after the highest one seen.
    _next_stream = 0

    def __init__(self, listener: "HTTP3Listener", quic: GatewayQuicConnection, addr) -> None:
        self.listener = listener
        self.clock = listener.clock
        self.gateway = listener.gateway
        self.quic = quic
        self.peer = _address(addr[0], addr[1])
        self.h3: H3Connection | None = None
        self.streams: dict[int, _Stream] = {}
        self.handshaking = True
        self.closed = False
        self._timer = None
        self._timer_at: float | None = None
        self._soon = None
        #: Streams whose request is over, while the client may still send on them
        #: (trailers after an early answer are not a new request).
        self._finished: set[int] = set()
        #: Streams with body bytes to hand over at the end of this reactor turn.
        self._inbox: dict[int, None] = {}
        #: Request streams with bytes but no head yet -> when their first bytes came.
        self._heads: dict[int, float] = {}
        #: What every request of the connection shares (made at the first request): the
        #: client and its address, the local address, the version, whether the
        #: certificate covers a host.
        self._common: dict | None = None
        quic.may_extend = self._may_extend

    # -- driving aioquic ----------------------------------------------------------------

    def datagram_received(self, data: bytes, addr) -> None:
        self._guarded(self.quic.receive_datagram, data, addr, self.clock.seconds())

    def _on_timer(self) -> None:
        self._timer = None
        now = max(self._timer_at or 0.0, self.clock.seconds())
        self._timer_at = None
        self._guarded(self._timer_fired, now)

    def _timer_fired(self, now: float) -> None:
        # (aioquic's own deadlines are checked against ``now``: an early call is harmless)
        if self._heads:
            self._expire_heads(now)
        self.quic.handle_timer(now)

    def _expire_heads(self, now: float) -> None:
        """Reset the request streams whose head is not complete after the deadline."""
        limit = self.listener.settings.request_head_timeout
        for stream_id, started in list(self._heads.items()):
            if now - started >= limit:
                del self._heads[stream_id]
                log.info("HTTP/3 client {peer}: no complete request head on stream {stream_id} "
                         "after {t:g} s: stream reset", peer=client_ip_of(self.peer), stream_id=stream_id,
                         t=limit)
                self._remember_finished(stream_id)
                try:
                    self.quic.reset_stream(stream_id, ErrorCode.H3_REQUEST_INCOMPLETE)
                    self.quic.stop_stream(stream_id, ErrorCode.H3_REQUEST_INCOMPLETE)
                except ValueError:
                    pass  # the stream is already gone on the QUIC side

    def _guarded(self, step: Callable, *args) -> None:
        """Run one aioquic step, then its events and transmission.  A bug here costs this
        connection, never the listener or the reactor."""
        try:
            step(*args)
            self._process_events()
            self.transmit()
        except Exception:
            log.failure("HTTP/3 connection failed; closing it")
            self._fail()

    def transmit(self) -> None:
        """Send what aioquic wants sent, resume drained streams, re-arm the one timer."""
        if self._soon is not None and not self._inbox:  # (body bytes still to hand over)
            if self._soon.active():
                self._soon.cancel()
            self._soon = None
        if self.closed:
            return
        for data, addr in self.quic.datagrams_to_send(now=self.clock.seconds()):
            self.listener.send(data, addr)
        self._resume_drained_output()
        self._arm_timer()

    def transmit_soon(self) -> None:
        """Coalesce the writes of one reactor turn into one transmission."""
        if self._soon is None and not self.closed:
            self._soon = self.clock.callLater(0, self._transmit_guarded)

    def _transmit_guarded(self) -> None:
        self._soon = None
        self._guarded(self._drain_inbox)

    def _drain_inbox(self) -> None:
        """Hand each stream the body bytes of this reactor turn's datagrams in one piece:
        a QUIC packet carries about 1.2 KB, and a write toward the container per packet
        costs both sides a system call."""
        inbox, self._inbox = self._inbox, {}
        for stream_id in inbox:
            stream = self.streams.get(stream_id)
            if stream is not None and not stream.paused:
                self._release(stream_id, stream)

    def _arm_timer(self) -> None:
        timer_at = self.quic.get_timer()
        if self._heads:
            due = min(self._heads.values()) + self.listener.settings.request_head_timeout
            timer_at = due if timer_at is None else min(timer_at, due)
        if self._timer is not None and self._timer_at != timer_at:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self.clock.callLater(max(0.0, timer_at - self.clock.seconds()), self._on_timer)
        self._timer_at = timer_at

    def _process_events(self) -> None:
        quic = self.quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, quicevents.ConnectionIdIssued):
                self.listener.connection_id_issued(event.connection_id, self)
            elif isinstance(event, quicevents.ConnectionIdRetired):
                self.listener.connection_id_retired(event.connection_id, self)
            elif isinstance(event, quicevents.ConnectionTerminated):
                self._terminated()
                return
            elif isinstance(event, quicevents.ProtocolNegotiated):
                if self.h3 is None:
                    self.h3 = H3Connection(quic)
                    if self.draining:
                        self._goaway_notice()
            elif isinstance(event, quicevents.HandshakeCompleted):
                self._handshake_done()
            if self.h3 is not None:
                for h3event in self.h3.handle_event(event):
                    self._h3_event(h3event)
            if isinstance(event, quicevents.StreamDataReceived):
                stream_id = event.stream_id
                if stream_id & 3 == 0 and stream_id not in self.streams and stream_id not in self._finished \
                        and stream_id not in self._heads:
                    # A client request stream with bytes but no complete head yet.
                    self._heads[stream_id] = self.clock.seconds()
            elif isinstance(event, (quicevents.StreamReset, quicevents.StopSendingReceived)):
                self._lose_stream(event.stream_id)
        if quic._state in END_STATES and self.streams:
            self._lose_all()  # closing or draining: no request will complete

    def _handshake_done(self) -> None:
        if self.handshaking:
            self.handshaking = False
            self.listener.handshake_done(self)
            if self.listener.metrics is not None:
                self.listener.metrics.tls_handshake("ok", "TLSv1.3", "quic")

    # -- HTTP/3 events ------------------------------------------------------------------

    def _h3_event(self, event: h3events.H3Event) -> None:
        """One HTTP/3 event; a request that raises costs its stream, not the connection."""
        stream_id = getattr(event, "stream_id", None)
        try:
            if isinstance(event, h3events.HeadersReceived):
                if stream_id in self.streams:
                    if event.stream_ended:
                        self._deliver(stream_id, b"", True)  # trailers end the body
                elif stream_id not in self._finished:
                    self._new_request(stream_id, event.headers, event.stream_ended)
            elif isinstance(event, h3events.DataReceived):
                self._deliver(stream_id, event.data, event.stream_ended)
        except Exception:
            log.failure("HTTP/3: request on stream {stream_id} failed", stream_id=stream_id)
            self.reset_stream(stream_id)
            self._lose_stream(stream_id)

    def _new_request(self, stream_id: int, headers, ended: bool) -> None:
        self._heads.pop(stream_id, None)
        if self.goaway_id is not None and stream_id >= self.goaway_id:
            # After the last GOAWAY: never served, so the client may send it again elsewhere.
            self._remember_finished(stream_id)
            try:
                self.quic.reset_stream(stream_id, ErrorCode.H3_REQUEST_REJECTED)
                self.quic.stop_stream(stream_id, ErrorCode.H3_REQUEST_REJECTED)
            except ValueError:
                pass
            self.transmit_soon()
            return
        self._next_stream = max(self._next_stream, stream_id + 4)
        common = self._common
        if common is None:
            # (the certificate and SNI name were chosen by the ClientHello, before any stream)
            local = self.listener.port.getHost()
            common = self._common = {"client": self.peer, "client_ip": client_ip_of(self.peer),
                                     "host": _address(local.host, local.port), "version": b"HTTP/3",
                                     "covers": Coverage(self.quic.dns_names, self.quic.sni)}
        fields, problem = parse_request_head(headers, ended)
        request = StreamRequest(self, stream_id, **fields, **common)
        request.problem = problem
        self.streams[stream_id] = _Stream(request)
        request.begin()
        if ended and fields["websocket"] and stream_id in self.streams:
            request.body_ended()  # a WebSocket CONNECT that ended its stream at once
        self.transmit_soon()

    def _deliver(self, stream_id: int, data: bytes, ended: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # answered and forgotten: late body bytes are dropped
        if data:
            stream.held.append(data)
        stream.held_end = stream.held_end or ended
        if not stream.paused:
            self._inbox[stream_id] = None
            self.transmit_soon()

    def _may_extend(self, stream_id: int) -> bool:
        stream = self.streams.get(stream_id)
        return stream is not None and not stream.paused

    # -- the StreamConnection side ------------------------------------------------------

    def send_head(self, stream_id: int, status: int, fields: list[tuple[bytes, bytes]],
                  end_stream: bool) -> None:
        if self._writable(stream_id) and self._h3_call(self.h3.send_headers, stream_id, fields, end_stream):
            self.transmit_soon()

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if not self._writable(stream_id) or not self._h3_call(self.h3.send_data, stream_id, data, end_stream):
            return
        self.transmit_soon()
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.output_paused and not end_stream \
                and self._unacked(stream_id) > OUTPUT_HIGH:
            stream.output_paused = True
            stream.request.pause_output()

    def reset_stream(self, stream_id: int, graceful: bool = False) -> None:
        """Graceful: the answer is complete, only the rest of the request body is unwanted
        (STOP_SENDING with H3_NO_ERROR, RFC 9114 4.1.1).  Otherwise cancel both ways."""
        if self.closed:
            return
        code = ErrorCode.H3_NO_ERROR if graceful else ErrorCode.H3_REQUEST_CANCELLED
        try:
            if not graceful:
                self.quic.reset_stream(stream_id, code)
            self.quic.stop_stream(stream_id, code)
        except ValueError:
            pass  # the stream is already gone on the QUIC side
        self.transmit_soon()

    def stream_closed(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self._remember_finished(stream_id)

    def _remember_finished(self, stream_id: int) -> None:
        finished = self._finished
        finished.add(stream_id)
        if len(finished) > 1024:
            # Forget the streams aioquic has discarded: nothing more comes on them.
            self._finished = {s for s in finished if s in self.quic._streams}

    def pause_stream_input(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.paused = True

    def resume_stream_input(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or not stream.paused:
            return
        stream.paused = False
        self._release(stream_id, stream)
        self.transmit_soon()  # the credit may grow again

    def _release(self, stream_id: int, stream: _Stream) -> None:
        """Give the request the body bytes (and the end) held for it, in one piece."""
        request = stream.request
        if stream.held:
            data = stream.held[0] if len(stream.held) == 1 else b"".join(stream.held)
            stream.held.clear()
            request.body_chunk(data)
        if stream.held_end and not stream.held and not stream.paused and stream_id in self.streams:
            stream.held_end = False
            request.body_ended()

    # -- helpers ------------------------------------------------------------------------

    def _h3_call(self, send: Callable, stream_id: int, *args) -> bool:
        """Write on a stream; a state aioquic refuses costs the stream, not the caller."""
        try:
            send(stream_id, *args)
        except Exception:
            log.failure("HTTP/3: could not write on stream {stream_id}", stream_id=stream_id)
            self.reset_stream(stream_id)
            self._lose_stream(stream_id)
            return False
        return True

    def _writable(self, stream_id: int) -> bool:
        if self.closed or self.h3 is None:
            return False
        stream = self.quic._streams.get(stream_id)
        return stream is not None and stream.sender._reset_error_code is None

    def _unacked(self, stream_id: int) -> int:
        stream = self.quic._streams.get(stream_id)
        if stream is None:
            return 0
        return stream.sender._buffer_stop - stream.sender._buffer_start

    def _resume_drained_output(self) -> None:
        for stream_id, stream in list(self.streams.items()):
            if stream.output_paused and self._unacked(stream_id) < OUTPUT_LOW:
                stream.output_paused = False
                stream.request.resume_output()

    def _lose_stream(self, stream_id: int) -> None:
        self._heads.pop(stream_id, None)
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self._remember_finished(stream_id)
            stream.request.stream_lost()

    def _lose_all(self) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            try:
                stream.request.stream_lost()
            except Exception:
                log.failure("HTTP/3: a request failed to stop")

    # -- draining (hoodyproxy.drain) ----------------------------------------------------

    def drain(self) -> None:
        """Shut down gracefully: a GOAWAY notice now (or once HTTP/3 is set up), the GOAWAY
        naming the first stream not served :data:`DRAIN_NOTICE` seconds later; requests
        below it finish, then the connection closes (:meth:`drain_tick`)."""
        if self.closed or self.draining:
            return
        self.draining = True
        if self.h3 is not None:
            self._goaway_notice()

    def _goaway_notice(self) -> None:
        self._send_goaway(_NOTICE_ID)
        self._drain_call = self.clock.callLater(DRAIN_NOTICE, self._last_goaway)

    def _last_goaway(self) -> None:
        self._drain_call = None
        if self.closed:
            return
        self.goaway_id = self._next_stream
        self._send_goaway(self.goaway_id)
        self.drain_tick()

    def _send_goaway(self, stream_id: int) -> None:
        """A GOAWAY frame on our control stream.  aioquic's H3Connection has no method for
        it (a pull request adding one, aiortc/aioquic#50, was closed unmerged), so the
        frame is encoded with its own ``encode_frame`` and written on the control stream
        it opened."""
        control = getattr(self.h3, "_local_control_stream_id", None)
        if control is None or self.closed:
            return
        try:
            self.quic.send_stream_data(control, encode_frame(FrameType.GOAWAY, encode_uint_var(stream_id)))
        except Exception:
            log.failure("HTTP/3: could not send GOAWAY")
            return
        self._goaway_sent = True
        self.transmit()

    def drain_tick(self) -> None:
        """Close the connection if it is draining and its last request is over (or it
        never got as far as HTTP/3)."""
        if self.closed or not self.draining:
            return
        if (self.goaway_id is not None and not self.streams) or (self.h3 is None and not self.handshaking):
            self.close()

    # -- the end ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection now (listener stopping): tell the peer, drop everything."""
        if self.closed:
            return
        try:
            self.quic.close(error_code=ErrorCode.H3_NO_ERROR, reason_phrase="server stopping")
            for data, addr in self.quic.datagrams_to_send(now=self.clock.seconds()):
                self.listener.send(data, addr)
        except Exception:
            log.failure("HTTP/3: could not send CONNECTION_CLOSE")
        self._terminated()

    def _fail(self) -> None:
        try:
            self.quic.close(error_code=ErrorCode.H3_INTERNAL_ERROR, reason_phrase="internal error")
            for data, addr in self.quic.datagrams_to_send(now=self.clock.seconds()):
                self.listener.send(data, addr)
        except Exception:
            pass
        self._terminated()

    def _terminated(self) -> None:
        if self.closed:
            return
        self.closed = True
        for call in (self._timer, self._soon, self._drain_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._soon = self._drain_call = None
        self._lose_all()
        self.listener.connection_terminated(self)


class HTTP3Listener(DatagramProtocol):
    """The UDP port's protocol: routes datagrams to connections by connection ID.

    Counters for operators and tests: ``connections`` (connection ID -> session; a
    session appears under each of its IDs), ``retries_sent``, ``handshaking``.
    """

    def __init__(self, clock, *, gateway, certificates, settings) -> None:
        self.clock = clock
        self.gateway = gateway
        #: Where handshakes are counted (the gateway's RequestMetrics), or None.
        self.metrics = getattr(gateway, "metrics", None)
        self.certificates = certificates
        self.settings = settings
        self.connections: dict[bytes, H3Session] = {}
        self.retries_sent = 0
        self.version_negotiations_sent = 0
        self.handshaking = 0
        self.retry_tokens = QuicRetryTokenHandler()
        certificate, chain, key, _ = certificates.material(None)
        self.configuration = QuicConfiguration(
            is_client=False, alpn_protocols=H3_ALPN, certificate=certificate,
            certificate_chain=list(chain), private_key=key, idle_timeout=settings.client_idle_timeout,
            max_stream_data=STREAM_WINDOW, max_data=4 * STREAM_WINDOW)

    def use_settings(self, settings) -> None:
        """Connections from now on take ``settings`` (``[http3]`` limits, timeouts)."""
        self.settings = settings
        self.configuration.idle_timeout = settings.client_idle_timeout

    #: The node drains: no new connection is accepted (their Initial packets are dropped).
    draining = False

    @property
    def sessions(self) -> set[H3Session]:
        """Each live connection once."""
        return set(self.connections.values())

    def drain(self) -> None:
        """Accept no new connection; every open one gets GOAWAY and ends after its requests."""
        self.draining = True
        for session in self.sessions:
            session.drain()

    def remaining(self) -> int:
        """Connections still open."""
        sessions = self.sessions
        for session in sessions:
            session.drain_tick()
        return len(self.sessions)

    def abort(self) -> None:
        for session in self.sessions:
            session.close()

    def startProtocol(self) -> None:
        # Kept because doStop clears ``transport`` before stopProtocol, while the socket
        # is still open for the CONNECTION_CLOSE frames.
        self.port = self.transport

    def send(self, data: bytes, addr) -> None:
        try:
            self.port.write(data, addr)
        except OSError:
            pass  # a full socket buffer is packet loss; QUIC recovers from it

    # -- dispatch (aioquic/asyncio/server.py) ------------------------------------------

    def datagramReceived(self, data: bytes, addr) -> None:
        try:
            header = pull_quic_header(Buffer(data=data),
                                      host_cid_length=self.configuration.connection_id_length)
        except ValueError:
            return
        versions = self.configuration.supported_versions
        # Never answer a Version Negotiation packet with another (a reflection loop).
        if (header.packet_type != QuicPacketType.VERSION_NEGOTIATION and header.version is not None
                and header.version not in versions):
            self.version_negotiations_sent += 1
            self.send(encode_quic_version_negotiation(
                source_cid=header.destination_cid, destination_cid=header.source_cid,
                supported_versions=versions), addr)
            return
        session = self.connections.get(header.destination_cid)
        if session is None:
            if (len(data) < SMALLEST_MAX_DATAGRAM_SIZE or header.packet_type != QuicPacketType.INITIAL
                    or self.draining):
                return
            session = self._accept(header, addr)
            if session is None:
                return
        session.datagram_received(data, addr)

    def _wants_retry(self) -> bool:
        mode = self.settings.http3_retry
        if mode == "always":
            return True
        if mode == "never":
            return False
        # address validation under load: only while many handshakes are pending
        return self.handshaking > self.settings.http3_retry_threshold

    def _accept(self, header, addr) -> H3Session | None:
        """A new connection for an INITIAL packet, or a Retry / INVALID_TOKEN answer."""
        now = self.clock.seconds()
        original_dcid = header.destination_cid
        retry_scid = None
        if header.token:
            try:
                original_dcid = self.retry_tokens.validate_token(
                    address=addr, destination_cid=header.destination_cid, token=header.token, now=now)
            except ValueError:
                self.send(_invalid_token_close(header), addr)
                return None
            retry_scid = header.destination_cid
        elif self._wants_retry():
            source_cid = os.urandom(8)
            self.retries_sent += 1
            self.send(encode_quic_retry(
                version=header.version, source_cid=source_cid, destination_cid=header.source_cid,
                original_destination_cid=header.destination_cid,
                retry_token=self.retry_tokens.create_token(
                    address=addr, original_destination_connection_id=header.destination_cid,
                    retry_source_connection_id=source_cid, now=now)), addr)
            return None
        quic = GatewayQuicConnection(
            configuration=self.configuration, original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid, certificates=self.certificates,
            max_streams=self.settings.http3_max_concurrent_streams)
        session = H3Session(self, quic, addr)
        self.handshaking += 1
        self.connections[header.destination_cid] = session
        self.connections[quic.host_cid] = session
        return session

    # -- called by sessions ---------------------------------------------------------------

    def connection_id_issued(self, cid: bytes, session: H3Session) -> None:
        self.connections[cid] = session

    def connection_id_retired(self, cid: bytes, session: H3Session) -> None:
        if self.connections.get(cid) is session:
            del self.connections[cid]

    def handshake_done(self, session: H3Session) -> None:
        self.handshaking -= 1

    def connection_terminated(self, session: H3Session) -> None:
        if session.handshaking:
            session.handshaking = False
            self.handshaking -= 1
            if self.metrics is not None:
                self.metrics.tls_handshake("failed", "unknown", "quic")
        for cid in [cid for cid, s in self.connections.items() if s is session]:
            del self.connections[cid]

    def stopProtocol(self) -> None:
        """The port is closing (the socket is still open): close every connection."""
        for session in self.sessions:
            session.close()
        self.connections.clear()


def _invalid_token_close(header) -> bytes:
    """CONNECTION_CLOSE(INVALID_TOKEN) for a Retry token we did not issue (RFC 9000 8.1.3)."""
    return _encode_invalid_token_close(version=header.version, source_cid=header.destination_cid,
                                       destination_cid=header.source_cid)


def _grow_socket_buffers(port) -> None:
    sock = getattr(port, "socket", None)
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass


def listen_http3(reactor, interface: str, port: int, *, gateway, certificates, settings,
                 v6only: bool = False, sock: socket.socket | None = None) -> IListeningPort:
    """Serve HTTP/3 on UDP ``interface``:``port``; the returned port's ``protocol`` is the
    :class:`HTTP3Listener` (counters), and ``stopListening`` closes every connection.

    ``::`` takes IPv4 clients too (``IPV6_V6ONLY`` off, whatever the host's default)
    unless ``v6only``, as the TCP listeners do (:mod:`hoodyproxy.listening`): their
    datagrams come from ``::ffff:a.b.c.d``, which aioquic keeps as the path to answer on,
    and requests give the plain IPv4 form as their ``client_ip``.

    ``sock``: a UDP socket handed in (:mod:`hoodyproxy.sockets`) to serve on a duplicate
    of instead (``interface`` and ``port`` are then not used).
    """
    from hoodyproxy.config import ListenAddress
    from hoodyproxy.listening import listen_udp
    listener = HTTP3Listener(reactor, gateway=gateway, certificates=certificates, settings=settings)
    if sock is not None:
        udp_port = reactor.adoptDatagramPort(sock.fileno(), sock.family, listener, maxPacketSize=8192)
    else:
        udp_port = listen_udp(reactor, ListenAddress(interface, port), listener, v6only=v6only)
    _grow_socket_buffers(udp_port)
    return udp_port
