"""A node's shared store, composed: the client, the mirror, the publisher, the writers.

:class:`SharedStore` is what ``[store] backend = "etcd"`` adds to a node (worker 0 only:
the other workers read the same SQLite tables the mirror writes).  ``permissions`` and
``aliases`` are the admin API's stores (writes through etcd); ``ready`` is the readiness
hook (true once the first snapshot of this run is loaded).
"""

from __future__ import annotations

from twisted.application import service

from hoodyproxy.config import Settings
from hoodyproxy.store.etcd import EtcdClient
from hoodyproxy.store.keys import Keys
from hoodyproxy.store.mirror import SharedState
from hoodyproxy.store.publish import ContainerPublisher
from hoodyproxy.store.writers import SharedAliases, SharedPermissions


class SharedStore(service.MultiService):
    """The etcd-backed store of one node; see the module docstring."""

    def __init__(self, settings: Settings, conn, directory, permissions, aliases, reactor) -> None:
        super().__init__()
        e = settings.etcd
        self.client = EtcdClient(e.endpoints, reactor, dial_timeout=e.dial_timeout,
                                 request_timeout=e.request_timeout, username=e.username, password=e.password,
                                 ca_file=e.ca_file, cert_file=e.cert_file, key_file=e.key_file)
        self.keys = Keys(e.prefix, settings.node)
        self.state = SharedState(self.client, self.keys, conn, permissions, aliases, reactor)
        self.state.setServiceParent(self)
        self.publisher = ContainerPublisher(self.client, self.keys, directory, reactor, e.lease_ttl)
        self.publisher.setServiceParent(self)
        self.permissions = SharedPermissions(permissions, self.state)
        self.aliases = SharedAliases(aliases, self.state)

    @property
    def ready(self) -> bool:
        return self.state.ready

    def stopService(self):
        d = super().stopService()
        return d.addBoth(lambda result: self.client.close())

    def abandon(self) -> None:
        """Stop as a node that died would: nothing revoked, nothing cleaned (for tests)."""
        self.publisher.abandon()
        self.state.stopService()
        self.client.close()
