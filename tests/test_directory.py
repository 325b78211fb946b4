"""Specification of the live container map: the model, its validation and the SQLite directory."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from hoodyproxy.directory import (
    Container,
    InvalidContainer,
    SQLiteDirectory,
    container_from_json,
    open_database,
)
from hoodyproxy.interfaces import IContainerDirectory

PROJECT = "67e89abc123def456789abcd"
OTHER_PROJECT = "0000000000000000000000aa"
C1 = "890abcdef12345678901cdef"
C2 = "111111111111111111111111"
C3 = "222222222222222222222222"


class DatabaseMixin:
    """A fresh database file per test, removed afterwards."""

    def db_path(self) -> str:
        directory = tempfile.mkdtemp(prefix="hoodyproxy-directory-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        return os.path.join(directory, "state", "hoodyproxy.db")

    def connect(self, path: str):
        conn = open_database(path)
        self.addCleanup(conn.close)
        return conn

    def directory(self, path: str | None = None, **kw) -> SQLiteDirectory:
        return SQLiteDirectory(self.connect(path or self.db_path()), **kw)


class DirectoryTests(DatabaseMixin, SynchronousTestCase):

    def test_provides_interface(self) -> None:
        """SQLiteDirectory provides IContainerDirectory."""
        self.assertTrue(verifyObject(IContainerDirectory, self.directory()))

    def test_put_then_lookup(self) -> None:
        """A container put is found by its id."""
        d = self.directory()
        c = Container(C1, PROJECT, "10.0.0.5", "running", {"http-8000": 9000})
        d.put(c)
        self.assertEqual(d.lookup(C1), c)
        self.assertEqual(d.lookup(C1).port_override("http", 8000), 9000)

    def test_lookup_unknown(self) -> None:
        """An id never put is not found."""
        self.assertIsNone(self.directory().lookup(C1))

    def test_put_replaces(self) -> None:
        """Putting a container with the same id replaces it."""
        d = self.directory()
        d.put(Container(C1, PROJECT, "10.0.0.5"))
        d.put(Container(C1, PROJECT, "10.0.0.6", "stopped"))
        self.assertEqual(d.lookup(C1), Container(C1, PROJECT, "10.0.0.6", "stopped"))
        self.assertEqual(len(d.list()), 1)

    def test_delete(self) -> None:
        """A deleted container is gone, and delete says whether there was one."""
        d = self.directory()
        d.put(Container(C1, PROJECT, "10.0.0.5"))
        self.assertTrue(d.delete(C1))
        self.assertIsNone(d.lookup(C1))
        self.assertFalse(d.delete(C1))

    def test_list(self) -> None:
        """list() gives every container sorted by id; list(project) only that project's."""
        d = self.directory()
        a = Container(C2, PROJECT, "10.0.0.2")
        b = Container(C1, OTHER_PROJECT, "10.0.0.1")
        c = Container(C3, PROJECT, "10.0.0.3")
        for container in (c, b, a):
            d.put(container)
        self.assertEqual(d.list(), [a, c, b])
        self.assertEqual(d.list(PROJECT), [a, c])
        self.assertEqual(d.list(OTHER_PROJECT), [b])
        self.assertEqual(d.list("ffffffffffffffffffffffff"), [])

    def test_second_directory_sees_changes(self) -> None:
        """A second SQLiteDirectory on the same file (another worker) sees puts and deletes."""
        path = self.db_path()
        writer = self.directory(path)
        clock = Clock()
        reader = self.directory(path, monotonic=clock.seconds)
        reader.recheck_interval = 0
        clock.advance(1)  # past the first check, made at construction
        c = Container(C1, PROJECT, "10.0.0.5")
        writer.put(c)
        self.assertEqual(reader.lookup(C1), c)
        writer.put(Container(C1, PROJECT, "10.0.0.9"))
        self.assertEqual(reader.lookup(C1).address, "10.0.0.9")
        writer.delete(C1)
        self.assertIsNone(reader.lookup(C1))

    def test_other_writers_noticed_after_recheck_interval(self) -> None:
        """Lookups may be stale about another process's writes for at most recheck_interval."""
        path = self.db_path()
        writer = self.directory(path)
        clock = Clock()
        reader = self.directory(path, monotonic=clock.seconds)
        writer.put(Container(C1, PROJECT, "10.0.0.5"))
        clock.advance(reader.recheck_interval)
        self.assertIsNotNone(reader.lookup(C1))

    def test_list_is_always_fresh(self) -> None:
        """list() always reflects other writers' commits, whatever the recheck interval."""
        path = self.db_path()
        writer = self.directory(path)
        reader = self.directory(path, monotonic=Clock().seconds)
        writer.put(Container(C1, PROJECT, "10.0.0.5"))
        self.assertEqual([c.id for c in reader.list()], [C1])

    def test_own_writes_seen_at_once(self) -> None:
        """Writes through a directory are visible through it at once."""
        d = self.directory(monotonic=Clock().seconds)
        d.put(Container(C1, PROJECT, "10.0.0.5"))
        self.assertIsNotNone(d.lookup(C1))
        d.delete(C1)
        self.assertIsNone(d.lookup(C1))

    def test_survives_reopen(self) -> None:
        """Containers survive closing the database and opening it again."""
        path = self.db_path()
        conn = open_database(path)
        c = Container(C1, PROJECT, "2001:db8::5", "stopped", {"terminal": 7676, "http-80": 8080})
        SQLiteDirectory(conn).put(c)
        conn.close()
        reopened = self.directory(path)
        self.assertEqual(reopened.lookup(C1), c)
        self.assertEqual(dict(reopened.lookup(C1).ports), {"terminal": 7676, "http-80": 8080})

    def test_reopen_keeps_schema(self) -> None:
        """Opening an up-to-date database again runs no migration and keeps the data."""
        path = self.db_path()
        first = self.connect(path)
        SQLiteDirectory(first).put(Container(C1, PROJECT, "10.0.0.5"))
        version = first.execute("PRAGMA user_version").fetchone()[0]
        second = self.connect(path)
        self.assertEqual(second.execute("PRAGMA user_version").fetchone()[0], version)
        self.assertEqual(len(SQLiteDirectory(second).list()), 1)


class SourceTests(DatabaseMixin, SynchronousTestCase):
    """Who owns an entry (admin API or Docker provider) is stored, and each leaves the other's alone."""

    def test_source_is_stored(self) -> None:
        """``source`` survives a reopen; it defaults to ``admin``."""
        path = self.db_path()
        d = self.directory(path)
        d.put(Container(C1, PROJECT, "10.0.0.5", source="docker"))
        d.put(Container(C2, PROJECT, "10.0.0.6"))
        reopened = self.directory(path)
        self.assertEqual((reopened.lookup(C1).source, reopened.lookup(C2).source), ("docker", "admin"))

    def test_put_owned_over_own_or_nothing(self) -> None:
        """``put_owned`` creates an entry, and replaces one of its own source."""
        d = self.directory()
        self.assertTrue(d.put_owned(Container(C1, PROJECT, "10.0.0.5", source="docker")))
        self.assertTrue(d.put_owned(Container(C1, PROJECT, "10.0.0.6", "stopped", source="docker")))
        self.assertEqual(d.lookup(C1), Container(C1, PROJECT, "10.0.0.6", "stopped", source="docker"))

    def test_put_owned_never_over_another_source(self) -> None:
        """``put_owned`` leaves an entry of another source as it is, on disk and in memory."""
        path = self.db_path()
        d = self.directory(path)
        manual = Container(C1, PROJECT, "10.0.0.5")
        d.put(manual)
        seen: list[str] = []
        d.subscribe(seen.append)
        self.assertFalse(d.put_owned(Container(C1, OTHER_PROJECT, "10.0.0.9", source="docker")))
        self.assertEqual(d.lookup(C1), manual)
        self.assertEqual(self.directory(path).lookup(C1), manual)
        self.assertEqual(seen, [])

    def test_delete_by_source(self) -> None:
        """``delete(id, source)`` removes only an entry of that source."""
        d = self.directory()
        d.put(Container(C1, PROJECT, "10.0.0.5"))
        self.assertFalse(d.delete(C1, "docker"))
        self.assertIsNotNone(d.lookup(C1))
        self.assertTrue(d.delete(C1, "admin"))
        self.assertIsNone(d.lookup(C1))

    def test_source_in_json(self) -> None:
        """``to_json`` shows the source; a body may send one back, but not an unknown one."""
        c = Container(C1, PROJECT, "10.0.0.5", source="docker")
        self.assertEqual(c.to_json()["source"], "docker")
        self.assertEqual(container_from_json(C1, c.to_json()).source, "admin")
        with self.assertRaises(InvalidContainer) as caught:
            container_from_json(C1, dict(c.to_json(), source="manual"))
        self.assertEqual(caught.exception.field, "source")

    def test_migration_of_an_existing_database(self) -> None:
        """A database from before sources (schema 4) is migrated: its entries are the admin's."""
        import sqlite3

        from hoodyproxy.directory._db import MIGRATIONS
        path = self.db_path()
        os.makedirs(os.path.dirname(path))
        old = sqlite3.connect(path, isolation_level=None)
        for number, script in enumerate(MIGRATIONS[:4], start=1):
            old.executescript(script)
            old.execute(f"PRAGMA user_version={number}")
        old.execute("INSERT INTO containers (id, project, address, state, ports, updated) "
                    "VALUES (?, ?, '10.0.0.5', 'running', '{\"http-80\": 8080}', 0)", (C1, PROJECT))
        old.close()
        conn = self.connect(path)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], len(MIGRATIONS))
        self.assertEqual(SQLiteDirectory(conn).lookup(C1),
                         Container(C1, PROJECT, "10.0.0.5", "running", {"http-80": 8080}, source="admin"))


class SubscribeTests(DatabaseMixin, SynchronousTestCase):

    def test_put_notifies(self) -> None:
        """Subscribers are called with the id of a container put."""
        d = self.directory()
        seen: list[str] = []
        d.subscribe(seen.append)
        d.put(Container(C1, PROJECT, "10.0.0.5"))
        self.assertEqual(seen, [C1])

    def test_delete_notifies(self) -> None:
        """Subscribers are called with the id of a container deleted, and not for an absent one."""
        d = self.directory()
        d.put(Container(C1, PROJECT, "10.0.0.5"))
        seen: list[str] = []
        d.subscribe(seen.append)
        d.delete(C1)
        d.delete(C2)
        self.assertEqual(seen, [C1])

    def test_every_subscriber_notified(self) -> None:
        """Every subscriber is called."""
        d = self.directory()
        first: list[str] = []
        second: list[str] = []
        d.subscribe(first.append)
        d.subscribe(second.append)
        d.put(Container(C1, PROJECT, "10.0.0.5"))
        self.assertEqual((first, second), ([C1], [C1]))

    def test_other_writers_notify(self) -> None:
        """A directory's subscribers hear of changes another writer made, once it notices them."""
        path = self.db_path()
        writer = self.directory(path)
        reader = self.directory(path)
        seen: list[str] = []
        reader.subscribe(seen.append)
        writer.put(Container(C2, PROJECT, "10.0.0.2"))
        writer.put(Container(C1, PROJECT, "10.0.0.1"))
        reader.list()
        self.assertEqual(sorted(seen), sorted([C1, C2]))
        del seen[:]
        writer.delete(C1)
        reader.list()
        self.assertEqual(seen, [C1])


class DurabilityTests(DatabaseMixin, SynchronousTestCase):
    """A commit that returned is on disk, and the file is private."""

    def test_wal_mode(self) -> None:
        """The database runs in WAL mode."""
        conn = self.connect(self.db_path())
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0].lower(), "wal")

    def test_synchronous_full(self) -> None:
        """Commits are synchronous=FULL (2)."""
        conn = self.connect(self.db_path())
        self.assertEqual(conn.execute("PRAGMA synchronous").fetchone()[0], 2)

    def test_autocommit(self) -> None:
        """A put is committed when it returns: no transaction is left open."""
        conn = self.connect(self.db_path())
        SQLiteDirectory(conn).put(Container(C1, PROJECT, "10.0.0.5"))
        self.assertFalse(conn.in_transaction)

    def test_file_mode(self) -> None:
        """The database file is mode 0600."""
        path = self.db_path()
        self.connect(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_directory_mode(self) -> None:
        """A directory open_database creates is mode 0700."""
        path = self.db_path()
        self.connect(path)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)

    def test_wal_files_mode(self) -> None:
        """The WAL and shared-memory files, which hold committed data too, are mode 0600.

        SQLite creates ``-wal`` and ``-shm`` when ``PRAGMA journal_mode=WAL`` runs, before
        ``open_database`` chmods the main file, so they get the umask's mode (0644 under
        umask 022).
        """
        path = self.db_path()
        conn = self.connect(path)
        SQLiteDirectory(conn).put(Container(C1, PROJECT, "10.0.0.5"))
        for suffix in ("-wal", "-shm"):
            if os.path.exists(path + suffix):
                self.assertEqual(stat.S_IMODE(os.stat(path + suffix).st_mode), 0o600, suffix)


class ContainerModelTests(SynchronousTestCase):

    def test_ports_read_only(self) -> None:
        """A Container's ports cannot be changed after it is made."""
        c = Container(C1, PROJECT, "10.0.0.5", ports={"http": 80})
        with self.assertRaises(TypeError):
            c.ports["http"] = 81  # type: ignore[index]

    def test_port_override(self) -> None:
        """``program-index`` overrides beat ``program`` overrides; none gives None."""
        c = Container(C1, PROJECT, "10.0.0.5", ports={"terminal": 7000, "terminal-2": 7002})
        self.assertEqual(c.port_override("terminal", 2), 7002)
        self.assertEqual(c.port_override("terminal", 1), 7000)
        self.assertIsNone(c.port_override("display", 1))

    def test_running(self) -> None:
        """``running`` is true only in state running."""
        self.assertTrue(Container(C1, PROJECT, "10.0.0.5").running)
        self.assertFalse(Container(C1, PROJECT, "10.0.0.5", "stopped").running)

    def test_json_round_trip(self) -> None:
        """``to_json`` gives a body container_from_json reads back to the same Container."""
        c = Container(C1, PROJECT, "10.0.0.5", "stopped", {"http-80": 8080})
        self.assertEqual(container_from_json(C1, c.to_json()), c)


class ContainerFromJSONTests(SynchronousTestCase):
    """container_from_json accepts a valid body and names the field of an invalid one."""

    def assertInvalid(self, body, field: str, container_id: str = C1) -> None:
        e = self.assertRaises(InvalidContainer, container_from_json, container_id, body)
        self.assertEqual(e.field, field, f"{body!r}: {e}")
        self.assertEqual(str(e), f"{field}: {e.problem}")

    def test_minimal(self) -> None:
        """project and address suffice; state defaults to running and ports to none."""
        self.assertEqual(container_from_json(C1, {"project": PROJECT, "address": "10.0.0.5"}),
                         Container(C1, PROJECT, "10.0.0.5", "running", {}))

    def test_full(self) -> None:
        """Every field given is kept."""
        body = {"id": C1, "project": PROJECT, "address": "10.0.0.5", "state": "stopped",
                "ports": {"terminal": 7000, "http-8000": 9000}}
        self.assertEqual(container_from_json(C1, body),
                         Container(C1, PROJECT, "10.0.0.5", "stopped", {"terminal": 7000, "http-8000": 9000}))

    def test_null_ports(self) -> None:
        """``"ports": null`` means no overrides."""
        c = container_from_json(C1, {"project": PROJECT, "address": "10.0.0.5", "ports": None})
        self.assertEqual(dict(c.ports), {})

    def test_ipv6_address_normalized(self) -> None:
        """IPv6 addresses are accepted and written in their compressed lowercase form."""
        c = container_from_json(C1, {"project": PROJECT, "address": "2001:DB8:0:0:0:0:0:0001"})
        self.assertEqual(c.address, "2001:db8::1")

    def test_ipv4_address(self) -> None:
        """IPv4 addresses are accepted."""
        self.assertEqual(container_from_json(C1, {"project": PROJECT, "address": "192.0.2.1"}).address,
                         "192.0.2.1")

    def test_bad_id(self) -> None:
        """The id (from the URL) is 24 lowercase hexadecimal digits."""
        for bad in ("", C1[:-1], C1 + "0", C1.upper(), "g" * 24):
            self.assertInvalid({"project": PROJECT, "address": "10.0.0.5"}, "id", bad)

    def test_id_mismatch(self) -> None:
        """An id in the body must match the URL's."""
        self.assertInvalid({"id": C2, "project": PROJECT, "address": "10.0.0.5"}, "id")

    def test_body_not_an_object(self) -> None:
        """The body must be a JSON object."""
        for body in ([], "x", None, 5):
            self.assertInvalid(body, "body")

    def test_unknown_field(self) -> None:
        """An unknown field is named."""
        self.assertInvalid({"project": PROJECT, "address": "10.0.0.5", "adress": "10.0.0.6"}, "adress")

    def test_bad_project(self) -> None:
        """project is 24 lowercase hexadecimal digits."""
        for bad in (None, 5, "", PROJECT[:-1], PROJECT.upper(), "z" * 24):
            self.assertInvalid({"project": bad, "address": "10.0.0.5"}, "project")

    def test_bad_address(self) -> None:
        """address is an IPv4 or IPv6 address, not a name or a network."""
        for bad in (None, 5, "", "localhost", "10.0.0.256", "10.0.0.0/8", "[::1]", "10.0.0.5:80"):
            self.assertInvalid({"project": PROJECT, "address": bad}, "address")

    def test_bad_state(self) -> None:
        """state is running or stopped."""
        for bad in ("paused", "Running", None, 1):
            self.assertInvalid({"project": PROJECT, "address": "10.0.0.5", "state": bad}, "state")

    def test_bad_ports_object(self) -> None:
        """ports is an object."""
        for bad in ([], "http", 80):
            self.assertInvalid({"project": PROJECT, "address": "10.0.0.5", "ports": bad}, "ports")

    def test_bad_ports_key(self) -> None:
        """ports keys are ``program`` or ``program-index``."""
        for bad in ("Http", "http-", "http-01", "1http", "http-123456", "", "a-b-c"):
            self.assertInvalid({"project": PROJECT, "address": "10.0.0.5", "ports": {bad: 80}}, "ports")

    def test_bad_ports_value(self) -> None:
        """ports values are integer ports 1 to 65535, and the error names the key."""
        for bad in (0, 65536, -1, "80", 80.0, True, None):
            self.assertInvalid({"project": PROJECT, "address": "10.0.0.5", "ports": {"http-80": bad}},
                               "ports.http-80")

    # ``CONTAINER_ID`` and ``PORT_KEY`` end in ``$``, which also matches just before a
    # final newline, so the three values below pass validation and the newline is stored.

    def test_id_with_trailing_newline(self) -> None:
        """An id with a trailing newline is refused."""
        self.assertInvalid({"project": PROJECT, "address": "10.0.0.5"}, "id", C1 + "\n")

    def test_project_with_trailing_newline(self) -> None:
        """A project with a trailing newline is refused."""
        self.assertInvalid({"project": PROJECT + "\n", "address": "10.0.0.5"}, "project")

    def test_ports_key_with_trailing_newline(self) -> None:
        """A ports key with a trailing newline is refused."""
        self.assertInvalid({"project": PROJECT, "address": "10.0.0.5", "ports": {"http\n": 80}}, "ports")
