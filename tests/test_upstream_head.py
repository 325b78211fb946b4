"""The container's response head, read two ways that must agree.

Most heads are plain ASCII with one Content-Length: those are split without llhttp's
callbacks (``_split_head``) and framed without a pass over every field (``_frame``'s
first branch).  Every head either way must give what llhttp and the general framing
rules give: the same status, reason, fields and names, and the same framing, length,
reuse and refusal.  Hypothesis makes the heads, plain and hostile.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from hoodyproxy.upstream import http11
from hoodyproxy.upstream.http11 import UpstreamConnection, UpstreamProtocolError

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
STATUS_LINES = st.one_of(
    st.sampled_from(["HTTP/1.1 200 OK", "HTTP/1.0 200 OK", "HTTP/1.1 204 No Content", "HTTP/1.1 304 ",
                     "HTTP/1.1 200", "HTTP/1.1 099 Low", "HTTP/1.1 999 High", "HTTP/1.2 200 OK",
                     "HTTP/1.1 2000 OK", "HTTP/1.1 200 \xe9t\xe9", "HTTP/1.1 404 Not\tFound"]),
    st.tuples(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]), st.integers(100, 599),
              st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=12))
    .map(lambda t: "%s %d %s" % t))


def _head(status_line: str, fields: list[tuple[str, str]], separator: str = ":") -> bytes:
    lines = [status_line] + [name + separator + value for name, value in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _read(parse, head: bytes):
    try:
        return parse(head)
    except UpstreamProtocolError as e:
        return ("refused", str(e))


class SplitHeadTests(unittest.SynchronousTestCase):
    """A head split without llhttp reads as llhttp reads it."""

    @settings(max_examples=1500, deadline=None)
    @given(STATUS_LINES, st.lists(st.tuples(NAMES, VALUES), max_size=8),
           st.sampled_from([":", ": ", ":  ", " :", ":\t"]))
    def test_the_two_readings_agree(self, status_line, fields, separator) -> None:
        head = _head(status_line, fields, separator)
        self.assertEqual(_read(http11._parse_head, head), _read(http11._parse_head_llhttp, head))

    def test_plain_heads_are_split_without_llhttp(self) -> None:
        """(The comparison above means something only if plain heads take the split.)"""
        head = _head("HTTP/1.1 200 OK", [("Server", "nginx"), ("Content-Length", " 12 "), ("Connection", "keep-alive")])
        self.assertIsNotNone(http11._PLAIN_HEAD.fullmatch(head))
        self.assertEqual(http11._split_head(head),
                         (200, b"OK", [(b"Server", b"nginx"), (b"Content-Length", b"12"),
                                       (b"Connection", b"keep-alive")],
                          [b"server", b"content-length", b"connection"]))

    def test_what_is_not_plain_goes_to_llhttp(self) -> None:
        for head in (b"HTTP/1.1 200 OK\r\nX: \xe9\r\n\r\n",        # obs-text
                     b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",      # obs-fold
                     b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n",           # space before the colon
                     b"HTTP/1.1 200 OK\r\nX: a\x7f\r\n\r\n",        # DEL
                     b"HTTP/1.1 200\r\n\r\n"):                       # no reason
            self.assertIsNone(http11._PLAIN_HEAD.fullmatch(head), head)
        self.assertEqual(_read(http11._parse_head, b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n")[0], "refused")


def _framing(method: str, status: int, headers, lnames, head_request: bool, http10: bool):
    conn = UpstreamConnection(("192.0.2.1", 80), Clock())
    conn.makeConnection(StringTransport())
    conn.send_head(b"GET / HTTP/1.1\r\n\r\n", None, chunked_body=False, has_body=False,
                   head_request=head_request, upgrade=False, timeout=30.0)
    conn._http10 = http10
    failed = []
    conn._fail = failed.append
    ok = getattr(conn, method)(status, headers, lnames)
    conn._cancel_timeout()
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
