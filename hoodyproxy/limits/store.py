"""Per-project and per-container rate limits, kept in the node's SQLite database.

The one module of :mod:`hoodyproxy.limits` that does I/O.  The same pattern as the
permission store (:class:`hoodyproxy.access.store.PermissionStore`): the table
``rate_limits`` is the truth, a dict mirrors it, writes commit before memory changes (a
2xx of the admin API survives ``kill -9``), and other processes' writes are noticed
through ``PRAGMA data_version``.

Rate limits live beside the permission sets, not inside them, so a project with no
permission set (its URLs are the credential) can be limited too.  The effective limits of
a request are the container's if it has any, else its project's (a container's replace
its project's entirely, as permission sets do).
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Callable

from twisted.logger import Logger

from hoodyproxy.directory._db import MirroredTables
from hoodyproxy.limits._rates import InvalidRateLimit
from hoodyproxy.limits._settings import RateLimits, parse_rate_limits

log = Logger()

Key = tuple[str, str]
SCOPES = ("project", "container")


class RateLimitStore(MirroredTables):
    """Rate limits by (scope, id): ``("project", P)`` or ``("container", C)``."""

    def __init__(self, conn: sqlite3.Connection, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._conn = conn
        self._clock = clock
        self._monotonic = monotonic
        self._limits: dict[Key, RateLimits] = {}
        self._projects: dict[Key, str] = {}
        self._reload_if_changed()

    # -- reads ------------------------------------------------------------------------

    def _load(self, scope: str, set_id: str, body: str) -> RateLimits:
        try:
            return parse_rate_limits(json.loads(body))
        except (InvalidRateLimit, ValueError, TypeError, RecursionError):
            # Unreadable limits must not silently turn into no limits: refuse everything.
            log.error("rate limits {scope} {id} in the database are unreadable; limiting to 1/d",
                      scope=scope, id=set_id)
            return parse_rate_limits({"per_container": {"rate": "1/d", "burst": 1}})

    def _reload(self) -> None:
        rows = list(self._conn.execute("SELECT scope, id, project, body FROM rate_limits"))
        self._limits = {(scope, set_id): self._load(scope, set_id, body) for scope, set_id, _, body in rows}
        self._projects = {(scope, set_id): project for scope, set_id, project, _ in rows}

    def get(self, scope: str, set_id: str) -> RateLimits | None:
        """The limits stored for a project or a container, or None."""
        self._reload_if_changed()
        return self._limits.get((scope, set_id))

    def project_of(self, scope: str, set_id: str) -> str:
        """The project a stored entry names ("" when a container's was stored without one)."""
        self._reload_if_changed()
        return self._projects.get((scope, set_id), "")

    def effective(self, project: str, container: str) -> RateLimits | None:
        """The limits that govern a request to ``container`` of ``project`` (from memory:
        called on every request)."""
        if self._monotonic() >= self._next_check:  # (_reload_if_changed's first test, without its call)
            self._reload_if_changed()
        limits = self._limits
        if not limits:
            return None
        return limits.get(("container", container)) or limits.get(("project", project))

    def list(self, scope: str | None = None) -> list[tuple[str, str, RateLimits]]:
        """Every stored entry (of one scope) as (scope, id, limits), ordered; always fresh."""
        self.refresh()
        return [(key[0], key[1], value) for key, value in sorted(self._limits.items())
                if scope is None or key[0] == scope]

    # -- writes -----------------------------------------------------------------------

    def change(self, scope: str, set_id: str, project: str,
               change: Callable[[RateLimits | None], RateLimits]) -> tuple[RateLimits, bool]:
        """Write ``change(stored limits or None)`` in one transaction; durable when it
        returns.  Returns (the new limits, True if none were stored before).  If ``change``
        raises, nothing is written."""
        if scope not in SCOPES:
            raise ValueError("scope is 'project' or 'container'")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            row = self._conn.execute("SELECT body FROM rate_limits WHERE scope = ? AND id = ?",
                                     (scope, set_id)).fetchone()
            new = change(self._load(scope, set_id, row[0]) if row is not None else None)
            self._conn.execute(
                "INSERT INTO rate_limits (scope, id, project, body, updated) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (scope, id) DO UPDATE SET project=excluded.project, body=excluded.body, "
                "updated=excluded.updated",
                (scope, set_id, project, json.dumps(new.to_json(), sort_keys=True), self._clock()))
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        self._limits[(scope, set_id)] = new
        self._projects[(scope, set_id)] = project
        return new, row is None

    def put(self, scope: str, set_id: str, project: str, limits: RateLimits) -> bool:
        """Create or replace; True if one was created."""
        return self.change(scope, set_id, project, lambda _old: limits)[1]

    def delete(self, scope: str, set_id: str) -> bool:
        """Remove an entry; durable when it returns.  True if one was stored."""
        cursor = self._conn.execute("DELETE FROM rate_limits WHERE scope = ? AND id = ?", (scope, set_id))
        self._limits.pop((scope, set_id), None)
        self._projects.pop((scope, set_id), None)
        return cursor.rowcount > 0
