"""A real HTTP/2 client for the tests: Twisted TLS (ALPN h2) driving the h2 state machine.

It does what curl and h2load cannot be made to do on purpose: several authorities on one
connection, extended CONNECT (RFC 8441) with WebSocket framing from wsproto, a client
that does not read (flow control), and the attacks (rapid reset, CONTINUATION flood).
"""

from __future__ import annotations

import hashlib

import h2.config
import h2.connection
import h2.events
import h2.settings
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol
from OpenSSL import SSL
from zope.interface import implementer


class StreamResult:
    """What came back on one stream."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[bytes, list[bytes]] = {}
        self.chunks: list[bytes] = []
        self.received = 0
        self.sha = hashlib.sha256()
        self.keep = True
        self.head = defer.Deferred()
        self.done = defer.Deferred()
        self.reset_code = None
        self.to_send: list[bytes] = []
        self.end_after_send = False
        self.sent = 0

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name)
        return values[0] if values else None


class H2Client(Protocol):
    def __init__(self, *, window: int | None = None, auto_ack: bool = True) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.window = window
        self.auto_ack = auto_ack
        self.streams: dict[int, StreamResult] = {}
        self.goaway = None
        self.settings_received = defer.Deferred()
        self.closed = defer.Deferred()
        self.lost = False

    def connectionMade(self) -> None:
        if self.window is not None:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.window})
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.lost:
            self.transport.write(data)

    @property
    def remote_settings(self):
        return self.conn.remote_settings

    def dataReceived(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            stream = self.streams.get(getattr(event, "stream_id", None))
            if isinstance(event, h2.events.RemoteSettingsChanged):
                if not self.settings_received.called:
                    self.settings_received.callback(self)
            elif isinstance(event, h2.events.ResponseReceived) and stream is not None:
                for name, value in event.headers:
                    if name == b":status":
                        stream.status = int(value)
                    else:
                        stream.headers.setdefault(name, []).append(value)
                stream.head.callback(stream)
            elif isinstance(event, h2.events.DataReceived) and stream is not None:
                stream.received += len(event.data)
                stream.sha.update(event.data)
                if stream.keep:
                    stream.chunks.append(event.data)
                if self.auto_ack:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                cb = getattr(stream, "on_data", None)
                if cb is not None:
                    cb(event.data)
            elif isinstance(event, h2.events.StreamEnded) and stream is not None:
                if not stream.done.called:
                    stream.done.callback(stream)
            elif isinstance(event, h2.events.StreamReset) and stream is not None:
                stream.reset_code = event.error_code
                if not stream.head.called:
                    stream.head.callback(stream)
                if not stream.done.called:
                    stream.done.callback(stream)
            elif isinstance(event, h2.events.WindowUpdated):
                for sid in list(self.streams):
                    self._pump(sid)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event.error_code
        self.flush()

    def connectionLost(self, reason=None) -> None:
        self.lost = True
        for stream in self.streams.values():
            if not stream.head.called:
                stream.head.callback(stream)
            if not stream.done.called:
                stream.done.callback(stream)
        self.closed.callback(None)

    def request(self, method: bytes, path: bytes, authority: bytes, headers=(), body: bytes | None = None,
                end_stream: bool = True, protocol: bytes | None = None) -> StreamResult:
        sid = self.conn.get_next_available_stream_id()
        fields = [(b":method", method), (b":scheme", b"https"), (b":authority", authority),
                  (b":path", path)]
        if protocol is not None:
            fields.insert(1, (b":protocol", protocol))
        fields += list(headers)
        stream = self.streams[sid] = StreamResult()
        stream.id = sid
        self.conn.send_headers(sid, fields, end_stream=end_stream and body is None)
        if body is not None:
            self.send(sid, body, end=end_stream)
        self.flush()
        return stream

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        """Queue ``data`` on a stream; it goes out as the gateway's windows allow."""
        stream = self.streams[sid]
        if data:
            stream.to_send.append(data)
        stream.end_after_send = end
        self._pump(sid)
        self.flush()

    def _pump(self, sid: int) -> None:
        stream = self.streams[sid]
        while stream.to_send:
            try:
                window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            except Exception:
                return
            if window <= 0:
                return
            chunk = stream.to_send[0]
            piece, rest = chunk[:window], chunk[window:]
            if rest:
                stream.to_send[0] = rest
            else:
                stream.to_send.pop(0)
            self.conn.send_data(sid, piece)
            stream.sent += len(piece)
        if stream.end_after_send:
            stream.end_after_send = False
            try:
                self.conn.end_stream(sid)
            except Exception:
                pass

    def ack(self, stream: StreamResult, amount: int) -> None:
        self.conn.acknowledge_received_data(amount, stream.id)
        self.flush()


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS with SNI and ALPN h2 but no certificate check (``curl -k``)."""

    def __init__(self, sni: str) -> None:
        self.sni = sni

    def clientConnectionForTLS(self, tls_protocol):
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_alpn_protos([b"h2"])
        connection = SSL.Connection(context, None)
        connection.set_app_data(tls_protocol)
        connection.set_tlsext_host_name(self.sni.encode())
        connection.set_connect_state()
        return connection


async def h2_connect(case, node, sni: str, *, verify: bool = True, client_class=None, **kw) -> H2Client:
    """An HTTP/2 connection to the node over TLS with SNI ``sni``, closed at cleanup
    (``client_class``: an H2Client subclass to connect with)."""
    with open(node.ca_path, "rb") as f:
        ca = ssl.Certificate.loadPEM(f.read())
    if verify:
        options = ssl.optionsForClientTLS(sni, trustRoot=ca, acceptableProtocols=[b"h2"])
    else:
        options = _Unverified(sni)
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", node.https_port))
    client = await connectProtocol(endpoint, (client_class or H2Client)(**kw))

    def close():
        if not client.lost:
            client.transport.abortConnection()
            return client.closed
    case.addCleanup(close)
    await client.settings_received
    return client
