"""Specification of the permission store: SQLite as the truth, memory for every request."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from hoodyproxy.access import InvalidPermissions, PermissionSet, PermissionStore, parse_permission_set
from hoodyproxy.directory import open_database
from hoodyproxy.directory._db import MIGRATIONS
from tests.test_access_model import CONTAINER, OTHER_PROJECT, PROJECT, container_body, project_body, registry

OTHER_CONTAINER = "111111111111111111111111"


class FakeMonotonic:
    """A monotonic clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StoreCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = registry()
        directory = tempfile.mkdtemp(prefix="hoodyproxy-access-store-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.path = os.path.join(directory, "hoodyproxy.db")

    def connect(self) -> sqlite3.Connection:
        conn = open_database(self.path)
        self.addCleanup(conn.close)
        return conn

    def store(self, **kw) -> PermissionStore:
        return PermissionStore(self.connect(), self.registry, **kw)

    def project_set(self, project: str = PROJECT, **overrides) -> PermissionSet:
        return parse_permission_set(project_body(**overrides), "project", project, self.registry)

    def container_set(self, container: str = CONTAINER, **overrides) -> PermissionSet:
        body = container_body(container=container, **overrides)
        return parse_permission_set(body, "container", container, self.registry)


class SchemaTests(StoreCase):
    def test_table_created_by_migration(self) -> None:
        """Opening the database creates ``permission_sets`` with the expected columns."""
        conn = self.connect()
        columns = [row[1] for row in conn.execute("PRAGMA table_info(permission_sets)")]
        self.assertEqual(columns, ["scope", "id", "project", "body", "updated"])
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], len(MIGRATIONS))

    def test_primary_key_is_scope_and_id(self) -> None:
        """A project and a container may share an id string; (scope, id) is the key."""
        s = self.store()
        s.put(self.project_set(CONTAINER))
        s.put(self.container_set(CONTAINER))
        self.assertEqual(len(s.list()), 2)


class ReadWriteTests(StoreCase):
    def test_empty(self) -> None:
        """A new store has no sets."""
        s = self.store()
        self.assertIsNone(s.get("project", PROJECT))
        self.assertEqual(s.list(), [])

    def test_put_then_get(self) -> None:
        """A set put is got back by (scope, id)."""
        s = self.store()
        pset = self.project_set()
        self.assertFalse(s.put(pset))
        self.assertEqual(s.get("project", PROJECT), pset)

    def test_put_reports_replacement(self) -> None:
        """``put`` answers True when it replaced a stored set."""
        s = self.store()
        s.put(self.project_set())
        self.assertTrue(s.put(self.project_set(default="allow")))
        self.assertEqual(s.get("project", PROJECT).default, "allow")

    def test_delete(self) -> None:
        """``delete`` removes a set and answers True; a second delete answers False."""
        s = self.store()
        s.put(self.project_set())
        self.assertTrue(s.delete("project", PROJECT))
        self.assertIsNone(s.get("project", PROJECT))
        self.assertFalse(s.delete("project", PROJECT))

    def test_list_by_scope(self) -> None:
        """``list(scope)`` gives the sets of one scope, ordered by id."""
        s = self.store()
        s.put(self.container_set())
        s.put(self.project_set(OTHER_PROJECT))
        s.put(self.project_set())
        self.assertEqual([p.id for p in s.list("project")], [OTHER_PROJECT, PROJECT])
        self.assertEqual([p.id for p in s.list("container")], [CONTAINER])

    def test_survives_reopen(self) -> None:
        """What was put is there after the database is closed and opened again."""
        conn = open_database(self.path)
        s = PermissionStore(conn, self.registry)
        pset, cset = self.project_set(), self.container_set()
        s.put(pset)
        s.put(cset)
        conn.close()
        reopened = self.store()
        self.assertEqual(reopened.get("project", PROJECT), pset)
        self.assertEqual(reopened.get("container", CONTAINER), cset)

    def test_stored_secrets_not_rehashed_on_load(self) -> None:
        """Loading a stored set does not parse its groups again (the hash is as stored)."""
        s = self.store()
        pset = self.project_set()
        s.put(pset)
        parsed = self.registry["token"].parsed
        self.assertEqual(self.store().get("project", PROJECT).groups["team"], pset.groups["team"])
        self.assertEqual(self.registry["token"].parsed, parsed)

    def test_unreadable_row_denies(self) -> None:
        """A row that cannot be read becomes a deny-everything set, never "no set" (which passes)."""
        conn = self.connect()
        conn.execute("INSERT INTO permission_sets VALUES ('project', ?, ?, 'not json', 0)", (PROJECT, PROJECT))
        pset = PermissionStore(conn, self.registry).effective(PROJECT, CONTAINER)
        self.assertEqual((dict(pset.groups), pset.default), ({}, "deny"))


class UpdateTests(StoreCase):
    def test_update_replaces_with_change(self) -> None:
        """``update`` stores what ``change(stored)`` returns and returns it."""
        s = self.store()
        s.put(self.project_set())
        new = s.update("project", PROJECT, lambda old: self.project_set(default="allow"))
        self.assertEqual(new.default, "allow")
        self.assertEqual(self.store().get("project", PROJECT).default, "allow")

    def test_update_missing(self) -> None:
        """``update`` of a set that is not stored returns None and writes nothing."""
        s = self.store()
        called = []
        self.assertIsNone(s.update("project", PROJECT, called.append))
        self.assertEqual(called, [])
        self.assertIsNone(self.store().get("project", PROJECT))

    def test_update_change_raises(self) -> None:
        """If ``change`` raises, nothing is written, the error propagates, the version is unchanged."""
        s = self.store()
        s.put(self.project_set())
        version = s.version

        def change(old):
            raise InvalidPermissions("default", "bad")
        self.assertRaises(InvalidPermissions, s.update, "project", PROJECT, change)
        self.assertEqual(s.get("project", PROJECT).default, "deny")
        self.assertEqual(s.version, version)
        # the connection is usable again (no transaction left open)
        s.put(self.project_set(default="allow"))

    def test_update_reads_disk(self) -> None:
        """``update`` passes ``change`` the set on disk, even one another process just wrote."""
        mine = self.store(monotonic=FakeMonotonic())
        mine.put(self.project_set())
        self.store().put(self.project_set(default="allow"))
        seen = []
        mine.update("project", PROJECT, lambda old: seen.append(old.default) or old)
        self.assertEqual(seen, ["allow"])

    def test_update_cannot_move_set(self) -> None:
        """``change`` may not return a set of another scope or id."""
        s = self.store()
        s.put(self.project_set())
        self.assertRaises(ValueError, s.update, "project", PROJECT, lambda old: self.project_set(OTHER_PROJECT))
        self.assertIsNone(s.get("project", OTHER_PROJECT))


class EffectiveTests(StoreCase):
    def test_neither(self) -> None:
        """With no container and no project set, ``effective`` is None (the request passes)."""
        self.assertIsNone(self.store().effective(PROJECT, CONTAINER))

    def test_project_set(self) -> None:
        """With only a project set, it governs every container of the project."""
        s = self.store()
        pset = self.project_set()
        s.put(pset)
        self.assertEqual(s.effective(PROJECT, CONTAINER), pset)
        self.assertEqual(s.effective(PROJECT, OTHER_CONTAINER), pset)
        self.assertIsNone(s.effective(OTHER_PROJECT, CONTAINER))

    def test_container_set_replaces_project_set(self) -> None:
        """A container set, if present, replaces the project set for that container only."""
        s = self.store()
        pset, cset = self.project_set(), self.container_set(default="allow")
        s.put(pset)
        s.put(cset)
        self.assertEqual(s.effective(PROJECT, CONTAINER), cset)
        self.assertEqual(s.effective(PROJECT, OTHER_CONTAINER), pset)

    def test_container_set_alone(self) -> None:
        """A container set applies without any project set."""
        s = self.store()
        cset = self.container_set()
        s.put(cset)
        self.assertEqual(s.effective(PROJECT, CONTAINER), cset)

    def test_deleting_container_set_falls_back(self) -> None:
        """After the container set is deleted the project set governs again."""
        s = self.store()
        pset = self.project_set()
        s.put(pset)
        s.put(self.container_set())
        s.delete("container", CONTAINER)
        self.assertEqual(s.effective(PROJECT, CONTAINER), pset)


class VersionTests(StoreCase):
    def test_put_bumps_version(self) -> None:
        """Every put raises ``version``."""
        s = self.store()
        v0 = s.version
        s.put(self.project_set())
        v1 = s.version
        s.put(self.project_set(default="allow"))
        self.assertLess(v0, v1)
        self.assertLess(v1, s.version)

    def test_delete_bumps_version(self) -> None:
        """A delete that removed something raises ``version``; one that did not leaves it."""
        s = self.store()
        s.put(self.project_set())
        v = s.version
        s.delete("project", PROJECT)
        self.assertLess(v, s.version)
        v = s.version
        s.delete("project", PROJECT)
        self.assertEqual(s.version, v)

    def test_update_bumps_version(self) -> None:
        """A successful update raises ``version``."""
        s = self.store()
        s.put(self.project_set())
        v = s.version
        s.update("project", PROJECT, lambda old: old)
        self.assertLess(v, s.version)

    def test_reads_do_not_bump_version(self) -> None:
        """Reads and refreshes without changes leave ``version`` alone."""
        s = self.store()
        s.put(self.project_set())
        v = s.version
        s.get("project", PROJECT)
        s.effective(PROJECT, CONTAINER)
        s.refresh()
        s.list()
        self.assertEqual(s.version, v)

    def test_other_writer_bumps_version(self) -> None:
        """A change by another connection raises ``version`` once it is noticed."""
        s = self.store()
        v = s.version
        self.store().put(self.project_set())
        s.refresh()
        self.assertLess(v, s.version)

    def test_other_writers_unrelated_tables_do_not_bump(self) -> None:
        """Another connection writing other tables (the directory) does not raise ``version``."""
        from hoodyproxy.directory import Container, SQLiteDirectory
        s = self.store()
        s.put(self.project_set())
        v = s.version
        SQLiteDirectory(self.connect()).put(Container(CONTAINER, PROJECT, "10.0.0.1"))
        s.refresh()
        self.assertEqual(s.version, v)


class OtherConnectionTests(StoreCase):
    def test_second_connection_sees_changes(self) -> None:
        """A store on another connection sees a put, an update and a delete (after refresh)."""
        writer, reader = self.store(), self.store()
        writer.put(self.project_set())
        reader.refresh()
        self.assertEqual(reader.get("project", PROJECT), writer.get("project", PROJECT))
        writer.update("project", PROJECT, lambda old: self.project_set(default="allow"))
        reader.refresh()
        self.assertEqual(reader.effective(PROJECT, CONTAINER).default, "allow")
        writer.delete("project", PROJECT)
        reader.refresh()
        self.assertIsNone(reader.effective(PROJECT, CONTAINER))

    def test_other_writers_noticed_after_recheck_interval(self) -> None:
        """Without refresh, another connection's write shows once the recheck interval has passed."""
        clock = FakeMonotonic()
        reader = self.store(monotonic=clock)
        self.assertIsNone(reader.effective(PROJECT, CONTAINER))
        self.store().put(self.project_set())
        self.assertIsNone(reader.effective(PROJECT, CONTAINER))
        clock.now += PermissionStore.recheck_interval
        self.assertIsNotNone(reader.effective(PROJECT, CONTAINER))

    def test_own_writes_seen_at_once(self) -> None:
        """A store's own writes are seen by its next read, whatever the clock says."""
        s = self.store(monotonic=FakeMonotonic())
        s.put(self.project_set())
        self.assertIsNotNone(s.effective(PROJECT, CONTAINER))

    def test_committed_before_put_returns(self) -> None:
        """When ``put`` returns, a brand-new connection reads the set from disk."""
        s = self.store()
        s.put(self.container_set())
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        row = conn.execute("SELECT scope, id, project FROM permission_sets").fetchone()
        self.assertEqual(row, ("container", CONTAINER, PROJECT))


class SubscribeTests(StoreCase):
    def test_put_and_delete_notify(self) -> None:
        """Subscribers hear (scope, id) after a put and after a delete."""
        s = self.store()
        heard = []
        s.subscribe(lambda scope, set_id: heard.append((scope, set_id)))
        s.put(self.container_set())
        s.delete("container", CONTAINER)
        self.assertEqual(heard, [("container", CONTAINER)] * 2)

    def test_other_writers_notify(self) -> None:
        """A change by another connection is announced once noticed."""
        s = self.store()
        heard = []
        s.subscribe(lambda scope, set_id: heard.append((scope, set_id)))
        self.store().put(self.project_set())
        s.refresh()
        self.assertEqual(heard, [("project", PROJECT)])

    def test_failing_subscriber_does_not_break_writes(self) -> None:
        """A subscriber that raises is logged; the write stands and others still hear."""
        s = self.store()
        heard = []
        s.subscribe(lambda scope, set_id: 1 / 0)
        s.subscribe(lambda scope, set_id: heard.append(set_id))
        s.put(self.project_set())
        self.assertEqual(heard, [PROJECT])
        self.assertIsNotNone(s.get("project", PROJECT))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
