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

Per request, the costly parts of h2 are replaced, not skipped: header blocks are checked
by :func:`malformed` (h2's inbound validation, one pass), requests decoded by
:class:`HeaderDecoder` and responses encoded by :class:`HeaderEncoder` (HPACK with the
same compression as hpack's, without its per-field search); a connection's responses of
one reactor turn share one deferred flush.
"""

from __future__ import annotations

import binascii
import re
from collections import deque

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack.hpack
import hyperframe.frame
from hpack import Decoder
from hpack.exceptions import HPACKDecodingError, OversizedHeaderListError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from hoodyproxy.frontend.http1 import client_ip_of
from hoodyproxy.frontend.stream import StreamRequest, parse_request_head
from hoodyproxy.tls.context import name_covered, server_name

log = Logger()


def _short_data_repr(data: bytes | None) -> str:
    """hyperframe's ``_raw_data_repr``, same output, without hex-encoding all of ``data``.

    h2 logs ``repr(frame)`` for every frame it receives, building the string even when
    nothing logs it, and hyperframe's repr hex-encodes a whole 16 KiB DATA payload only to
    keep its first 20 characters: about a tenth of the gateway's CPU on an HTTP/2 upload.
    """
    if not data:
        return "None"
    r = binascii.hexlify(data[:11]).decode("ascii")
    if len(r) > 20:
        r = r[:20] + "..."
    return "<hex:" + r + ">"


if getattr(hyperframe.frame, "_raw_data_repr", None) is not None:
    hyperframe.frame._raw_data_repr = _short_data_repr
# ... and h2 formats ``repr(frame)`` of every frame it receives, for a trace line its
# default logger drops (1 % of the CPU of a small request).  Within h2.connection (its
# only use of repr) the built-in object repr, which costs next to nothing, takes its place.
h2.connection.repr = object.__repr__


class _QuietLog:
    """Stands in for hpack's module logger: hpack logs every integer and field it codes
    at debug level (about 15 calls a request, each a logging level check)."""

    @staticmethod
    def debug(*args, **kwargs) -> None:
        pass


if hasattr(hpack.hpack, "log"):
    hpack.hpack.log = _QuietLog()


# -- receiving: what makes a header block malformed (RFC 9113 8.2 and 8.3) ------------

#: A regular field name: no control, space, upper-case letter, colon, DEL or byte above
#: 0x7f (RFC 9113 8.2.1; stream.parse_request_head then wants a token).
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x40\x5b-\x7e]+")
#: NUL, CR and LF, never in a field value; nor is white space at either end (RFC 9113 8.2.1).
_BAD_VALUE_BYTE = re.compile(rb"[\x00\n\r]")
_WHITE_SPACE = frozenset(b"\t ")
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
#: Connection-specific fields, never in an HTTP/2 message (RFC 9113 8.2.2; TE apart).
_CONNECTION_FIELDS = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding",
                                b"upgrade"})


def malformed(headers, trailers: bool = False) -> str | None:
    """Why a received request header block (or trailer block) is malformed, or None.

    The checks h2 makes with ``validate_inbound_headers`` on, in one pass instead of a
    chain of seven generators (6 % of the gateway's HTTP/2 CPU per request): field
    characters, connection-specific fields, ``te`` other than ``trailers``, pseudo-header
    fields known, single, first and as the method requires, no pseudo-header in
    trailers, one Host at most and the same as ``:authority``, a ``:path`` not empty.
    A malformed block is a connection error (PROTOCOL_ERROR), as when h2 made the checks.
    """
    pseudo: dict[bytes, bytes] = {}
    regular = False
    host = None
    bad_byte, space = _BAD_VALUE_BYTE.search, _WHITE_SPACE
    name_ok = _FIELD_NAME.fullmatch
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                return "pseudo-header field after a regular field"
            if name not in _REQUEST_PSEUDO or name in pseudo:
                return "unknown or repeated pseudo-header field"
            pseudo[name] = value
        else:
            regular = True
            if name_ok(name) is None:
                return "malformed field name"
            if name in _CONNECTION_FIELDS:
                return "connection-specific field"
            if name == b"te" and value.lower() != b"trailers":
                return "te other than trailers"
            if name == b"host":
                if host is not None and not trailers:
                    return "more than one host"
                host = value
        if value and (value[0] in space or value[-1] in space or bad_byte(value) is not None):
            return "malformed field value"
    if trailers:
        return "pseudo-header field in trailers" if pseudo else None
    method = pseudo.get(b":method")
    if method is None:
        return "no :method"
    if method == b"CONNECT" and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            return "CONNECT with :scheme or :path"
    elif b":scheme" not in pseudo or b":path" not in pseudo:
        return "no :scheme or :path"
    elif b":protocol" in pseudo and method != b"CONNECT":
        return ":protocol without CONNECT"
    authority = pseudo.get(b":authority")
    if authority is None:
        if host is None:
            return "neither :authority nor host"
    elif host is not None and host != authority:
        return ":authority and host differ"
    if pseudo.get(b":path", b"/") == b"":
        return "empty :path"
    return None


# -- receiving: HPACK, the common case inline ---------------------------------------

class HeaderDecoder(Decoder):
    """hpack's decoder with the indexed field (RFC 7541 6.1) decoded inline.

    A client's request fields are mostly in its dynamic table already, each a one-byte
    index: hpack's decode spends some 10 us a field on slicing, tuple classes and debug
    logs around the table lookup.  Here an index is looked up in place; literals and
    table size updates go to hpack's own methods, and every limit stays as hpack sets it
    (the header list size, the table size, a size update only at the start of a block).
    The fields come back as plain (name, value) tuples.
    """

    def decode(self, data: bytes, raw: bool = False):
        if not raw:
            return super().decode(data, raw)
        headers: list[tuple[bytes, bytes]] = []
        get = self.header_table.get_by_index
        view = memoryview(data)
        limit = self.max_header_list_size
        size = 0
        at, end = 0, len(data)
        while at < end:
            first = data[at]
            if first & 0x80:
                if first != 0xFF:
                    field = get(first & 0x7F)
                    at += 1
                else:
                    field, used = self._decode_indexed(view[at:])
                    at += used
            elif first & 0x40:
                field, used = self._decode_literal_index(view[at:])
                at += used
            elif first & 0x20:
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                at += self._update_encoding_context(view[at:])
                continue
            else:
                field, used = self._decode_literal_no_index(view[at:])
                at += used
            headers.append(field)
            size += len(field[0]) + len(field[1]) + 32
            if size > limit:
                raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
        self._assert_valid_table_size()
        return headers


#: hpack's decoder methods HeaderDecoder relies on (else hpack's decoder is kept).
_DECODER_PARTS = ("_decode_indexed", "_decode_literal_index", "_decode_literal_no_index",
                  "_update_encoding_context", "_assert_valid_table_size", "header_table")


# -- sending: HPACK with the dynamic table indexed both ways ---------------------------

_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode
#: (name, value) -> static table index, and name -> its first static index (RFC 7541 A).
_STATIC_FIELDS: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC_FIELDS.setdefault((_name, _value), _index)
    _STATIC_NAMES.setdefault(_name, _index)
del _index, _name, _value
#: Index 62 is the dynamic table's newest entry.
_DYNAMIC_BASE = len(HeaderTable.STATIC_TABLE) + 1
#: Response fields kept out of any compression context (RFC 7541 7.1.3).
_NEVER_INDEXED = frozenset({b"set-cookie", b"authorization", b"proxy-authorization"})
#: Encoded string literals, shared by every connection (the encoding depends on the
#: string alone); cleared when full, and long strings are never kept.
_STRINGS: dict[bytes, bytes] = {}
_STRINGS_MAX = 4096
_STRINGS_MAX_LENGTH = 256


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with ``first``'s flag bits in its first byte."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: Indexed field representations (RFC 7541 6.1) of the indices that fit in one byte.
_INDEXED = [_integer(i, 7, 0x80) for i in range(127)]


def _string(data: bytes) -> bytes:
    """An HPACK string literal (RFC 7541 5.2), Huffman-coded when that is shorter."""
    encoded = _STRINGS.get(data)
    if encoded is None:
        coded = _huffman(data)
        if len(coded) < len(data):
            encoded = _integer(len(coded), 7, 0x80) + coded
        else:
            encoded = _integer(len(data), 7, 0x00) + data
        if len(data) <= _STRINGS_MAX_LENGTH:
            if len(_STRINGS) >= _STRINGS_MAX:
                _STRINGS.clear()
            _STRINGS[data] = encoded
    return encoded


class HeaderEncoder:
    """The HPACK encoder of a connection's responses, in place of hpack's.

    hpack's encoder searches its dynamic table entry by entry for every field and logs
    each step: about 5 us a field, most of the cost of sending a response head.  This
    one keeps the table's entries indexed by field and by name, each numbered by
    insertion, so that a field already in the table (a response's fields mostly are)
    costs a dict lookup: its index is the distance from the newest entry.  Fields are
    added as hpack adds them (RFC 7541 6.2.1), except the never-indexed ones and any
    larger than a quarter of the table, sent as literals that do not evict the rest.

    h2 sets :attr:`header_table_size` from the client's SETTINGS_HEADER_TABLE_SIZE; the
    table shrinks to it, with a size update at the start of the next block (RFC 7541
    4.2), and never grows back (the smaller size stays allowed).
    """

    def __init__(self) -> None:
        self._limit = 4096  # SETTINGS_HEADER_TABLE_SIZE's initial value
        self._max = 4096
        self._size = 0
        self._inserted = 0
        #: (number, name, value, size), oldest first.
        self._entries: deque[tuple[int, bytes, bytes, int]] = deque()
        #: (name, value) and name -> number of the newest entry with it.
        self._fields: dict[tuple[bytes, bytes], int] = {}
        self._names: dict[bytes, int] = {}
        self._resized = False

    @property
    def header_table_size(self) -> int:
        return self._limit

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._limit = value
        if value < self._max:
            self._max = value
            self._evict()
            self._resized = True

    def encode(self, headers, huffman: bool = True) -> bytes:
        """The header block of ``headers``, (name, value) pairs of lower-case bytes."""
        out = []
        if self._resized:
            self._resized = False
            out.append(_integer(self._max, 5, 0x20))
        static, dynamic, indexed = _STATIC_FIELDS, self._fields, _INDEXED
        for field in headers:
            index = static.get(field)
            if index is None:
                number = dynamic.get(field)
                if number is not None:
                    index = _DYNAMIC_BASE + self._inserted - 1 - number
            if index is not None:
                out.append(indexed[index] if index < 127 else _integer(index, 7, 0x80))
                continue
            name, value = field[0], field[1]
            name_index = _STATIC_NAMES.get(name)
            if name_index is None:
                number = self._names.get(name)
                if number is not None:
                    name_index = _DYNAMIC_BASE + self._inserted - 1 - number
            size = len(name) + len(value) + 32
            if name in _NEVER_INDEXED:
                first, bits, add = 0x10, 4, False
            elif size * 4 > self._max:
                first, bits, add = 0x00, 4, False
            else:
                first, bits, add = 0x40, 6, True
            if name_index is None:
                out.append(bytes((first,)) + _string(name) + _string(value))
            else:
                out.append(_integer(name_index, bits, first) + _string(value))
            if add:  # (after the name's index was taken: the decoder adds after reading)
                self._add(name, value, size)
        return b"".join(out)

    def _add(self, name: bytes, value: bytes, size: int) -> None:
        number = self._inserted
        self._inserted += 1
        self._entries.append((number, name, value, size))
        self._size += size
        self._fields[(name, value)] = number
        self._names[name] = number
        self._evict()

    def _evict(self) -> None:
        entries, fields, names = self._entries, self._fields, self._names
        while self._size > self._max:
            number, name, value, size = entries.popleft()
            self._size -= size
            if fields.get((name, value)) == number:
                del fields[(name, value)]
            if names.get(name) == number:
                del names[name]


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

    def __init__(self, gateway, settings, certificates=None, reactor=None) -> None:
        self.gateway = gateway
        self.settings = settings
        self.certificates = certificates
        self.reactor = reactor
        self.alt_svc = gateway.alt_svc
        self.streams: dict[int, _Stream] = {}
        self.transport_paused = False
        self.closed = False
        self._names = None
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
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.encoder = HeaderEncoder()
        stock = self.conn.decoder
        if all(hasattr(stock, part) for part in _DECODER_PARTS):
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
        for call in (self._flush_call, self._idle_timer, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._idle_timer = self._abort_call = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.request.stream_lost()

    def _goaway(self, code) -> None:
        if self.closed:
            return
        try:
            self.conn.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass
        self._flush_wire()
        self._close_transport()

    def _close_transport(self) -> None:
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
            self._abort_call = self.reactor.callLater(GOAWAY_GRACE, self._abort)

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
                         peer=client_ip_of(self.peer), t=self.settings.request_head_timeout)
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
        if self._names is None:
            names, sni = frozenset(), None
            handle = getattr(self.transport, "getHandle", None)
            if self.certificates is not None and handle is not None:
                connection = handle()
                names = self.certificates.names_of_context(connection.get_context())
                sni = server_name(connection)
            self._names, self._sni = names, sni
        return name_covered(self._names, host, self._sni)

    def _request(self, event) -> None:
        stream_id = event.stream_id
        if malformed(event.headers) is not None:
            self._goaway(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        fields, problem = parse_request_head(event.headers, event.stream_ended is not None)
        request = StreamRequest(self, stream_id, **fields, client=self.peer, host=self.local,
                                version=b"HTTP/2", covers=self._covers)
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
                         "(rapid reset guard)", peer=client_ip_of(self.peer), n=self._resets,
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

    def makeConnection(self, transport) -> None:
        self.transport = transport
        self.connected = True
        # A client that never completes the handshake does not hold the socket forever.
        self._timer = self.factory.reactor.callLater(self.factory.handshake_timeout, transport.abortConnection)

    def handshakeCompleted(self) -> None:
        self._choose()

    def _choose(self):
        if self.chosen is not None:
            return self.chosen
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        transport = self.transport
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
        if self.chosen is not None:
            self.chosen.connectionLost(reason)


class NegotiatingFactory(Factory):
    """The protocol factory inside TLS on the HTTPS port: HTTP/2 or HTTP/1.1 by ALPN."""

    def __init__(self, h1_factory, gateway, settings, certificates, reactor) -> None:
        self.h1 = h1_factory
        self.gateway = gateway
        self.settings = settings
        self.certificates = certificates
        self.reactor = reactor
        self.h2_enabled = settings.http2_enabled
        # The handshake is the head of a TLS connection: it gets the request head's deadline.
        self.handshake_timeout = settings.request_head_timeout

    def buildProtocol(self, addr):
        return _Negotiator(self, addr)

    def build_h2(self, addr) -> H2ServerProtocol:
        return H2ServerProtocol(self.gateway, self.settings, self.certificates, self.reactor)

    # The HTTP/1.1 factory's lifecycle follows this one's.
    def doStart(self) -> None:
        self.h1.doStart()

    def doStop(self) -> None:
        self.h1.doStop()
