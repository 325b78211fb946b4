"""The shared store mirrored into this node: list, then watch, into the node's own stores.

:class:`SharedState` reads every key under the prefix at revision R, applies it, then
watches from R+1 (with progress notifications).  What it applies goes where the request
path already reads: permission sets into the node's :class:`PermissionStore`, this node's
aliases and domains into its :class:`AliasStore` (both SQLite tables mirrored in memory),
so the request path never waits on etcd and every worker process sees the change as it
sees any other write.  Those tables, with each key's ``mod_revision`` (``shared_keys``),
are the last-known-good copy: a node started while etcd is unreachable serves them and
says so in one log line.  Other nodes' aliases and published containers are kept in
memory only (the admin API lists them; nothing routes by them).

A key is applied only when its ``mod_revision`` is newer than the one known, so the
node's own write (applied at once, when etcd answered) and its watch event are one
change, in either order.  When the watch is cancelled because its revision was
compacted, everything is read again and only keys whose ``mod_revision`` differs are
rewritten.
"""

from __future__ import annotations

import time
from typing import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from hoodyproxy.access.model import to_stored_json
from hoodyproxy.aliases import check_alias, check_domain, check_target
from hoodyproxy.store.etcd import EtcdClient, EtcdError, EtcdUnavailable, KeyValue, WatchCompacted
from hoodyproxy.store.keys import ALIASES, PERMISSIONS, Keys, alias_from_value

log = Logger()


class SharedState(service.Service):
    """Keeps this node's stores equal to the shared store (see the module docstring).

    Readiness and metrics read: ``snapshot_loaded`` (the first read of the shared store
    in this run is applied; ``readyz`` answers 503 until then), ``connected`` (the watch
    is running), ``snapshot_age()`` (seconds since the last full read), ``watch_restarts``
    and ``resyncs`` (after a compaction), ``last_resync_changed`` (keys rewritten by the
    last full read).
    """

    #: Seconds between attempts while etcd cannot be reached (doubling up to the maximum).
    retry_delay, max_retry_delay = 0.2, 2.0

    def __init__(self, client: EtcdClient, keys: Keys, conn, permissions, aliases, reactor,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.keys = keys
        self._conn = conn
        self.permissions = permissions
        self.aliases = aliases
        self.reactor = reactor
        self._clock = clock
        #: key -> (mod_revision, value or None for a deleted key) of every key under the prefix.
        self.known: dict[str, tuple[int, bytes | None]] = {}
        self.revision = 0
        self.snapshot_loaded = False
        self.connected = False
        self.snapshot_time: float | None = None
        self.watch_restarts = 0
        self.resyncs = 0
        self.last_resync_changed = 0
        self._watch = None
        self._running: defer.Deferred | None = None
        self._outage_logged = False
        self._stopping = False

    @property
    def ready(self) -> bool:
        """The hook for ``readyz``: true once the first snapshot of this run is loaded."""
        return self.snapshot_loaded

    def snapshot_age(self) -> float | None:
        return None if self.snapshot_time is None else max(0.0, self._clock() - self.snapshot_time)

    # -- the service ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        for key, revision in self._conn.execute("SELECT key, mod_revision FROM shared_keys"):
            self.known[key] = (revision, b"")  # (the value is in the mirrored tables)
        self._running = defer.ensureDeferred(self._run())
        self._running.addErrback(lambda f: None if f.check(defer.CancelledError)
                                 else log.failure("store: the etcd mirror stopped", f))

    def stopService(self):
        super().stopService()
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        running, self._running = self._running, None
        if running is not None and not running.called:
            running.cancel()
        return defer.succeed(None)

    async def _run(self) -> None:
        delay = self.retry_delay
        need_snapshot = True
        while not self._stopping:
            try:
                if need_snapshot:
                    await self.load_snapshot()
                    need_snapshot = False
                delay = self.retry_delay
                await self._watch_once()
                # The stream ended (its member went away): watch again from where it was.
                self.watch_restarts += 1
            except WatchCompacted as e:
                self.resyncs += 1
                self.watch_restarts += 1
                log.info("store: etcd history compacted at revision {compacted} (this node was at {revision}); "
                         "reading everything again", compacted=e.compact_revision, revision=self.revision)
                need_snapshot = True
            except defer.CancelledError:
                return
            except Exception as e:
                self.connected = False
                if not isinstance(e, (EtcdUnavailable, EtcdError)):
                    log.failure("store: the etcd mirror failed; starting again")
                if self._stopping:
                    return
                self._outage(e)
                await deferLater(self.reactor, delay, lambda: None)
                delay = min(delay * 2, self.max_retry_delay)

    def _outage(self, error: Exception) -> None:
        if self._outage_logged:
            return
        self._outage_logged = True
        if self.snapshot_loaded:
            log.warn("store: etcd unreachable ({error}); serving the state of revision {revision} until it is back",
                     error=str(error), revision=self.revision)
            return
        saved = dict(self._conn.execute("SELECT name, value FROM shared_meta"))
        when = saved.get("saved_at")
        log.warn("store: etcd unreachable at start ({error}); serving the last-known-good state "
                 "(revision {revision}, saved {saved}) until it is back",
                 error=str(error), revision=saved.get("revision", "none"),
                 saved=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(when))) if when else "never")

    async def _watch_once(self) -> None:
        watch = self._watch = self.client.watch(self.keys.root, prefix=True, start_revision=self.revision + 1,
                                                on_events=self._on_events, on_progress=self._on_progress)
        try:
            await watch.done
        finally:
            self._watch = None
            self.connected = False

    def _on_progress(self, revision: int) -> None:
        if not self.connected:
            self.connected = True
            if self._outage_logged:
                self._outage_logged = False
                log.info("store: etcd reachable again; watching from revision {revision}", revision=self.revision)
        if revision > self.revision:
            self.revision = revision

    def _on_events(self, revision: int, events: list[KeyValue]) -> None:
        self._on_progress(0)
        for kv in events:
            self.apply(kv.key, kv.mod_revision, kv.value)
        # Only the events' own revisions: the header's may be ahead of what was delivered
        # (a batch is one revision's events, but the watch may be catching up).
        self.revision = max(self.revision, *(kv.mod_revision for kv in events))
        self._save_meta()

    # -- snapshots -----------------------------------------------------------------------

    async def load_snapshot(self) -> int:
        """Read everything under the prefix and apply what differs; the keys rewritten."""
        revision, kvs = await self.client.range(self.keys.root, prefix=True)
        fresh = {kv.key: kv for kv in kvs}
        # What this node wrote while the read was under way is newer than the read: kept.
        newer = {k for k, (known_revision, _) in self.known.items() if known_revision > revision}
        changed = 0
        for key, kv in fresh.items():
            known = self.known.get(key)
            if key not in newer and (known is None or known[0] != kv.mod_revision):
                changed += self.apply(key, kv.mod_revision, kv.value, force=True)
        for key in [k for k, (_, value) in self.known.items()
                    if value is not None and k not in fresh and k not in newer]:
            changed += self.apply(key, revision, None, force=True)
        changed += self._drop_local_only(fresh.keys() | newer)
        self.revision = revision
        self.last_resync_changed = changed
        first = not self.snapshot_loaded
        self.snapshot_loaded = True
        self.snapshot_time = self._clock()
        self._save_meta()
        if first or changed:
            log.info("store: etcd snapshot at revision {revision}: {count} keys, {changed} rewritten here",
                     revision=revision, count=len(fresh), changed=changed)
        if self._outage_logged:
            self._outage_logged = False
            log.info("store: etcd reachable again at revision {revision}", revision=revision)
        return changed

    def _drop_local_only(self, fresh: set[str]) -> int:
        """Remove what the local tables hold and the shared store does not (written here
        before the node used etcd, or while a delete was missed)."""
        dropped = 0
        for pset in self.permissions.list():
            key = self.keys.permission(pset.scope, pset.id)
            if key not in fresh:
                self.permissions.delete(pset.scope, pset.id)
                dropped += 1
        for alias in self.aliases.list():
            if self.keys.alias(alias.alias) not in fresh:
                self.aliases.mirror(alias.alias, None)
                dropped += 1
        if dropped:
            log.info("store: removed {count} local entries the shared store does not have", count=dropped)
        return dropped

    # -- applying one key ----------------------------------------------------------------

    def apply(self, key: str, mod_revision: int, value: bytes | None, force: bool = False) -> int:
        """Bring ``key`` to ``value`` (None: deleted) as of ``mod_revision``; 1 if applied,
        0 if what is known is as new or newer (unless ``force``: a full read's answer)."""
        known = self.known.get(key)
        if known is not None and not force and known[0] >= mod_revision:
            return 0
        self.known[key] = (mod_revision, value)
        parsed = self.keys.parse(key)
        if parsed is None:
            return 1
        try:
            if parsed.kind == PERMISSIONS:
                self._apply_permission(parsed.name, value)
            elif parsed.kind == ALIASES and parsed.node == self.keys.node:
                self._apply_alias(parsed.name, value)
            else:
                return 1  # other nodes' aliases, containers and domain claims: memory only
        except (ValueError, TypeError) as e:
            log.error("store: shared key {key} is unreadable ({problem}); left as it was here",
                      key=key, problem=str(e))
            return 1
        if value is None:
            self._conn.execute("DELETE FROM shared_keys WHERE key = ?", (key,))
        else:
            self._conn.execute("INSERT INTO shared_keys (key, mod_revision) VALUES (?, ?) ON CONFLICT (key) "
                               "DO UPDATE SET mod_revision = excluded.mod_revision", (key, mod_revision))
        return 1

    def _apply_permission(self, name: str, value: bytes | None) -> None:
        scope, _, set_id = name.partition("/")
        if value is None:
            self.permissions.delete(scope, set_id)
            return
        # Unreadable: a set that denies everything (fail closed; the store logs it).
        pset = self.permissions._load(scope, set_id, value.decode("utf-8", "replace"))
        current = self.permissions.get(scope, set_id)
        if current is None or to_stored_json(current) != to_stored_json(pset):
            self.permissions.put(pset)

    def _apply_alias(self, name: str, value: bytes | None) -> None:
        if value is None:
            if self.aliases.get(name) is not None:
                self.aliases.mirror(name, None)
            return
        entry, domains = alias_from_value(name, value)
        # Checked as the admin API checks what it writes (InvalidAlias is a ValueError: the
        # key is logged and left out): whatever else can write to etcd routes nothing here
        # that this node's own API would have refused.
        local = self.aliases
        check_alias(name, local.reserved)
        check_target(entry.container_id, entry.program, entry.index, local.programs)
        domains = [check_domain(domain, local.zone, local.node) for domain in domains]
        if self.aliases.get(name) != entry or self.aliases.domains(name) != sorted(domains):
            self.aliases.mirror(name, entry, domains)

    def _save_meta(self) -> None:
        self._conn.execute("INSERT INTO shared_meta (name, value) VALUES ('revision', ?), ('saved_at', ?) "
                           "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                           (str(self.revision), repr(self._clock())))

    # -- the shared view (other nodes) ----------------------------------------------------

    def view(self, kind: str, node: str | None = None) -> list[tuple[str, str, bytes]]:
        """(node, name, value) of every live ``kind`` key (``aliases`` or ``containers``),
        of one node or all, sorted."""
        out = []
        for key, (_, value) in self.known.items():
            parsed = self.keys.parse(key)
            if value is None or parsed is None or parsed.kind != kind or (node is not None and parsed.node != node):
                continue
            if kind == ALIASES and parsed.node == self.keys.node and value == b"":
                continue  # loaded from shared_keys, not read yet
            out.append((parsed.node or "", parsed.name, value))
        return sorted(out)

    def claim(self, domain: str) -> bytes | None:
        known = self.known.get(self.keys.domain(domain))
        return None if known is None else known[1]
