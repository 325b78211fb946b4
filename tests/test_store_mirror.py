"""hoodyproxy.store.keys and the mirror's one rule (apply only what is newer), without etcd."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.trial import unittest

from hoodyproxy.access import PermissionStore
from hoodyproxy.access.model import parse_permission_set, to_stored_json
from hoodyproxy.aliases import Alias, AliasStore
from hoodyproxy.directory import open_database
from hoodyproxy.store.keys import Keys, Parsed, alias_from_value, alias_value
from hoodyproxy.store.mirror import SharedState
from tests.test_access_model import OFFICE, PROJECT, registry

CONTAINER = "890abcdef12345678901cdef"


class KeyTests(unittest.SynchronousTestCase):
    def test_layout(self) -> None:
        """Each kind's key under the prefix, per node where the thing is per node."""
        keys = Keys("/hoody/v1/", "node-a")
        self.assertEqual(keys.permission("project", PROJECT), f"/hoody/v1/permissions/project/{PROJECT}")
        self.assertEqual(keys.alias("web"), "/hoody/v1/nodes/node-a/aliases/web")
        self.assertEqual(keys.container(CONTAINER, "node-b"), f"/hoody/v1/nodes/node-b/containers/{CONTAINER}")
        self.assertEqual(keys.domain("api.example.com"), "/hoody/v1/domains/api.example.com")

    def test_parse(self) -> None:
        """Keys parse back to what they name; unknown shapes and other prefixes to None."""
        keys = Keys("/hoody/v1", "node-a")
        self.assertEqual(keys.parse(keys.alias("web", "node-b")), Parsed("aliases", "node-b", "web"))
        self.assertEqual(keys.parse(keys.permission("container", CONTAINER)),
                         Parsed("permissions", None, f"container/{CONTAINER}"))
        for key in ("/hoody/v2/domains/x", "/hoody/v1/permissions/group/x", "/hoody/v1/nodes/a/b/c",
                    "/hoody/v1/domains/", "/hoody/v1/nodes//aliases/x"):
            self.assertIsNone(keys.parse(key), key)

    def test_alias_value_round_trip(self) -> None:
        """An alias and its domains survive the value's JSON; a value of another shape is refused."""
        alias = Alias("web", CONTAINER, "http", 8080, 12.5)
        entry, domains = alias_from_value("web", alias_value(alias, ["b.example.com", "a.example.com"]))
        self.assertEqual((entry, entry.created, domains), (alias, 12.5, ["a.example.com", "b.example.com"]))
        for bad in (b"[]", b'{"container_id": 1}', b'{"container_id": "x", "program": "http", "index": true}'):
            self.assertRaises(ValueError, alias_from_value, "web", bad)


class _Stores:
    """A node's real stores and a SharedState on them (no client: nothing talks to etcd)."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="hoodyproxy-mirror-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "db")
        self.conn = open_database(path)
        self.addCleanup(self.conn.close)
        self.permissions = PermissionStore(self.conn, registry())
        self.aliases = AliasStore(self.conn, node="node-a", zone="containers.localhost")
        self.keys = Keys("/hoody/v1", "node-a")
        self.state = SharedState(None, self.keys, self.conn, self.permissions, self.aliases, reactor)

    def pset_value(self, default: str) -> bytes:
        body = {"groups": {"office": OFFICE}, "permissions": {"office": {"files": "read"}}, "default": default}
        return to_stored_json(parse_permission_set(body, "project", PROJECT, registry())).encode()


class ApplyTests(_Stores, unittest.TestCase):
    """SharedState.apply: the one rule, and where each kind of key goes."""

    def test_older_revision_never_overwrites_newer(self) -> None:
        """A change at revision 5 applied after one at 7 (a write's answer racing its watch
        event) leaves the revision 7 state."""
        key = self.keys.permission("project", PROJECT)
        self.assertEqual(self.state.apply(key, 7, self.pset_value("allow")), 1)
        self.assertEqual(self.state.apply(key, 5, self.pset_value("deny")), 0)
        self.assertEqual(self.permissions.get("project", PROJECT).default, "allow")
        self.assertEqual(self.state.apply(key, 7, self.pset_value("allow")), 0)

    def test_revisions_are_kept_with_the_copy(self) -> None:
        """Applied keys are saved with their mod_revision; a delete removes the row."""
        key = self.keys.permission("project", PROJECT)
        self.state.apply(key, 3, self.pset_value("deny"))
        self.assertEqual(list(self.conn.execute("SELECT key, mod_revision FROM shared_keys")), [(key, 3)])
        self.state.apply(key, 4, None)
        self.assertIsNone(self.permissions.get("project", PROJECT))
        self.assertEqual(list(self.conn.execute("SELECT key FROM shared_keys")), [])

    def test_unreadable_permission_set_denies(self) -> None:
        """A permission value the node cannot read becomes a set that denies everything."""
        self.state.apply(self.keys.permission("project", PROJECT), 3, b"{not json")
        self.assertEqual(self.permissions.get("project", PROJECT).default, "deny")
        self.flushLoggedErrors()

    def test_own_alias_goes_to_the_alias_store_others_stay_in_memory(self) -> None:
        """This node's aliases (and domains) route; another node's are only listed."""
        value = alias_value(Alias("web", CONTAINER, "http", 8080), ["api.example.com"])
        self.state.apply(self.keys.alias("web"), 2, value)
        self.state.apply(self.keys.alias("docs", "node-b"), 3, value)
        self.assertEqual(self.aliases.resolve_host("api.example.com"), (CONTAINER, "http", 8080))
        self.assertIsNone(self.aliases.get("docs"))
        self.assertEqual([(n, name) for n, name, _ in self.state.view("aliases")],
                         [("node-a", "web"), ("node-b", "docs")])
        self.state.apply(self.keys.alias("web"), 4, None)
        self.assertIsNone(self.aliases.resolve_host("api.example.com"))


class _Range:
    """A client stand-in whose range answers what the test says the store holds."""

    def __init__(self, revision: int, kvs) -> None:
        self.answer = (revision, kvs)

    async def range(self, key, prefix=False):
        return self.answer


class SnapshotTests(_Stores, unittest.TestCase):
    """SharedState.load_snapshot against a stand-in client."""

    async def test_rewrites_only_what_changed(self) -> None:
        """A full read rewrites the keys whose mod_revision differs and removes those gone."""
        from hoodyproxy.store.etcd import KeyValue
        keys = [self.keys.permission("project", f"{i:024x}") for i in range(1, 4)]
        for i, key in enumerate(keys):
            self.state.apply(key, 10 + i, self.pset_value("deny"))
        self.state.client = _Range(20, [KeyValue(keys[0], self.pset_value("deny"), 10),
                                        KeyValue(keys[1], self.pset_value("allow"), 15)])
        self.assertEqual(await self.state.load_snapshot(), 2)
        self.assertEqual([s.default for s in self.permissions.list()], ["deny", "allow"])

    async def test_own_write_newer_than_the_read_is_kept(self) -> None:
        """A set this node wrote (revision 9) while a read at revision 8 was under way stays."""
        key = self.keys.permission("project", PROJECT)
        self.state.apply(key, 9, self.pset_value("deny"))
        self.state.client = _Range(8, [])
        await self.state.load_snapshot()
        self.assertEqual(self.permissions.get("project", PROJECT).default, "deny")

    async def test_local_only_entries_are_removed(self) -> None:
        """Sets the node's database holds and the shared store does not are removed."""
        self.permissions.put(parse_permission_set({"default": "deny"}, "project", PROJECT, registry()))
        self.state.client = _Range(3, [])
        self.assertEqual(await self.state.load_snapshot(), 1)
        self.assertEqual(self.permissions.list(), [])
