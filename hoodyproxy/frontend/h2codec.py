"""HTTP/2 header blocks and response frames, cheaply: the malformation check, the HPACK
coders and a connection that packs its own response frames.

h2 validates and normalizes every inbound header block through a chain of generators,
and hpack searches its dynamic table entry by entry and logs every step: together about
a fifth of an HTTP/2 request's CPU.  Here the same work is done in one pass each, and
held to the originals by tests (tests/test_h2_frontend.py, with hypothesis):

- :func:`malformed`: RFC 9113 8.2 and 8.3, what h2's inbound validation refuses;
- :class:`HeaderDecoder`: hpack's decoder with the common one-byte indexed field inline
  (literals, size updates and every limit still hpack's own);
- :class:`HeaderEncoder`: HPACK with the dynamic table indexed by field and by name (the
  same bytes as hpack's encoder);
- :class:`ServerConnection`: h2's connection, its response HEADERS and DATA frames packed
  directly (the same bytes, states and windows as h2's own path), and a request's
  HEADERS frame taken in h2's steps without its wrappers (the same events and states).

Importing this module also quiets two libraries process-wide: hpack's module logger
(debug lines for every field it codes) and h2's ``repr`` of every received frame for a
trace line its default logger drops.
"""

from __future__ import annotations

import binascii
import re
import struct
from collections import deque

import h2.connection
import h2.exceptions
import h2.frame_buffer
import h2.stream
import h2.utilities
import hpack.hpack
import hyperframe.flags
import hyperframe.frame
from hpack import Decoder
from hpack.exceptions import HPACKDecodingError, OversizedHeaderListError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

_ConnectionInputs = h2.connection.ConnectionInputs
_StreamInputs = h2.stream.StreamInputs
try:  # (h2's internals ServerConnection's receiving path calls; another h2: its own path)
    _decode_headers = h2.connection._decode_headers
    _ODD = h2.connection.AllowedStreamIDs.ODD
    _STREAM_OPEN = h2.stream.STREAM_OPEN
    _CLOSED = h2.stream.StreamState.CLOSED
    _is_informational = h2.utilities.is_informational_response
    _SHORT_WAY = all(hasattr(cls, name) for cls, name in (
        (h2.connection.H2Connection, "_begin_new_stream"), (h2.stream.H2Stream, "_initialize_content_length")))
except AttributeError:  # pragma: no cover
    _SHORT_WAY = False


# -- receiving: a request's HEADERS frame without hyperframe's generic parse ----------

_HeadersFrame = hyperframe.frame.HeadersFrame
_Flags = hyperframe.flags.Flags
#: HEADERS's flag names (hyperframe checks what a frame's Flags are given against them).
_HEADERS_FLAG_NAMES = frozenset(flag.name for flag in _HeadersFrame.defined_flags)
#: What a complete HEADERS frame's header block looks like after hyperframe's parse when
#: it has neither padding nor priority: the attributes its constructors set.
_PLAIN_HEADERS = {"pad_length": 0, "depends_on": 0, "stream_weight": 0, "exclusive": False}
try:
    _new = object.__new__
    _FAST_FRAMES = (hasattr(h2.frame_buffer.FrameBuffer, "_validate_frame_length")
                    and set(vars(_HeadersFrame(1))) == {"stream_id", "flags", "body_len", "data", *_PLAIN_HEADERS}
                    and set(vars(_Flags(_HeadersFrame.defined_flags))) == {"_valid_flags", "_flags"}
                    and _HeadersFrame.type == 0x1 and {flag.bit for flag in _HeadersFrame.defined_flags}
                    == {0x01, 0x04, 0x08, 0x20})
except Exception:  # pragma: no cover - another h2 or hyperframe: their own parse
    _FAST_FRAMES = False


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, with a request's usual HEADERS frame made directly.

    A HEADERS frame that is whole in the buffer, has END_HEADERS and neither PADDED nor
    PRIORITY, on a stream other than 0, with no header block pending (a request's, as
    browsers and load generators send it) becomes the HeadersFrame hyperframe's parse
    would make: the same attributes (flags, stream id, length, block; no padding, no
    priority), the same length check first, the same bytes consumed.  hyperframe spends
    about 4 us a request making it through constructors, a flag loop and memoryviews.
    Every other frame, and anything not whole, goes through h2's own ``__next__``.
    """

    def __next__(self):
        data = self._data
        if len(data) >= 9 and data[3] == 0x1 and data[4] & 0x2C == 0x04 and not self._headers_buffer:
            length = data[0] << 16 | data[1] << 8 | data[2]
            stream_id = (data[5] & 0x7F) << 24 | data[6] << 16 | data[7] << 8 | data[8]
            if stream_id and len(data) >= 9 + length:
                self._validate_frame_length(length)
                flags = _new(_Flags)
                flags._valid_flags = _HEADERS_FLAG_NAMES
                flags._flags = {"END_STREAM", "END_HEADERS"} if data[4] & 0x01 else {"END_HEADERS"}
                frame = _new(_HeadersFrame)
                frame.__dict__.update(_PLAIN_HEADERS, stream_id=stream_id, flags=flags, body_len=length,
                                      data=bytes(data[9:9 + length]))
                del data[:9 + length]
                return frame
        return super().__next__()


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
DECODER_PARTS = ("_decode_indexed", "_decode_literal_index", "_decode_literal_no_index",
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


# -- sending: a response's frames without frame objects --------------------------------

#: A frame's 9-byte head: length (24 bits, as 16 + 8), type, flags, stream id.
_FRAME_HEAD = struct.Struct(">HBBBL")
_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9
_END_STREAM, _END_HEADERS = 0x1, 0x4


class ServerConnection(h2.connection.H2Connection):
    """h2's connection with a cheaper way out for a server's response frames.

    h2 sends a response's HEADERS and DATA by building hyperframe objects (a flag set
    each), checking and re-encoding every field as UTF-8 bytes, building header
    validation flags that only its own outbound validation (off here) reads, and joining
    serialized frames: more than half of the h2 library's time on a small request (238 ->
    106 us a request under the profiler, ``python -m bench.profile_h2``).  Here the
    same frames are packed directly, with the same state-machine steps, in the same
    order, and the same windows spent; anything unusual (a client connection, priority,
    padding, a stream h2 does not hold, fields not in a list or not bytes, a memoryview)
    takes h2's own path.  tests/test_h2_frontend.py holds the two to the same bytes and
    state, operation by operation.

    A request's HEADERS frame comes in the same way: h2's steps (the open-stream limit,
    HPACK, the connection's and the new stream's state machines, the content length),
    in h2's order, with h2's errors, without the wrappers a server that leaves fields to
    :func:`malformed` does not need (``is_informational_response`` aside, h2's
    header-validation flags and its copy of the fields through inbound normalization
    and validation, both off here).  tests/test_h2_frontend.py holds the two to the same
    events, errors, states and bytes, frame by frame.  Before that, its receive buffer
    (:class:`_FrameBuffer`) makes such a frame without hyperframe's generic parse.
    """

    def __init__(self, config=None) -> None:
        super().__init__(config=config)
        if _FAST_FRAMES and self.incoming_buffer.__class__ is h2.frame_buffer.FrameBuffer:
            self.incoming_buffer.__class__ = _FrameBuffer
        #: The configuration whose options allow :meth:`_receive_headers_frame`'s short
        #: way (read once: h2's options are descriptors, a call each): a server's, with
        #: inbound normalization and validation off and fields left as bytes.
        self._plain_config = config if (
            _SHORT_WAY and config is not None and not config.client_side and not config.normalize_inbound_headers
            and not config.validate_inbound_headers and not isinstance(config.header_encoding, str)) else None

    def _open_streams(self, remainder: int) -> int:
        """h2's count of the open streams whose id is ``remainder`` modulo 2, forgetting
        the closed ones as it goes: each stream's state read once, not through the
        ``open`` and ``closed`` properties (h2 counts on every new stream)."""
        if not _SHORT_WAY:  # pragma: no cover
            return super()._open_streams(remainder)
        count = 0
        to_delete = []
        for stream_id, stream in self.streams.items():
            state = stream.state_machine.state
            if _STREAM_OPEN[state] and stream_id % 2 == remainder:
                count += 1
            elif state == _CLOSED:
                to_delete.append(stream_id)
        for stream_id in to_delete:
            stream = self.streams.pop(stream_id)
            self._closed_streams[stream_id] = stream.closed_by
        return count

    def _receive_headers_frame(self, frame):
        stream_id = frame.stream_id
        flags = frame.flags
        if self.config is not self._plain_config or stream_id in self.streams or "PRIORITY" in flags:
            # (trailers, a client's connection, priority, options that change the fields)
            return super()._receive_headers_frame(frame)
        max_open_streams = self.local_settings.max_concurrent_streams
        value = self._open_streams(1)  # (h2's open_inbound_streams for a server)
        if value + 1 > max_open_streams:
            raise h2.exceptions.TooManyStreamsError(f"Max inbound streams is {max_open_streams}, {value} open")
        headers = _decode_headers(self.decoder, frame.data)
        events = self.state_machine.process_input(_ConnectionInputs.RECV_HEADERS)
        stream = self._begin_new_stream(stream_id, _ODD)
        end_stream = "END_STREAM" in flags
        if _is_informational(headers):  # (h2 refuses it: a new stream cannot take one)
            frames, stream_events = stream.receive_headers(headers, end_stream, self.config.header_encoding)
            return frames, events + stream_events
        # H2Stream.receive_headers for a request
        machine = stream.state_machine
        stream_events = machine.process_input(_StreamInputs.RECV_HEADERS)
        if end_stream:
            ended = machine.process_input(_StreamInputs.RECV_END_STREAM)
            stream_events[0].stream_ended = ended[0]
            stream_events += ended
        stream._initialize_content_length(headers)
        # (a new stream's first block is never trailers; h2 hands over a list of its own)
        stream_events[0].headers = list(headers)
        return [], events + stream_events

    def send_headers(self, stream_id, headers, end_stream=False, priority_weight=None,
                     priority_depends_on=None, priority_exclusive=None) -> None:
        stream = self.streams.get(stream_id)
        if (stream is None or type(headers) is not list or not headers or self.config.client_side
                or priority_weight is not None
                or priority_depends_on is not None or priority_exclusive is not None):
            return super().send_headers(stream_id, headers, end_stream, priority_weight,
                                        priority_depends_on, priority_exclusive)
        informational = method = None
        for name, value in headers:
            if type(name) is not bytes or type(value) is not bytes:
                return super().send_headers(stream_id, headers, end_stream)
            if informational is None and (name[:1] != b":" or name == b":status"):
                # (h2's is_informational_response: the first :status, or no pseudo-field)
                informational = name == b":status" and value[:1] == b"1"
            if method is None and name == b":method":
                method = value  # (h2's extract_method_header)
        self.state_machine.process_input(_ConnectionInputs.SEND_HEADERS)
        machine = stream.state_machine
        if informational:
            if end_stream:
                raise h2.exceptions.ProtocolError("Cannot set END_STREAM on informational responses.")
            machine.process_input(_StreamInputs.SEND_INFORMATIONAL_HEADERS)
        else:
            machine.process_input(_StreamInputs.SEND_HEADERS)
        block = self.encoder.encode(headers)
        flags = 0
        if end_stream:
            machine.process_input(_StreamInputs.SEND_END_STREAM)
            flags = _END_STREAM
        if machine.trailers_sent and not end_stream:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
        stream.request_method = method
        out = self._data_to_send
        step = stream.max_outbound_frame_size
        if len(block) <= step:
            size = len(block)
            out += _FRAME_HEAD.pack(size >> 8, size & 0xFF, _HEADERS, flags | _END_HEADERS, stream_id)
            out += block
            return
        pieces = [block[start:start + step] for start in range(0, len(block), step)]
        last = len(pieces) - 1
        kind = _HEADERS
        for index, piece in enumerate(pieces):
            size = len(piece)
            if index == last:
                flags |= _END_HEADERS
            out += _FRAME_HEAD.pack(size >> 8, size & 0xFF, kind, flags, stream_id)
            out += piece
            kind, flags = _CONTINUATION, 0

    def send_data(self, stream_id, data, end_stream=False, pad_length=None) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or pad_length is not None or type(data) is not bytes:
            return super().send_data(stream_id, data, end_stream, pad_length)
        size = len(data)
        if size > 0 and size > min(self.outbound_flow_control_window, stream.outbound_flow_control_window):
            return super().send_data(stream_id, data, end_stream)  # (h2 raises FlowControlError)
        if size > self.max_outbound_frame_size:
            return super().send_data(stream_id, data, end_stream)  # (h2 raises FrameTooLargeError)
        self.state_machine.process_input(_ConnectionInputs.SEND_DATA)
        machine = stream.state_machine
        machine.process_input(_StreamInputs.SEND_DATA)
        flags = 0
        if end_stream:
            machine.process_input(_StreamInputs.SEND_END_STREAM)
            flags = _END_STREAM
        stream.outbound_flow_control_window -= size
        out = self._data_to_send
        out += _FRAME_HEAD.pack(size >> 8, size & 0xFF, _DATA, flags, stream_id)
        out += data
        self.outbound_flow_control_window -= size
