"""This node's live map, published to the shared store under a lease the node keeps alive.

Each container of the node's directory is written to ``<prefix>/nodes/<node>/containers/<id>``
bound to one lease of ``lease_ttl`` seconds, renewed every third of it.  A node that dies
stops renewing, and etcd deletes its containers when the lease expires: the shared view
never lists a dead node's containers for longer than ``lease_ttl``.  A node that stops
cleanly revokes the lease (its containers go at once).

The node's own routing never reads this copy (the directory is the truth for the node's
own containers), so publishing is best effort: while etcd is unreachable the changes wait,
and when the lease was lost the whole map is published again under a new one.
"""

from __future__ import annotations

import json

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from hoodyproxy.store.etcd import EtcdClient, EtcdError, EtcdUnavailable
from hoodyproxy.store.keys import Keys

log = Logger()


class ContainerPublisher(service.Service):
    """Publishes ``directory`` (an IContainerDirectory) under ``keys.containers()``."""

    retry_delay = 0.5

    def __init__(self, client: EtcdClient, keys: Keys, directory, reactor, ttl: int) -> None:
        self.client = client
        self.keys = keys
        self.directory = directory
        self.reactor = reactor
        self.ttl = ttl
        self.lease = 0
        self.published = False
        self._pending: set[str] = set()
        self._wake: defer.Deferred | None = None
        self._timer = None
        self._running: defer.Deferred | None = None
        self._stopping = False
        directory.subscribe(self._changed)

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._running = defer.ensureDeferred(self._run())
        self._running.addErrback(lambda f: None if f.check(defer.CancelledError)
                                 else log.failure("store: publishing the live map stopped", f))

    def stopService(self):
        """Stop renewing and revoke the lease: the containers leave the shared view now."""
        super().stopService()
        lease = self.lease
        self.abandon()
        if not lease:
            return defer.succeed(None)
        d = defer.ensureDeferred(self.client.revoke(lease))
        return d.addErrback(lambda f: log.info("store: could not revoke the live map's lease ({why}); its "
                                               "containers go when it expires", why=str(f.value)))

    def abandon(self) -> None:
        """Stop renewing without revoking (as a node that died would)."""
        self._stopping = True
        self.lease = 0
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        running, self._running = self._running, None
        if running is not None and not running.called:
            running.cancel()

    def _changed(self, container_id: str) -> None:
        self._pending.add(container_id)
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.called:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._wake.callback(None)

    def _sleep(self, seconds: float) -> defer.Deferred:
        if self._stopping:
            return defer.succeed(None)
        self._wake = defer.Deferred()
        self._timer = self.reactor.callLater(seconds, self._poke)
        return self._wake

    async def _run(self) -> None:
        renew_every = max(0.5, self.ttl / 3)
        next_renewal = 0.0
        while not self._stopping:
            try:
                if not self.lease:
                    self.lease = await self.client.grant(self.ttl)
                    next_renewal = self.reactor.seconds() + renew_every
                    await self._publish_all()
                elif self.reactor.seconds() >= next_renewal:
                    if await self.client.keepalive(self.lease) <= 0:
                        log.warn("store: the live map's lease expired; publishing it again under a new one")
                        self.lease = 0
                        continue
                    next_renewal = self.reactor.seconds() + renew_every
                await self._publish_pending()
                await self._sleep(max(0.0, next_renewal - self.reactor.seconds()))
            except defer.CancelledError:
                return
            except Exception as e:
                self.published = False
                if not isinstance(e, (EtcdUnavailable, EtcdError)):
                    log.failure("store: publishing the live map failed; starting again")
                log.debug("store: publishing the live map: {error}", error=str(e))
                await self._sleep(self.retry_delay)

    async def _publish_all(self) -> None:
        """Every local container under the current lease, and nothing else of this node."""
        self._pending.clear()
        _, kvs = await self.client.range(self.keys.containers(), prefix=True)
        local = {c.id: c for c in self.directory.list()}
        for container in local.values():
            await self.client.put(self.keys.container(container.id), json.dumps(container.to_json()),
                                  lease=self.lease)
        for kv in kvs:
            container_id = kv.key.rsplit("/", 1)[-1]
            if container_id not in local:
                await self.client.delete(kv.key)
        self.published = True

    async def _publish_pending(self) -> None:
        while self._pending and self.lease:
            container_id = self._pending.pop()
            container = self.directory.lookup(container_id)
            try:
                if container is None:
                    await self.client.delete(self.keys.container(container_id))
                else:
                    await self.client.put(self.keys.container(container_id), json.dumps(container.to_json()),
                                          lease=self.lease)
            except BaseException:
                self._pending.add(container_id)
                raise
