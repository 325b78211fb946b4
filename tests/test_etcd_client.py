"""hoodyproxy.store.etcd: the etcd v3 JSON-gateway client, against a real three-member cluster."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from hoodyproxy.store.etcd import (EtcdClient, EtcdError, EtcdUnavailable, WatchCompacted, compare_absent, compare_mod,
                                   prefix_end, put_op)
from tests import etcd_cluster
from tests.support import until


class PrefixEndTests(unittest.SynchronousTestCase):
    def test_prefix_end(self) -> None:
        """The range end of a prefix is the prefix with its last byte plus one."""
        self.assertEqual(prefix_end("/hoody/v1/"), b"/hoody/v10")
        self.assertEqual(prefix_end("a\N{LATIN SMALL LETTER Y WITH DIAERESIS}"), b"a\xc3\xc0")


class ClientTests(unittest.TestCase):
    """One cluster for the class; each test under a key prefix of its own."""

    def setUp(self) -> None:
        self.cluster = etcd_cluster.shared_cluster()
        self.client = self.make_client(self.cluster.endpoints)
        self.prefix = f"/test/{self.id().rsplit('.', 1)[-1]}/"

    def make_client(self, endpoints, **kw) -> EtcdClient:
        client = EtcdClient(endpoints, reactor, **{"request_timeout": 5.0, "dial_timeout": 1.0, **kw})
        self.addCleanup(client.close)
        return client

    async def test_put_get_delete(self) -> None:
        """A put is read back with its revision; a delete removes it."""
        key = self.prefix + "k"
        revision, previous = await self.client.put(key, b"v1")
        self.assertIsNone(previous)
        _, kv = await self.client.get(key)
        self.assertEqual((kv.value, kv.mod_revision), (b"v1", revision))
        _, previous = await self.client.put(key, b"v2")
        self.assertEqual(previous.value, b"v1")
        _, deleted = await self.client.delete(key)
        self.assertEqual(deleted, 1)
        self.assertIsNone((await self.client.get(key))[1])

    async def test_txn_compares_the_revision(self) -> None:
        """A transaction on an outdated mod_revision does nothing and says so."""
        key = self.prefix + "k"
        self.assertTrue((await self.client.txn([compare_absent(key)], [put_op(key, "a")]))[0])
        _, kv = await self.client.get(key)
        self.assertFalse((await self.client.txn([compare_absent(key)], [put_op(key, "b")]))[0])
        self.assertTrue((await self.client.txn([compare_mod(key, kv.mod_revision)], [put_op(key, "c")]))[0])
        self.assertFalse((await self.client.txn([compare_mod(key, kv.mod_revision)], [put_op(key, "d")]))[0])
        self.assertEqual((await self.client.get(key))[1].value, b"c")

    async def test_range_prefix(self) -> None:
        """A prefix range returns every key under the prefix and nothing else."""
        for name in ("a", "b", "c"):
            await self.client.put(self.prefix + name, name)
        await self.client.put(self.prefix[:-1] + "x", "outside")
        _, kvs = await self.client.range(self.prefix, prefix=True)
        self.assertEqual([kv.key for kv in kvs], [self.prefix + n for n in "abc"])

    async def test_watch_sees_puts_and_deletes(self) -> None:
        """A prefix watch gets each put and delete, in order, with their revisions."""
        revision, _ = await self.client.range(self.prefix, prefix=True)
        seen = []
        watch = self.client.watch(self.prefix, prefix=True, start_revision=revision + 1,
                                  on_events=lambda rev, events: seen.extend(events))
        self.addCleanup(watch.cancel)
        await self.client.put(self.prefix + "a", "1")
        await self.client.delete(self.prefix + "a")
        await until(lambda: len(seen) == 2)
        self.assertEqual([(e.key, e.value) for e in seen], [(self.prefix + "a", b"1"), (self.prefix + "a", None)])

    async def test_watch_from_a_compacted_revision_fails(self) -> None:
        """A watch starting before the compacted revision ends with WatchCompacted."""
        first, _ = await self.client.put(self.prefix + "a", "1")
        last, _ = await self.client.put(self.prefix + "a", "2")
        await self.client.compact(last)
        watch = self.client.watch(self.prefix, prefix=True, start_revision=first, on_events=lambda *a: None)
        with self.assertRaises(WatchCompacted) as e:
            await watch.done
        self.assertEqual(e.exception.compact_revision, last)

    async def test_lease_keys_vanish_when_revoked(self) -> None:
        """Keys bound to a lease go with it; keepalive of a gone lease answers 0."""
        lease = await self.client.grant(30)
        self.assertGreater(await self.client.keepalive(lease), 0)
        await self.client.put(self.prefix + "c", "x", lease=lease)
        await self.client.revoke(lease)
        self.assertIsNone((await self.client.get(self.prefix + "c"))[1])
        self.assertEqual(await self.client.keepalive(lease), 0)

    async def test_next_endpoint_when_one_is_down(self) -> None:
        """A member that cannot be reached is skipped for the next one."""
        dead = f"http://127.0.0.1:{etcd_cluster.free_ports(1)[0]}"
        client = self.make_client([dead, *self.cluster.endpoints])
        await client.put(self.prefix + "k", "v")
        self.assertEqual((await client.get(self.prefix + "k"))[1].value, b"v")

    async def test_unavailable_when_nothing_answers(self) -> None:
        """With no member reachable a call fails with EtcdUnavailable (at its deadline: the
        members are tried in rounds until then)."""
        client = self.make_client([f"http://127.0.0.1:{p}" for p in etcd_cluster.free_ports(2)],
                                  request_timeout=1.0)
        with self.assertRaises(EtcdUnavailable):
            await client.get("/x")

    async def test_cancelled_watch_fires_done(self) -> None:
        """Cancelling a watch ends it with no error."""
        watch = self.client.watch(self.prefix, prefix=True, start_revision=0, on_events=lambda *a: None)
        await defer.succeed(None)
        watch.cancel()
        self.assertIsNone(await watch.done)


class AuthenticationTests(unittest.TestCase):
    """etcd's own authentication: a cluster of one member with auth on, for this class."""

    async def test_username_and_password(self) -> None:
        """With username and password the client gets a token and works; without, it is refused."""
        if etcd_cluster.available():
            raise unittest.SkipTest(etcd_cluster.available())
        cluster = etcd_cluster.start_cluster(size=1)
        self.addCleanup(cluster.stop)
        admin = EtcdClient(cluster.endpoints, reactor, request_timeout=5.0)
        self.addCleanup(admin.close)
        await admin.call("auth/user/add", {"name": "root", "password": "root-secret"})
        await admin.call("auth/user/grant", {"user": "root", "role": "root"})
        await admin.call("auth/enable", {})
        client = EtcdClient(cluster.endpoints, reactor, request_timeout=5.0, username="root",
                            password="root-secret")
        self.addCleanup(client.close)
        await client.put("/auth/k", "v")
        self.assertEqual((await client.get("/auth/k"))[1].value, b"v")
        stranger = EtcdClient(cluster.endpoints, reactor, request_timeout=5.0)
        self.addCleanup(stranger.close)
        with self.assertRaises(EtcdError):
            await stranger.get("/auth/k")
        wrong = EtcdClient(cluster.endpoints, reactor, request_timeout=5.0, username="root", password="nope")
        self.addCleanup(wrong.close)
        with self.assertRaises(EtcdError):
            await wrong.get("/auth/k")
