"""Specification of the Docker provider's parts that need no daemon: the label grammar, what an
inspected container means for the live map, the events line buffer, the Engine API client
(against a stand-in Engine API on a UNIX socket) and the provider's sync logic (against an
in-memory daemon on a fake clock).  tests/test_docker.py runs it against a real dockerd.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from hoodyproxy.directory import Container, SQLiteDirectory, open_database
from hoodyproxy.directory.docker import (DockerProvider, EngineClient, EngineError, InvalidLabel, LineBuffer,
                                         LineTooLong, NotFound, choose_address, parse_labels, parse_ports,
                                         preferred, read_container, socket_path)
from hoodyproxy.directory.docker._engine import MAX_API_VERSION, negotiated_version
from tests.support import wait

PROJECT = "67e89abc123def456789abcd"
CONTAINER = "890abcdef12345678901cdef"
DOCKER_ID = "0123456789abcdef" * 4
OTHER_ID = "fedcba9876543210" * 4
ANYWHERE_LOCAL = {"198.51.100.1", "203.0.113.1"}.__contains__
#: Hypothesis without its clock: on a loaded machine slow generation is not a failure.
UNTIMED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def network(address: str, gateway: str) -> dict:
    return {"IPAddress": address, "Gateway": gateway, "GlobalIPv6Address": "", "IPv6Gateway": ""}


def inspected(docker_id: str = DOCKER_ID, *, labels: dict | None = None, status: str = "running",
              health: str | None = None, networks: dict | None = None, name: str = "/web",
              started: str = "2026-01-01T00:00:00.000000001Z", mode: str = "default") -> dict:
    """An inspect document as Docker 20.10 answers it (the parts the provider reads)."""
    state = {"Status": status, "Running": status == "running", "StartedAt": started}
    if health is not None:
        state["Health"] = {"Status": health}
    if networks is None:
        networks = {"bridge": network("198.51.100.7", "198.51.100.1")} if status == "running" else \
            {"bridge": network("", "")}
    return {"Id": docker_id, "Name": name, "State": state,
            "Config": {"Labels": {"hoody.project": PROJECT} if labels is None else labels},
            "HostConfig": {"NetworkMode": mode}, "NetworkSettings": {"Networks": networks}}


class LabelTests(SynchronousTestCase):
    """The label grammar: hoody.project, hoody.container, hoody.ports, hoody.network."""

    def test_not_ours_without_project(self) -> None:
        """A container without ``hoody.project`` is not the provider's business."""
        self.assertIsNone(parse_labels({"hoody.container": CONTAINER, "other": "x"}, DOCKER_ID))

    def test_container_defaults_to_the_docker_id(self) -> None:
        """Without ``hoody.container`` the entry id is the Docker id's first 24 hex digits."""
        labels = parse_labels({"hoody.project": PROJECT}, DOCKER_ID)
        self.assertEqual((labels.project, labels.container, dict(labels.ports), labels.network),
                         (PROJECT, DOCKER_ID[:24], {}, None))

    def test_every_label(self) -> None:
        """All four labels, read under the configured prefix."""
        labels = parse_labels({"acme.project": PROJECT, "acme.container": CONTAINER,
                               "acme.ports": "terminal=7681,http-1=3000", "acme.network": "backend",
                               "hoody.project": "ignored"}, DOCKER_ID, "acme.")
        self.assertEqual((labels.project, labels.container, dict(labels.ports), labels.network),
                         (PROJECT, CONTAINER, {"terminal": 7681, "http-1": 3000}, "backend"))

    def test_bad_ids_name_the_label(self) -> None:
        """A project or container label that is not 24 lowercase hex digits is named in the error."""
        for labels, label in (({"hoody.project": PROJECT.upper()}, "hoody.project"),
                              ({"hoody.project": "x"}, "hoody.project"),
                              ({"hoody.project": PROJECT, "hoody.container": CONTAINER + "0"}, "hoody.container")):
            with self.assertRaises(InvalidLabel) as caught:
                parse_labels(labels, DOCKER_ID)
            self.assertEqual(caught.exception.label, label)

    def test_ports(self) -> None:
        """Pairs separated by commas; spaces and empty items are ignored."""
        self.assertEqual(parse_ports(" terminal = 7681 , http-1=3000,, "), {"terminal": 7681, "http-1": 3000})
        self.assertEqual(parse_ports(""), {})

    def test_bad_ports(self) -> None:
        """Anything else names the label: no '=', a word for a port, out of range, a bad key, twice."""
        for text in ("terminal", "terminal=x", "terminal=0", "terminal=65536", "Terminal=80", "http-01=80",
                     "a=1,a=2", "terminal=-1", "=80"):
            with self.assertRaises(InvalidLabel, msg=text) as caught:
                parse_ports(text, "hoody.ports")
            self.assertTrue(str(caught.exception).startswith("label hoody.ports"), text)

    @UNTIMED
    @given(st.text(max_size=60))
    def test_ports_never_crash(self, text: str) -> None:
        """Any label text is a dict of valid overrides or InvalidLabel, nothing else."""
        try:
            ports = parse_ports(text)
        except InvalidLabel:
            return
        self.assertTrue(all(1 <= port <= 65535 for port in ports.values()))


class NetworkChoiceTests(SynchronousTestCase):
    """Which network's address the gateway uses."""

    TWO = {"front": network("198.51.100.7", "198.51.100.1"), "back": network("203.0.113.7", "203.0.113.1")}

    def test_one_reachable_network(self) -> None:
        """Without a choice: the network whose gateway address is this host's."""
        self.assertEqual(choose_address(self.TWO, "default", None, {"203.0.113.1"}.__contains__),
                         ("203.0.113.7", None))

    def test_named_network(self) -> None:
        """A named network is used as it is, reachable or not."""
        self.assertEqual(choose_address(self.TWO, "default", "front", lambda a: False), ("198.51.100.7", None))

    def test_named_network_absent(self) -> None:
        """A named network the container is not on: no address, and why (naming its networks)."""
        address, why = choose_address(self.TWO, "default", "other", ANYWHERE_LOCAL)
        self.assertIsNone(address)
        self.assertIn("not on network other", why)
        self.assertIn("back, front", why)

    def test_several_reachable_is_ambiguous(self) -> None:
        """Two reachable networks and no choice: no address, and the advice names the label."""
        address, why = choose_address(self.TWO, "default", None, ANYWHERE_LOCAL, "hoody.network")
        self.assertIsNone(address)
        self.assertIn("several", why)
        self.assertIn("hoody.network label or [docker] network", why)

    def test_unreachable_network(self) -> None:
        """A network whose gateway is elsewhere (macvlan, overlay, rootless) is not chosen."""
        address, why = choose_address({"mac": network("192.168.1.50", "192.168.1.1")}, "default", None,
                                      lambda a: False)
        self.assertIsNone(address)
        self.assertIn("mac does not have its gateway on this host", why)

    def test_host_network(self) -> None:
        """A container on the host network is reached on loopback."""
        self.assertEqual(choose_address({"host": network("", "")}, "host", None, lambda a: False),
                         ("127.0.0.1", None))

    def test_ipv6_only(self) -> None:
        """A network with only a global IPv6 address gives that address."""
        v6 = {"n": {"IPAddress": "", "Gateway": "", "GlobalIPv6Address": "2001:db8::7",
                    "IPv6Gateway": "2001:db8::1"}}
        self.assertEqual(choose_address(v6, "default", None, {"2001:db8::1"}.__contains__), ("2001:db8::7", None))


class ReadContainerTests(SynchronousTestCase):
    """An inspect document -> the entry it asks for."""

    def read(self, doc: dict, previous: str | None = None, network: str | None = None):
        return read_container(doc, "hoody.", network, ANYWHERE_LOCAL, lambda entry_id: previous)

    def test_running(self) -> None:
        """Running: a running docker-owned entry at the network's address."""
        reading = self.read(inspected(labels={"hoody.project": PROJECT, "hoody.ports": "http-80=8080"}))
        self.assertEqual(reading.entry, Container(DOCKER_ID[:24], PROJECT, "198.51.100.7", "running",
                                                  {"http-80": 8080}, source="docker"))
        self.assertIsNone(reading.problem)
        self.assertEqual(reading.name, "web")

    def test_unlabelled(self) -> None:
        """No hoody.project: nothing at all."""
        self.assertIsNone(self.read(inspected(labels={"com.example": "x"})))

    def test_every_other_status_is_stopped(self) -> None:
        """Paused, restarting, exited, created, dead: stopped, at the address last seen."""
        for status in ("paused", "restarting", "exited", "created", "dead", "removing"):
            reading = self.read(inspected(status=status), previous="198.51.100.9")
            self.assertEqual((reading.entry.state, reading.entry.address), ("stopped", "198.51.100.9"), status)

    def test_paused_keeps_its_own_address(self) -> None:
        """A paused container still has its address in Docker: that one is used."""
        reading = self.read(inspected(status="paused", networks={"bridge": network("198.51.100.8",
                                                                                      "198.51.100.1")}))
        self.assertEqual((reading.entry.state, reading.entry.address), ("stopped", "198.51.100.8"))

    def test_stopped_never_seen_running(self) -> None:
        """A stopped container with no address known has no entry (nothing to route to), and no problem."""
        reading = self.read(inspected(status="exited"))
        self.assertEqual((reading.entry, reading.problem), (None, None))

    def test_unhealthy_is_stopped_until_healthy(self) -> None:
        """Health ``unhealthy``: stopped; ``starting`` and ``healthy``: running."""
        self.assertEqual(self.read(inspected(health="unhealthy")).entry.state, "stopped")
        self.assertEqual(self.read(inspected(health="starting")).entry.state, "running")
        self.assertEqual(self.read(inspected(health="healthy")).entry.state, "running")

    def test_bad_label_is_a_problem(self) -> None:
        """A labelled container with a bad label is not routed, and says why."""
        reading = self.read(inspected(labels={"hoody.project": PROJECT, "hoody.ports": "terminal"}))
        self.assertIsNone(reading.entry)
        self.assertIn("label hoody.ports", reading.problem)

    def test_running_without_a_chosen_network_is_a_problem(self) -> None:
        """Running on two reachable networks with none named: not routed, and why."""
        reading = self.read(inspected(networks=NetworkChoiceTests.TWO))
        self.assertIsNone(reading.entry)
        self.assertIn("several", reading.problem)
        self.assertEqual(self.read(inspected(networks=NetworkChoiceTests.TWO), network="back").entry.address,
                         "203.0.113.7")

    def test_label_network_beats_the_node_default(self) -> None:
        """``hoody.network`` overrides ``[docker] network``."""
        doc = inspected(labels={"hoody.project": PROJECT, "hoody.network": "front"}, networks=NetworkChoiceTests.TWO)
        self.assertEqual(self.read(doc, network="back").entry.address, "198.51.100.7")

    def test_preferred_claim(self) -> None:
        """Two containers claiming one entry: the running one; both running: the last started."""
        old = self.read(inspected(OTHER_ID, labels={"hoody.project": PROJECT, "hoody.container": CONTAINER},
                                  started="2026-01-01T00:00:00Z"))
        new = self.read(inspected(DOCKER_ID, labels={"hoody.project": PROJECT, "hoody.container": CONTAINER},
                                  started="2026-01-02T00:00:00Z"))
        stopped = self.read(inspected(DOCKER_ID, labels={"hoody.project": PROJECT, "hoody.container": CONTAINER},
                                      status="exited", started="2026-01-03T00:00:00Z"), previous="198.51.100.3")
        self.assertIs(preferred([old, new]), new)
        self.assertIs(preferred([old, stopped]), old)
        self.assertIsNone(preferred([]))


class LineBufferTests(SynchronousTestCase):
    """The events stream's framing: lines split anywhere come out whole, and bounded."""

    EVENTS = [json.dumps({"Type": "container", "Action": a, "Actor": {"ID": DOCKER_ID}}).encode()
              for a in ("start", "die", "health_status: healthy")]

    def test_one_byte_at_a_time(self) -> None:
        """Fed a byte at a time, the buffer gives each line once, when its newline arrives."""
        stream = b"\n".join(self.EVENTS) + b"\n"
        buffer, out = LineBuffer(), []
        for i in range(len(stream)):
            out += buffer.feed(stream[i:i + 1])
        self.assertEqual(out, self.EVENTS)
        self.assertEqual(buffer.pending, 0)

    @UNTIMED
    @given(st.lists(st.integers(min_value=0, max_value=400), max_size=10))
    def test_any_split(self, cuts: list[int]) -> None:
        """Cut anywhere (mid-line, mid-character), the lines come out whole and in order."""
        stream = b"\n".join(self.EVENTS) + "\n{\"name\": \"caf\u00e9\"}\r\n".encode()
        buffer, out, start = LineBuffer(), [], 0
        for cut in sorted({min(c, len(stream)) for c in cuts}) + [len(stream)]:
            out += buffer.feed(stream[start:cut])
            start = cut
        self.assertEqual(out, [*self.EVENTS, "{\"name\": \"caf\u00e9\"}".encode()])

    def test_unfinished_line_waits(self) -> None:
        """A line without its newline is held, not given."""
        buffer = LineBuffer()
        self.assertEqual(buffer.feed(b'{"Type": "cont'), [])
        self.assertEqual(buffer.feed(b'ainer"}\n\n'), [b'{"Type": "container"}'])

    def test_bounded(self) -> None:
        """A line longer than the bound raises LineTooLong, finished or not."""
        self.assertRaises(LineTooLong, LineBuffer(16).feed, b"x" * 17)
        buffer = LineBuffer(16)
        buffer.feed(b"x" * 10)
        self.assertRaises(LineTooLong, buffer.feed, b"x" * 10 + b"\n")


class SocketPathTests(SynchronousTestCase):
    """Where the provider finds the daemon."""

    def test_order(self) -> None:
        """The configured socket, else DOCKER_HOST's unix:// path, else /var/run/docker.sock."""
        self.assertEqual(socket_path("/a.sock", {"DOCKER_HOST": "unix:///b.sock"}), "/a.sock")
        self.assertEqual(socket_path("", {"DOCKER_HOST": "unix:///b.sock"}), "/b.sock")
        self.assertEqual(socket_path("", {}), "/var/run/docker.sock")

    def test_tcp_docker_host_refused(self) -> None:
        """A DOCKER_HOST that is not a UNIX socket is an error naming the way out."""
        with self.assertRaises(ValueError) as caught:
            socket_path("", {"DOCKER_HOST": "tcp://10.0.0.1:2375"})
        self.assertIn("--docker-socket", str(caught.exception))

    def test_version_negotiation(self) -> None:
        """The daemon's version, at most ours; too old or unreadable is an error."""
        self.assertEqual(negotiated_version("1.41"), (1, 41))
        self.assertEqual(negotiated_version("1.99"), MAX_API_VERSION)
        self.assertRaises(EngineError, negotiated_version, "1.12")
        self.assertRaises(EngineError, negotiated_version, None)
        self.assertRaises(EngineError, negotiated_version, "one")


# -- the Engine API client against a stand-in API on a UNIX socket --------------------------

class _EngineStandIn(Resource):
    """A minimal Engine API: /version, /v1.41/containers/..., /v1.41/events (streamed in
    awkward chunks); it records every method and path it is sent."""

    isLeaf = True

    def __init__(self, api_version: str = "1.41") -> None:
        super().__init__()
        self.api_version = api_version
        self.requests: list[tuple[bytes, bytes]] = []
        self.streams: list = []
        #: As docker-socket-proxy with VERSION=0 answers /version.
        self.version_forbidden = False

    def render(self, request):
        self.requests.append((request.method, request.uri))
        request.setHeader(b"Content-Type", b"application/json")
        path = request.path.decode()
        if path == "/version":
            if self.version_forbidden:
                request.setResponseCode(403)
                return b"<html><body><h1>403 Forbidden</h1></body></html>"
            return json.dumps({"ApiVersion": self.api_version, "MinAPIVersion": "1.12"}).encode()
        if path.startswith("/v") and not path.startswith(f"/v{self.api_version}/"):
            request.setResponseCode(400)
            return b'{"message": "client version is too new"}'
        rest = path[len(f"/v{self.api_version}"):] if path.startswith("/v") else path
        if rest == "/containers/json":
            return json.dumps([{"Id": DOCKER_ID}]).encode()
        if rest == f"/containers/{DOCKER_ID}/json":
            return json.dumps(inspected()).encode()
        if rest == "/events":
            self.streams.append(request)
            request.write(b"")  # the head now, as dockerd sends it
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b'{"message": "No such container: x"}'


class EngineClientTests(TestCase):
    """The GET-only client: version negotiation, paths, errors, the streamed events."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="hoodyproxy-engine-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.path = os.path.join(directory, "docker.sock")
        self.api = _EngineStandIn()
        port = reactor.listenUNIX(self.path, Site(self.api))
        self.addCleanup(port.stopListening)
        self.client = EngineClient(reactor, self.path, timeout=10)
        self.addCleanup(self.client.close)

    async def test_negotiates_and_prefixes(self) -> None:
        """``/version`` first, then every path under ``/v<ApiVersion>``, all of them GET."""
        self.assertEqual(await self.client.negotiate(), "1.41")
        listed = await self.client.get("/containers/json", {"all": "1", "filters": {"label": ["hoody.project"]}})
        self.assertEqual(listed, [{"Id": DOCKER_ID}])
        self.assertEqual((await self.client.get(f"/containers/{DOCKER_ID}/json"))["Id"], DOCKER_ID)
        self.assertEqual([m for m, _ in self.api.requests], [b"GET"] * 3)
        self.assertEqual(self.api.requests[1][1],
                         b"/v1.41/containers/json?all=1&filters=%7B%22label%22%3A%5B%22hoody.project%22%5D%7D")

    async def test_version_refused_by_a_proxy(self) -> None:
        """A socket proxy refusing ``/version`` (403): paths go unversioned (the daemon's own version)."""
        self.api.version_forbidden = True
        self.assertEqual(await self.client.negotiate(), "")
        self.assertEqual(await self.client.get("/containers/json"), [{"Id": DOCKER_ID}])
        self.assertEqual(self.api.requests[-1], (b"GET", b"/containers/json"))

    async def test_tcp_socket_proxy(self) -> None:
        """``tcp://host:port`` (a read-only socket proxy) is spoken to the same way."""
        port = reactor.listenTCP(0, Site(self.api), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = EngineClient(reactor, f"tcp://127.0.0.1:{port.getHost().port}", timeout=10)
        self.assertEqual(await client.negotiate(), "1.41")
        self.assertEqual((await client.get(f"/containers/{DOCKER_ID}/json"))["Id"], DOCKER_ID)

    async def test_newer_daemon_gets_our_newest(self) -> None:
        """A daemon newer than the client is spoken to in the client's newest version."""
        self.api.api_version = "1.%d" % (MAX_API_VERSION[1] + 5)
        self.assertEqual(await self.client.negotiate(), "%d.%d" % MAX_API_VERSION)

    async def test_not_found(self) -> None:
        """404 is NotFound, carrying the daemon's message."""
        await self.client.negotiate()
        with self.assertRaises(NotFound):
            await self.client.get(f"/containers/{OTHER_ID}/json")

    async def test_events_split_anywhere(self) -> None:
        """Events written in pieces that split lines arrive one whole line each, then the end."""
        await self.client.negotiate()
        lines: list[bytes] = []
        stream = await self.client.follow("/events", {"filters": {"type": ["container"]}}, lines.append)
        request = self.api.streams[0]
        payload = b"".join(LineBufferTests.EVENTS[i] + b"\n" for i in range(3))
        for piece in (payload[:5], payload[5:70], payload[70:71], payload[71:]):
            request.write(piece)
            await wait(0.02)  # so that the pieces arrive as separate reads
        request.finish()
        await stream.ended
        self.assertEqual(lines, LineBufferTests.EVENTS)

    async def test_events_stop(self) -> None:
        """``stop`` ends the stream from the client's side; ``ended`` fires."""
        await self.client.negotiate()
        stream = await self.client.follow("/events", None, lambda line: None)
        stream.stop()
        await stream.ended

    def test_only_get(self) -> None:
        """The client has no way to send any method but GET: none is a parameter."""
        import inspect

        from hoodyproxy.directory.docker import _engine
        source = inspect.getsource(_engine)
        self.assertEqual(source.count(".request("), 1)
        self.assertIn('self._agent.request(b"GET", url', source)


# -- the provider's logic against an in-memory daemon ---------------------------------------

class _FakeStream:
    def __init__(self, on_line) -> None:
        self.on_line = on_line
        self.ended: defer.Deferred = defer.Deferred()

    def emit(self, action: str, docker_id: str, kind: str = "container", **attributes) -> None:
        self.on_line(json.dumps({"Type": kind, "Action": action,
                                 "Actor": {"ID": docker_id, "Attributes": attributes}}).encode())

    def stop(self) -> None:
        if not self.ended.called:
            self.ended.callback(None)


class _FakeDaemon:
    """Containers (inspect documents by id) and the streams of whoever follows its events."""

    def __init__(self) -> None:
        self.containers: dict[str, dict] = {}
        self.up = True
        self.streams: list[_FakeStream] = []
        self.connections = 0
        #: While set, inspections wait on this Deferred (to hold a resync open).
        self.hold: defer.Deferred | None = None

    def client(self, reactor, path, timeout=30.0):
        daemon = self

        class Client:
            api_version = "1.41"

            async def negotiate(self):
                daemon.connections += 1
                if not daemon.up:
                    raise ConnectionRefusedError("no daemon")
                return "1.41"

            async def get(self, path, query=None):
                if not daemon.up:
                    raise ConnectionRefusedError("no daemon")
                if path == "/containers/json":
                    label = query["filters"]["label"][0]
                    return [{"Id": i} for i, d in daemon.containers.items() if label in d["Config"]["Labels"]]
                docker_id = path.split("/")[2]
                if daemon.hold is not None:
                    await daemon.hold
                if docker_id not in daemon.containers:
                    raise NotFound("no such container", 404)
                return copy.deepcopy(daemon.containers[docker_id])

            async def follow(self, path, query, on_line):
                stream = _FakeStream(on_line)
                daemon.streams.append(stream)
                return stream

            def close(self):
                return defer.succeed(None)
        return Client()

    def go_away(self) -> None:
        self.up = False
        self.streams[-1].ended.callback(None)


class ProviderTests(SynchronousTestCase):
    """The provider's sync: resync, events, ownership, reconnection (a fake daemon, a fake clock)."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="hoodyproxy-provider-")
        self.addCleanup(shutil.rmtree, directory, True)
        conn = open_database(os.path.join(directory, "hoodyproxy.db"))
        self.addCleanup(conn.close)
        self.map = SQLiteDirectory(conn)
        self.clock = Clock()
        self.daemon = _FakeDaemon()
        self.changed: list[str] = []
        self.map.subscribe(self.changed.append)

    def start(self, **kw) -> DockerProvider:
        provider = DockerProvider(self.map, "/fake.sock", self.clock, client_factory=self.daemon.client,
                                  is_local=ANYWHERE_LOCAL, **kw)
        provider.startService()
        self.addCleanup(provider.stopService)
        return provider

    def entry(self, docker_id: str = DOCKER_ID):
        return self.map.lookup(docker_id[:24])

    def test_resync_writes_labelled_containers(self) -> None:
        """At start every labelled container is in the map, owned by the provider; others are not."""
        self.daemon.containers[DOCKER_ID] = inspected()
        self.daemon.containers[OTHER_ID] = inspected(OTHER_ID, labels={"com.example": "x"})
        provider = self.start()
        self.assertEqual(self.entry(), Container(DOCKER_ID[:24], PROJECT, "198.51.100.7", source="docker"))
        self.assertIsNone(self.entry(OTHER_ID))
        self.assertEqual(provider.resyncs, 1)

    def test_events_follow_the_lifecycle(self) -> None:
        """die -> stopped (address kept), start -> running, destroy -> gone; each write notifies
        subscribers (the workers' notify_change is one)."""
        self.start()
        stream = self.daemon.streams[-1]
        self.daemon.containers[DOCKER_ID] = inspected()
        stream.emit("start", DOCKER_ID, **{"hoody.project": PROJECT})
        self.assertTrue(self.entry().running)
        self.daemon.containers[DOCKER_ID] = inspected(status="exited")
        stream.emit("die", DOCKER_ID)
        self.assertEqual((self.entry().state, self.entry().address), ("stopped", "198.51.100.7"))
        self.daemon.containers[DOCKER_ID] = inspected()
        stream.emit("start", DOCKER_ID)
        self.assertTrue(self.entry().running)
        del self.daemon.containers[DOCKER_ID]
        stream.emit("destroy", DOCKER_ID)
        self.assertIsNone(self.entry())
        self.assertEqual(self.changed, [DOCKER_ID[:24]] * 4)

    def test_health(self) -> None:
        """health_status: unhealthy -> stopped, healthy -> running."""
        self.daemon.containers[DOCKER_ID] = inspected(health="healthy")
        self.start()
        self.daemon.containers[DOCKER_ID] = inspected(health="unhealthy")
        self.daemon.streams[-1].emit("health_status: unhealthy", DOCKER_ID)
        self.assertEqual(self.entry().state, "stopped")
        self.daemon.containers[DOCKER_ID] = inspected(health="healthy")
        self.daemon.streams[-1].emit("health_status: healthy", DOCKER_ID)
        self.assertEqual(self.entry().state, "running")

    def test_unchanged_is_not_written(self) -> None:
        """An event that changes nothing (a rename) writes nothing."""
        self.daemon.containers[DOCKER_ID] = inspected()
        self.start()
        self.changed.clear()
        self.daemon.streams[-1].emit("rename", DOCKER_ID)
        self.assertEqual(self.changed, [])

    def test_manual_entries_untouched(self) -> None:
        """An admin entry with a container's id is neither replaced nor removed by the provider."""
        manual = Container(DOCKER_ID[:24], PROJECT, "10.0.0.5", "stopped")
        self.map.put(manual)
        self.daemon.containers[DOCKER_ID] = inspected()
        self.start()
        self.assertEqual(self.entry(), manual)
        del self.daemon.containers[DOCKER_ID]
        self.daemon.streams[-1].emit("destroy", DOCKER_ID, **{"hoody.project": PROJECT})
        self.assertEqual(self.entry(), manual)

    def test_resync_removes_what_vanished(self) -> None:
        """The daemon goes away: the map is kept; back, a full resync removes the containers
        removed meanwhile and adds the new ones (after a capped exponential backoff)."""
        self.daemon.containers[DOCKER_ID] = inspected()
        provider = self.start()
        self.daemon.go_away()
        self.clock.pump([0.25] * 40)  # 10 s: attempts 0.25, 0.5, 1, 2, 4 s apart
        self.assertIsNotNone(self.entry())
        attempts = self.daemon.connections
        self.assertGreater(attempts, 3)
        del self.daemon.containers[DOCKER_ID]
        self.daemon.containers[OTHER_ID] = inspected(OTHER_ID)
        self.daemon.up = True
        self.clock.pump([1] * int(provider.backoff_max))
        self.assertIsNone(self.entry())
        self.assertTrue(self.entry(OTHER_ID).running)
        self.assertEqual(provider.resyncs, 2)

    def test_backoff_is_capped(self) -> None:
        """Reconnection attempts slow down to one per backoff_max, never slower."""
        self.daemon.up = False
        provider = self.start()
        self.clock.pump([1] * 300)
        before = self.daemon.connections
        self.clock.pump([1] * int(provider.backoff_max * 3))
        self.assertEqual(self.daemon.connections - before, 3)

    def test_resync_removes_entries_of_an_earlier_run(self) -> None:
        """A provider entry whose container is gone by the time the node starts is removed."""
        self.map.put(Container(OTHER_ID[:24], PROJECT, "198.51.100.9", source="docker"))
        self.start()
        self.assertIsNone(self.entry(OTHER_ID))

    def test_events_during_resync_wait_for_it(self) -> None:
        """A container started while the resync lists and inspects is in the map afterwards."""
        self.daemon.containers[OTHER_ID] = inspected(OTHER_ID)
        self.daemon.hold = defer.Deferred()
        self.start()
        self.daemon.containers[DOCKER_ID] = inspected()
        self.daemon.streams[-1].emit("start", DOCKER_ID, **{"hoody.project": PROJECT})
        hold, self.daemon.hold = self.daemon.hold, None
        hold.callback(None)
        self.assertTrue(self.entry().running)
        self.assertTrue(self.entry(OTHER_ID).running)

    def test_replacement_claiming_the_same_entry(self) -> None:
        """Two containers labelled with one hoody.container: the map follows the running one,
        and removing the old one leaves the new one's entry."""
        labels = {"hoody.project": PROJECT, "hoody.container": CONTAINER}
        self.daemon.containers[OTHER_ID] = inspected(OTHER_ID, labels=labels, started="2026-01-01T00:00:00Z")
        self.start()
        stream = self.daemon.streams[-1]
        self.daemon.containers[DOCKER_ID] = inspected(
            DOCKER_ID, labels=labels, started="2026-01-02T00:00:00Z",
            networks={"bridge": network("198.51.100.8", "198.51.100.1")})
        stream.emit("start", DOCKER_ID, **labels)
        self.assertEqual(self.map.lookup(CONTAINER).address, "198.51.100.8")
        self.daemon.containers[OTHER_ID] = inspected(OTHER_ID, labels=labels, status="exited")
        stream.emit("die", OTHER_ID, **labels)
        del self.daemon.containers[OTHER_ID]
        stream.emit("destroy", OTHER_ID, **labels)
        self.assertEqual((self.map.lookup(CONTAINER).address, self.map.lookup(CONTAINER).state),
                         ("198.51.100.8", "running"))

    def test_network_connect_reinspects(self) -> None:
        """A running container joining a network is inspected again (its address may change)."""
        labels = {"hoody.project": PROJECT, "hoody.network": "back"}
        self.daemon.containers[DOCKER_ID] = inspected(labels=labels, networks={
            "front": network("198.51.100.7", "198.51.100.1"), "back": network("", "")})
        self.start()
        self.assertIsNone(self.entry())
        self.daemon.containers[DOCKER_ID] = inspected(labels=labels, networks=NetworkChoiceTests.TWO)
        self.daemon.streams[-1].emit("connect", "f" * 64, kind="network", container=DOCKER_ID)
        self.assertEqual(self.entry().address, "203.0.113.7")

    def test_unlabelled_events_ignored(self) -> None:
        """Events of unlabelled containers never reach the map."""
        self.start()
        self.daemon.containers[OTHER_ID] = inspected(OTHER_ID, labels={})
        self.daemon.streams[-1].emit("start", OTHER_ID)
        self.daemon.streams[-1].emit("die", OTHER_ID)
        self.assertEqual(self.map.list(), [])

    def test_garbage_lines_are_skipped(self) -> None:
        """A line that is not JSON, or not an event, changes nothing and stops nothing."""
        self.start()
        stream = self.daemon.streams[-1]
        stream.on_line(b"not json")
        stream.on_line(b"[1, 2]")
        stream.on_line(b'{"Type": "container", "Action": "start", "Actor": {"ID": "../../etc"}}')
        self.daemon.containers[DOCKER_ID] = inspected()
        stream.emit("start", DOCKER_ID)
        self.assertTrue(self.entry().running)
        self.flushLoggedErrors()

    def test_stop(self) -> None:
        """Stopping the provider ends the events stream and any retry; the map stays."""
        self.daemon.containers[DOCKER_ID] = inspected()
        provider = self.start()
        stream = self.daemon.streams[-1]
        provider.stopService()
        self.assertTrue(stream.ended.called)
        self.clock.advance(100)
        self.assertEqual(len(self.daemon.streams), 1)
        self.assertIsNotNone(self.entry())
