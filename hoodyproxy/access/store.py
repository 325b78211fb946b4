"""Permission sets kept in the node's SQLite database and answered from memory.

The same pattern as :class:`hoodyproxy.directory.SQLiteDirectory`: the table
``permission_sets`` is the source of truth; a dict mirrors it.  Writes commit first and
then update the dict, so the next request sees them and memory never shows what the
disk does not have.  Other processes' writes are noticed through ``PRAGMA
data_version``, checked at most every :attr:`PermissionStore.recheck_interval` seconds.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Callable, Mapping

from twisted.logger import Logger

from hoodyproxy.access.model import PermissionSet, from_stored_json, to_stored_json
from hoodyproxy.directory._db import MirroredTables

log = Logger()

Key = tuple[str, str]


class PermissionStore(MirroredTables):
    """Project- and container-level permission sets, by (scope, id).

    ``version`` grows by at least one on every change (own writes and other processes'
    writes alike), so a cache of decisions can be keyed on it.  ``registry`` (group type
    name -> IGroupType provider) is kept for the admin API; the store itself never
    parses groups.
    """

    def __init__(self, conn: sqlite3.Connection, registry: Mapping[str, Any] | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._conn = conn
        self.registry = registry
        self._clock = clock
        self._monotonic = monotonic
        self._sets: dict[Key, PermissionSet] = {}
        self._subscribers: list[Callable[[str, str], None]] = []
        self.version = 0
        self._reload_if_changed()

    # -- reads ------------------------------------------------------------------------

    def _load(self, scope: str, set_id: str, body: str) -> PermissionSet:
        try:
            return from_stored_json(scope, set_id, body)
        except (ValueError, TypeError, RecursionError):
            # Fail closed: a set we cannot read must not turn into "no set" (which passes).
            log.error("permission set {scope} {id} in the database is unreadable; denying all",
                      scope=scope, id=set_id)
            project = set_id if scope == "project" else "0" * 24
            return PermissionSet(scope, project, set_id if scope == "container" else None, {}, {}, "deny")

    def _reload(self) -> None:
        fresh = {(scope, set_id): self._load(scope, set_id, body)
                 for scope, set_id, body in self._conn.execute("SELECT scope, id, body FROM permission_sets")}
        changed = sorted(key for key in fresh.keys() | self._sets.keys()
                         if fresh.get(key) != self._sets.get(key))
        self._sets = fresh
        if changed:
            self.version += 1
            for scope, set_id in changed:
                self._notify(scope, set_id)

    def get(self, scope: str, set_id: str) -> PermissionSet | None:
        """The set stored for a project (``scope="project"``) or a container, or None."""
        self._reload_if_changed()
        return self._sets.get((scope, set_id))

    def effective(self, project: str, container: str) -> PermissionSet | None:
        """The set that governs a request: the container's if it has one, else the project's.

        Called on every request: answers from memory.
        """
        if self._monotonic() >= self._next_check:  # (_reload_if_changed's first test, without its call)
            self._reload_if_changed()
        sets = self._sets
        return sets.get(("container", container)) or sets.get(("project", project))

    def list(self, scope: str | None = None) -> list[PermissionSet]:
        """Every stored set (of one scope), ordered by (scope, id); always fresh."""
        self.refresh()
        return [s for key, s in sorted(self._sets.items()) if scope is None or key[0] == scope]

    # -- writes -----------------------------------------------------------------------

    def _write(self, pset: PermissionSet) -> None:
        self._conn.execute(
            "INSERT INTO permission_sets (scope, id, project, body, updated) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (scope, id) DO UPDATE SET project=excluded.project, body=excluded.body, "
            "updated=excluded.updated",
            (pset.scope, pset.id, pset.project, to_stored_json(pset), self._clock()))

    def _committed(self, key: Key, pset: PermissionSet | None) -> None:
        if pset is None:
            self._sets.pop(key, None)
        else:
            self._sets[key] = pset
        self.version += 1
        self._notify(*key)

    def put(self, pset: PermissionSet) -> bool:
        """Create or replace a set; durable when it returns.  True if it replaced one."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            existed = self._conn.execute("SELECT 1 FROM permission_sets WHERE scope = ? AND id = ?",
                                         (pset.scope, pset.id)).fetchone() is not None
            self._write(pset)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        self._committed((pset.scope, pset.id), pset)
        return existed

    def update(self, scope: str, set_id: str,
               change: Callable[[PermissionSet], PermissionSet]) -> PermissionSet | None:
        """Replace a set with ``change(stored set)`` in one transaction.

        Returns the new set, or None (writing nothing) if no set is stored.  If
        ``change`` raises, nothing is written and the exception propagates.  Reading and
        writing in one ``BEGIN IMMEDIATE`` means a concurrent writer in another process
        cannot be overwritten unseen.
        """
        new, _ = self._change(scope, set_id, change, create=False)
        return new

    def merge(self, scope: str, set_id: str,
              change: Callable[[PermissionSet | None], PermissionSet]) -> tuple[PermissionSet, bool]:
        """Write ``change(stored set, or None if there is none)`` in one transaction (a PATCH).

        Returns (the new set, True if it was created).  Like :meth:`update`, but a set
        that does not exist yet is created from ``change(None)``: the platform PATCHes a
        whole set whether or not one is stored.  Deciding "exists?" inside the
        transaction means two PATCHes racing on a new set both merge, neither loses.
        """
        new, created = self._change(scope, set_id, change, create=True)
        assert new is not None
        return new, created

    def _change(self, scope: str, set_id: str, change: Callable[[Any], PermissionSet],
                create: bool) -> tuple[PermissionSet | None, bool]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            row = self._conn.execute("SELECT body FROM permission_sets WHERE scope = ? AND id = ?",
                                     (scope, set_id)).fetchone()
            if row is None and not create:
                self._conn.execute("ROLLBACK")
                return None, False
            new = change(self._load(scope, set_id, row[0]) if row is not None else None)
            if (new.scope, new.id) != (scope, set_id):
                raise ValueError("an update may not move a set to another scope or id")
            self._write(new)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        self._committed((scope, set_id), new)
        return new, row is None

    def delete(self, scope: str, set_id: str) -> bool:
        """Remove a set; durable when it returns.  True if one was stored."""
        cursor = self._conn.execute("DELETE FROM permission_sets WHERE scope = ? AND id = ?", (scope, set_id))
        existed = cursor.rowcount > 0 or (scope, set_id) in self._sets
        if existed:
            self._committed((scope, set_id), None)
        return existed

    # -- change notification ----------------------------------------------------------

    def subscribe(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(scope, id)`` after a set changes or goes away."""
        self._subscribers.append(callback)

    def _notify(self, scope: str, set_id: str) -> None:
        for callback in self._subscribers:
            try:
                callback(scope, set_id)
            except Exception:
                log.failure("permission store subscriber failed")
