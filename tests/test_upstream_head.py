"""The container's response head, framed two ways that must agree.

Most heads have one Content-Length and at most one Connection: those are framed without
a pass over every field (``_frame``'s first branch).  Every head must be framed as the
general rules frame it (``_frame_by_rules``): the same framing, length, reuse and
refusal.  Hypothesis makes the fields, plain and hostile.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from hoodyproxy.upstream.headers import _without_hop_by_hop, response_headers
from hoodyproxy.upstream import http11
from hoodyproxy.upstream.http11 import UpstreamConnection

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
NAMES = st.one_of(
    st.sampled_from(["Content-Length", "content-length", "CONTENT-LENGTH", "Connection", "connection",
                     "Transfer-Encoding", "Date", "Server", "Keep-Alive", "X-A", "Set-Cookie"]),
    st.text(alphabet=TCHAR, min_size=1, max_size=12))
VALUES = st.one_of(
    st.sampled_from(["5", "0", "12", "5, 5", "5,6", "5,", " 7 ", "abc", "-1", "1" * 19, "close",
                     "keep-alive", "Keep-Alive, close", "chunked", "gzip, chunked", "", " \t"]),
    st.text(alphabet=st.characters(min_codepoint=0x09, max_codepoint=0x7e,
                                   blacklist_characters="\n\r\x0b\x0c"), max_size=20),
    st.binary(max_size=8).map(lambda b: b.decode("latin-1")))
def _framing(method: str, status: int, headers, lnames, head_request: bool, http10: bool):
    conn = UpstreamConnection(("192.0.2.1", 80), Clock())
    conn.makeConnection(StringTransport())
    conn.send_head(b"GET / HTTP/1.1\r\n\r\n", None, chunked_body=False, has_body=False,
                   head_request=head_request, upgrade=False, timeout=30.0)
    conn._http10 = http10
    failed = []
    conn._fail = failed.append
    ok = getattr(conn, method)(status, headers, lnames)
    conn._leave_sweep()
    return ok, failed, conn._framing if ok else None, conn._remaining if ok else None, conn._reusable


class FrameTests(unittest.SynchronousTestCase):
    """The usual head's short way to its framing gives the general rules' answer."""

    @settings(max_examples=1500, deadline=None)
    @given(st.sampled_from([200, 204, 304, 404, 500]),
           st.lists(st.tuples(NAMES, VALUES), max_size=6), st.booleans(), st.booleans())
    def test_the_two_framings_agree(self, status, fields, head_request, http10) -> None:
        headers = [(n.encode("latin-1"), v.strip(" \t").encode("latin-1")) for n, v in fields]
        lnames = [n.lower() for n, _ in headers]
        self.assertEqual(_framing("_frame", status, headers, lnames, head_request, http10),
                         _framing("_frame_by_rules", status, headers, lnames, head_request, http10))

    def test_one_length_and_keep_alive(self) -> None:
        headers = [(b"Content-Length", b"12"), (b"Connection", b"keep-alive")]
        ok, failed, framing, remaining, reusable = _framing(
            "_frame", 200, headers, [b"content-length", b"connection"], False, True)
        self.assertEqual((ok, failed, remaining, reusable), (True, [], 12, True))


HOP_NAMES = st.sampled_from(["Connection", "connection", "Keep-Alive", "Transfer-Encoding", "Upgrade",
                             "TE", "Trailer", "Proxy-Connection", "X_Foo", "x-foo", "Content-Length"])
CONNECTION_VALUES = st.sampled_from(["keep-alive", "close", "Keep-Alive, x-foo", "x_foo", "upgrade",
                                     "connection", ",", "", "te, trailer", "content-length"])


class ResponseFieldsTests(unittest.SynchronousTestCase):
    """The one-Connection short way out of response_headers removes what the general pass removes."""

    @settings(max_examples=1500, deadline=None)
    @given(st.lists(st.one_of(st.tuples(NAMES, VALUES), st.tuples(HOP_NAMES, CONNECTION_VALUES)), max_size=8))
    def test_the_two_filters_agree(self, fields) -> None:
        headers = [(n.encode("latin-1"), v.strip(" \t").encode("latin-1")) for n, v in fields]
        lnames = [n.lower() for n, _ in headers]
        self.assertEqual(response_headers(headers, lnames=list(lnames)), _without_hop_by_hop(headers, lnames))
        self.assertEqual(response_headers(headers), _without_hop_by_hop(headers, lnames))

    def test_nginx_keep_alive(self) -> None:
        headers = [(b"Server", b"nginx"), (b"Content-Length", b"12"), (b"Connection", b"keep-alive"),
                   (b"ETag", b'"x"')]
        self.assertEqual(response_headers(headers),
                         [(b"Server", b"nginx"), (b"Content-Length", b"12"), (b"ETag", b'"x"')])


def _parsed(head: bytes):
    """``_parse_head``'s answer, or the refusal's text."""
    try:
        return http11._parse_head(head)
    except http11.UpstreamProtocolError as e:
        return ("refused", str(e))


class HeadCacheTests(unittest.SynchronousTestCase):
    """A head seen before is answered from memory: exactly as a fresh parse answers it."""

    def setUp(self) -> None:
        http11._heads.clear()
        self.addCleanup(http11._heads.clear)

    @settings(max_examples=500, deadline=None)
    @given(st.sampled_from(["HTTP/1.1 200 OK", "HTTP/1.0 404 Not Found", "HTTP/1.1 2000 OK", "HTTP/1.1 99 X",
                            "HTTP/1.1 204 ", "HTTP/2 200 OK"]),
           st.lists(st.tuples(NAMES, VALUES), max_size=6), st.sampled_from(["", " folded", "\tx"]))
    def test_a_head_seen_before_gets_a_fresh_parse_s_answer(self, status_line, fields, fold) -> None:
        lines = [status_line] + [f"{n}: {v}" for n, v in fields] + ([fold] if fold else [])
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        http11._heads.clear()
        first = _parsed(head)
        as_first = tuple(list(x) if isinstance(x, list) else x for x in first)
        if first[0] != "refused":
            first[2].append((b"X-Added", b"by a caller"))  # the caller's lists are its own
            first[3].append(b"x-added")
        second = _parsed(head)
        http11._heads.clear()
        fresh = _parsed(head)
        self.assertEqual(second, fresh)
        self.assertEqual(as_first, fresh)

    def test_the_cache_is_bounded(self) -> None:
        for i in range(http11.HEAD_CACHE_SIZE * 3):
            http11._parse_head(b"HTTP/1.1 200 OK\r\nX-Request-Id: %d\r\nContent-Length: 0\r\n\r\n" % i)
            self.assertLessEqual(len(http11._heads), http11.HEAD_CACHE_SIZE)
        long = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * http11.HEAD_CACHE_LONGEST + b"\r\n\r\n"
        http11._parse_head(long)
        self.assertNotIn(long, http11._heads)

    def test_a_refused_head_is_refused_every_time(self) -> None:
        """A container's malformed head is not remembered as anything: each one fails its
        exchange (502), the first and the next."""
        head = b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n"
        for _ in range(3):
            self.assertEqual(_parsed(head)[0], "refused")
        self.assertNotIn(head, http11._heads)
