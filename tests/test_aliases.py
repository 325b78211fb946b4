"""Specification of aliases and custom domains (:mod:`hoodyproxy.aliases`) and their admin API.

Validation is pure and tested by table and with hypothesis; the store runs on a real
SQLite file (two connections play two processes); the admin API is a real
:class:`~hoodyproxy.admin.api.AdminAPI` on loopback spoken to with treq.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile

import treq
from hypothesis import given, settings, strategies as st
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from hoodyproxy import errors
from hoodyproxy.admin.api import AdminAPI
from hoodyproxy.aliases import (Alias, AliasExists, AliasStore, DomainExists, InvalidAlias, NoSuchAlias,
                                alias_url, check_alias, check_domain, check_target)
from hoodyproxy.config import DEFAULT_PROGRAMS, Program
from hoodyproxy.directory import Container, SQLiteDirectory, open_database
from hoodyproxy.routing import Router

NODE, ZONE = "node-local", "containers.localhost"
PROJECT = "67e89abc123def456789abcd"
CID = "890abcdef12345678901cdef"
CID2 = "111111111111111111111111"
TOKEN = "alias-test-admin-token-0123456789"


def temp_db(case) -> str:
    directory = tempfile.mkdtemp(prefix="hoodyproxy-aliases-")
    case.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, "hoodyproxy.db")


def open_store(path: str, **kw) -> AliasStore:
    kw.setdefault("node", NODE)
    kw.setdefault("zone", ZONE)
    return AliasStore(open_database(path), **kw)


class AliasValidationTests(unittest.SynchronousTestCase):
    """check_alias: one lowercase DNS label, never route-shaped, never reserved."""

    GOOD = ["my-api", "a", "x1", "0", "a" * 63, "web-3000", "xn--bcher-kva", "api2", "ab-cd"]
    BAD = [
        ("", "empty"), ("a" * 64, "64 characters"), ("My-Api", "uppercase"), ("-api", "leading dash"),
        ("api-", "trailing dash"), ("my_api", "underscore"), ("my.api", "two labels"), ("my api", "space"),
        ("ab--cd", "'--' in positions 3-4"), ("é", "non-ascii"),
        (f"{PROJECT}-{CID}-http-3000", "a real route label"),
        (f"{PROJECT}-{CID}-", "a route prefix"),
        ("zzzzzzzzzzzzzzzzzzzzzzzz-zzzzzzzzzzzzzzzzzzzzzzzz-http-1", "route-shaped with non-hex ids"),
        (f"{PROJECT}-{CID}", "two ids"),
        ("admin", "reserved"), ("www", "reserved"), ("api", "reserved"),
    ]

    def test_good(self):
        """Every good alias is returned unchanged."""
        for value in self.GOOD:
            self.assertEqual(check_alias(value), value)

    def test_bad(self):
        """Every bad alias raises InvalidAlias naming the field ``alias``."""
        for value, why in self.BAD:
            with self.assertRaises(InvalidAlias, msg=why) as caught:
                check_alias(value)
            self.assertEqual(caught.exception.field, "alias", why)

    def test_not_a_string(self):
        """Numbers and null are not aliases."""
        for value in (3, None, ["a"]):
            self.assertRaises(InvalidAlias, check_alias, value)

    @settings(max_examples=300, deadline=None)
    @given(st.from_regex(r"[a-z0-9-]{1,63}", fullmatch=True))
    def test_accepted_alias_is_never_a_route(self, label):
        """A label check_alias accepts never parses as a route label (the two never overlap)."""
        try:
            check_alias(label)
        except InvalidAlias:
            return
        with self.assertRaises(errors.GatewayError):
            Router(NODE, ZONE, DEFAULT_PROGRAMS).parse_label(label, label + "." + NODE + "." + ZONE)

    @settings(max_examples=200, deadline=None)
    @given(st.from_regex(r"[0-9a-f]{24}", fullmatch=True), st.from_regex(r"[0-9a-f]{24}", fullmatch=True),
           st.sampled_from(sorted(DEFAULT_PROGRAMS)), st.integers(1, 999))
    def test_route_label_is_never_an_alias(self, project, container, program, index):
        """Every route label is refused as an alias."""
        self.assertRaises(InvalidAlias, check_alias, f"{project}-{container}-{program}-{index}")


class DomainValidationTests(unittest.SynchronousTestCase):
    """check_domain: a lowercase DNS name of two labels or more, outside the node's zone."""

    def check(self, value):
        return check_domain(value, ZONE, NODE)

    def test_good(self):
        for value, expected in [("api.yourcompany.com", "api.yourcompany.com"),
                                ("API.YourCompany.COM", "api.yourcompany.com"),
                                ("api.yourcompany.com.", "api.yourcompany.com"),
                                ("example.org", "example.org"),
                                ("xn--bcher-kva.example", "xn--bcher-kva.example"),
                                ("a.b.c.d.e.f.example.com", "a.b.c.d.e.f.example.com"),
                                ("1.example.com", "1.example.com"),
                                ("localhost.example", "localhost.example")]:
            self.assertEqual(self.check(value), expected)

    def test_bad(self):
        long_name = ".".join(["a" * 63] * 4)  # 255 characters
        for value, why in [
            ("", "empty"), ("com", "one label"), ("localhost", "one label"),
            ("*.example.com", "wildcard"), ("a*.example.com", "wildcard in a label"),
            ("192.0.2.1", "IPv4 literal"), ("::1", "IPv6 literal"), ("[::1]", "bracketed IPv6"),
            ("10.0.0.1.", "IPv4 with a dot"), ("example.123", "numeric top-level label"),
            ("my-api.node-local.containers.localhost", "under the node"),
            ("x.containers.localhost", "under the zone"), ("containers.localhost", "the zone"),
            ("node-local.containers.localhost", "the node"),
            ("-a.example.com", "leading dash"), ("a..example.com", "empty label"),
            ("a_b.example.com", "underscore"), ("bücher.example", "non-ascii"),
            (long_name, "longer than 253"), (("a" * 64) + ".com", "label longer than 63"),
            ("example.com/x", "slash"), ("example.com:443", "port"),
        ]:
            with self.assertRaises(InvalidAlias, msg=why) as caught:
                self.check(value)
            self.assertEqual(caught.exception.field, "domain", why)

    def test_253_characters(self):
        """253 characters is the longest name accepted."""
        name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
        self.assertEqual(len(name), 253)
        self.assertEqual(self.check(name), name)


class TargetValidationTests(unittest.SynchronousTestCase):
    """check_target: the container id, and a program and index as a route label would allow."""

    def test_port_program(self):
        self.assertEqual(check_target(CID, "http", 3000, DEFAULT_PROGRAMS), (CID, "http", 3000))
        for index in (1, 65535):
            check_target(CID, "http", index, DEFAULT_PROGRAMS)
        for index in (0, 65536, -1):
            with self.assertRaises(InvalidAlias) as caught:
                check_target(CID, "http", index, DEFAULT_PROGRAMS)
            self.assertEqual(caught.exception.field, "index")

    def test_instance_program(self):
        programs = dict(DEFAULT_PROGRAMS, tiny=Program("tiny", "instance", 80, "generic", 3))
        check_target(CID, "tiny", 3, programs)
        for index in (0, 4):
            with self.assertRaises(InvalidAlias) as caught:
                check_target(CID, "tiny", index, programs)
            self.assertEqual(caught.exception.field, "index")

    def test_index_must_be_an_integer(self):
        for index in ("3000", 3000.0, True, None):
            with self.assertRaises(InvalidAlias) as caught:
                check_target(CID, "http", index, DEFAULT_PROGRAMS)
            self.assertEqual(caught.exception.field, "index")

    def test_unknown_program(self):
        with self.assertRaises(InvalidAlias) as caught:
            check_target(CID, "gopher", 1, DEFAULT_PROGRAMS)
        self.assertEqual(caught.exception.field, "program")

    def test_bad_container_id(self):
        for value in ("", CID.upper(), CID[:-1], 5, None):
            with self.assertRaises(InvalidAlias) as caught:
                check_target(value, "http", 1, DEFAULT_PROGRAMS)
            self.assertEqual(caught.exception.field, "container_id")

    def test_alias_url(self):
        """The URL leaves out port 443 and names any other."""
        self.assertEqual(alias_url("my-api", "n.z"), "https://my-api.n.z/")
        self.assertEqual(alias_url("my-api", "n.z", 8443), "https://my-api.n.z:8443/")


class AliasStoreTests(unittest.TestCase):
    """The store: durable writes, memory answers, cascades, other processes' writes."""

    def setUp(self):
        self.path = temp_db(self)
        self.store = open_store(self.path)
        self.events: list[tuple[str, str]] = []
        self.store.subscribe(lambda kind, name: self.events.append((kind, name)))

    def test_create_and_resolve(self):
        """A created alias resolves from memory to (container, program, index)."""
        alias = self.store.create("my-api", CID, "http", 3000)
        self.assertEqual(alias, Alias("my-api", CID, "http", 3000))
        self.assertEqual(self.store.resolve_alias("my-api"), (CID, "http", 3000))
        self.assertIsNone(self.store.resolve_alias("other"))
        self.assertEqual(self.events, [("alias", "my-api")])

    def test_create_is_durable(self):
        """Another connection (a restarted process) sees the alias."""
        self.store.create("my-api", CID, "http", 3000)
        again = open_store(self.path)
        self.assertEqual(again.get("my-api"), Alias("my-api", CID, "http", 3000))

    def test_duplicate_alias(self):
        """A second create of the same name raises AliasExists and changes nothing."""
        self.store.create("my-api", CID, "http", 3000)
        self.assertRaises(AliasExists, self.store.create, "my-api", CID2, "http", 80)
        self.assertEqual(self.store.resolve_alias("my-api"), (CID, "http", 3000))

    def test_invalid_create_writes_nothing(self):
        self.assertRaises(InvalidAlias, self.store.create, "Bad", CID, "http", 1)
        self.assertRaises(InvalidAlias, self.store.create, "ok", CID, "http", 0)
        self.assertEqual(self.store.list(), [])

    def test_several_aliases_one_container(self):
        """Several aliases may point at one container; list filters by container."""
        self.store.create("b-api", CID, "http", 3000)
        self.store.create("a-web", CID, "http", 80)
        self.store.create("other", CID2, "terminal", 1)
        self.assertEqual([a.alias for a in self.store.list()], ["a-web", "b-api", "other"])
        self.assertEqual([a.alias for a in self.store.list(CID)], ["a-web", "b-api"])
        self.assertEqual([a.alias for a in self.store.list(CID2)], ["other"])

    def test_attach_and_resolve_domain(self):
        """An attached domain resolves to its alias, is_attached, and is normalized."""
        self.store.create("my-api", CID, "http", 3000)
        self.assertEqual(self.store.attach("my-api", "API.YourCompany.com."), "api.yourcompany.com")
        self.assertEqual(self.store.resolve_domain("api.yourcompany.com"), "my-api")
        self.assertTrue(self.store.is_attached("api.yourcompany.com"))
        self.assertFalse(self.store.is_attached("www.yourcompany.com"))
        self.assertEqual(self.store.domains("my-api"), ["api.yourcompany.com"])
        self.assertEqual(self.events[-1], ("domain", "api.yourcompany.com"))
        self.assertEqual(self.store.hostname("my-api"), f"my-api.{NODE}.{ZONE}")

    def test_attach_errors(self):
        """A missing alias, a domain attached elsewhere and a bad domain are refused."""
        self.store.create("one", CID, "http", 1)
        self.store.create("two", CID, "http", 2)
        self.assertRaises(NoSuchAlias, self.store.attach, "three", "a.example.com")
        self.store.attach("one", "a.example.com")
        with self.assertRaises(DomainExists) as caught:
            self.store.attach("two", "A.example.com")
        self.assertEqual(caught.exception.alias, "one")
        self.assertRaises(InvalidAlias, self.store.attach, "one", "x.containers.localhost")
        self.assertEqual(self.store.domains(), ["a.example.com"])

    def test_detach(self):
        self.store.create("one", CID, "http", 1)
        self.store.attach("one", "a.example.com")
        self.assertFalse(self.store.detach("a.example.com", alias="other"))
        self.assertTrue(self.store.detach("a.example.com"))
        self.assertFalse(self.store.detach("a.example.com"))
        self.assertIsNone(self.store.resolve_domain("a.example.com"))
        self.assertFalse(self.store.is_attached("a.example.com"))

    def test_delete_cascades_domains(self):
        """Deleting an alias detaches its domains, on disk and in memory, and says so."""
        self.store.create("one", CID, "http", 1)
        self.store.create("two", CID, "http", 2)
        self.store.attach("one", "a.example.com")
        self.store.attach("one", "b.example.com")
        self.store.attach("two", "c.example.com")
        del self.events[:]
        self.assertTrue(self.store.delete("one"))
        self.assertFalse(self.store.delete("one"))
        self.assertEqual(self.store.domains(), ["c.example.com"])
        self.assertIsNone(self.store.resolve_alias("one"))
        self.assertEqual(self.events, [("alias", "one"), ("domain", "a.example.com"),
                                       ("domain", "b.example.com")])
        rows = sqlite3.connect(self.path).execute("SELECT domain FROM domains").fetchall()
        self.assertEqual(rows, [("c.example.com",)])

    def test_other_process_writes_are_seen(self):
        """Writes through another connection are noticed (data_version) and reported."""
        other = open_store(self.path)
        other.create("my-api", CID, "http", 3000)
        other.attach("my-api", "api.example.com")
        version = self.store.version
        self.store.refresh()
        self.assertEqual(self.store.resolve_alias("my-api"), (CID, "http", 3000))
        self.assertEqual(self.store.resolve_domain("api.example.com"), "my-api")
        self.assertIn(("domain", "api.example.com"), self.events)
        self.assertGreater(self.store.version, version)
        other.delete("my-api")
        self.assertFalse(self.store.is_attached("api.example.com"))
        self.assertIn(("alias", "my-api"), self.events[-2:])

    def test_version_grows_on_every_write(self):
        versions = [self.store.version]
        self.store.create("one", CID, "http", 1)
        versions.append(self.store.version)
        self.store.attach("one", "a.example.com")
        versions.append(self.store.version)
        self.store.detach("a.example.com")
        versions.append(self.store.version)
        self.assertEqual(versions, sorted(set(versions)))

    def test_failing_subscriber_does_not_stop_the_write(self):
        def boom(kind, name):
            raise RuntimeError("subscriber bug")
        self.store.subscribe(boom)
        self.store.create("one", CID, "http", 1)
        self.assertEqual(self.store.resolve_alias("one"), (CID, "http", 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_program_table_is_the_nodes(self):
        """An operator program (from Settings.programs) is accepted with its own index rule."""
        programs = dict(DEFAULT_PROGRAMS, vnc=Program("vnc", "instance", 5900, "display", 4))
        store = open_store(temp_db(self), programs=programs)
        store.create("desk", CID, "vnc", 4)
        self.assertRaises(InvalidAlias, store.create, "desk2", CID, "vnc", 5)

    def test_migration_tables(self):
        """The migration makes both tables, and foreign keys cascade."""
        conn = open_database(temp_db(self))
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        self.assertLessEqual({"aliases", "domains"}, tables)
        conn.execute('INSERT INTO aliases (alias, container_id, program, "index", created) '
                     "VALUES ('a', ?, 'http', 1, 0)", (CID,))
        conn.execute("INSERT INTO domains (domain, alias, created) VALUES ('a.example.com', 'a', 0)")
        conn.execute("DELETE FROM aliases WHERE alias = 'a'")
        self.assertEqual(conn.execute("SELECT COUNT(*) FROM domains").fetchone()[0], 0)
        with self.assertRaises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO domains (domain, alias, created) VALUES ('b.example.com', 'zz', 0)")


def start_admin(case, *, aliases: bool = True, **api_kw):
    """A real AdminAPI with an alias store on loopback: (base URL, directory, alias store)."""
    path = temp_db(case)
    conn = open_database(path)
    directory = SQLiteDirectory(conn)
    store = AliasStore(conn, node=NODE, zone=ZONE) if aliases else None
    site = Site(AdminAPI(directory, TOKEN, aliases=store, **api_kw))
    site.log = lambda request: None
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    return f"http://127.0.0.1:{port.getHost().port}", directory, store


class AliasAPITests(unittest.TestCase):
    """``/api/v1/proxy/aliases``: the exact shapes of the issue."""

    def setUp(self):
        self.base, self.directory, self.store = start_admin(
            self, base_url_for=lambda alias: f"https://{alias}.{NODE}.{ZONE}:8443/")
        self.directory.put(Container(CID, PROJECT, "10.0.0.7"))
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)

    async def request(self, method, path, body=None, token=TOKEN):
        headers = {b"Authorization": [b"Bearer " + token.encode()]}
        data = json.dumps(body).encode() if body is not None else None
        response = await treq.request(method, self.base + path, data=data, headers=headers, agent=self.agent)
        content = await response.content()
        return response.code, (json.loads(content) if content else None)

    async def create(self, alias="my-api", container_id=CID, program="http", index=3000):
        return await self.request("POST", "/api/v1/proxy/aliases",
                                  {"container_id": container_id, "alias": alias, "program": program,
                                   "index": index})

    async def test_create(self):
        """POST answers 201 with the alias and its URL, and stores it."""
        status, body = await self.create()
        self.assertEqual(status, 201)
        self.assertEqual(body, {"alias": "my-api", "container_id": CID, "program": "http", "index": 3000,
                                "url": f"https://my-api.{NODE}.{ZONE}:8443/"})
        self.assertEqual(self.store.resolve_alias("my-api"), (CID, "http", 3000))

    async def test_create_conflict(self):
        await self.create()
        status, body = await self.create(index=80)
        self.assertEqual((status, body["error"], body["field"]), (409, "conflict", "alias"))
        self.assertEqual(self.store.resolve_alias("my-api"), (CID, "http", 3000))

    async def test_create_invalid_names_the_field(self):
        """Each bad field is a 422 naming it; nothing is stored."""
        cases = [({"alias": "Bad"}, "alias"), ({"alias": f"{PROJECT}-{CID}-http-1"}, "alias"),
                 ({"program": "gopher"}, "program"), ({"index": 0}, "index"), ({"index": "80"}, "index"),
                 ({"container_id": "xyz"}, "container_id"), ({"container_id": CID2}, "container_id")]
        for change, field in cases:
            body = {"container_id": CID, "alias": "ok", "program": "http", "index": 80, **change}
            status, answer = await self.request("POST", "/api/v1/proxy/aliases", body)
            self.assertEqual((status, answer["field"]), (422, field), answer)
            self.assertTrue(answer["message"].startswith(field + ":"), answer)
        self.assertEqual(self.store.list(), [])

    async def test_create_missing_and_unknown_fields(self):
        status, body = await self.request("POST", "/api/v1/proxy/aliases", {"alias": "x"})
        self.assertEqual((status, body["field"]), (422, "container_id"))
        status, body = await self.request("POST", "/api/v1/proxy/aliases",
                                          {"container_id": CID, "alias": "x", "program": "http", "index": 1,
                                           "project": PROJECT})
        self.assertEqual((status, body["field"]), (422, "project"))
        status, body = await self.request("POST", "/api/v1/proxy/aliases", [1])
        self.assertEqual((status, body["field"]), (422, "body"))

    async def test_container_must_be_in_the_live_map(self):
        """An alias for a container the node does not know is a 422 on container_id."""
        status, body = await self.create(container_id=CID2)
        self.assertEqual((status, body["field"]), (422, "container_id"))
        self.assertIn("live map", body["message"])

    async def test_list_get_delete(self):
        self.directory.put(Container(CID2, PROJECT, "10.0.0.8"))
        await self.create("b-api")
        await self.create("a-web", index=80)
        await self.create("other", container_id=CID2, program="terminal", index=1)
        status, body = await self.request("GET", "/api/v1/proxy/aliases")
        self.assertEqual(status, 200)
        self.assertEqual([a["alias"] for a in body["aliases"]], ["a-web", "b-api", "other"])
        status, body = await self.request("GET", f"/api/v1/proxy/aliases?container_id={CID2}")
        self.assertEqual([a["alias"] for a in body["aliases"]], ["other"])
        status, body = await self.request("GET", "/api/v1/proxy/aliases?container_id=nope")
        self.assertEqual((status, body["field"]), (422, "container_id"))
        status, body = await self.request("GET", "/api/v1/proxy/aliases/a-web")
        self.assertEqual((status, body["index"], body["domains"]), (200, 80, []))
        self.assertEqual(await self.request("DELETE", "/api/v1/proxy/aliases/a-web"), (204, None))
        self.assertEqual((await self.request("GET", "/api/v1/proxy/aliases/a-web"))[0], 404)
        self.assertEqual((await self.request("DELETE", "/api/v1/proxy/aliases/a-web"))[0], 404)

    async def test_domains(self):
        """Attach (201), list, conflict (409), bad (422), detach (204); alias deletion cascades."""
        await self.create()
        await self.create("my-web", index=80)
        path = "/api/v1/proxy/aliases/my-api/domains"
        status, body = await self.request("POST", path, {"domain": "API.yourcompany.com"})
        self.assertEqual((status, body), (201, {"domain": "api.yourcompany.com", "alias": "my-api",
                                                "cname": f"my-api.{NODE}.{ZONE}"}))
        self.assertEqual(self.store.resolve_domain("api.yourcompany.com"), "my-api")
        status, body = await self.request("POST", "/api/v1/proxy/aliases/my-web/domains",
                                          {"domain": "api.yourcompany.com"})
        self.assertEqual((status, body["field"]), (409, "domain"))
        self.assertIn("my-api", body["message"])
        for bad in ("*.yourcompany.com", "192.0.2.1", "x.containers.localhost", "com", 5):
            status, body = await self.request("POST", path, {"domain": bad})
            self.assertEqual((status, body["field"]), (422, "domain"), bad)
        status, body = await self.request("POST", "/api/v1/proxy/aliases/nope/domains", {"domain": "a.example.com"})
        self.assertEqual(status, 404)
        status, body = await self.request("GET", path)
        self.assertEqual(body, {"domains": [{"domain": "api.yourcompany.com", "alias": "my-api",
                                             "cname": f"my-api.{NODE}.{ZONE}"}]})
        status, body = await self.request("GET", "/api/v1/proxy/aliases/my-api")
        self.assertEqual(body["domains"], ["api.yourcompany.com"])
        self.assertEqual((await self.request("DELETE", path + "/api.yourcompany.com"))[0], 204)
        self.assertEqual((await self.request("DELETE", path + "/api.yourcompany.com"))[0], 404)
        await self.request("POST", path, {"domain": "b.example.com"})
        await self.request("DELETE", "/api/v1/proxy/aliases/my-api")
        self.assertFalse(self.store.is_attached("b.example.com"))

    async def test_domain_of_another_alias_is_not_deleted_through_this_one(self):
        await self.create()
        await self.create("my-web", index=80)
        await self.request("POST", "/api/v1/proxy/aliases/my-api/domains", {"domain": "a.example.com"})
        status, _ = await self.request("DELETE", "/api/v1/proxy/aliases/my-web/domains/a.example.com")
        self.assertEqual(status, 404)
        self.assertTrue(self.store.is_attached("a.example.com"))

    async def test_certificate_status_is_shown(self):
        """With a certificate_status source, domain reads carry the certificate's state."""
        self.base, self.directory, self.store = start_admin(
            self, certificate_status=lambda d: {"status": "valid"} if d == "a.example.com" else None)
        self.directory.put(Container(CID, PROJECT, "10.0.0.7"))
        status, body = await self.create()
        self.assertEqual(body["url"], f"https://my-api.{NODE}.{ZONE}/")
        await self.request("POST", "/api/v1/proxy/aliases/my-api/domains", {"domain": "a.example.com"})
        await self.request("POST", "/api/v1/proxy/aliases/my-api/domains", {"domain": "b.example.com"})
        status, body = await self.request("GET", "/api/v1/proxy/aliases/my-api/domains")
        self.assertEqual([d.get("certificate") for d in body["domains"]], [{"status": "valid"}, None])
        status, body = await self.request("GET", "/api/v1/proxy/aliases/my-api/domains/a.example.com")
        self.assertEqual(body["certificate"], {"status": "valid"})

    async def test_methods_and_auth(self):
        self.assertEqual((await self.request("PUT", "/api/v1/proxy/aliases"))[0], 405)
        self.assertEqual((await self.request("GET", "/api/v1/proxy/aliases", token="wrong"))[0], 401)
        await self.create()
        self.assertEqual((await self.request("PUT", "/api/v1/proxy/aliases/my-api"))[0], 405)
        self.assertEqual((await self.request("GET", "/api/v1/proxy/aliases/my-api/other"))[0], 404)

    async def test_not_configured(self):
        """Without an alias store the endpoints are 404 (the other endpoints still work)."""
        self.base, _, _ = start_admin(self, aliases=False)
        self.assertEqual((await self.request("GET", "/api/v1/proxy/aliases"))[0], 404)
        self.assertEqual((await self.request("GET", "/api/v1/containers"))[0], 200)


class ResolveHostTests(unittest.SynchronousTestCase):
    """resolve_host: the gateway's hook for a Host that is not a route label."""

    def setUp(self):
        self.store = open_store(temp_db(self))
        self.store.create("my-api", CID, "http", 3000)
        self.store.attach("my-api", "api.yourcompany.com")

    def test_alias_host(self):
        self.assertEqual(self.store.resolve_host(f"my-api.{NODE}.{ZONE}"), (CID, "http", 3000))

    def test_custom_domain(self):
        self.assertEqual(self.store.resolve_host("api.yourcompany.com"), (CID, "http", 3000))

    def test_unknown(self):
        for host in (f"other.{NODE}.{ZONE}", f"x.my-api.{NODE}.{ZONE}", f"my-api.other-node.{ZONE}",
                     "my-api", "www.yourcompany.com", f"{NODE}.{ZONE}"):
            self.assertIsNone(self.store.resolve_host(host), host)

    def test_follows_changes(self):
        """A detached domain and a deleted alias stop resolving at once."""
        self.store.detach("api.yourcompany.com")
        self.assertIsNone(self.store.resolve_host("api.yourcompany.com"))
        self.store.delete("my-api")
        self.assertIsNone(self.store.resolve_host(f"my-api.{NODE}.{ZONE}"))
