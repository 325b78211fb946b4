"""Many nodes, one truth: two real nodes sharing state through a real three-member etcd cluster.

Each test starts two nodes (``node-a`` and ``node-b``: two data directories, their own
ports, in this process's reactor) with ``[store] backend = "etcd"`` on the test process's
cluster (:func:`tests.etcd_cluster.shared_cluster`), under a key prefix of the test's own,
and talks to them as the platform would: their admin APIs over HTTP, their gateways over
HTTPS.  Members a test kills are started again by the next test's fixture.

The behaviour under test (docs/scale-out.rst):

- a permission set written through one node is enforced by the other within a second;
  PATCHes racing from both nodes all land;
- an alias is routed by its own node and listed by the other's API;
- one member down changes nothing; two down: writes answer 503 and both nodes keep
  serving what they had; the members back: writes work again;
- a node restarted while etcd is down serves its last-known-good copy and says so;
- a node whose watch fell behind a compaction reads everything again, rewriting only
  what changed;
- a node that dies without cleaning up leaves the shared view when its lease expires.
"""

from __future__ import annotations

import json
import uuid

import treq
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource

from hoodyproxy.store.etcd import EtcdClient
from tests import etcd_cluster
from tests.support import CONTAINER, PROJECT, Backend, https_agent, register, start_node, until, url, wait

OTHER_CONTAINER = "bbbbbbbbbbbbbbbbbbbbbbbb"
ZONE = "containers.localhost"
#: A set that lets no one in (nobody connects from TEST-NET-3).
DENY = {"groups": {"office": {"type": "ip", "range": "203.0.113.0/24"}},
        "permissions": {"office": {"http": True}}, "default": "deny"}
#: A set that lets loopback in.
ALLOW_LOOPBACK = {"groups": {"local": {"type": "ip", "range": "127.0.0.0/8"}},
                  "permissions": {"local": {"http": True}}, "default": "deny"}


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


class TwoNodes(unittest.TestCase):
    """Node A and node B on one cluster, under a prefix of this test's own."""

    def setUp(self) -> None:
        self.cluster = etcd_cluster.shared_cluster()
        self.prefix = f"/test-{uuid.uuid4().hex[:12]}/hoody/v1"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)
        self.backend = Backend(self, Hello())

    def start(self, name: str, endpoints=None, data_dir: str | None = None, request_timeout: float = 3.0):
        etcd = {"endpoints": endpoints or self.cluster.endpoints, "prefix": self.prefix,
                "dial_timeout": 0.5, "request_timeout": request_timeout, "lease_ttl": 2}
        config = {"node": {"name": name}, "store": {"backend": "etcd", "etcd": etcd},
                  "http3": {"enabled": False}}
        if data_dir is not None:
            config["node"]["data_dir"] = data_dir
        node = start_node(self, config)
        node.data_dir = node.settings.data_dir
        return node

    async def pair(self, **kw):
        a, b = self.start("node-a", **kw), self.start("node-b", **kw)
        await until(lambda: a.store_ready() and b.store_ready())
        register(a, self.backend.number, container=CONTAINER)
        register(b, self.backend.number, container=OTHER_CONTAINER)
        return a, b

    async def api(self, node, method: str, path: str, body=None) -> tuple[int, dict]:
        headers = {b"Authorization": [f"Bearer {node.token}".encode()]}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers[b"Content-Type"] = [b"application/json"]
        response = await treq.request(method, f"http://127.0.0.1:{node.admin_port}{path}", data=data,
                                      headers=headers, agent=self.agent)
        raw = await response.content()
        return response.code, (json.loads(raw) if raw.strip() else {})

    async def get_through(self, node, container: str) -> int:
        """The status of a GET through ``node``'s gateway to ``container``'s backend."""
        agent = https_agent(self, node, persistent=False)
        target = url(node, "/", container=container, index=self.backend.number,
                     suffix=f"{node.settings.node}.{ZONE}")
        response = await agent.request(b"GET", target.encode())
        await treq.content(response)
        return response.code

    def project_set(self, node, project: str = PROJECT):
        return node.stack.permissions.get("project", project)

    def kill(self, *indexes: int) -> None:
        for i in indexes:
            self.cluster.kill(self.cluster.members[i])

    def revive(self, *indexes: int) -> None:
        members = [self.cluster.members[i] for i in indexes]
        for member in members:
            self.cluster.restart(member)
        self.cluster.wait_healthy(members)

    # -- sharing ------------------------------------------------------------------------

    async def test_permission_set_put_on_a_is_enforced_on_b(self) -> None:
        """A project set PUT through node A's API denies on node B within a second."""
        a, b = await self.pair()
        self.assertEqual(await self.get_through(b, OTHER_CONTAINER), 200)
        status, _ = await self.api(a, "PUT", f"/api/v1/projects/{PROJECT}/proxy/permissions", DENY)
        self.assertEqual(status, 201)
        await until(lambda: self.project_set(b) is not None, timeout=1.0)
        self.assertEqual(await self.get_through(b, OTHER_CONTAINER), 403)
        status, body = await self.api(b, "GET", f"/api/v1/projects/{PROJECT}/proxy/permissions")
        self.assertEqual((status, body["default"]), (200, "deny"))

    async def test_patch_race_from_both_nodes_loses_nothing(self) -> None:
        """Ten PATCHes, five through each node at once, each adding a group: all ten land."""
        a, b = await self.pair()
        path = f"/api/v1/projects/{PROJECT}/proxy/permissions"
        patches = []
        for i in range(5):
            for node, name in ((a, f"a{i}"), (b, f"b{i}")):
                patches.append(defer.ensureDeferred(self.api(node, "PATCH", path, {
                    "groups": {name: {"type": "ip", "range": f"10.{i}.0.0/16"}},
                    "permissions": {name: {"http": True}}, "default": "deny"})))
        results = await defer.gatherResults(patches)
        self.assertTrue(all(status in (200, 201) for status, _ in results), results)
        expected = {f"{side}{i}" for side in "ab" for i in range(5)}
        for node in (a, b):
            await until(lambda: set(getattr(self.project_set(node), "groups", {})) == expected)
            status, body = await self.api(node, "GET", path)
            self.assertEqual(set(body["groups"]), expected)

    async def test_alias_routed_by_its_node_and_listed_by_the_other(self) -> None:
        """An alias created on A for an A container routes on A; B lists it with ?node=node-a."""
        a, b = await self.pair()
        status, body = await self.api(a, "POST", "/api/v1/proxy/aliases", {
            "alias": "my-api", "container_id": CONTAINER, "program": "http", "index": self.backend.number})
        self.assertEqual(status, 201, body)
        agent = https_agent(self, a, persistent=False)
        response = await agent.request(b"GET", f"https://my-api.node-a.{ZONE}:{a.https_port}/".encode())
        self.assertEqual((response.code, await treq.content(response)), (200, b"hello"))

        async def listed():
            return (await self.api(b, "GET", "/api/v1/proxy/aliases?node=node-a"))[1]["aliases"]
        found = await listed()
        for _ in range(100):
            if found:
                break
            await wait(0.05)
            found = await listed()
        self.assertEqual([(x["alias"], x["node"], x["container_id"]) for x in found],
                         [("my-api", "node-a", CONTAINER)])
        self.assertEqual((await self.api(b, "GET", "/api/v1/proxy/aliases"))[1]["aliases"], [])

    async def test_a_forged_alias_in_etcd_routes_nothing(self) -> None:
        """Attack: aliases written to etcd by anything but a node's admin API (a leaked
        etcd credential) are checked as the API checks them: an alias under a program the
        node does not have, or naming no container id, or a domain under the node's own
        zone, is refused (logged, left out); a well-formed one written the same way routes."""
        from hoodyproxy.store.keys import Keys
        a, b = await self.pair()
        keys = Keys(self.prefix, "node-a")
        client = EtcdClient(self.cluster.endpoints, reactor, request_timeout=5.0)
        self.addCleanup(client.close)

        def value(container_id, program, index, domains=()):
            return json.dumps({"container_id": container_id, "program": program, "index": index,
                               "domains": list(domains), "created": 1.0}).encode()
        forged = {"no-such-program": value(CONTAINER, "ssh", 22),
                  "not-a-container": value("../../etc", "http", self.backend.number),
                  "zone-domain": value(CONTAINER, "http", self.backend.number, [f"x.node-b.{ZONE}"])}
        for name, body in forged.items():
            await client.put(keys.alias(name), body)
        await client.put(keys.alias("good"), value(CONTAINER, "http", self.backend.number))
        await until(lambda: a.stack.aliases.get("good") is not None)
        for name in forged:
            self.assertIsNone(a.stack.aliases.get(name), name)
        self.assertIsNone(a.stack.aliases.resolve_domain(f"x.node-b.{ZONE}"))
        agent = https_agent(self, a, persistent=False)
        response = await agent.request(b"GET", f"https://good.node-a.{ZONE}:{a.https_port}/".encode())
        self.assertEqual((response.code, await treq.content(response)), (200, b"hello"))

    async def test_domain_is_claimed_across_nodes(self) -> None:
        """A custom domain attached to an alias of A cannot be attached to one of B (409)."""
        a, b = await self.pair()
        for node, container in ((a, CONTAINER), (b, OTHER_CONTAINER)):
            status, _ = await self.api(node, "POST", "/api/v1/proxy/aliases", {
                "alias": "web", "container_id": container, "program": "http", "index": 8080})
            self.assertEqual(status, 201)
        status, _ = await self.api(a, "POST", "/api/v1/proxy/aliases/web/domains", {"domain": "api.example.com"})
        self.assertEqual(status, 201)
        status, body = await self.api(b, "POST", "/api/v1/proxy/aliases/web/domains", {"domain": "api.example.com"})
        self.assertEqual((status, body["message"]), (409, "domain: already attached to alias web of node node-a"))
        self.assertEqual(a.stack.aliases.resolve_domain("api.example.com"), "web")
        self.assertIsNone(b.stack.aliases.resolve_domain("api.example.com"))

    # -- failures -----------------------------------------------------------------------

    async def test_one_member_down_changes_nothing(self) -> None:
        """With one of three members killed (the leader: the harder case), writes through
        either node land on both.  (Writes made during the election wait for its end: the
        request timeout here is long enough for an election on a loaded machine.)"""
        a, b = await self.pair(request_timeout=15.0)
        leader = self.cluster.leader()
        self.cluster.kill(leader)
        self.addCleanup(self.revive, self.cluster.members.index(leader))
        status, body = await self.api(a, "PUT", f"/api/v1/projects/{PROJECT}/proxy/permissions", DENY)
        self.assertEqual(status, 201, body)
        await until(lambda: self.project_set(b) is not None)
        self.assertEqual(await self.get_through(b, OTHER_CONTAINER), 403)
        status, _ = await self.api(b, "PUT", f"/api/v1/projects/{PROJECT}/proxy/permissions", ALLOW_LOOPBACK)
        self.assertEqual(status, 200)
        await until(lambda: "local" in self.project_set(a).groups)
        self.assertEqual(await self.get_through(a, CONTAINER), 200)

    async def test_two_members_down_writes_503_and_nodes_serve_on(self) -> None:
        """Without quorum a write is 503 with a clear message and nothing applied; both nodes
        keep enforcing what they had; with the members back, writes work and agree."""
        a, b = await self.pair()
        path = f"/api/v1/projects/{PROJECT}/proxy/permissions"
        self.assertEqual((await self.api(a, "PUT", path, DENY))[0], 201)
        await until(lambda: self.project_set(b) is not None)
        self.kill(1, 2)
        self.addCleanup(self.revive, 1, 2)
        status, body = await self.api(a, "PUT", path, ALLOW_LOOPBACK)
        self.assertEqual((status, body["error"]), (503, "store_unavailable"))
        self.assertIn("did not confirm the change", body["message"])
        status, body = await self.api(b, "PATCH", path, {"default": "allow"})
        self.assertEqual((status, body["error"]), (503, "store_unavailable"))
        for node, container in ((a, CONTAINER), (b, OTHER_CONTAINER)):
            self.assertEqual(self.project_set(node).default, "deny")
            self.assertEqual(await self.get_through(node, container), 403)
        self.revive(1, 2)
        status, _ = await self.api(b, "PUT", path, ALLOW_LOOPBACK)
        self.assertEqual(status, 200)
        for node, container in ((a, CONTAINER), (b, OTHER_CONTAINER)):
            await until(lambda: "local" in self.project_set(node).groups)
            self.assertEqual(await self.get_through(node, container), 200)
        answers = [await self.api(node, "GET", path) for node in (a, b)]
        self.assertEqual(answers[0], answers[1])

    async def test_node_restarted_while_etcd_is_down_serves_last_known_good(self) -> None:
        """Node B restarted with every member down serves the sets it had, says so in
        one log line, and is not ready until etcd is back."""
        a, b = await self.pair()
        self.assertEqual((await self.api(a, "PUT", f"/api/v1/projects/{PROJECT}/proxy/permissions", DENY))[0], 201)
        await until(lambda: self.project_set(b) is not None)
        data_dir = b.data_dir
        await b.stopService()
        self.kill(0, 1, 2)
        self.addCleanup(self.revive, 0, 1, 2)
        lines = []

        def observe(event):
            text = event.get("log_format") or ""
            if "last-known-good" in text:
                lines.append(event)
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        b2 = self.start("node-b", data_dir=data_dir)
        register(b2, self.backend.number, container=OTHER_CONTAINER)
        await until(lambda: lines)
        self.assertFalse(b2.store_ready())
        status, body = await self.api(b2, "GET", "/readyz")
        self.assertEqual(status, 503, body)
        self.assertEqual(self.project_set(b2).default, "deny")
        self.assertEqual(await self.get_through(b2, OTHER_CONTAINER), 403)
        self.assertEqual(len(lines), 1)
        self.revive(0, 1, 2)
        await until(b2.store_ready)
        self.assertEqual((await self.api(b2, "GET", "/readyz"))[0], 200)
        self.assertEqual(self.project_set(b2).default, "deny")

    async def test_compaction_under_a_watching_node_resyncs_only_changes(self) -> None:
        """B watches through one member; while it is down the others change two of five
        sets and compact: B's watch is refused, it reads everything again, rewrites the two
        and ends equal to A.  (B's member is one that does not lead: with the leader killed
        the writes would wait for an election, the case test_one_member_down_changes_nothing
        covers, and a write that did not land would leave nothing to compact past B.)"""
        leader = self.cluster.leader()
        down = next(i for i, member in enumerate(self.cluster.members) if member is not leader)
        b_member = self.cluster.members[down]
        a = self.start("node-a")
        b = self.start("node-b", endpoints=[b_member.url])
        await until(lambda: a.store_ready() and b.store_ready())
        projects = [f"{i:024x}" for i in range(1, 6)]
        for project in projects:
            self.assertEqual((await self.api(a, "PUT", f"/api/v1/projects/{project}/proxy/permissions", DENY))[0],
                             201)
        await until(lambda: all(self.project_set(b, p) is not None for p in projects))
        self.kill(down)
        self.addCleanup(self.revive, down)
        status, body = await self.api(a, "PUT", f"/api/v1/projects/{projects[0]}/proxy/permissions", ALLOW_LOOPBACK)
        self.assertEqual(status, 200, body)
        status, body = await self.api(a, "DELETE", f"/api/v1/projects/{projects[1]}/proxy/permissions")
        self.assertIn(status, (200, 204), body)
        client = EtcdClient([m.url for m in self.cluster.members if m is not b_member], reactor, request_timeout=5.0)
        self.addCleanup(client.close)
        revision, _ = await client.range("/", prefix=True)
        await client.compact(revision)
        resyncs = b.shared_store.state.resyncs
        self.revive(down)
        # (a bound, not a speed: the member rejoins, B's retry finds it, B reads everything)
        await until(lambda: b.shared_store.state.resyncs > resyncs and b.store_ready(), timeout=30.0)
        await until(lambda: self.project_set(b, projects[1]) is None)
        self.assertIn("local", self.project_set(b, projects[0]).groups)
        for project in projects[2:]:
            self.assertEqual(self.project_set(b, project).default, "deny")
        self.assertEqual(b.shared_store.state.last_resync_changed, 2)
        # What the node's metrics say of its store (a real Prometheus text parser), once
        # its watch runs again.
        await until(lambda: b.shared_store.state.connected)
        from prometheus_client.parser import text_string_to_metric_families
        response = await treq.get(f"http://127.0.0.1:{b.admin_port}/metrics", agent=self.agent)
        samples = {sample.name: sample.value for family in text_string_to_metric_families(
            (await response.text()).strip() + "\n") for sample in family.samples}
        self.assertEqual(samples["hoodyproxy_store_connected"], 1)
        self.assertEqual(samples["hoodyproxy_store_snapshot_loaded"], 1)
        self.assertGreaterEqual(samples["hoodyproxy_store_resyncs_total"], 1)
        self.assertGreaterEqual(samples["hoodyproxy_store_watch_restarts_total"], 1)
        self.assertGreaterEqual(samples["hoodyproxy_store_snapshot_age_seconds"], 0)

    async def test_dead_node_containers_vanish_after_the_lease(self) -> None:
        """A's published containers are listed by B, and leave B's list once A stops
        renewing its lease without cleaning up."""
        a, b = await self.pair()

        async def published():
            return (await self.api(b, "GET", "/api/v1/containers?node=node-a"))[1]["containers"]
        await until(lambda: a.shared_store.publisher.published)
        listing = await published()
        for _ in range(100):
            if listing:
                break
            await wait(0.05)
            listing = await published()
        self.assertEqual([(c["id"], c["node"]) for c in listing], [(CONTAINER, "node-a")])
        everyone = (await self.api(b, "GET", "/api/v1/containers?node=*"))[1]["containers"]
        self.assertEqual(sorted(c["node"] for c in everyone), ["node-a", "node-b"])
        a.shared_store.abandon()
        for _ in range(200):  # 20 s at most, for a lease of 2 s
            if not await published():
                break
            await wait(0.1)
        self.assertEqual(await published(), [])
