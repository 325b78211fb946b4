"""The node's embedded SQLite database: WAL, synchronous commits, schema migrations.

A commit that returned is on disk (``synchronous=FULL`` in WAL mode), which is what lets
the admin API answer 2xx only for changes that survive ``kill -9``.
"""

from __future__ import annotations

import os
import sqlite3

#: Each entry migrates the schema from version N to N+1.  Append, never edit.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE containers (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        address TEXT NOT NULL,
        state TEXT NOT NULL,
        ports TEXT NOT NULL DEFAULT '{}',
        updated REAL NOT NULL
    );
    CREATE INDEX containers_project ON containers (project);
    """,
    """
    CREATE TABLE permission_sets (
        scope TEXT NOT NULL CHECK (scope IN ('project', 'container')),
        id TEXT NOT NULL,
        project TEXT NOT NULL,
        body TEXT NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (scope, id)
    );
    """,
    """
    CREATE TABLE aliases (
        alias TEXT PRIMARY KEY,
        container_id TEXT NOT NULL,
        program TEXT NOT NULL,
        "index" INTEGER NOT NULL,
        created REAL NOT NULL
    );
    CREATE INDEX aliases_container ON aliases (container_id);
    CREATE TABLE domains (
        domain TEXT PRIMARY KEY,
        alias TEXT NOT NULL REFERENCES aliases (alias) ON DELETE CASCADE,
        created REAL NOT NULL
    );
    CREATE INDEX domains_alias ON domains (alias);
    """,
    """
    CREATE TABLE rate_limits (
        scope TEXT NOT NULL CHECK (scope IN ('project', 'container')),
        id TEXT NOT NULL,
        project TEXT NOT NULL,
        body TEXT NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (scope, id)
    );
    """,
    # Who owns a container entry (hoodyproxy.directory._model.SOURCES): every entry made
    # before there was a Docker provider was made through the admin API.
    """
    ALTER TABLE containers ADD COLUMN source TEXT NOT NULL DEFAULT 'admin';
    """,
    # With [store] backend = "etcd": the mod_revision of each shared key copied into this
    # database (the last-known-good copy), so a resync rewrites only what changed.
    """
    CREATE TABLE shared_keys (
        key TEXT PRIMARY KEY,
        mod_revision INTEGER NOT NULL
    );
    CREATE TABLE shared_meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
]


def open_database(path: str) -> sqlite3.Connection:
    """Open (creating if needed) the database at ``path`` and bring its schema up to date."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    # Create the file 0600 first: SQLite gives the -wal and -shm files the database's mode.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    try:
        os.chmod(path, 0o600)
    except OSError:
        pass
    return conn


class MirroredTables:
    """Base for stores that answer from memory what they keep in the node's database.

    Writes made through the store update memory themselves; a commit by another
    connection (another worker, the CLI) is noticed through ``PRAGMA data_version``,
    checked at most every ``recheck_interval`` seconds (checking on every read costs a
    few microseconds, too much for the request path).  Subclasses set ``_conn`` and
    ``_monotonic`` and implement ``_reload()``.
    """

    #: How stale a read may be about another process's writes, in seconds.
    recheck_interval = 0.05
    _next_check = 0.0
    _data_version = -1

    def _reload_if_changed(self) -> None:
        now = self._monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.recheck_interval
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version:
            return
        self._data_version = version
        self._reload()

    def _reload(self) -> None:
        raise NotImplementedError

    def refresh(self) -> None:
        """Re-read the store now if another process changed it."""
        self._next_check = 0.0
        self._reload_if_changed()
