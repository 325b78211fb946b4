"""Writes through the shared store: the admin API's permission and alias stores on etcd.

:class:`SharedPermissions` and :class:`SharedAliases` have the methods of
:class:`hoodyproxy.access.store.PermissionStore` and :class:`hoodyproxy.aliases.AliasStore`
the admin API uses.  Reads answer from the node's own store (the mirror of the shared
one); writes go to etcd first and return a Deferred that fires once etcd committed, with
what the local store's method would have returned.  The committed change is applied to
the local store at once (before the watch brings it back), so a read after a 2xx shows it.

A read-modify-write (PATCH, attaching a domain) is a transaction that holds only if the
key's ``mod_revision`` is still the one read; when another node wrote in between, it is
read and merged again, so two concurrent PATCHes both land.  When etcd cannot commit:
:class:`hoodyproxy.store.StoreUnavailable` (the API's 503), nothing applied here.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer

from hoodyproxy.access.model import PermissionSet, from_stored_json, to_stored_json
from hoodyproxy.aliases import (Alias, AliasExists, DomainExists, NoSuchAlias, check_alias, check_domain,
                                check_target)
from hoodyproxy.store import StoreConflict, StoreUnavailable
from hoodyproxy.store.etcd import EtcdError, EtcdUnavailable, compare_absent, compare_mod, delete_op, put_op
from hoodyproxy.store.keys import alias_from_value, alias_value, claim_from_value, claim_value
from hoodyproxy.store.mirror import SharedState

#: Read-modify-write attempts before giving up (each lost to another writer).
ATTEMPTS = 16


def _unavailable(error: Exception) -> StoreUnavailable:
    return StoreUnavailable(f"the shared store (etcd) did not confirm the change: {error}")


class _Through:
    """What both writers share: the client, the key layout, the mirror to apply to."""

    def __init__(self, local, shared: SharedState) -> None:
        self.local = local
        self.shared = shared
        self.client = shared.client
        self.keys = shared.keys

    def __getattr__(self, name: str) -> Any:
        # Reads (get, list, effective, resolve_*, subscribe, version...) are the local store's.
        return getattr(self.local, name)

    async def _etcd(self, call):
        try:
            return await call
        except (EtcdUnavailable, EtcdError) as e:
            raise _unavailable(e) from None


class SharedPermissions(_Through):
    """Permission sets written through etcd; see the module docstring."""

    def put(self, pset: PermissionSet) -> defer.Deferred:
        """Create or replace; fires True if one was replaced."""
        return defer.ensureDeferred(self._put(pset))

    async def _put(self, pset: PermissionSet) -> bool:
        key = self.keys.permission(pset.scope, pset.id)
        value = to_stored_json(pset).encode()
        revision, previous = await self._etcd(self.client.put(key, value))
        self.shared.apply(key, revision, value)
        return previous is not None

    def merge(self, scope: str, set_id: str,
              change: Callable[[PermissionSet | None], PermissionSet]) -> defer.Deferred:
        """Fires (the new set, True if created): ``change(stored or None)`` written only
        if no one wrote the set meanwhile (else read and merged again)."""
        return defer.ensureDeferred(self._change(scope, set_id, change, create=True))

    def update(self, scope: str, set_id: str, change: Callable[[PermissionSet], PermissionSet]) -> defer.Deferred:
        """Fires the new set, or None (nothing written) if none is stored."""
        d = defer.ensureDeferred(self._change(scope, set_id, change, create=False))
        return d.addCallback(lambda result: result[0])

    async def _change(self, scope: str, set_id: str, change, create: bool) -> tuple[PermissionSet | None, bool]:
        key = self.keys.permission(scope, set_id)
        for _ in range(ATTEMPTS):
            _, kv = await self._etcd(self.client.get(key))
            if kv is None and not create:
                return None, False
            previous = from_stored_json(scope, set_id, kv.value.decode()) if kv is not None else None
            new = change(previous)
            if (new.scope, new.id) != (scope, set_id):
                raise ValueError("an update may not move a set to another scope or id")
            value = to_stored_json(new).encode()
            held, revision = await self._etcd(self.client.txn(
                [compare_mod(key, kv.mod_revision if kv is not None else 0)], [put_op(key, value)]))
            if held:
                self.shared.apply(key, revision, value)
                return new, kv is None
        raise StoreConflict(f"the permission set changed under {ATTEMPTS} attempts in a row; try again")

    def delete(self, scope: str, set_id: str) -> defer.Deferred:
        """Fires True if a set was stored."""
        return defer.ensureDeferred(self._delete(scope, set_id))

    async def _delete(self, scope: str, set_id: str) -> bool:
        key = self.keys.permission(scope, set_id)
        revision, deleted = await self._etcd(self.client.delete(key))
        self.shared.apply(key, revision, None)
        return deleted > 0


class SharedAliases(_Through):
    """This node's aliases and custom domains written through etcd (domains claimed
    globally, so no two aliases of any nodes hold one); see the module docstring."""

    def create(self, alias: str, container_id: str, program: str, index: int) -> defer.Deferred:
        """Fires the Alias; fails with InvalidAlias or AliasExists."""
        alias = check_alias(alias, self.local.reserved)
        container_id, program, index = check_target(container_id, program, index, self.local.programs)
        entry = Alias(alias, container_id, program, index, self.local._clock())
        return defer.ensureDeferred(self._create(entry))

    async def _create(self, entry: Alias) -> Alias:
        key = self.keys.alias(entry.alias)
        value = alias_value(entry, [])
        held, revision = await self._etcd(self.client.txn([compare_absent(key)], [put_op(key, value)]))
        if not held:
            # Ours already, if the client sent it twice across an election (the value
            # holds our creation time): created, not "exists".
            _, kv = await self._etcd(self.client.get(key))
            if kv is None or kv.value != value:
                raise AliasExists(entry.alias)
            revision = kv.mod_revision
        self.shared.apply(key, revision, value)
        return entry

    async def _read(self, alias: str):
        """(the alias key's KeyValue, the alias, its domains), or NoSuchAlias."""
        _, kv = await self._etcd(self.client.get(self.keys.alias(alias)))
        if kv is None:
            raise NoSuchAlias(alias)
        entry, domains = alias_from_value(alias, kv.value)
        return kv, entry, domains

    def delete(self, alias: str) -> defer.Deferred:
        """Fires True if the alias existed (its domains go with it)."""
        return defer.ensureDeferred(self._delete(alias))

    async def _delete(self, alias: str) -> bool:
        key = self.keys.alias(alias)
        for _ in range(ATTEMPTS):
            try:
                kv, _, domains = await self._read(alias)
            except NoSuchAlias:
                return False
            held, revision = await self._etcd(self.client.txn(
                [compare_mod(key, kv.mod_revision)],
                [delete_op(key)] + [delete_op(self.keys.domain(d)) for d in domains]))
            if held:
                self.shared.apply(key, revision, None)
                return True
        raise StoreConflict(f"the alias changed under {ATTEMPTS} attempts in a row; try again")

    def attach(self, alias: str, domain: str) -> defer.Deferred:
        """Fires the normalized domain; fails with InvalidAlias, NoSuchAlias or DomainExists."""
        domain = check_domain(domain, self.local.zone, self.local.node)
        return defer.ensureDeferred(self._attach(alias, domain))

    async def _attach(self, alias: str, domain: str) -> str:
        key, claim = self.keys.alias(alias), self.keys.domain(domain)
        for _ in range(ATTEMPTS):
            kv, entry, domains = await self._read(alias)
            if domain in domains:
                raise DomainExists(domain, alias)
            value = alias_value(entry, domains + [domain])
            held, revision = await self._etcd(self.client.txn(
                [compare_mod(key, kv.mod_revision), compare_absent(claim)],
                [put_op(key, value), put_op(claim, claim_value(self.keys.node, alias))]))
            if held:
                self.shared.apply(key, revision, value)
                return domain
            _, holder = await self._etcd(self.client.get(claim))
            if holder is not None:
                node, other = claim_from_value(holder.value)
                raise DomainExists(domain, other if node == self.keys.node else f"{other} of node {node}")
        raise StoreConflict(f"the alias changed under {ATTEMPTS} attempts in a row; try again")

    def detach(self, domain: str, alias: str | None = None) -> defer.Deferred:
        """Fires True if ``domain`` was attached (to ``alias``, if given)."""
        domain = domain.lower().rstrip(".")
        return defer.ensureDeferred(self._detach(domain, alias))

    async def _detach(self, domain: str, alias: str | None) -> bool:
        if alias is None:
            alias = self.local.resolve_domain(domain)
            if alias is None:
                return False
        key = self.keys.alias(alias)
        for _ in range(ATTEMPTS):
            try:
                kv, entry, domains = await self._read(alias)
            except NoSuchAlias:
                return False
            if domain not in domains:
                return False
            value = alias_value(entry, [d for d in domains if d != domain])
            held, revision = await self._etcd(self.client.txn(
                [compare_mod(key, kv.mod_revision)], [put_op(key, value), delete_op(self.keys.domain(domain))]))
            if held:
                self.shared.apply(key, revision, value)
                return True
        raise StoreConflict(f"the alias changed under {ATTEMPTS} attempts in a row; try again")
