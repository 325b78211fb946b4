"""The HTTP/2 frontend's own header handling, in memory: the request fields the gateway
reads (:class:`~hoodyproxy.frontend.fields.Fields`), the malformed-block checks made in
place of h2's, and the HPACK coders that stand in for hpack's on the hot path.

Each replacement is held to what it replaces on random input (hypothesis): the checks to
h2's ``validate_headers``, the encoder to hpack's decoder, the decoder to hpack's, and
the connection's direct response frames to h2's own (the same bytes, states and windows).
"""

from __future__ import annotations

import re

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.utilities
import hyperframe.frame
from hpack import Decoder, Encoder
from hpack.exceptions import HPACKError
from hypothesis import example, given, settings as hsettings, strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from hoodyproxy.frontend.fields import Fields
from hoodyproxy.frontend.h2codec import HeaderDecoder, HeaderEncoder, ServerConnection, malformed
from hoodyproxy.frontend.http2 import H2ServerProtocol
from hoodyproxy.frontend.stream import parse_request_head

AUTHORITY = b"app.example.test"
GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", AUTHORITY)]


class FieldsTests(unittest.TestCase):
    """Fields answers the three questions the gateway asks as twisted's Headers did."""

    PAIRS = [(b"accept", b"*/*"), (b"x-a", b"1"), (b"cookie", b"a=b"), (b"X-A", b"2"), (b"host", b"h")]

    def test_lookups_ignore_case_and_keep_order(self):
        """getRawHeaders: every value of a name in any case, in the order received."""
        fields = Fields(list(self.PAIRS))
        self.assertEqual(fields.getRawHeaders(b"x-a"), [b"1", b"2"])
        self.assertEqual(fields.getRawHeaders(b"X-a"), [b"1", b"2"])
        self.assertIsNone(fields.getRawHeaders(b"authorization"))
        self.assertEqual(fields.getRawHeaders(b"authorization", []), [])
        self.assertTrue(fields.hasHeader(b"COOKIE"))
        self.assertFalse(fields.hasHeader(b"upgrade"))

    def test_all_fields_grouped_like_headers(self):
        """getAllRawHeaders: one entry per name, first-seen order, values as Headers has them
        (names keep the client's spelling; Headers re-capitalizes them)."""
        headers = Headers()
        for name, value in self.PAIRS:
            headers.addRawHeader(name, value)
        expected = [(name.lower(), list(values)) for name, values in headers.getAllRawHeaders()]
        got = [(name.lower(), list(values)) for name, values in Fields(list(self.PAIRS)).getAllRawHeaders()]
        self.assertEqual(got, expected)
        self.assertEqual([name for name, _ in Fields(list(self.PAIRS)).getAllRawHeaders()],
                         [b"accept", b"x-a", b"cookie", b"host"])

    @hsettings(max_examples=500, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from([b"Host", b"host", b"HOST", b"X-A", b"x-a", b"x_a", b"Connection",
                                               b"cookie", b"Content-Length"]),
                              st.sampled_from([b"1", b"2", b"", b"close"])), max_size=8),
           st.sampled_from(["pairs", "frontend", "behind"]))
    def test_every_way_of_building_answers_like_headers(self, pairs, way):
        """Fields built from a list, as the HTTP/1.1 frontend builds them (each pair with its
        lower-case name), or with pairs appended without their names, answers every lookup
        as twisted's Headers does."""
        if way == "pairs":
            fields = Fields(list(pairs))
        else:
            fields = Fields()
            for name, value in pairs:
                fields.pairs.append((name, value))
                if way == "frontend":
                    fields.lnames.append(name.lower())
        headers = Headers()
        for name, value in pairs:
            headers.addRawHeader(name, value)
        for name in (b"host", b"HOST", b"x-a", b"x_a", b"connection", b"cookie", b"content-length", b"absent"):
            self.assertEqual(fields.getRawHeaders(name), headers.getRawHeaders(name), (name, way))
            self.assertEqual(fields.hasHeader(name), headers.hasHeader(name), (name, way))
        self.assertEqual(fields.lower_names(), [name.lower() for name, _ in pairs])
        self.assertEqual([(n.lower(), list(v)) for n, v in fields.getAllRawHeaders()],
                         [(n.lower(), list(v)) for n, v in headers.getAllRawHeaders()])


_FLAGS = h2.utilities.HeaderValidationFlags(is_client=False, is_trailer=False, is_response_header=False,
                                            is_push_promise=False)
_TRAILER_FLAGS = h2.utilities.HeaderValidationFlags(is_client=False, is_trailer=True, is_response_header=False,
                                                    is_push_promise=False)


def _h2_rejects(headers, flags=_FLAGS) -> bool:
    try:
        list(h2.utilities.validate_headers(headers, flags))
    except h2.exceptions.ProtocolError:
        return True
    return False


_names = st.sampled_from([b":method", b":scheme", b":path", b":authority", b":protocol", b":status", b":x",
                          b"host", b"te", b"connection", b"upgrade", b"accept", b"x-y", b"X-Y", b"a b",
                          b"a:b", b"", b"\xff", b"a\"b", b"cookie"])
_values = st.sampled_from([b"GET", b"CONNECT", b"https", b"/", b"", AUTHORITY, b"other.test", b"trailers",
                           b"gzip", b" x", b"x\t", b"a\rb", b"a\nb", b"a\x00b", b"websocket", b"v a l"])


class MalformedTests(unittest.TestCase):
    """malformed() refuses exactly what h2's inbound validation refused."""

    def test_well_formed_requests(self):
        """A GET, a GET with Host equal to :authority, a plain and an extended CONNECT."""
        for headers in (GET + [(b"user-agent", b"x"), (b"te", b"Trailers")],
                        GET + [(b"host", AUTHORITY)],
                        [(b":method", b"CONNECT"), (b":authority", AUTHORITY)],
                        [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                         (b":path", b"/chat"), (b":authority", AUTHORITY)]):
            self.assertIsNone(malformed(headers), headers)

    def test_each_rule(self):
        """One header block per rule, each refused."""
        cases = {
            "uppercase name": GET + [(b"User-Agent", b"x")],
            "space in a name": GET + [(b"a b", b"x")],
            "colon in a name": GET + [(b"a:b", b"x")],
            "empty name": GET + [(b"", b"x")],
            "CR in a value": GET + [(b"x-a", b"a\r\nx-b: c")],
            "LF in a value": GET + [(b"x-a", b"a\nb")],
            "NUL in a value": GET + [(b"x-a", b"a\x00b")],
            "leading space": GET + [(b"x-a", b" a")],
            "trailing tab": GET + [(b"x-a", b"a\t")],
            "connection": GET + [(b"connection", b"close")],
            "transfer-encoding": GET + [(b"transfer-encoding", b"chunked")],
            "te gzip": GET + [(b"te", b"gzip")],
            "pseudo after regular": GET[:3] + [(b"accept", b"*/*"), (b":authority", AUTHORITY)],
            "unknown pseudo": GET + [(b":x", b"1")],
            "response pseudo": GET + [(b":status", b"200")],
            "repeated pseudo": GET + [(b":path", b"/again")],
            "no method": GET[1:],
            "no path": [h for h in GET if h[0] != b":path"],
            "empty path": [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b""), (b":authority", AUTHORITY)],
            ":protocol on GET": GET + [(b":protocol", b"websocket")],
            "plain CONNECT with a path": [(b":method", b"CONNECT"), (b":path", b"/"), (b":authority", AUTHORITY)],
            "no authority or host": GET[:3],
            "two hosts": GET[:3] + [(b"host", AUTHORITY), (b"host", AUTHORITY)],
            "host differs": GET + [(b"host", b"other.test")],
        }
        for label, headers in cases.items():
            self.assertIsNotNone(malformed(headers), label)
            self.assertTrue(_h2_rejects(headers), label)  # (h2 refused it too)

    def test_trailers(self):
        """A trailer block: no pseudo-header field, the same character rules."""
        self.assertIsNone(malformed([(b"x-checksum", b"abc")], trailers=True))
        self.assertIsNotNone(malformed([(b":path", b"/")], trailers=True))
        self.assertIsNotNone(malformed([(b"x-a", b"a\nb")], trailers=True))

    @hsettings(max_examples=500, deadline=None)
    @given(st.lists(st.tuples(_names, _values), max_size=8), st.booleans(), st.booleans())
    def test_same_verdict_as_h2(self, fields, trailers, prefixed):
        """On random blocks (requests, some starting as a GET does, and trailers), refused
        by malformed() if and only if h2 refused them."""
        headers = GET[:2] + fields if prefixed and not trailers else fields
        flags = _TRAILER_FLAGS if trailers else _FLAGS
        self.assertEqual(malformed(headers, trailers=trailers) is not None, _h2_rejects(headers, flags), headers)


class ParseRequestHeadTests(unittest.TestCase):
    def test_field_name_not_a_token_is_400(self):
        """A name HTTP/2 allows but HTTP/1.1 cannot carry (``"``): 400, never forwarded."""
        fields, problem = parse_request_head(GET + [(b'a"b', b"x")], True)
        self.assertEqual(problem.status, 400)
        self.assertEqual(problem.reason, "bad header name")


_response_fields = st.lists(st.tuples(
    st.sampled_from([b":status", b"server", b"date", b"content-type", b"content-length", b"etag", b"x-a",
                     b"x-" + b"b" * 40, b"set-cookie", b"cache-control"]),
    st.one_of(st.sampled_from([b"200", b"404", b"nginx", b"text/plain", b"12", b"", b"bytes"]),
              st.binary(max_size=1300))), min_size=1, max_size=12)


class HeaderEncoderTests(unittest.TestCase):
    """The response encoder: what hpack's decoder reads back is what was encoded."""

    @hsettings(max_examples=150, deadline=None)
    @given(st.lists(st.tuples(_response_fields, st.sampled_from([None, None, None, 0, 64, 256, 1000, 4096])),
                    min_size=1, max_size=30))
    def test_round_trip(self, blocks):
        """Blocks in sequence, with table size changes between them, decode as sent, and
        both tables stay the same size."""
        encoder, decoder = HeaderEncoder(), Decoder()
        for fields, table_size in blocks:
            if table_size is not None:
                decoder.max_allowed_table_size = min(decoder.max_allowed_table_size, table_size)
                encoder.header_table_size = table_size
            decoded = decoder.decode(encoder.encode(fields), raw=True)
            self.assertEqual([tuple(f) for f in decoded], fields)
            self.assertEqual(decoder.header_table._current_size, encoder._size)

    def test_repeated_fields_are_indexed(self):
        """A response head sent again is a byte per field."""
        fields = [(b":status", b"200"), (b"server", b"nginx"), (b"content-type", b"text/plain"),
                  (b"x-request-kind", b"small")]
        encoder = HeaderEncoder()
        encoder.encode(fields)
        self.assertEqual(len(encoder.encode(fields)), len(fields))

    def test_set_cookie_is_never_indexed(self):
        """A set-cookie goes as a never-indexed literal, again the second time."""
        encoder, decoder = HeaderEncoder(), Decoder()
        for _ in range(2):
            block = encoder.encode([(b"set-cookie", b"session=secret")])
            self.assertEqual(block[0] & 0xF0, 0x10)
            decoder.decode(block, raw=True)
        self.assertEqual(decoder.header_table._current_size, 0)


_SERVER_CONFIG = dict(client_side=False, header_encoding=None, validate_outbound_headers=False,
                      normalize_outbound_headers=False, validate_inbound_headers=False,
                      normalize_inbound_headers=False)

#: Response-side header blocks: a final head, an informational one, trailers, fields that
#: are not bytes (h2 encodes them), and one past a 16 KiB frame (CONTINUATION).
_send_blocks = st.one_of(
    st.builds(lambda status, rest: [(b":status", status)] + rest,
              st.sampled_from([b"200", b"204", b"404", b"100", b"103", b"1"]), _response_fields),
    _response_fields,
    st.just([(b":status", b"200"), (b"x-big", b"v" * 20000)]),
    st.just([(b":status", b"200"), (b":method", b"GET"), (b"server", b"x")]),
    st.just([(":status", "200"), ("server", "str")]),
    st.just([]))

_operations = st.lists(st.one_of(
    st.tuples(st.just("headers"), st.integers(0, 3), _send_blocks, st.booleans()),
    st.tuples(st.just("data"), st.integers(0, 3), st.sampled_from([0, 1, 12, 100, 16384, 16385, 70000]),
              st.booleans(), st.sampled_from(["bytes", "bytes", "memoryview", "padded"])),
    st.tuples(st.just("window"), st.integers(-1, 3), st.sampled_from([1, 100, 65535])),
    st.tuples(st.just("reset"), st.integers(0, 3))), max_size=25)


class ServerConnectionTests(unittest.TestCase):
    """:class:`ServerConnection` sends a response's frames itself: held to h2's own path,
    operation by operation, on the same connection history."""

    def _pair(self, window: int, frame_size: int):
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
                                h2.settings.SettingCodes.MAX_FRAME_SIZE: frame_size})
        servers = []
        for kind in (h2.connection.H2Connection, ServerConnection):
            server = kind(h2.config.H2Configuration(**_SERVER_CONFIG))
            server.encoder = HeaderEncoder()
            server.initiate_connection()
            servers.append(server)
        return client, servers

    @staticmethod
    def _state(server) -> tuple:
        streams = {sid: (s.state_machine.state, s.outbound_flow_control_window, s.request_method,
                         s.state_machine.headers_sent, s.state_machine.trailers_sent)
                   for sid, s in server.streams.items()}
        return (server.state_machine.state, server.outbound_flow_control_window, streams,
                server.data_to_send())

    @staticmethod
    def _apply(server, op, ids):
        kind = op[0]
        if kind == "headers":
            server.send_headers(ids[op[1]], op[2], end_stream=op[3])
        elif kind == "data":
            _, index, size, end, form = op
            data = b"d" * size
            if form == "memoryview":
                server.send_data(ids[index], memoryview(data), end_stream=end)
            elif form == "padded":
                server.send_data(ids[index], data, end_stream=end, pad_length=3)
            else:
                server.send_data(ids[index], data, end_stream=end)
        elif kind == "reset":
            server.reset_stream(ids[op[1]])

    @hsettings(max_examples=300, deadline=None)
    @given(st.sampled_from([100, 65535, 1 << 20]), st.sampled_from([16384, 20000]),
           st.lists(st.booleans(), min_size=4, max_size=4), _operations)
    def test_same_as_h2(self, window, frame_size, ended, operations):
        """Every operation raises what h2 raises (or nothing) and leaves the same bytes
        to send, the same stream states, windows and request methods."""
        client, servers = self._pair(window, frame_size)
        ids = []
        for end in ended:
            stream_id = client.get_next_available_stream_id()
            client.send_headers(stream_id, GET, end_stream=end)
            ids.append(stream_id)
        wire = client.data_to_send()
        for server in servers:
            server.receive_data(wire)
        self.assertEqual(self._state(servers[0]), self._state(servers[1]))
        for op in operations:
            if op[0] == "window":
                _, index, size = op
                client.increment_flow_control_window(size, None if index < 0 else ids[index])
                wire = client.data_to_send()
                outcomes = []
                for server in servers:
                    try:
                        server.receive_data(wire)
                        outcomes.append(None)
                    except h2.exceptions.ProtocolError as e:
                        outcomes.append(type(e))
            else:
                outcomes = []
                for server in servers:
                    try:
                        self._apply(server, op, ids)
                        outcomes.append(None)
                    except Exception as e:  # (whatever h2 raises, an empty block's IndexError too)
                        outcomes.append(type(e))
            self.assertEqual(outcomes[0], outcomes[1], op)
            self.assertEqual(self._state(servers[0]), self._state(servers[1]), op)

    def test_blocks_of_whole_frames(self):
        """A block exactly one or two frames long ends its last frame, no empty one after."""
        def block_length(n: int) -> int:  # (0xff costs more in Huffman: sent as it is)
            return len(HeaderEncoder().encode([(b":status", b"200"), (b"x-big", b"\xff" * n)]))

        for frames in (1, 2):
            near = 16384 * frames - 16  # (the length's own encoding is as long here as at the answer)
            value_length = 16384 * frames - (block_length(near) - near)
            self.assertEqual(block_length(value_length), 16384 * frames)
            client, servers = self._pair(65535, 16384)
            client.send_headers(1, GET, end_stream=True)
            wire = client.data_to_send()
            for server in servers:
                server.receive_data(wire)
                server.send_headers(1, [(b":status", b"200"), (b"x-big", b"\xff" * value_length)])
            self.assertEqual(self._state(servers[0]), self._state(servers[1]))

    def test_a_response_is_two_frames_the_client_reads(self):
        """HEADERS then DATA with END_STREAM, as h2's client reads them."""
        client, (_, server) = self._pair(65535, 16384)
        client.send_headers(1, GET, end_stream=True)
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        server.send_headers(1, [(b":status", b"200"), (b"content-length", b"5")])
        server.send_data(1, b"hello", end_stream=True)
        events = client.receive_data(server.data_to_send())
        self.assertEqual([type(e) for e in events],
                         [h2.events.ResponseReceived, h2.events.DataReceived, h2.events.StreamEnded])
        self.assertEqual(events[0].headers, [(b":status", b"200"), (b"content-length", b"5")])
        self.assertEqual(events[1].data, b"hello")


#: Request-side header blocks a client may send: usual requests, bodies announced or not,
#: HEAD, Content-Length bad or conflicting, a :status (informational or not), trailers,
#: an empty block.
_GET_BLOCK = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", AUTHORITY)]
_receive_blocks = st.sampled_from([
    _GET_BLOCK,
    _GET_BLOCK + [(b"user-agent", b"h2load"), (b"accept", b"*/*")],
    [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/up"), (b":authority", AUTHORITY),
     (b"content-length", b"5")],
    [(b":method", b"HEAD"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", AUTHORITY),
     (b"content-length", b"9")],
    _GET_BLOCK + [(b"content-length", b"x1")],
    _GET_BLOCK + [(b"content-length", b"3"), (b"content-length", b"4")],
    _GET_BLOCK + [(b"content-length", b"0"), (b"content-length", b"0")],
    [(b":status", b"100")] + _GET_BLOCK,
    [(b":status", b"200")] + _GET_BLOCK,
    [(b"grpc-status", b"0")],
    [(b"x-trailer", b"1")],
    [],
])

#: A client's frames: HEADERS (a stream, a block, END_STREAM, PRIORITY, padding, the
#: block cut into CONTINUATIONs), DATA, RST_STREAM, a broken HPACK block.
_client_frames = st.lists(st.one_of(
    st.tuples(st.just("headers"), st.sampled_from([1, 3, 5, 7, 9, 11, 2, 1, 3]), _receive_blocks, st.booleans(),
              st.sampled_from([False, False, True]), st.sampled_from([0, 0, 4]), st.sampled_from([0, 0, 7])),
    st.tuples(st.just("data"), st.sampled_from([1, 3, 5, 7]), st.sampled_from([0, 3, 5, 9]), st.booleans()),
    st.tuples(st.just("rst"), st.sampled_from([1, 3, 5, 7])),
    st.tuples(st.just("garbled"), st.sampled_from([13, 15]))), min_size=1, max_size=14)


class ServerConnectionReceiveTests(unittest.TestCase):
    """:class:`ServerConnection` takes a request's HEADERS frame in h2's steps without its
    wrappers: held to h2's own connection, frame by frame, on the same bytes."""

    @staticmethod
    def _servers(max_streams: int) -> list:
        servers = []
        for kind in (h2.connection.H2Connection, ServerConnection):
            server = kind(h2.config.H2Configuration(**_SERVER_CONFIG))
            server.decoder = HeaderDecoder(max_header_list_size=server.decoder.max_header_list_size)
            server.local_settings = h2.settings.Settings(client=False, initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
            server.initiate_connection()
            servers.append(server)
        return servers

    @staticmethod
    def _frames(op, encoder) -> bytes:
        kind = op[0]
        if kind == "headers":
            _, stream_id, fields, end, priority, padding, cut = op
            block = encoder.encode(fields)
            head = hyperframe.frame.HeadersFrame(stream_id)
            flags = {"END_STREAM"} if end else set()
            if priority:
                flags.add("PRIORITY")
                head.depends_on, head.stream_weight = 0, 15
            if padding:
                flags.add("PADDED")
                head.pad_length = padding
            if cut and len(block) > cut:
                head.data = block[:cut]
                head.flags = flags
                rest = hyperframe.frame.ContinuationFrame(stream_id, block[cut:])
                rest.flags.add("END_HEADERS")
                return head.serialize() + rest.serialize()
            head.data = block
            head.flags = flags | {"END_HEADERS"}
            return head.serialize()
        if kind == "data":
            _, stream_id, size, end = op
            frame = hyperframe.frame.DataFrame(stream_id, b"d" * size)
            if end:
                frame.flags.add("END_STREAM")
            return frame.serialize()
        if kind == "rst":
            return hyperframe.frame.RstStreamFrame(op[1], error_code=8).serialize()
        frame = hyperframe.frame.HeadersFrame(op[1], b"\xff\xff\xff\xff\xff")  # (an index past any table)
        frame.flags.add("END_HEADERS")
        return frame.serialize()

    @classmethod
    def _requests(cls, stream_ids, end_stream: bool) -> bytes:
        """A client's preface and a GET's HEADERS frame on each of ``stream_ids``."""
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        encoder = Encoder()
        return client.data_to_send() + b"".join(
            cls._frames(("headers", sid, _GET_BLOCK, end_stream, False, 0, 0), encoder) for sid in stream_ids)

    @classmethod
    def _events(cls, events) -> list:
        # (values by repr: a settings change holds objects that do not compare equal)
        return [(type(e).__name__, sorted((k, cls._events([v])[0] if isinstance(v, h2.events.Event) else repr(v))
                                          for k, v in vars(e).items())) for e in events]

    @staticmethod
    def _state(server) -> tuple:
        streams = {sid: (s.state_machine.state, s.state_machine.client, s.state_machine.headers_received,
                         s.state_machine.trailers_received, s.state_machine.stream_closed_by,
                         s._expected_content_length, s._actual_content_length, s.inbound_flow_control_window,
                         s.outbound_flow_control_window, s.max_outbound_frame_size)
                   for sid, s in server.streams.items()}
        return (server.state_machine.state, server.highest_inbound_stream_id, streams,
                dict(server._closed_streams), server.inbound_flow_control_window, server.data_to_send())

    @hsettings(max_examples=400, deadline=None)
    @given(st.sampled_from([1, 2, 100]), _client_frames)
    def test_same_as_h2(self, max_streams, ops):
        """Every frame gives the events h2 gives (or the error h2 raises), and leaves the
        same streams, states, windows, closed streams and bytes to send."""
        servers = self._servers(max_streams)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        preface = client.data_to_send()
        for server in servers:
            server.receive_data(preface)
        self.assertEqual(self._state(servers[0]), self._state(servers[1]))
        encoder = Encoder()
        for op in ops:
            wire = self._frames(op, encoder)
            outcomes = []
            for server in servers:
                try:
                    outcomes.append(self._events(server.receive_data(wire)))
                except h2.exceptions.ProtocolError as e:
                    outcomes.append((type(e), re.sub(r"0x[0-9a-f]+", "0x", str(e))))  # (a buffer's address)
            self.assertEqual(outcomes[0], outcomes[1], op)
            self.assertEqual(self._state(servers[0]), self._state(servers[1]), op)
            if isinstance(outcomes[0], tuple):
                break  # (the connection is over for both)

    def test_requests_take_the_short_way(self):
        """The usual request does not reach h2's own receive_headers (this test fails if the
        short way is lost), and gives what h2's gives."""
        calls = []
        original = h2.stream.H2Stream.receive_headers

        def counted(stream, *args, **kwargs):
            calls.append(stream.stream_id)
            return original(stream, *args, **kwargs)

        self.patch(h2.stream.H2Stream, "receive_headers", counted)
        stock, server = self._servers(100)
        wire = self._requests((1, 3, 5), end_stream=True)
        mine = server.receive_data(wire)
        self.assertEqual(calls, [])
        theirs = stock.receive_data(wire)
        self.assertEqual(calls, [1, 3, 5])
        self.assertEqual(self._events(mine), self._events(theirs))
        self.assertEqual([type(e) for e in mine if not isinstance(e, h2.events.RemoteSettingsChanged)],
                         [h2.events.RequestReceived, h2.events.StreamEnded] * 3)
        self.assertEqual(mine[-2].headers, _GET_BLOCK)

    def test_too_many_streams_refused_as_h2_does(self):
        """The third open stream on a connection that allows two is a connection error,
        as with h2, and both are left in the same state."""
        stock, server = self._servers(2)
        wire = self._requests((1, 3, 5), end_stream=False)
        for conn in (stock, server):
            with self.assertRaises(h2.exceptions.TooManyStreamsError):
                conn.receive_data(wire)
        self.assertEqual(self._state(stock), self._state(server))


#: A frame as raw bytes: any type (HEADERS mostly), flags, stream id (0 and the reserved
#: bit included), a length that may exceed the limit, and its body whole (None) or cut
#: or run on into the next frame's bytes.
_raw_frames = st.tuples(st.sampled_from([0x1, 0x1, 0x1, 0x9, 0x0]),
                        st.one_of(st.sampled_from([0x4, 0x5, 0x0, 0x1]), st.integers(0, 255)),
                        st.sampled_from([0, 1, 3, 0x80000001, 2**31 - 1]), st.integers(0, 300),
                        st.one_of(st.none(), st.none(), st.integers(0, 310)))


def _raw(kind: int, flags: int, stream_id: int, length: int, given: int | None) -> bytes:
    return (length.to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big")
            + bytes(range(256)) * 2)[:9 + (length if given is None else given)]


class FrameBufferTests(unittest.TestCase):
    """The receive buffer makes a request's usual HEADERS frame itself: the frame, error
    or wait hyperframe's parse gives, and the same bytes consumed."""

    @staticmethod
    def _buffers(max_frame_size: int) -> list:
        buffers = [h2.connection.H2Connection(h2.config.H2Configuration(client_side=False)).incoming_buffer,
                   ServerConnection(h2.config.H2Configuration(**_SERVER_CONFIG)).incoming_buffer]
        for buffer in buffers:
            buffer._preamble_len = 0
            buffer.max_frame_size = max_frame_size
        return buffers

    @staticmethod
    def _take(buffer) -> list:
        taken = []
        while True:
            try:
                frame = next(buffer)
            except StopIteration:
                taken.append("wait")
                break
            except h2.exceptions.ProtocolError as e:
                taken.append(("error", type(e).__name__, str(e)))
                break
            state = dict(vars(frame), flags=sorted(frame.flags))
            taken.append((type(frame).__name__, sorted(state.items())))
        return taken + [bytes(buffer._data), len(buffer._headers_buffer)]

    @hsettings(max_examples=500, deadline=None)
    @given(st.lists(_raw_frames, min_size=1, max_size=4), st.sampled_from([16384, 100, 0]),
           st.integers(1, 40))
    # (a whole HEADERS frame while a header block waits for its CONTINUATION: an error)
    @example([(0x1, 0x0, 1, 10, None), (0x1, 0x4, 1, 10, None)], 16384, 40)
    @example([(0x1, 0x1, 3, 10, None), (0x1, 0x5, 5, 10, None)], 16384, 7)
    def test_same_as_hyperframe(self, frames, max_frame_size, piece):
        """Frames fed in pieces of ``piece`` bytes give, piece by piece, what h2's buffer
        gives: frames with the same attributes and flags, the same errors, the same waits."""
        wire = b"".join(_raw(*frame) for frame in frames)
        buffers = self._buffers(max_frame_size)
        for at in range(0, len(wire), piece):
            outcomes = []
            for buffer in buffers:
                buffer.add_data(wire[at:at + piece])
                outcomes.append(self._take(buffer))
            self.assertEqual(outcomes[0], outcomes[1], (frames, at))
            if outcomes[0][-3][0] == "error":
                break  # (the connection is over for both)

    def test_the_usual_headers_frame_skips_hyperframes_parse(self):
        """A GET's HEADERS frame is made without HeadersFrame's constructor or parse (this
        test fails if the short way is lost); a padded one still takes them."""
        calls = []
        original = hyperframe.frame.HeadersFrame.parse_body

        def counted(frame, data):
            calls.append(frame.stream_id)
            return original(frame, data)

        self.patch(hyperframe.frame.HeadersFrame, "parse_body", counted)
        stock, mine = self._buffers(16384)
        usual = _raw(0x1, 0x5, 3, 20, 20)
        padded = _raw(0x1, 0xD, 5, 20, 20)
        for buffer in (stock, mine):
            buffer.add_data(usual + padded)
        self.assertEqual(self._take(stock), self._take(mine))
        self.assertEqual(calls, [3, 5, 5])


def _blocks(draw_fields):
    return st.lists(st.tuples(draw_fields, st.booleans(), st.sampled_from([None, None, 0, 100, 4096, 8192]),
                              st.one_of(st.none(), st.tuples(st.integers(0, 400), st.integers(0, 255)))),
                    min_size=1, max_size=15)


_request_fields = st.lists(st.tuples(
    st.sampled_from([b":method", b":path", b"user-agent", b"cookie", b"x-a", b"x-" + b"b" * 40, b"accept"]),
    st.one_of(st.sampled_from([b"GET", b"/", b"curl", b"a=b", b"", b"*/*"]), st.binary(max_size=600))),
    min_size=1, max_size=10)


class HeaderDecoderTests(unittest.TestCase):
    """The request decoder: the same fields, or the same error, as hpack's."""

    @staticmethod
    def _decode_all(decoder, blocks, list_limit, table_limit):
        decoder.max_header_list_size = list_limit
        decoder.max_allowed_table_size = table_limit
        out = []
        for block in blocks:
            try:
                out.append([tuple(f) for f in decoder.decode(block, raw=True)])
            except (HPACKError, IndexError, TypeError) as e:  # (what h2 turns into a ProtocolError)
                out.append(type(e).__name__)
                break
        return out

    @hsettings(max_examples=200, deadline=None)
    @given(_blocks(_request_fields), st.sampled_from([65536, 1500]), st.sampled_from([4096, 100]))
    def test_same_as_hpack(self, spec, list_limit, table_limit):
        """Blocks from hpack's encoder (some Huffman-coded, some with a table size update,
        some with a byte changed or cut short) decode to what hpack's decoder says."""
        encoder, blocks = Encoder(), []
        for fields, huffman, table_size, damage in spec:
            if table_size is not None:
                encoder.header_table_size = table_size
            block = bytearray(encoder.encode(fields, huffman=huffman))
            if damage is not None and block:
                at, byte = damage
                if at % 3:
                    block[at % len(block)] = byte
                else:
                    del block[at % len(block):]
            blocks.append(bytes(block))
        self.assertEqual(self._decode_all(HeaderDecoder(), blocks, list_limit, table_limit),
                         self._decode_all(Decoder(), blocks, list_limit, table_limit))


class _Settings:
    http2_max_concurrent_streams = 100
    http2_max_header_list_size = 65536
    http2_stream_window = 1 << 20
    client_idle_timeout = 60.0
    request_head_timeout = 10.0
    http2_max_resets = 100


class _Gateway:
    """Answers every request at once, with the fields it was given echoed in the body."""

    alt_svc = None

    def __init__(self) -> None:
        self.requests = []

    def begin(self, request) -> None:
        self.requests.append(request)
        body = repr(sorted((n, list(v)) for n, v in request.requestHeaders.getAllRawHeaders())).encode()
        request.start_response(200, b"OK", [(b"Content-Type", b"text/plain"), (b"Content-Length", b"%d" % len(body)),
                                            (b"X-Serial", b"%d" % len(self.requests))])
        request.write(body)
        request.finish_response()


class ServerTests(unittest.TestCase):
    """H2ServerProtocol in memory, driven by h2's own client."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.gateway = _Gateway()
        self.server = H2ServerProtocol(self.gateway, _Settings(), None, self.clock)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000),
                                         hostAddress=IPv4Address("TCP", "127.0.0.1", 443))
        self.server.makeConnection(self.transport)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.client = h2.connection.H2Connection(config=config)
        self.client.initiate_connection()
        self.exchange()

    def tearDown(self) -> None:
        self.server.connectionLost(None)

    def exchange(self) -> list:
        """Client bytes to the server, server bytes to the client; the client's events."""
        events = []
        for _ in range(5):
            data = self.client.data_to_send()
            if data:
                self.server.dataReceived(data)
            self.clock.advance(0)
            out = self.transport.value()
            self.transport.clear()
            if not data and not out:
                break
            if out:
                events += self.client.receive_data(out)
        return events

    def test_many_requests_decode_in_order(self):
        """300 requests on one connection, in batches: every response decodes (the two
        HPACK contexts stay in step), with its own serial number."""
        serials = []
        stream_id = 1
        for batch in range(30):
            for _ in range(10):
                self.client.send_headers(stream_id, GET + [(b"x-batch", b"%d" % batch)], end_stream=True)
                stream_id += 2
            for event in self.exchange():
                if isinstance(event, h2.events.ResponseReceived):
                    serials.append(int(dict(event.headers)[b"x-serial"]))
        self.assertEqual(serials, list(range(1, 301)))

    def test_split_cookies_are_joined(self):
        """Cookie crumbs (RFC 9113 8.2.3) reach the gateway as one cookie field."""
        self.client.send_headers(1, GET + [(b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2")],
                                 end_stream=True)
        self.exchange()
        fields = self.gateway.requests[0].requestHeaders
        self.assertEqual(fields.getRawHeaders(b"cookie"), [b"a=1; b=2"])
        self.assertEqual(fields.getRawHeaders(b"host"), [AUTHORITY])

    def test_malformed_block_ends_the_connection(self):
        """A field value carrying CR LF (a header injected into the container's request) is
        a connection error: GOAWAY PROTOCOL_ERROR, and the gateway never sees it."""
        self.client.send_headers(1, GET + [(b"x-a", b"1\r\nx-injected: yes")], end_stream=True)
        events = self.exchange()
        goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        self.assertEqual([e.error_code for e in goaway], [h2.errors.ErrorCodes.PROTOCOL_ERROR])
        self.assertEqual(self.gateway.requests, [])
        self.assertTrue(self.server.closed)

    def test_uppercase_name_ends_the_connection(self):
        """An upper-case field name is malformed in HTTP/2: GOAWAY PROTOCOL_ERROR."""
        self.client.send_headers(1, GET + [(b"X-A", b"1")], end_stream=True)
        events = self.exchange()
        self.assertTrue(any(isinstance(e, h2.events.ConnectionTerminated)
                            and e.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR for e in events))
        self.assertEqual(self.gateway.requests, [])

    def test_table_size_zero_from_the_client(self):
        """A client that allows no dynamic table still decodes every response."""
        self.client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
        self.client.local_settings.acknowledge()  # (the client's own decoder limit)
        self.exchange()
        count = 0
        for stream_id in (1, 3, 5):
            self.client.send_headers(stream_id, GET, end_stream=True)
            count += sum(isinstance(e, h2.events.ResponseReceived) for e in self.exchange())
        self.assertEqual(count, 3)
        self.assertEqual(self.server.conn.encoder.header_table_size, 0)
