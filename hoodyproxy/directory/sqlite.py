"""The live container map kept in the node's SQLite database and answered from memory."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Callable, Iterable

from zope.interface import implementer

from hoodyproxy.directory._db import MirroredTables
from hoodyproxy.directory._model import Container
from hoodyproxy.interfaces import IContainerDirectory


@implementer(IContainerDirectory)
class SQLiteDirectory(MirroredTables):
    """Containers in SQLite, mirrored in a dict.

    Lookups read the dict.  Writes commit first, then update the dict, so memory never
    shows what the disk does not have.  Another process writing the same database (a
    second worker, the CLI) is noticed through ``PRAGMA data_version`` and the dict is
    reloaded before the next lookup.
    """

    def __init__(self, conn: sqlite3.Connection, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._conn = conn
        self._clock = clock
        self._monotonic = monotonic
        self._subscribers: list[Callable[[str], None]] = []
        self._containers: dict[str, Container] = {}
        self._reload_if_changed()

    # -- reads ------------------------------------------------------------------------

    def _reload(self) -> None:
        fresh = {
            row[0]: Container(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5])
            for row in self._conn.execute("SELECT id, project, address, state, ports, source FROM containers")
        }
        changed = {cid for cid in fresh.keys() | self._containers.keys()
                   if fresh.get(cid) != self._containers.get(cid)}
        self._containers = fresh
        for cid in sorted(changed):
            self._notify(cid)

    def lookup(self, container_id: str) -> Container | None:
        if self._monotonic() >= self._next_check:  # (_reload_if_changed's first test, without its call)
            self._reload_if_changed()
        return self._containers.get(container_id)

    def list(self, project: str | None = None) -> list[Container]:
        self.refresh()
        return [c for _, c in sorted(self._containers.items())
                if project is None or c.project == project]

    # -- writes -----------------------------------------------------------------------

    _UPSERT = ("INSERT INTO containers (id, project, address, state, ports, source, updated) "
               "VALUES (?, ?, ?, ?, ?, ?, ?) "
               "ON CONFLICT (id) DO UPDATE SET project=excluded.project, address=excluded.address, "
               "state=excluded.state, ports=excluded.ports, source=excluded.source, updated=excluded.updated")

    def _row(self, container: Container) -> tuple:
        return (container.id, container.project, container.address, container.state,
                json.dumps(dict(container.ports), sort_keys=True), container.source, self._clock())

    def put(self, container: Container) -> None:
        """Create or replace ``container``, whoever owned the entry before."""
        self._conn.execute(self._UPSERT, self._row(container))
        self._containers[container.id] = container
        self._notify(container.id)

    def put_owned(self, container: Container) -> bool:
        """Create or replace ``container`` unless an entry of another source holds its id
        (checked and written in one statement); returns whether it was written."""
        cursor = self._conn.execute(self._UPSERT + " WHERE containers.source = excluded.source",
                                    self._row(container))
        if cursor.rowcount == 0:
            self.refresh()  # another process may have written that entry: show it
            return False
        self._containers[container.id] = container
        self._notify(container.id)
        return True

    def delete(self, container_id: str, source: str | None = None) -> bool:
        """Remove a container (only if ``source`` owns it, when given); returns whether one was removed."""
        if source is None:
            cursor = self._conn.execute("DELETE FROM containers WHERE id = ?", (container_id,))
        else:
            cursor = self._conn.execute("DELETE FROM containers WHERE id = ? AND source = ?",
                                        (container_id, source))
            if cursor.rowcount == 0:
                return False
        existed = self._containers.pop(container_id, None) is not None or cursor.rowcount > 0
        if existed:
            self._notify(container_id)
        return existed

    # -- change notification ----------------------------------------------------------

    def subscribe(self, callback: Callable[[str], None]) -> None:
        self._subscribers.append(callback)

    def _notify(self, container_id: str) -> None:
        for callback in self._subscribers:
            callback(container_id)


def load_containers(conn: sqlite3.Connection) -> Iterable[Container]:
    """All containers stored in ``conn`` (for tools and tests)."""
    return SQLiteDirectory(conn).list()
