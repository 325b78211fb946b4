"""Where shared state lives when a node is one of many: etcd (docs/scale-out.rst).

The embedded default is the node's own SQLite database (:mod:`hoodyproxy.directory`,
:mod:`hoodyproxy.access.store`, :mod:`hoodyproxy.aliases`), and nothing here is imported
then.  With ``[store] backend = "etcd"`` the same stores keep answering every request from
memory; :mod:`hoodyproxy.store.etcd` is the client.
"""


class StoreUnavailable(Exception):
    """The shared store could not confirm a write (no quorum, no member reachable, or too
    many concurrent writers): nothing of it is applied here, and etcd applies a write
    whole or not at all.  The admin API answers 503 with this message."""


class StoreConflict(StoreUnavailable):
    """A read-modify-write lost to other writers every time it was tried."""
