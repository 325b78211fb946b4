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
            row[0]: Container(row[0], row[1], row[2], row[3], json.loads(row[4]))
            for row in self._conn.execute("SELECT id, project, address, state, ports FROM containers")
        }
        changed = {cid for cid in fresh.keys() | self._containers.keys()
                   if fresh.get(cid) != self._containers.get(cid)}
        self._containers = fresh
        for cid in sorted(changed):
            self._notify(cid)

    def lookup(self, container_id: str) -> Container | None:
        self._reload_if_changed()
        return self._containers.get(container_id)

    def list(self, project: str | None = None) -> list[Container]:
        self.refresh()
        return [c for _, c in sorted(self._containers.items())
                if project is None or c.project == project]

    # -- writes -----------------------------------------------------------------------

    def put(self, container: Container) -> None:
        self._conn.execute(
            "INSERT INTO containers (id, project, address, state, ports, updated) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET project=excluded.project, address=excluded.address, "
            "state=excluded.state, ports=excluded.ports, updated=excluded.updated",
            (container.id, container.project, container.address, container.state,
             json.dumps(dict(container.ports), sort_keys=True), self._clock()),
        )
        self._containers[container.id] = container
        self._notify(container.id)

    def delete(self, container_id: str) -> bool:
        cursor = self._conn.execute("DELETE FROM containers WHERE id = ?", (container_id,))
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
