"""The ``ldap`` group type: configuration, and binds against a real slapd."""

from __future__ import annotations

import json

from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from hoodyproxy.access.credentials import Credentials
from hoodyproxy.access.groups import InvalidPermissions, ldap as ldap_module
from hoodyproxy.access.groups.ldap import LDAPGroup
from tests.ldap_server import GROUPS, PEOPLE, SERVICE_DN, SERVICE_PASSWORD, USERS, start_slapd

USER_DN = f"uid={{username}},{PEOPLE}"
STAFF = f"cn=staff,{GROUPS}"  # alice
OPS = f"cn=ops,{GROUPS}"  # bob, as uniqueMember
INJECTIONS = ("*)(uid=*))(|(uid=*", "admin)(|(password=*)", "*", "ali*", "alice)(uid=*")


def basic(username: str, password: str) -> Credentials:
    return Credentials("192.0.2.1", basic=(username, password))


class LDAPParseTests(unittest.TestCase):
    group = LDAPGroup()

    def parse(self, **spec):
        return self.group.parse({"type": "ldap", "url": "ldaps://ldap.example", **spec},
                                "groups.corp")

    def assertInvalid(self, field, **spec):
        error = self.assertRaises(InvalidPermissions, self.parse, **spec)
        self.assertEqual(error.field, field)
        return error

    def test_user_dn_config(self):
        """A DN-template config is stored with the default timeout made explicit."""
        self.assertEqual(self.parse(user_dn=USER_DN),
                         {"type": "ldap", "url": "ldaps://ldap.example", "user_dn": USER_DN,
                          "timeout": 5})

    def test_search_config_round_trip(self):
        """A search config with every option parses to itself."""
        stored = self.parse(search_base=PEOPLE, search_filter="(&(objectClass=person)"
                                                              "(uid={username}))",
                            bind_dn=SERVICE_DN, bind_password=SERVICE_PASSWORD,
                            group_dn=STAFF, timeout=2.5)
        self.assertEqual(self.group.parse(stored, "groups.corp"), stored)

    def test_redact_hides_bind_password(self):
        """The admin API does not show the search account's password."""
        stored = self.parse(search_base=PEOPLE, search_filter="(uid={username})",
                            bind_dn=SERVICE_DN, bind_password=SERVICE_PASSWORD)
        shown = self.group.redact(stored)
        self.assertEqual(shown["bind_password"], "***")
        self.assertNotIn(SERVICE_PASSWORD, json.dumps(shown))
        self.assertEqual(shown["bind_dn"], SERVICE_DN)

    def test_url_scheme(self):
        """The URL must be ldap:// or ldaps://."""
        self.assertInvalid("groups.corp.url", url="http://ldap.example")

    def test_url_with_path(self):
        """The URL holds only scheme, host and port."""
        self.assertInvalid("groups.corp.url", url="ldap://ldap.example/dc=example?uid",
                           user_dn=USER_DN)

    def test_url_bad_port(self):
        """A URL with a bad port is refused."""
        self.assertInvalid("groups.corp.url", url="ldap://ldap.example:99999", user_dn=USER_DN)

    def test_neither_template_nor_search(self):
        """A config needs user_dn or a search."""
        self.assertInvalid("groups.corp.user_dn")

    def test_template_and_search(self):
        """user_dn and a search exclude one another."""
        self.assertInvalid("groups.corp.search_base", user_dn=USER_DN, search_base=PEOPLE)

    def test_template_without_placeholder(self):
        """user_dn must contain {username}."""
        self.assertInvalid("groups.corp.user_dn", user_dn=f"uid=alice,{PEOPLE}")

    def test_template_not_a_dn(self):
        """user_dn must be a DN."""
        self.assertInvalid("groups.corp.user_dn", user_dn="{username} at example")

    def test_search_needs_filter(self):
        """search_base without search_filter is refused."""
        self.assertInvalid("groups.corp.search_filter", search_base=PEOPLE)

    def test_bad_filter(self):
        """A malformed search_filter is refused."""
        self.assertInvalid("groups.corp.search_filter", search_base=PEOPLE,
                           search_filter="(uid={username}))(")

    def test_filter_without_placeholder(self):
        """search_filter must contain {username}."""
        self.assertInvalid("groups.corp.search_filter", search_base=PEOPLE,
                           search_filter="(uid=alice)")

    def test_bind_dn_without_password(self):
        """bind_dn and bind_password go together."""
        self.assertInvalid("groups.corp.bind_password", search_base=PEOPLE,
                           search_filter="(uid={username})", bind_dn=SERVICE_DN)

    def test_empty_bind_password(self):
        """An empty bind_password (an unauthenticated bind) is refused."""
        self.assertInvalid("groups.corp.bind_password", search_base=PEOPLE,
                           search_filter="(uid={username})", bind_dn=SERVICE_DN,
                           bind_password="")

    def test_bad_group_dn(self):
        """group_dn must be a DN."""
        self.assertInvalid("groups.corp.group_dn", user_dn=USER_DN, group_dn="staff")

    def test_timeout_bounds(self):
        """timeout is more than 0 and at most 60 seconds."""
        for bad in (0, 61, "5", False):
            self.assertInvalid("groups.corp.timeout", user_dn=USER_DN, timeout=bad)

    def test_unknown_key(self):
        """An unknown key is refused and named."""
        self.assertInvalid("groups.corp.start_tls", user_dn=USER_DN, start_tls=True)

    def test_empty_password_never_binds(self):
        """An empty password is refused at once, without asking any server."""
        stored = self.group.parse({"type": "ldap", "url": "ldap://127.0.0.1:1",
                                   "user_dn": USER_DN}, "g")
        self.assertIs(self.group.check(stored, basic("alice", "")), False)

    def test_no_basic_credentials(self):
        """A request without Basic credentials does not match, without asking any server."""
        stored = self.group.parse({"type": "ldap", "url": "ldap://127.0.0.1:1",
                                   "user_dn": USER_DN}, "g")
        self.assertIs(self.group.check(stored, Credentials("192.0.2.1", bearer="x")), False)


class LDAPBindTests(unittest.TestCase):
    """Against a real slapd (tests/ldap_server.py)."""

    def setUp(self):
        self.slapd = start_slapd(self)
        self.clock = task.Clock()
        self.group = LDAPGroup(clock=self.clock)

    def config(self, **spec):
        return self.group.parse({"type": "ldap", "url": self.slapd.url, **spec}, "g")

    def template(self, **spec):
        return self.config(user_dn=USER_DN, **spec)

    def search(self, **spec):
        return self.config(search_base=PEOPLE, search_filter="(&(objectClass=inetOrgPerson)"
                                                             "(uid={username}))", **spec)

    def check(self, stored, username, password):
        return defer.maybeDeferred(self.group.check, stored, basic(username, password))

    @defer.inlineCallbacks
    def test_right_password(self):
        """The right password binds, with a DN template and with a search."""
        self.assertTrue((yield self.check(self.template(), "alice", USERS["alice"])))
        self.assertTrue((yield self.check(self.search(), "alice", USERS["alice"])))

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """A wrong password fails, with a DN template and with a search."""
        self.assertFalse((yield self.check(self.template(), "alice", USERS["bob"])))
        self.assertFalse((yield self.check(self.search(), "alice", "nope")))

    @defer.inlineCallbacks
    def test_empty_password(self):
        """An empty password fails (slapd would take it for an anonymous bind)."""
        self.assertFalse((yield self.check(self.template(), "alice", "")))
        self.assertFalse((yield self.check(self.search(), "alice", "")))

    @defer.inlineCallbacks
    def test_unknown_user(self):
        """A user that does not exist fails."""
        self.assertFalse((yield self.check(self.template(), "mallory", "x")))
        self.assertFalse((yield self.check(self.search(), "mallory", "x")))

    @defer.inlineCallbacks
    def test_group_member(self):
        """A member of group_dn (member or uniqueMember) passes."""
        self.assertTrue((yield self.check(self.template(group_dn=STAFF), "alice",
                                          USERS["alice"])))
        self.assertTrue((yield self.check(self.search(group_dn=OPS), "bob", USERS["bob"])))

    @defer.inlineCallbacks
    def test_not_in_group(self):
        """A user with the right password who is not in group_dn fails."""
        self.assertFalse((yield self.check(self.template(group_dn=STAFF), "bob", USERS["bob"])))
        self.assertFalse((yield self.check(self.search(group_dn=OPS), "alice",
                                           USERS["alice"])))

    @defer.inlineCallbacks
    def test_search_with_service_account(self):
        """A search as bind_dn finds the user, who then binds."""
        stored = self.search(bind_dn=SERVICE_DN, bind_password=SERVICE_PASSWORD, group_dn=STAFF)
        self.assertTrue((yield self.check(stored, "alice", USERS["alice"])))
        self.assertFalse((yield self.check(stored, "alice", USERS["admin"])))

    @defer.inlineCallbacks
    def test_filter_injection(self):
        """Filter metacharacters in a username are escaped: no wildcard picks a user."""
        stored = self.search()
        for username in INJECTIONS:
            for password in USERS.values():
                self.assertFalse((yield self.check(stored, username, password)),
                                 (username, password))

    @defer.inlineCallbacks
    def test_filter_injection_into_group_check(self):
        """A wildcard username cannot satisfy the group check either."""
        stored = self.search(group_dn=STAFF)
        for username in INJECTIONS:
            self.assertFalse((yield self.check(stored, username, USERS["alice"])))

    @defer.inlineCallbacks
    def test_dn_metacharacters_escaped(self):
        """A username with a DN metacharacter binds as its own entry (uid=carol\\,admin)."""
        self.assertTrue((yield self.check(self.template(), "carol,admin", USERS["carol,admin"])))
        self.assertTrue((yield self.check(self.search(), "carol,admin", USERS["carol,admin"])))

    @defer.inlineCallbacks
    def test_dn_injection(self):
        """DN metacharacters in a username are escaped: it cannot name another entry."""
        stored = self.template()
        for username in ("alice,ou=people", f"alice,{PEOPLE}", "alice+cn=Alice", "*"):
            self.assertFalse((yield self.check(stored, username, USERS["alice"])))

    @defer.inlineCallbacks
    def test_search_bind_refused(self):
        """A wrong search-account password means no match, logged as a warning."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        stored = self.search(bind_dn=SERVICE_DN, bind_password="wrong")
        self.assertFalse((yield self.check(stored, "alice", USERS["alice"])))
        self.assertTrue(any("search bind was refused" in str(e.get("error")) for e in events))

    @defer.inlineCallbacks
    def test_server_down(self):
        """An LDAP server that is not there means no match, not an error."""
        stored = self.template()
        self.slapd.stop()
        self.assertFalse((yield self.check(stored, "alice", USERS["alice"])))

    @defer.inlineCallbacks
    def test_success_cached(self):
        """A success is remembered for 30 seconds: no second bind within them."""
        binds = []
        real = ldap_module.authenticate
        self.patch(ldap_module, "authenticate", lambda *a: binds.append(a) or real(*a))
        stored = self.template()
        self.assertTrue((yield self.check(stored, "alice", USERS["alice"])))
        self.slapd.stop()
        self.clock.advance(29)
        self.assertTrue((yield self.check(stored, "alice", USERS["alice"])))
        self.assertEqual(len(binds), 1)
        self.clock.advance(2)
        self.assertFalse((yield self.check(stored, "alice", USERS["alice"])))
        self.assertEqual(len(binds), 2)


class LDAPSTests(unittest.TestCase):
    """ldaps against a slapd whose certificate nobody trusts."""

    def setUp(self):
        self.slapd = start_slapd(self, tls=True)

    @defer.inlineCallbacks
    def test_untrusted_certificate_refused(self):
        """An ldaps server whose certificate is not trusted is not asked for a password."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        group = LDAPGroup()
        stored = group.parse({"type": "ldap", "url": self.slapd.ldaps_url, "user_dn": USER_DN},
                             "g")
        self.assertFalse((yield group.check(stored, basic("alice", USERS["alice"]))))
        self.assertTrue(any("could not be asked" in e.get("log_format", "") for e in events))

    def test_tls_listener_works(self):
        """(Control) the same server and password bind when certificate checks are off."""
        import ldap3
        server = ldap3.Server(self.slapd.ldaps_url, tls=ldap3.Tls(), get_info=ldap3.NONE,
                              connect_timeout=5)
        connection = ldap3.Connection(server, user=f"uid=alice,{PEOPLE}",
                                      password=USERS["alice"], receive_timeout=5)
        self.assertTrue(connection.bind())
        connection.unbind()
