"""Where shared state lives when a node is one of many: etcd (docs/scale-out.rst).

The embedded default is the node's own SQLite database (:mod:`hoodyproxy.directory`,
:mod:`hoodyproxy.access.store`, :mod:`hoodyproxy.aliases`), and nothing here is imported
then.  With ``[store] backend = "etcd"`` the same stores keep answering every request from
memory; :mod:`hoodyproxy.store.etcd` is the client.
"""
