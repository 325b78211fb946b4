"""Group types ip, token and password; the registry of group types; safe_check."""

from __future__ import annotations

import functools
import json
import os
import sys
import textwrap

from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

import hoodyproxy.plugins
from hoodyproxy.access.credentials import Credentials
from hoodyproxy.access.groups import InvalidPermissions, _secrets, group_types, safe_check
from hoodyproxy.access.groups.ip import IPGroup
from hoodyproxy.access.groups.password import PasswordGroup
from hoodyproxy.access.groups.token import TokenGroup
from hoodyproxy.interfaces import IGroupType

TOKEN = "tok_0123456789abcdefABCDEF-._~+/="


def basic(username: str, password: str, client_ip: str = "198.51.100.7") -> Credentials:
    return Credentials(client_ip, basic=(username, password))


class ParseErrorMixin:
    """assertInvalid(spec, field): parse raises InvalidPermissions naming exactly that field."""

    group = None

    def assertInvalid(self, spec, field):
        error = self.assertRaises(InvalidPermissions, self.group.parse, spec, "groups.office")
        self.assertEqual(error.field, field)
        self.assertEqual(str(error), f"{error.field}: {error.problem}")
        return error


class InvalidPermissionsTests(unittest.TestCase):
    def test_shape(self):
        """The error carries field and problem and reads "field: problem"."""
        error = InvalidPermissions("groups.office.range", "must be a range")
        self.assertEqual((error.field, error.problem), ("groups.office.range", "must be a range"))
        self.assertEqual(str(error), "groups.office.range: must be a range")
        self.assertIsInstance(error, ValueError)

    def test_same_class_as_the_model(self):
        """Group types raise the model's InvalidPermissions: the one the admin API catches."""
        from hoodyproxy.access import model
        self.assertIs(InvalidPermissions, model.InvalidPermissions)


class RegistryTests(unittest.TestCase):
    def test_builtins(self):
        """The five built-in types are registered under their names with their challenges."""
        types = group_types()
        self.assertEqual({name: t.challenge for name, t in types.items()
                          if name in ("ip", "token", "password", "jwt", "ldap")},
                         {"ip": None, "token": "bearer", "password": "basic", "jwt": "bearer",
                          "ldap": "basic"})
        for name, provider in types.items():
            self.assertEqual(provider.name, name)

    def test_builtins_provide_interface(self):
        """Every built-in type declares and fully implements IGroupType."""
        for provider in group_types().values():
            self.assertTrue(verifyObject(IGroupType, provider))

    def test_returns_a_copy(self):
        """Changing the returned dict does not change the registry."""
        group_types().pop("ip")
        self.assertIn("ip", group_types())

    def _install_plugins(self):
        """A third-party drop-in with a new type and one that reuses the name 'ip'."""
        root = self.mktemp()
        plugins = os.path.join(root, "hoodyproxy", "plugins")
        os.makedirs(plugins)
        with open(os.path.join(plugins, "thirdparty_groups_test.py"), "w") as f:
            f.write(textwrap.dedent("""
                from twisted.plugin import IPlugin
                from zope.interface import implementer
                from hoodyproxy.interfaces import IGroupType

                @implementer(IPlugin, IGroupType)
                class Kind:
                    challenge = None
                    def __init__(self, name):
                        self.name = name
                    def parse(self, spec, field):
                        return dict(spec)
                    def redact(self, stored):
                        return dict(stored)
                    def check(self, stored, credentials):
                        return True

                office_hours = Kind("office-hours")
                impostor = Kind("ip")
            """))
        # Cleanups run last-added first: forget the plugins after the path is restored.
        self.addCleanup(group_types, True)
        self.addCleanup(sys.modules.pop, "hoodyproxy.plugins.thirdparty_groups_test", None)
        self.patch(hoodyproxy.plugins, "__path__", [*hoodyproxy.plugins.__path__, plugins])
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_third_party_plugin_found(self):
        """A provider in a hoodyproxy/plugins drop-in is registered under its name."""
        self._install_plugins()
        self.assertEqual(group_types(refresh=True)["office-hours"].name, "office-hours")

    def test_third_party_plugin_cannot_replace_builtin(self):
        """A provider whose name is a built-in's is ignored, and a log line says so."""
        events = self._install_plugins()
        self.assertIsInstance(group_types(refresh=True)["ip"], IPGroup)
        ignored = [e for e in events if "is taken" in e.get("log_format", "")]
        self.assertEqual([e["name"] for e in ignored], ["ip"])


@implementer(IGroupType)
class FakeGroup:
    """A group type whose check does whatever the test says."""

    name = "fake"
    challenge = None

    def __init__(self, check):
        self._check = check

    def parse(self, spec, field):
        return spec

    def redact(self, stored):
        return stored

    def check(self, stored, credentials):
        return self._check()


class SafeCheckTests(unittest.TestCase):
    credentials = Credentials("192.0.2.1")

    def outcome(self, check, **kw):
        results = []
        safe_check(FakeGroup(check), {}, self.credentials, **kw).addBoth(results.append)
        return results

    def test_true_passes(self):
        """A check answering True matches."""
        self.assertEqual(self.outcome(lambda: True), [True])

    def test_deferred_true_passes(self):
        """A check answering a Deferred that fires True matches."""
        self.assertEqual(self.outcome(lambda: defer.succeed(True)), [True])

    def test_raising_check_is_no_match(self):
        """A check that raises is logged and counts as no match."""
        self.assertEqual(self.outcome(lambda: 1 / 0), [False])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_failing_deferred_is_no_match(self):
        """A check whose Deferred fails is logged and counts as no match."""
        self.assertEqual(self.outcome(lambda: defer.fail(KeyError("x"))), [False])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_non_bool_answer_is_no_match(self):
        """A truthy answer that is not True (a string, a dict) does not let a request in."""
        self.assertEqual(self.outcome(lambda: "yes"), [False])
        self.assertEqual(self.outcome(lambda: defer.succeed({"ok": 1})), [False])

    def test_hanging_check_times_out(self):
        """A check that never answers counts as no match after the timeout, and is logged."""
        clock = task.Clock()
        results = self.outcome(defer.Deferred, timeout=5, reactor=clock)
        clock.advance(4)
        self.assertEqual(results, [])
        clock.advance(2)
        self.assertEqual(results, [False])
        self.assertEqual(len(self.flushLoggedErrors(defer.TimeoutError)), 1)


class IPGroupTests(ParseErrorMixin, unittest.TestCase):
    group = IPGroup()

    def check(self, ranges, client_ip):
        stored = self.group.parse({"type": "ip", "ranges": ranges}, "groups.office")
        return self.group.check(stored, Credentials(client_ip))

    def test_parse_range(self):
        """A single range is stored normalised in a ranges list."""
        self.assertEqual(self.group.parse({"type": "ip", "range": "203.0.113.7/24"}, "g"),
                         {"type": "ip", "ranges": ["203.0.113.0/24"]})

    def test_parse_ranges(self):
        """A list of v4 and v6 ranges and single addresses is stored normalised."""
        stored = self.group.parse({"type": "ip", "ranges": ["2001:DB8::1/32", "192.0.2.9"]}, "g")
        self.assertEqual(stored["ranges"], ["2001:db8::/32", "192.0.2.9/32"])

    def test_round_trip(self):
        """The stored form parses to itself."""
        stored = self.group.parse({"type": "ip", "ranges": ["10.0.0.0/8", "fd00::/8"]}, "g")
        self.assertEqual(self.group.parse(stored, "g"), stored)

    def test_bad_range(self):
        """A range that is not an address or CIDR names the range field."""
        self.assertInvalid({"type": "ip", "range": "203.0.113.0/33"}, "groups.office.range")

    def test_bad_entry_in_ranges(self):
        """A bad entry in ranges is named by its index."""
        self.assertInvalid({"type": "ip", "ranges": ["10.0.0.0/8", "nope"]},
                           "groups.office.ranges[1]")

    def test_non_string_range(self):
        """A range must be a string."""
        self.assertInvalid({"type": "ip", "ranges": [167772160]}, "groups.office.ranges[0]")

    def test_empty_ranges(self):
        """An empty ranges list is refused."""
        self.assertInvalid({"type": "ip", "ranges": []}, "groups.office.ranges")

    def test_range_and_ranges(self):
        """range and ranges together are refused."""
        self.assertInvalid({"type": "ip", "range": "10.0.0.0/8", "ranges": ["10.0.0.0/8"]},
                           "groups.office.ranges")

    def test_missing_range(self):
        """A group without range or ranges is refused."""
        self.assertInvalid({"type": "ip"}, "groups.office.range")

    def test_unknown_key(self):
        """An unknown key is refused and named."""
        self.assertInvalid({"type": "ip", "range": "10.0.0.0/8", "header": "X-Forwarded-For"},
                           "groups.office.header")

    def test_not_an_object(self):
        """A group that is not an object is refused."""
        self.assertInvalid(["10.0.0.0/8"], "groups.office")

    def test_wrong_type(self):
        """A spec of another type is refused by this type."""
        self.assertInvalid({"type": "token", "range": "10.0.0.0/8"}, "groups.office.type")

    def test_redact_shows_ranges(self):
        """Ranges are no secret: the admin API shows them."""
        stored = {"type": "ip", "ranges": ["10.0.0.0/8"]}
        self.assertEqual(self.group.redact(stored), stored)

    def test_ipv4_in_range(self):
        """An IPv4 client inside a range matches."""
        self.assertTrue(self.check(["203.0.113.0/24"], "203.0.113.77"))

    def test_ipv4_outside_range(self):
        """An IPv4 client outside every range does not match."""
        self.assertFalse(self.check(["203.0.113.0/24", "10.0.0.0/8"], "203.0.114.1"))

    def test_ipv6_in_range(self):
        """An IPv6 client inside a range matches, one outside does not."""
        self.assertTrue(self.check(["2001:db8:1::/48"], "2001:db8:1::42"))
        self.assertFalse(self.check(["2001:db8:1::/48"], "2001:db8:2::42"))

    def test_mapped_ipv4_matches_ipv4_range(self):
        """An IPv4-mapped IPv6 client address (dual-stack socket) matches IPv4 ranges."""
        self.assertTrue(self.check(["203.0.113.0/24"], "::ffff:203.0.113.9"))
        self.assertFalse(self.check(["203.0.113.0/24"], "::ffff:198.51.100.9"))

    def test_ipv4_does_not_match_ipv6_range(self):
        """An IPv4 client is not inside an unrelated IPv6 range."""
        self.assertFalse(self.check(["2001:db8::/32"], "203.0.113.9"))

    def test_unparseable_client_address(self):
        """A client address that is not an IP address (a UNIX socket) matches nothing."""
        self.assertFalse(self.check(["0.0.0.0/0", "::/0"], "unix:/run/x.sock"))

    def test_credentials_do_not_matter(self):
        """Only the TCP peer counts: tokens or passwords do not put a client in range."""
        stored = self.group.parse({"type": "ip", "range": "10.0.0.0/8"}, "g")
        self.assertFalse(self.group.check(stored, Credentials("192.0.2.1", bearer="10.0.0.1",
                                                              basic=("10.0.0.1", "x"))))


class TokenGroupTests(ParseErrorMixin, unittest.TestCase):
    group = TokenGroup()

    def stored(self):
        return self.group.parse({"type": "token", "value": TOKEN}, "groups.office")

    def test_stored_as_digest(self):
        """The token is stored as its SHA-256, never in clear."""
        stored = self.stored()
        self.assertEqual(set(stored), {"type", "value_sha256"})
        self.assertEqual(stored["value_sha256"], _secrets.sha256_hex(TOKEN))
        self.assertNotIn(TOKEN, json.dumps(stored))

    def test_round_trip(self):
        """The stored form parses to itself."""
        self.assertEqual(self.group.parse(self.stored(), "g"), self.stored())

    def test_redact(self):
        """The admin API shows neither token nor digest."""
        self.assertEqual(self.group.redact(self.stored()), {"type": "token", "value": "***"})

    def test_right_token(self):
        """The right bearer token matches."""
        self.assertTrue(self.group.check(self.stored(), Credentials("192.0.2.1", bearer=TOKEN)))

    def test_wrong_token(self):
        """Another token, a prefix of the token, or none at all does not match."""
        for bearer in (TOKEN + "x", TOKEN[:-1], "", None):
            self.assertFalse(self.group.check(self.stored(), Credentials("192.0.2.1",
                                                                         bearer=bearer)))

    def test_basic_credentials_do_not_match(self):
        """The token offered as a Basic password does not match."""
        self.assertFalse(self.group.check(self.stored(), basic("token", TOKEN)))

    def test_compares_in_constant_time(self):
        """The digests are compared with hmac.compare_digest."""
        calls = []
        real = _secrets.hmac.compare_digest
        self.patch(_secrets.hmac, "compare_digest",
                   lambda a, b: calls.append((a, b)) or real(a, b))
        self.group.check(self.stored(), Credentials("192.0.2.1", bearer=TOKEN))
        self.assertEqual(len(calls), 1)

    def test_short_token(self):
        """A token under 16 characters is stored (as its digest), with advice naming its field."""
        spec = {"type": "token", "value": "short-token"}
        self.assertEqual(self.group.parse(spec, "groups.office"),
                         {"type": "token", "value_sha256": _secrets.sha256_hex("short-token")})
        [(field, message)] = self.group.advise(spec, "groups.office")
        self.assertEqual(field, "groups.office.value")
        self.assertNotIn("short-token", message)

    def test_empty_token(self):
        """An empty token is refused, naming its field."""
        self.assertInvalid({"type": "token", "value": ""}, "groups.office.value")

    def test_token_with_spaces(self):
        """A token that cannot travel in a header (spaces, quotes) is refused."""
        self.assertInvalid({"type": "token", "value": "two words are not a token"},
                           "groups.office.value")

    def test_bad_digest(self):
        """A value_sha256 that is not 64 lower-case hex digits is refused."""
        self.assertInvalid({"type": "token", "value_sha256": "ab" * 31}, "groups.office.value_sha256")

    def test_value_and_digest(self):
        """value and value_sha256 together are refused."""
        self.assertInvalid({"type": "token", "value": TOKEN, "value_sha256": "a" * 64},
                           "groups.office.value_sha256")

    def test_missing_value(self):
        """A token group needs a value."""
        self.assertInvalid({"type": "token"}, "groups.office")

    def test_unknown_key(self):
        """An unknown key is refused and named."""
        self.assertInvalid({"type": "token", "value": TOKEN, "scope": "x"}, "groups.office.scope")


@functools.cache
def alice_group() -> dict:
    """A stored password group, hashed once for all the tests (a scrypt takes a while)."""
    return PasswordGroup().parse({"type": "password", "username": "alice",
                                  "password": "correct horse"}, "g")


class PasswordGroupTests(ParseErrorMixin, unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.group = PasswordGroup(clock=self.clock)
        self.scrypts = 0
        real = _secrets.verify_password

        def counting(password, encoded):
            self.scrypts += 1
            return real(password, encoded)
        self.patch(_secrets, "verify_password", counting)
        self.alice = alice_group()


    def test_stored_form(self):
        """The password is stored as a salted scrypt hash in the documented format."""
        self.assertEqual(set(self.alice), {"type", "username", "password_hash"})
        scheme, n, r, p, salt, digest = self.alice["password_hash"].split("$")
        self.assertEqual((scheme, n, r, p), ("scrypt", "16384", "8", "1"))
        self.assertEqual(len(_secrets._unb64(salt)), 16)
        self.assertEqual(len(_secrets._unb64(digest)), 32)

    def test_clear_password_never_stored(self):
        """Neither the stored nor the redacted form contains the clear password."""
        self.assertNotIn("correct horse", json.dumps(self.alice))
        self.assertNotIn("correct horse", json.dumps(self.group.redact(self.alice)))

    def test_salted(self):
        """The same password hashes differently each time."""
        again = self.group.parse({"type": "password", "username": "alice",
                                  "password": "correct horse"}, "g")
        self.assertNotEqual(again["password_hash"], self.alice["password_hash"])

    def test_round_trip(self):
        """The stored form parses to itself, without hashing the hash."""
        self.assertEqual(self.group.parse(self.alice, "g"), self.alice)

    def test_redact(self):
        """The admin API shows the username and no hash."""
        self.assertEqual(self.group.redact(self.alice),
                         {"type": "password", "username": "alice", "password": "***"})

    def test_password_and_hash(self):
        """password and password_hash together are refused."""
        self.assertInvalid(dict(self.alice, password="x"), "groups.office.password_hash")

    def test_no_password(self):
        """A password group needs a password or a password_hash."""
        self.assertInvalid({"type": "password", "username": "alice"}, "groups.office")

    def test_empty_password(self):
        """An empty password is refused."""
        self.assertInvalid({"type": "password", "username": "alice", "password": ""},
                           "groups.office.password")

    def test_bad_hash(self):
        """A password_hash that is not scrypt$n$r$p$salt$hash is refused."""
        for bad in ("plain", "scrypt$16384$8$1$AAAA$AAAA", "bcrypt$x$y$z$a$b",
                    "scrypt$1000$8$1$" + self.alice["password_hash"].split("$", 4)[4]):
            self.assertInvalid(dict(self.alice, password_hash=bad), "groups.office.password_hash")

    def test_hash_too_costly(self):
        """A password_hash whose parameters would cost too much memory per check is refused."""
        salt_and_hash = self.alice["password_hash"].split("$", 4)[4]
        self.assertInvalid(dict(self.alice, password_hash="scrypt$1048576$8$1$" + salt_and_hash),
                           "groups.office.password_hash")

    def test_missing_username(self):
        """A password group needs a username."""
        self.assertInvalid({"type": "password", "password": "x"}, "groups.office.username")

    def test_username_with_colon(self):
        """A username with a colon (which Basic cannot carry) is refused."""
        self.assertInvalid({"type": "password", "username": "a:b", "password": "x"},
                           "groups.office.username")

    def test_unknown_key(self):
        """An unknown key is refused and named."""
        self.assertInvalid(dict(self.alice, realm="x"), "groups.office.realm")

    @defer.inlineCallbacks
    def test_right_password(self):
        """The right username and password match."""
        self.assertTrue((yield self.group.check(self.alice, basic("alice", "correct horse"))))

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """A wrong password does not match."""
        self.assertFalse((yield self.group.check(self.alice, basic("alice", "correct horse!"))))

    def test_unknown_user(self):
        """Another username does not match, and costs no scrypt."""
        self.assertFalse(self.group.check(self.alice, basic("bob", "correct horse")))
        self.assertEqual(self.scrypts, 0)

    def test_empty_password_check(self):
        """An empty password does not match, and costs no scrypt."""
        self.assertFalse(self.group.check(self.alice, basic("alice", "")))
        self.assertEqual(self.scrypts, 0)

    def test_no_basic_credentials(self):
        """A request without Basic credentials (a bearer token) does not match."""
        self.assertFalse(self.group.check(self.alice, Credentials("192.0.2.1",
                                                                  bearer="correct horse")))

    @defer.inlineCallbacks
    def test_success_cached(self):
        """A repeated success within a minute costs no second scrypt; after it, one more."""
        self.assertTrue((yield self.group.check(self.alice, basic("alice", "correct horse"))))
        self.clock.advance(59)
        self.assertTrue((yield self.group.check(self.alice, basic("alice", "correct horse"))))
        self.assertEqual(self.scrypts, 1)
        self.clock.advance(2)
        self.assertTrue((yield self.group.check(self.alice, basic("alice", "correct horse"))))
        self.assertEqual(self.scrypts, 2)

    @defer.inlineCallbacks
    def test_failure_not_cached(self):
        """A wrong password is checked again each time."""
        for _ in range(2):
            self.assertFalse((yield self.group.check(self.alice, basic("alice", "wrong"))))
        self.assertEqual(self.scrypts, 2)

    @defer.inlineCallbacks
    def test_cache_follows_password_change(self):
        """After the password changes, the old password no longer matches from the cache."""
        self.assertTrue((yield self.group.check(self.alice, basic("alice", "correct horse"))))
        changed = self.group.parse({"type": "password", "username": "alice",
                                    "password": "battery staple"}, "g")
        self.assertFalse((yield self.group.check(changed, basic("alice", "correct horse"))))

    @defer.inlineCallbacks
    def test_concurrent_checks_share_one_scrypt(self):
        """Identical checks arriving together (a browser's parallel requests) run one scrypt."""
        results = yield defer.gatherResults(
            [self.group.check(self.alice, basic("alice", "correct horse")) for _ in range(5)])
        self.assertEqual(results, [True] * 5)
        self.assertEqual(self.scrypts, 1)


class SuccessCacheTests(unittest.TestCase):
    def test_bounded(self):
        """The cache holds at most max_entries successes; the oldest go first."""
        clock = task.Clock()
        cache = _secrets.SuccessCache(60, max_entries=2, clock=clock)
        for key in (b"a", b"b", b"c"):
            cache._remember(key)
        self.assertEqual([cache.fresh(k) for k in (b"a", b"b", b"c")], [False, True, True])

    def test_keys_are_unambiguous(self):
        """Keys differ when the parts differ, even if their concatenation does not."""
        self.assertNotEqual(_secrets.SuccessCache.key("ab", "c"), _secrets.SuccessCache.key("a", "bc"))
        self.assertEqual(_secrets.SuccessCache.key("a", "b"), _secrets.SuccessCache.key("a", "b"))


class RedactedPlaceholderTests(unittest.TestCase):
    """A body read back from GET (secrets shown as ***) cannot set *** as a secret."""

    def test_password_placeholder_is_refused(self):
        """PUTting a password group as GET showed it is a 422 on groups.x.password."""
        with self.assertRaises(InvalidPermissions) as caught:
            PasswordGroup().parse({"type": "password", "username": "ann", "password": "***"}, "groups.x")
        self.assertEqual(caught.exception.field, "groups.x.password")

    def test_ldap_bind_password_placeholder_is_refused(self):
        """PUTting an LDAP group as GET showed it is a 422 on groups.x.bind_password."""
        from hoodyproxy.access.groups.ldap import LDAPGroup
        with self.assertRaises(InvalidPermissions) as caught:
            LDAPGroup().parse({"type": "ldap", "url": "ldap://127.0.0.1:389/", "search_base": "dc=example,dc=org",
                               "search_filter": "(uid={username})", "bind_dn": "cn=gw,dc=example,dc=org",
                               "bind_password": "***"}, "groups.x")
        self.assertEqual(caught.exception.field, "groups.x.bind_password")
