"""The Docker provider end to end: a real dockerd (tests/dockerd.py), a real node, curl.

Each test starts a node whose ``[docker] socket`` is the test daemon's, runs labelled
busybox httpd containers (port 80, ``http-80`` in the route) and looks at the live map and
at what the gateway answers.  Waits are bounded polls (tests.support.until), never
assertions about speed.  The daemon is started once per test process and torn down when
it exits; every test removes the containers and networks it made.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import time

import treq
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from tests.dockerd import IMAGE, PAGE, DockerdUnavailable, shared_daemon
from tests.support import PROJECT, curl, host_for, start_node, until, wait

#: Containers of these tests are named after this (and removed by the test that made them).
CID = "c0ffee0000000000000000a1"
CID2 = "c0ffee0000000000000000a2"
CID3 = "c0ffee0000000000000000a3"


class DockerTestCase(unittest.TestCase):
    """A node following the test daemon, and helpers to run containers on it."""

    #: The node's ``[docker]`` table (besides enabled and socket).
    docker_config: dict = {}

    def setUp(self) -> None:
        try:
            self.dockerd = shared_daemon()
        except DockerdUnavailable as e:
            raise unittest.SkipTest(str(e))
        self.node = start_node(self, {"docker": {"enabled": True, "socket": self.dockerd.socket,
                                                 **self.docker_config}})
        self.provider = self.node.docker
        self.logged: list[str] = []

        def observe(event):
            if event.get("log_namespace", "").endswith("_provider"):
                from twisted.logger import formatEvent
                self.logged.append(formatEvent(event))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def run_container(self, *args: str, entry: str | None = CID, start: bool = True,
                            labels: dict | None = None, remove: bool = True) -> str:
        """``docker create`` (and start) the test image with ``hoody.project`` (and
        ``hoody.container`` = ``entry``) plus ``labels``; removed at cleanup unless
        ``remove`` is false.  Its Docker id."""
        all_labels = {"hoody.project": PROJECT, **({"hoody.container": entry} if entry else {}), **(labels or {})}
        label_args = [a for k, v in all_labels.items() for a in ("-l", f"{k}={v}")]
        docker_id = await self.dockerd.run("create", "--init", *label_args, *args, IMAGE)
        if remove:
            self.addCleanup(self.remove, docker_id)
        if start:
            await self.dockerd.run("start", docker_id)
        return docker_id

    async def remove(self, *docker_ids: str) -> None:
        try:
            await self.dockerd.run("rm", "-f", *docker_ids)
        except RuntimeError:
            pass  # removed by the test already

    def entry(self, container: str = CID):
        return self.node.directory.lookup(container)

    def running(self, container: str = CID) -> bool:
        entry = self.entry(container)
        return entry is not None and entry.running

    async def serving(self, *containers: str, port: int = 80, timeout: float = 30.0) -> None:
        """Wait until each container's own service accepts a connection on its address:
        busybox httpd binds a moment after Docker reports the container running, and a
        request sent through the gateway in that moment is rightly a 502.  What a test
        then asks the gateway is about the gateway, not about that moment."""
        addresses = [self.entry(container).address for container in containers or (CID,)]

        def accepts(address: str) -> bool:
            try:
                socket.create_connection((address, port), timeout=1).close()
                return True
            except OSError:
                return False
        deadline = time.monotonic() + timeout
        for address in addresses:
            while not await deferToThread(accepts, address):
                if time.monotonic() > deadline:
                    raise AssertionError(f"nothing accepted connections on {address}:{port}")
                await wait(0.05)

    async def status(self, container: str = CID, host: str | None = None) -> tuple[int, bytes]:
        """One request through the gateway: (HTTP status, body)."""
        host = host or host_for(program="http", index=80, container=container)
        done = await curl(self.node, "-o", "-", "-w", "\n%{http_code}", f"https://{host}:{self.node.https_port}/",
                          host=host)
        body, _, code = done.stdout.rpartition(b"\n")
        return int(code or 0), body

    async def admin(self, method: str, path: str, body=None) -> tuple[int, object]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.request(method, f"http://127.0.0.1:{self.node.admin_port}{path}",
                                      data=json.dumps(body).encode() if body is not None else None,
                                      headers={b"Authorization": [b"Bearer " + self.node.token.encode()]},
                                      agent=Agent(reactor, pool=pool))
        content = await response.content()
        return response.code, (json.loads(content) if content else None)


class LifecycleTests(DockerTestCase):
    """A labelled container's life, followed by the map and seen through the gateway."""

    async def test_start_stop_start_remove(self):
        """Started: reachable within a second; stopped: 503; started again: 200; removed: gone."""
        await until(lambda: self.provider.resyncs >= 1, timeout=30)
        docker_id = await self.run_container()
        await until(self.running, timeout=1.0)  # a bound on the wait, not a measurement
        await self.serving()
        self.assertEqual(await self.status(), (200, PAGE))
        entry = self.entry()
        self.assertEqual((entry.project, entry.source), (PROJECT, "docker"))
        self.assertIn(ipaddress.ip_address(entry.address), self.dockerd.subnet)

        await self.dockerd.run("stop", docker_id)
        await until(lambda: not self.running(), timeout=30)
        self.assertEqual((await self.status())[0], 503)
        self.assertEqual(self.entry().address, entry.address)  # kept while stopped

        await self.dockerd.run("start", docker_id)
        await until(self.running, timeout=30)
        await self.serving()
        self.assertEqual(await self.status(), (200, PAGE))

        await self.dockerd.run("rm", "-f", docker_id)
        await until(lambda: self.entry() is None, timeout=30)
        self.assertEqual((await self.status())[0], 503)

    async def test_unhealthy_until_healthy(self):
        """A failing health check stops the container for routing (503) until it passes again."""
        docker_id = await self.run_container("--health-cmd", "test -f /tmp/healthy", "--health-interval", "1s",
                                             "--health-retries", "1")
        await until(lambda: self.entry() is not None, timeout=30)
        await until(lambda: not self.running(), timeout=30)  # unhealthy after the first failed check
        self.assertEqual((await self.status())[0], 503)
        await self.dockerd.run("exec", docker_id, "/bin/busybox", "touch", "/tmp/healthy")
        await until(self.running, timeout=30)
        self.assertEqual(await self.status(), (200, PAGE))

    async def test_container_id_from_the_docker_id(self):
        """Without ``hoody.container`` the route's container id is the Docker id's first 24
        hex digits, and ``hoody.ports`` overrides a program's port."""
        docker_id = await self.run_container(entry=None, labels={"hoody.ports": "terminal=80"})
        await until(lambda: self.running(docker_id[:24]), timeout=30)
        await self.serving(docker_id[:24])
        self.assertEqual(dict(self.entry(docker_id[:24]).ports), {"terminal": 80})
        host = host_for(program="terminal", index=1, container=docker_id[:24])
        self.assertEqual((await self.status(host=host))[0], 200)

    async def test_unlabelled_container_never_routed(self):
        """A container without ``hoody.project`` is never in the map, even once its labelled
        neighbour (started after it) is."""
        plain = await self.dockerd.run("run", "-d", "--init", IMAGE)
        self.addCleanup(self.remove, plain)
        await self.run_container()
        await until(self.running, timeout=30)
        self.assertEqual([c.id for c in self.node.directory.list()], [CID])
        self.assertEqual((await self.status(plain[:24]))[0], 503)

    async def test_existing_containers_found_at_start(self):
        """Containers running before the node starts are in the map after its first resync."""
        await self.run_container(entry=CID2)
        node = start_node(self, {"docker": {"enabled": True, "socket": self.dockerd.socket}})
        await until(lambda: node.directory.lookup(CID2) is not None, timeout=30)
        self.assertTrue(node.directory.lookup(CID2).running)


class NetworkTests(DockerTestCase):
    """Which of a container's networks the gateway uses."""

    async def two_network_container(self, **kw) -> tuple[str, object]:
        """A container on the daemon's bridge and on a second network; (Docker id, that network's subnet)."""
        name, subnet = await self.dockerd.network()
        self.addCleanup(self.dockerd.run, "network", "rm", name)
        docker_id = await self.run_container(start=False, **kw)
        await self.dockerd.run("network", "connect", name, docker_id)
        await self.dockerd.run("start", docker_id)
        return docker_id, (name, subnet)

    async def test_label_names_the_network(self):
        """With ``hoody.network`` the entry has that network's address, and is reachable over it."""
        name, subnet = await self.dockerd.network()
        self.addCleanup(self.dockerd.run, "network", "rm", name)
        docker_id = await self.run_container(start=False, labels={"hoody.network": name})
        await self.dockerd.run("network", "connect", name, docker_id)
        await self.dockerd.run("start", docker_id)
        await until(self.running, timeout=30)
        self.assertIn(ipaddress.ip_address(self.entry().address), subnet)
        await self.serving()
        self.assertEqual(await self.status(), (200, PAGE))

    async def test_several_reachable_and_none_named(self):
        """Two networks the gateway reaches and none named: not routed, and one clear log line."""
        await self.two_network_container()
        await until(lambda: any("several" in line for line in self.logged), timeout=30)
        self.assertIsNone(self.entry())
        line = next(line for line in self.logged if "several" in line)
        self.assertIn("hoody.network label or [docker] network", line)


class ConfiguredNetworkTests(DockerTestCase):
    """``[docker] network`` names the network for every container."""

    docker_config = {"network": "bridge"}

    async def test_configured_network(self):
        """A container on two networks is reached over the configured one."""
        name, subnet = await self.dockerd.network()
        self.addCleanup(self.dockerd.run, "network", "rm", name)
        docker_id = await self.run_container(start=False)
        await self.dockerd.run("network", "connect", name, docker_id)
        await self.dockerd.run("start", docker_id)
        await until(self.running, timeout=30)
        self.assertIn(ipaddress.ip_address(self.entry().address), self.dockerd.subnet)
        await self.serving()
        self.assertEqual(await self.status(), (200, PAGE))


class DaemonRestartTests(DockerTestCase):
    """The daemon goes away and comes back while the gateway runs."""

    async def test_restart_resyncs(self):
        """The map is kept while dockerd is down; after it is back the provider resyncs: a
        container removed meanwhile is gone, one restarted by its policy is routed again."""
        await self.run_container("--restart", "always", entry=CID)
        victim = await self.run_container(entry=CID2)
        await until(lambda: self.running(CID) and self.running(CID2), timeout=30)
        resyncs = self.provider.resyncs
        self.addCleanup(self.ensure_daemon)

        await deferToThread(self.dockerd.stop_daemon)
        # Meanwhile (a daemon on another socket, which the provider does not follow) the
        # victim is removed.
        other = self.dockerd.socket + ".meanwhile"
        await deferToThread(self.dockerd.start_daemon, other)
        await deferToThread(self.dockerd.docker, "rm", "-f", victim, socket_path=other)
        await deferToThread(self.dockerd.stop_daemon)
        self.assertIsNotNone(self.entry(CID2), "the map was not kept while the daemon was away")
        await deferToThread(self.dockerd.start_daemon)

        await until(lambda: self.provider.resyncs > resyncs, timeout=60)
        await until(lambda: self.entry(CID2) is None and self.running(CID), timeout=30)
        await self.serving(CID)
        self.assertEqual(await self.status(CID), (200, PAGE))

    async def ensure_daemon(self) -> None:
        """Whatever happened, the daemon is up on its own socket for the next test."""
        if self.dockerd.process is None or self.dockerd.process.poll() is not None:
            await deferToThread(self.dockerd.start_daemon)


class ManyContainersTests(DockerTestCase):
    """Fifty containers started at once."""

    # Starting fifty containers costs dockerd about 20 s of a loaded two-core machine (runc,
    # a network namespace and an overlay mount each), and removing them a few more: the
    # default 120 s would leave too little margin for a quarter of it.
    timeout = 300

    async def test_fifty_at_once(self):
        """Fifty labelled containers started together are all in the map, and all reachable."""
        ids = [f"c0ffee{i:018x}" for i in range(50)]
        created = await defer.gatherResults([
            defer.ensureDeferred(self.run_container(entry=cid, start=False, remove=False)) for cid in ids])
        self.addCleanup(self.remove, *created)
        await defer.gatherResults([defer.ensureDeferred(self.dockerd.run("start", docker_id))
                                   for docker_id in created])
        await until(lambda: all(self.running(cid) for cid in ids), timeout=120)
        self.assertEqual(sorted(ipaddress.ip_address(self.entry(cid).address) in self.dockerd.subnet
                                for cid in ids), [True] * 50)
        await self.serving(*ids)
        self.assertEqual(await self.statuses(ids), [200] * 50)

    async def statuses(self, ids: list[str]) -> list[int]:
        """One request to each container, from one curl process."""
        args = ["curl"]
        for cid in ids:
            host = host_for(program="http", index=80, container=cid)
            if len(args) > 1:
                args.append("--next")
            args += ["-sS", "--max-time", "30", "--cacert", self.node.ca_path, "--resolve",
                     f"{host}:{self.node.https_port}:127.0.0.1", "-o", "/dev/null", "-w", "%{http_code}\\n",
                     f"https://{host}:{self.node.https_port}/"]
        done = await deferToThread(subprocess.run, args, capture_output=True, text=True, timeout=120)
        return [int(code) for code in done.stdout.split()]


class OwnershipTests(DockerTestCase):
    """The provider's entries and the admin API's."""

    async def test_admin_put_is_409_unless_forced(self):
        """A PUT over a provider entry is 409; forced, it is accepted and the entry becomes the
        admin's, which the provider then leaves alone (a stop no longer changes it)."""
        docker_id = await self.run_container()
        await until(self.running, timeout=30)
        code, body = await self.admin("GET", f"/api/v1/containers/{CID}")
        self.assertEqual((code, body["source"]), (200, "docker"))
        manual = {"project": PROJECT, "address": "127.0.0.1", "state": "running"}
        code, body = await self.admin("PUT", f"/api/v1/containers/{CID}", manual)
        self.assertEqual((code, body["error"]), (409, "conflict"))
        code, body = await self.admin("PUT", f"/api/v1/containers/{CID}?force=true", manual)
        self.assertEqual((code, body["source"], body["address"]), (200, "admin", "127.0.0.1"))
        await self.dockerd.run("stop", docker_id)
        await until(lambda: any("leaves it alone" in line for line in self.logged), timeout=30)
        self.assertEqual(self.entry().to_json(), dict(manual, id=CID, ports={}, source="admin"))

    async def test_manual_entries_untouched(self):
        """Entries made through the admin API stay as they are while containers come and go."""
        other = {"project": PROJECT, "address": "10.7.7.7", "state": "stopped"}
        code, _ = await self.admin("PUT", f"/api/v1/containers/{CID3}", other)
        self.assertEqual(code, 201)
        docker_id = await self.run_container()
        await until(self.running, timeout=30)
        await self.dockerd.run("rm", "-f", docker_id)
        await until(lambda: self.entry() is None, timeout=30)
        self.assertEqual(self.entry(CID3).to_json(), dict(other, id=CID3, ports={}, source="admin"))

    async def test_aliases_domains_and_permissions(self):
        """An alias, its custom domain and a permission set work for a provider entry as for
        any other."""
        await self.run_container()
        await until(self.running, timeout=30)
        await self.serving()
        code, body = await self.admin("POST", "/api/v1/proxy/aliases",
                                      {"container_id": CID, "alias": "busybox", "program": "http", "index": 80})
        self.assertEqual(code, 201, body)
        alias = "busybox.node-local.containers.localhost"
        self.assertEqual(await self.status(host=alias), (200, PAGE))
        code, body = await self.admin("POST", "/api/v1/proxy/aliases/busybox/domains",
                                      {"domain": "busybox.example.com"})
        self.assertEqual(code, 201, body)
        done = await curl(self.node, "-k", "-o", "/dev/null", "-w", "%{http_code}",
                          f"https://busybox.example.com:{self.node.https_port}/", host="busybox.example.com")
        self.assertEqual(done.stdout, b"200")
        code, body = await self.admin("PUT", f"/api/v1/projects/{PROJECT}/proxy/permissions", {
            "groups": {"office": {"type": "ip", "range": "203.0.113.0/24"}},
            "permissions": {"office": {"http": True}}, "default": "deny"})
        self.assertIn(code, (200, 201), body)
        self.assertEqual((await self.status(host=alias))[0], 403)
        self.assertEqual((await self.status())[0], 403)


class WorkersTests(DockerTestCase):
    """``--workers 2``: worker 0 runs the provider, every worker routes what it writes."""

    async def test_every_worker_follows_the_provider(self):
        """Fresh connections (spread by the kernel over both workers) all reach a started
        container, and all get 503 once it is stopped: worker 0's provider writes, and every
        worker is told."""
        from bench.procs import Gateway
        gateway = await deferToThread(Gateway, ["--workers", "2", "--docker-socket", self.dockerd.socket])
        self.addCleanup(deferToThread, gateway.stop)
        docker_id = await self.run_container()
        host = host_for(program="http", index=80, container=CID)

        def statuses() -> list[int]:
            one = ["-s", "-o", "/dev/null", "-w", "%{http_code}\\n", *gateway.curl_args(host),
                   f"https://{host}:{gateway.https_port}/"]
            args = ["curl", *one]
            for _ in range(19):
                args += ["--next", *one]
            return [int(c) for c in subprocess.run(args, capture_output=True, text=True, timeout=120).stdout.split()]

        async def all_are(code: int) -> None:
            for _ in range(300):  # bounded: 300 rounds of 20 requests
                if await deferToThread(statuses) == [code] * 20:
                    return
            self.fail(f"not every answer became {code}")
        await all_are(200)
        await self.dockerd.run("stop", docker_id)
        await all_are(503)
