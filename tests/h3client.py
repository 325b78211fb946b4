"""A real HTTP/3 client for tests and benches: aioquic's client state machines driven by
Twisted, so it runs in Trial's reactor beside the node it talks to.

``await H3Client.connect(case, port, server_name=..., ca_path=...)`` gives a connected
client (closed again in the case's cleanup); :meth:`H3Client.request` sends one request
and returns a :class:`ClientStream` whose ``done`` Deferred fires at the end of the
response.  Bodies go through sinks: :class:`Collect` keeps them (small answers),
:class:`Digest` only counts bytes and hashes them, and uploads are pulled from an
iterable as the QUIC send buffer drains -- so :func:`transfer` can move any number of
bytes up and down in bounded memory (the bench reuses it for 1 GiB).
"""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import Iterable, Iterator

from aioquic.h3 import events as h3events
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.quic import events as quicevents
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol

#: Upload bytes kept in the QUIC send buffer; more is pulled from the source as it drains.
UPLOAD_BUFFER = 512 * 1024


class Collect:
    """Keeps the body (small responses only)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


class Digest:
    """Counts and hashes the body, never holding it."""

    def __init__(self) -> None:
        self.length = 0
        self.hash = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self.length += len(data)
        self.hash.update(data)

    @property
    def sha256(self) -> str:
        return self.hash.hexdigest()


def pattern_chunks(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """``total`` deterministic bytes (tests.backends.pattern's sequence) in chunks,
    generated from one block: memory stays constant whatever ``total`` is."""
    block = bytes(range(256)) * (chunk // 256 + 1)
    sent = 0
    while sent < total:
        size = min(chunk, total - sent)
        offset = sent % 256
        yield block[offset:offset + size]
        sent += size


def pattern_sha256(total: int) -> str:
    h = hashlib.sha256()
    for piece in pattern_chunks(total):
        h.update(piece)
    return h.hexdigest()


class _H3Client(H3Connection):
    """aioquic's H3Connection, except that a HEAD response may announce a content-length
    it does not carry (RFC 9114 4.1.2; aioquic's client closes the connection)."""

    def __init__(self, quic: QuicConnection) -> None:
        super().__init__(quic)
        self.head_streams: set[int] = set()

    def _check_content_length(self, stream) -> None:
        if stream.stream_id not in self.head_streams:
            super()._check_content_length(stream)


class ClientStream:
    """One request stream: its response head, body sink, end and reset."""

    def __init__(self, client: "H3ClientProtocol", stream_id: int, sink, upload: Iterator[bytes] | None):
        self.client = client
        self.stream_id = stream_id
        self.sink = sink
        self.upload = upload
        self.status: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.header_list: list[tuple[bytes, bytes]] = []
        self.head = defer.Deferred()  # fires with self at the response head
        self.done = defer.Deferred()  # fires with self at the end (or reset)
        self.ended = False
        self.reset_code: int | None = None
        self.stop_code: int | None = None
        self.bytes_sent = 0

    def json(self):
        return json.loads(self.sink.body)

    def _headers(self, headers) -> None:
        if self.status is None:
            self.header_list = list(headers)
            self.headers = dict(headers)
            self.status = int(self.headers.get(b":status", b"0"))
            if self.status >= 200:
                self.head.callback(self)
            else:
                self.status = None  # interim

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            if not self.head.called:
                self.head.callback(self)
            self.done.callback(self)

    def send(self, data: bytes, end_stream: bool = False) -> None:
        """Write on the stream (WebSocket frames, hand-made bodies)."""
        self.client.h3.send_data(self.stream_id, data, end_stream)
        self.client.transmit()


class H3ClientProtocol(DatagramProtocol):
    """The client's UDP socket and its one QUIC connection."""

    def __init__(self, clock, addr, *, server_name: str, ca_path: str | None, verify: bool = True) -> None:
        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=server_name,
                                   verify_mode=ssl.CERT_REQUIRED if verify else ssl.CERT_NONE)
        if ca_path:
            config.load_verify_locations(cafile=ca_path)
        self.clock = clock
        self.addr = addr
        self.quic = QuicConnection(configuration=config)
        self.h3 = _H3Client(self.quic)
        self.streams: dict[int, ClientStream] = {}
        self.connected = defer.Deferred()
        self.closed = defer.Deferred()
        self.terminated: quicevents.ConnectionTerminated | None = None
        self._timer = None
        self._timer_at = None
        self.stopped = False
        #: While True every datagram is dropped: a stalled client, for backpressure tests.
        self.deaf = False

    def startProtocol(self) -> None:
        self.quic.connect(self.addr, now=self.clock.seconds())
        self.transmit()

    def datagramReceived(self, data: bytes, addr) -> None:
        if self.stopped or self.deaf:
            return  # deaf: a client that stopped reading (no ACKs, no credit)
        self.quic.receive_datagram(data, addr, now=self.clock.seconds())
        self._process()
        self.transmit()

    def _on_timer(self) -> None:
        self._timer = None
        self.quic.handle_timer(now=max(self._timer_at or 0, self.clock.seconds()))
        self._timer_at = None
        self._process()
        self.transmit()

    def transmit(self) -> None:
        if self.transport is None or self.stopped:
            return
        self._pump_uploads()
        for data, addr in self.quic.datagrams_to_send(now=self.clock.seconds()):
            try:
                self.transport.write(data, addr)
            except OSError:
                pass
        timer_at = self.quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None and self.terminated is None:
            self._timer = self.clock.callLater(max(0, timer_at - self.clock.seconds()), self._on_timer)
        self._timer_at = timer_at

    def _pump_uploads(self) -> None:
        for stream in list(self.streams.values()):
            if stream.upload is None or stream.reset_code is not None or stream.stop_code is not None:
                continue
            sender = self.quic._streams[stream.stream_id].sender
            while sender._buffer_stop - sender._buffer_start < UPLOAD_BUFFER:
                piece = next(stream.upload, None)
                if piece is None:
                    stream.upload = None
                    self.h3.send_data(stream.stream_id, b"", True)
                    break
                stream.bytes_sent += len(piece)
                self.h3.send_data(stream.stream_id, piece, False)

    def _process(self) -> None:
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, quicevents.HandshakeCompleted):
                if not self.connected.called:
                    self.connected.callback(self)
            elif isinstance(event, quicevents.ConnectionTerminated):
                self._terminated(event)
                return
            elif isinstance(event, quicevents.StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.reset_code = event.error_code
                    stream._end()
            elif isinstance(event, quicevents.StopSendingReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.stop_code = event.error_code
                    stream.upload = None
            for h3event in self.h3.handle_event(event):
                stream = self.streams.get(getattr(h3event, "stream_id", -1))
                if stream is None:
                    continue
                if isinstance(h3event, h3events.HeadersReceived):
                    stream._headers(h3event.headers)
                elif isinstance(h3event, h3events.DataReceived) and h3event.data:
                    stream.sink.feed(h3event.data)
                if getattr(h3event, "stream_ended", False):
                    stream._end()

    def _terminated(self, event) -> None:
        self.terminated = event
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self.connected.called:
            self.connected.errback(ConnectionError(f"QUIC connection failed: {event.reason_phrase!r} "
                                                   f"(error {event.error_code})"))
        for stream in self.streams.values():
            stream._end()
        if not self.closed.called:
            self.closed.callback(event)

    # -- requests -----------------------------------------------------------------------

    def open(self, headers: list[tuple[bytes, bytes]], *, end_stream: bool, sink=None,
             upload: Iterable[bytes] | None = None) -> ClientStream:
        """Send a header block on a new stream; the body (if any) follows from ``upload``."""
        stream_id = self.quic.get_next_available_stream_id()
        stream = ClientStream(self, stream_id, sink if sink is not None else Collect(),
                              iter(upload) if upload is not None else None)
        self.streams[stream_id] = stream
        if (b":method", b"HEAD") in headers:
            self.h3.head_streams.add(stream_id)
        self.h3.send_headers(stream_id, headers, end_stream=end_stream)
        self.transmit()
        return stream

    def request(self, method: str, path: str, authority: str, *, headers=(), body: bytes | None = None,
                upload: Iterable[bytes] | None = None, sink=None) -> ClientStream:
        """An ordinary request (``body`` small and whole, or ``upload`` streamed)."""
        head = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", authority.encode()),
                (b":path", path.encode())]
        head += [(k.lower().encode() if isinstance(k, str) else k.lower(),
                  v.encode() if isinstance(v, str) else v) for k, v in headers]
        if body is not None:
            head.append((b"content-length", b"%d" % len(body)))
            upload = [body] if body else []
        return self.open(head, end_stream=upload is None, sink=sink, upload=upload)

    def close(self) -> defer.Deferred:
        """Close the connection and the socket; fires when both are done."""
        if self.terminated is None and self.transport is not None and not self.stopped:
            self.quic.close()
            self.transmit()
        self.stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        port, self._port = getattr(self, "_port", None), None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)


async def connect(case, reactor, port: int, *, server_name: str, ca_path: str | None,
                  host: str = "127.0.0.1", verify: bool = True, timeout: float = 10.0) -> H3ClientProtocol:
    """A connected client (handshake done); closed in ``case``'s cleanup."""
    client = H3ClientProtocol(reactor, (host, port), server_name=server_name, ca_path=ca_path,
                              verify=verify)
    client._port = reactor.listenUDP(0, client, interface="::1" if ":" in host else "127.0.0.1")
    case.addCleanup(client.close)
    await within(client.connected, timeout)
    return client


async def within(d: defer.Deferred, timeout: float = 30.0):
    """``await d``, failing after ``timeout`` seconds (a wait always has a bound)."""
    from twisted.internet import reactor
    return await d.addTimeout(timeout, reactor)


async def transfer(client: H3ClientProtocol, method: str, path: str, authority: str, *,
                   upload_size: int = 0, headers=(), timeout: float = 120.0) -> ClientStream:
    """Stream ``upload_size`` pattern bytes up (chunked when no length is given in
    ``headers``) and digest the response: bounded memory for any size."""
    upload = pattern_chunks(upload_size) if upload_size else None
    stream = client.request(method, path, authority, headers=headers, upload=upload, sink=Digest())
    await within(stream.done, timeout)
    return stream
