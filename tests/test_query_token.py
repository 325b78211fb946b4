"""The ``hoody_token`` query parameter: taken as a credential, kept out of the forwarded
request and of the audit line, however it is spelled (hoodyproxy.access.policy)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from hoodyproxy.access.policy import _strip_query_token_by_parts, strip_query_token

# Queries built from the pieces that matter: the name in any case and percent-encoded,
# separators, plus signs, escapes good and bad.
_PIECES = st.sampled_from([
    b"hoody_token", b"HOODY_TOKEN", b"Hoody_Token", b"hoody%5Ftoken", b"hoody%5ftoken", b"%68oody_token",
    b"hoody_toke", b"hoody+token", b"=", b"&", b"+", b"%", b"%2", b"%41", b"x", b"secret", b"%26", b"%3D",
    b"\xe2\x84\xaa", b"",
])
_QUERIES = st.lists(_PIECES, max_size=12).map(b"".join)


class StripQueryTokenTests(unittest.TestCase):

    def test_the_token_is_taken_and_removed(self):
        self.assertEqual(strip_query_token(b"/a?x=1&hoody_token=s3cret&y=2"), (b"/a?x=1&y=2", b"s3cret"))

    def test_an_encoded_name_is_the_same_parameter(self):
        self.assertEqual(strip_query_token(b"/a?hoody%5Ftoken=s%3D1"), (b"/a", b"s=1"))

    def test_another_case_is_no_credential_but_leaves_the_audit_line(self):
        self.assertEqual(strip_query_token(b"/a?Hoody_Token=s&x=1"), (b"/a?Hoody_Token=s&x=1", None))
        self.assertEqual(strip_query_token(b"/a?Hoody_Token=s&x=1", any_case=True), (b"/a?x=1", b"s"))

    def test_a_query_without_the_name_is_kept_byte_for_byte(self):
        for uri in (b"/a", b"/a?", b"/a?&&", b"/a?x=1&&y", b"/a?q=a+b"):
            self.assertEqual(strip_query_token(uri), (uri, None))

    @settings(max_examples=1500, deadline=None)
    @given(path=st.sampled_from([b"/", b"/a/b"]), query=st.one_of(st.none(), _QUERIES), any_case=st.booleans())
    def test_the_short_way_agrees_with_the_parameter_by_parameter_way(self, path, query, any_case):
        """A query that cannot hold the name is returned as it is; that answer is the
        general pass's for every query."""
        if query is None:
            self.assertEqual(strip_query_token(path, any_case=any_case), (path, None))
            return
        self.assertEqual(strip_query_token(path + b"?" + query, any_case=any_case),
                         _strip_query_token_by_parts(path, query, any_case))
