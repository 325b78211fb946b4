"""The container sees the real client IP: transparent connections, PROXY protocol, the netfilter service.

The namespace tests build a client host, the gateway host and a container host as three
network namespaces (``tests/netns.py``), run the real ``twistd -n hoodyproxy`` in the
gateway's, and look at what a service in the container's sees.  They need root (and run
in CI, which is root); elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from hoodyproxy import netfilter
from hoodyproxy.config import settings_from_mapping
from hoodyproxy.directory import Container
from hoodyproxy.netfilter import NetfilterError, NetfilterService, PolicyRouting, has_net_admin
from hoodyproxy.service import NodeService, StartError
from hoodyproxy.upstream.pool import ConnectionPool
from hoodyproxy.upstream.proxy_protocol import ProxyHeaderError, ProxySource, parse_v2, v2_header
from hoodyproxy.upstream.transparent import TransparentSource
from tests import netns
from tests.support import Backend, raw_backend, register, start_node

PROJECT = "67e89abc123def456789abcd"
CONTAINER = "890abcdef12345678901cdef"
SERVICE_PORT = 8000
NAMESPACES_SKIP = netns.missing_requirements()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def route(container: str = CONTAINER, port: int = SERVICE_PORT) -> str:
    return f"{PROJECT}-{container}-http-{port}.node-local.containers.localhost"


# == PROXY protocol v2 (pure) ===================================================================

class ProxyHeaderTests(unittest.SynchronousTestCase):

    def test_ipv4_header_bytes(self):
        """An IPv4 client: signature, PROXY over TCP4, 12 address bytes, in network order."""
        self.assertEqual(
            v2_header("203.0.113.50", 51234, "198.51.100.1", 443),
            b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c"
            + bytes([203, 0, 113, 50]) + bytes([198, 51, 100, 1]) + struct.pack("!HH", 51234, 443))

    def test_ipv6_header_bytes(self):
        """An IPv6 client: PROXY over TCP6 and 36 address bytes."""
        header = v2_header("2001:db8:1::50", 1, "2001:db8:1::1", 8443)
        self.assertEqual(header[12:16], b"\x21\x21\x00\x24")
        self.assertEqual(header[16:32], socket.inet_pton(socket.AF_INET6, "2001:db8:1::50"))
        self.assertEqual(header[32:48], socket.inet_pton(socket.AF_INET6, "2001:db8:1::1"))
        self.assertEqual(header[48:], struct.pack("!HH", 1, 8443))

    def test_mapped_addresses_are_unwrapped(self):
        """IPv4-mapped IPv6 addresses (a dual-stack listener) are sent as IPv4."""
        self.assertEqual(v2_header("::ffff:203.0.113.50", 5, "::ffff:203.0.113.1", 8443),
                         v2_header("203.0.113.50", 5, "203.0.113.1", 8443))

    def test_parse_round_trip(self):
        """parse_v2 reads back what v2_header wrote, with the header's length."""
        header = v2_header("2001:db8::7", 4000, "2001:db8::1", 443)
        self.assertEqual(parse_v2(header + b"GET /"), (("2001:db8::7", 4000, "2001:db8::1", 443), len(header)))

    def test_parse_needs_the_whole_header(self):
        """A header cut short asks for more bytes rather than failing."""
        header = v2_header("203.0.113.50", 1, "203.0.113.1", 2)
        for cut in (1, 12, 15, len(header) - 1):
            self.assertIsNone(parse_v2(header[:cut]))

    def test_parse_refuses_other_bytes(self):
        """Plain HTTP is not a PROXY header."""
        self.assertRaises(ProxyHeaderError, parse_v2, b"GET / HTTP/1.1\r\n\r\n")

    def test_source_pools_by_client_address_only(self):
        """Two connections of one client address are interchangeable, whatever their ports."""
        self.assertEqual(ProxySource("203.0.113.50", 1111, "203.0.113.1", 8443),
                         ProxySource("203.0.113.50", 2222, "203.0.113.1", 8443))
        self.assertNotEqual(ProxySource("203.0.113.50"), ProxySource("203.0.113.51"))

    def test_source_with_unknown_destination(self):
        """Without a usable destination the header names the unspecified address of the client's family."""
        parsed, _ = parse_v2(ProxySource("2001:db8::9", 7, "", 0).preamble)
        self.assertEqual(parsed, ("2001:db8::9", 7, "::", 0))


# == the pool: connections owned by one client ======================================================

class SourcedPoolTests(unittest.SynchronousTestCase):
    ADDRESS, PORT = "198.51.100.2", 8000

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.pool = ConnectionPool(self.reactor, connect_timeout=5.0, idle_timeout=30.0, max_idle=4)

    def establish(self, index: int = -1):
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        conn = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        conn.makeConnection(transport)
        return conn, transport

    def pooled(self, source) -> None:
        """Open a connection for ``source`` and finish one keep-alive exchange on it."""
        d = self.pool.acquire(self.ADDRESS, self.PORT, source)
        conn, _ = self.establish()
        self.assertIs(self.successResultOf(d), conn)
        self.exchange(conn)

    @staticmethod
    def exchange(conn) -> None:
        """One complete keep-alive exchange on ``conn`` (it goes back to the pool)."""
        class Listener:
            def upstream_head(self, *a): pass
            def upstream_data(self, data): pass
            def upstream_end(self): pass
            def upstream_failed(self, *a): pass
            def upstream_upgraded(self, leftover): pass
        conn.send_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Listener(), chunked_body=False, has_body=False,
                       head_request=False, upgrade=False, timeout=10)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def test_transparent_connection_binds_the_client_address(self):
        """A transparent source connects from (client address, any port)."""
        self.pool.acquire(self.ADDRESS, self.PORT, TransparentSource("203.0.113.50"))
        host, port, _factory, timeout, bind = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout, bind), (self.ADDRESS, self.PORT, 5.0, ("203.0.113.50", 0)))

    def test_client_connections_are_never_shared(self):
        """An idle connection of one client serves that client only: not another, not the shared pool."""
        self.pooled(TransparentSource("203.0.113.50"))
        self.assertIsNone(self.pool.acquire_idle(self.ADDRESS, self.PORT))
        self.assertIsNone(self.pool.acquire_idle(self.ADDRESS, self.PORT, TransparentSource("203.0.113.51")))
        self.assertIsNone(self.pool.acquire_idle(self.ADDRESS, self.PORT, ProxySource("203.0.113.50")))
        self.assertIsNotNone(self.pool.acquire_idle(self.ADDRESS, self.PORT, TransparentSource("203.0.113.50")))

    def test_proxy_header_goes_first(self):
        """A PROXY-protocol connection sends its header before anything else, once."""
        source = ProxySource("203.0.113.50", 40000, "203.0.113.1", 8443)
        d = self.pool.acquire(self.ADDRESS, self.PORT, source)
        conn, transport = self.establish()
        self.successResultOf(d)
        self.assertEqual(transport.value(), source.preamble)

    def test_custom_connect_gets_the_source(self):
        """A ``connect`` callable is given the source as a fifth argument when there is one."""
        calls = []

        def connect(address, port, factory, timeout, *source):
            calls.append(source)
            return self.reactor.connectTCP(address, port, factory, timeout=timeout)
        pool = ConnectionPool(self.reactor, connect=connect)
        source = TransparentSource("203.0.113.50")
        pool.acquire(self.ADDRESS, self.PORT)
        pool.acquire(self.ADDRESS, self.PORT, source)
        self.assertEqual(calls, [(), (source,)])

    def test_idle_connections_per_client_are_bounded(self):
        """At most ``max_idle_per_source`` idle connections are kept per client."""
        self.pool.max_idle_per_source = 2
        source = TransparentSource("203.0.113.50")
        for _ in range(3):
            self.pool.acquire(self.ADDRESS, self.PORT, source)
        conns = [self.establish(i) for i in range(3)]
        for conn, _transport in conns:
            self.exchange(conn)
        self.assertEqual(self.pool.idle_count(self.ADDRESS, self.PORT, source), 2)
        self.assertTrue(conns[2][1].disconnecting)


# == the netfilter service (its logic, with stand-ins for the kernel) =============================

class _FakeRules:
    """A stand-in for MangleRule or PolicyRouting recording what is done to one family."""

    def __init__(self, kind: str, family: int, journal: list, state: dict, fail_add: bool = False) -> None:
        self.kind, self.family, self.journal, self.state, self.fail_add = kind, family, journal, state, fail_add

    def remove(self) -> int:
        self.journal.append(("remove", self.kind, self.family))
        n = self.state.pop((self.kind, self.family), 0)
        return n

    def replace(self) -> int:
        removed = self.remove()
        self.journal.append(("add", self.kind, self.family))
        if self.fail_add:
            raise NetfilterError(f"no {self.kind} for IPv{self.family}")
        self.state[(self.kind, self.family)] = 1
        return removed


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class _Directory:
    def __init__(self, *containers: Container) -> None:
        self.containers = {c.id: c for c in containers}
        self.subscribers = []

    def list(self):
        return list(self.containers.values())

    def lookup(self, container_id):
        return self.containers.get(container_id)

    def subscribe(self, callback):
        self.subscribers.append(callback)

    def put(self, container):
        self.containers[container.id] = container
        for callback in self.subscribers:
            callback(container.id)

    def delete(self, container_id):
        self.containers.pop(container_id, None)
        for callback in self.subscribers:
            callback(container_id)


class NetfilterServiceTests(unittest.SynchronousTestCase):

    def service(self, *, required=True, fail=None, directory=None, state=None) -> NetfilterService:
        self.journal: list = []
        self.state = {} if state is None else state
        svc = NetfilterService(
            "node-a", 0x4870, 4870, required=required, directory=directory, families=(4, 6),
            mangle=lambda f: _FakeRules("mangle", f, self.journal, self.state, fail == ("mangle", f)),
            routing=lambda f: _FakeRules("routing", f, self.journal, self.state, fail == ("routing", f)),
            lock=_NoLock, conntrack="/usr/sbin/conntrack")
        self.flushed: list[str] = []
        svc.flush_conntrack = self.flushed.append
        return svc

    def started(self, directory) -> NetfilterService:
        """A started service watching ``directory``."""
        svc = self.service(directory=directory)
        svc.privilegedStartService()
        svc.startService()
        return svc

    def test_start_replaces_leftovers(self):
        """At start the node's leftovers (a crash) are removed first, then one set is added."""
        svc = self.service(state={("mangle", 4): 2, ("routing", 6): 1})
        self.assertEqual(svc.install(), 3)
        for kind in ("mangle", "routing"):
            for family in (4, 6):
                ops = [op for op, k, f in self.journal if (k, f) == (kind, family)]
                self.assertEqual(ops, ["remove", "add"], (kind, family))
        self.assertEqual(self.state, {("mangle", 4): 1, ("routing", 4): 1, ("mangle", 6): 1, ("routing", 6): 1})

    def test_stop_removes_everything(self):
        """Stopping removes every rule and route the start added."""
        svc = self.service()
        svc.privilegedStartService()
        svc.startService()
        svc.stopService()
        self.assertEqual(self.state, {})

    def test_failure_takes_back_what_was_added(self):
        """A rule that cannot be added: what was added before it is removed and the start fails."""
        svc = self.service(fail=("routing", 4))
        self.assertRaises(NetfilterError, svc.privilegedStartService)
        self.assertEqual(self.state, {})
        self.assertFalse(svc.installed)

    def test_ipv6_failure_leaves_ipv4(self):
        """IPv6 that cannot be set up (disabled, as in many containers) leaves IPv4 transparent alone."""
        svc = self.service(fail=("routing", 6))
        svc.privilegedStartService()
        self.assertEqual(svc.families_installed, (4,))
        self.assertIsInstance(svc.ipv6_problem, NetfilterError)
        self.assertIsNone(svc.failed)
        self.assertEqual(self.state, {("mangle", 4): 1, ("routing", 4): 1})
        svc.stopService()
        self.assertEqual(self.state, {})

    def test_failure_when_not_required_is_remembered(self):
        """In ``auto`` mode a failure does not stop the start: it is kept for the node to fall back."""
        svc = self.service(required=False, fail=("routing", 4))
        svc.privilegedStartService()
        self.assertIsInstance(svc.failed, NetfilterError)
        self.assertEqual(self.state, {})

    def test_stopped_or_removed_container_is_flushed(self):
        """A container that stops, or is removed, has its conntrack entries flushed; a running update does not."""
        directory = _Directory(Container(CONTAINER, PROJECT, "198.51.100.2"),
                               Container("a" * 24, PROJECT, "198.51.100.3"))
        self.started(directory)
        directory.put(Container(CONTAINER, PROJECT, "198.51.100.2", "running", {"http": 81}))
        self.assertEqual(self.flushed, [])
        directory.put(Container(CONTAINER, PROJECT, "198.51.100.2", "stopped"))
        directory.delete("a" * 24)
        self.assertEqual(self.flushed, ["198.51.100.2", "198.51.100.3"])

    def test_loopback_container_is_not_flushed(self):
        """A container on loopback never went through the rules: its stop flushes nothing."""
        directory = _Directory(Container(CONTAINER, PROJECT, "127.0.0.1"))
        self.started(directory)
        directory.delete(CONTAINER)
        self.assertEqual(self.flushed, [])

    def test_moved_container_flushes_its_old_address(self):
        """A container given another address has the old one flushed."""
        directory = _Directory(Container(CONTAINER, PROJECT, "198.51.100.2"))
        self.started(directory)
        directory.put(Container(CONTAINER, PROJECT, "198.51.100.9"))
        self.assertEqual(self.flushed, ["198.51.100.2"])

    def test_shared_address_is_not_flushed(self):
        """An address another running container still has is left alone."""
        directory = _Directory(Container(CONTAINER, PROJECT, "198.51.100.2"),
                               Container("a" * 24, PROJECT, "198.51.100.2"))
        self.started(directory)
        directory.delete(CONTAINER)
        self.assertEqual(self.flushed, [])

    def test_policy_routing_commands(self):
        """One ip batch per family: every copy of the rule and the route deleted, then one of each added."""
        batches = []

        def run(family, commands):
            batches.append((family, commands))
            # Two copies of the rule and one route were left; every other deletion fails.
            dels = [i for i, c in enumerate(commands, 1) if " del " in c]
            present = {"rule": 2, "route": 1}
            failed = set()
            for i in dels:
                kind = commands[i - 1].split()[0]
                if present[kind]:
                    present[kind] -= 1
                else:
                    failed.add(i)
            return failed, ""
        routing = PolicyRouting(6, 0x4870, 4870, run=run)
        self.assertEqual(routing.replace(), 3)
        family, commands = batches[0]
        self.assertEqual(family, 6)
        self.assertEqual(commands[-2:], ["route add local ::/0 dev lo table 4870",
                                         f"rule add priority {netfilter.RULE_PRIORITY} fwmark 0x4870 lookup 4870"])
        self.assertEqual(set(commands[:-2]), {"route del local ::/0 dev lo table 4870",
                                              f"rule del priority {netfilter.RULE_PRIORITY} fwmark 0x4870 lookup 4870"})

    def test_policy_routing_failure_names_the_command(self):
        """An addition ip refuses is an error naming the command and ip's message."""
        def run(family, commands):
            n = len(commands)
            return ({i for i in range(1, n - 1)} | {n},
                    f"RTNETLINK answers: No such file or directory\nCommand failed -:{n - 2}\n"
                    f"Error: Nexthop device is not up.\nCommand failed -:{n}\n")
        e = self.assertRaises(NetfilterError, PolicyRouting(4, 1, 100, run=run).replace)
        self.assertIn("rule add priority", str(e))
        self.assertIn("Nexthop device is not up.", str(e))

    def test_cap_net_admin_read_from_capeff(self):
        """CAP_NET_ADMIN is bit 12 of CapEff in /proc/self/status."""
        path = os.path.join(tempfile.mkdtemp(), "status")
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        for value, expected in (("0000000000001000", True), ("000001ffffffefff", False), ("0", False)):
            with open(path, "w") as f:
                f.write(f"Name:\tx\nCapInh:\t0000000000001000\nCapEff:\t{value}\n")
            self.assertEqual(has_net_admin(path), expected, value)


class ConntrackFlushTests(unittest.TestCase):
    """The flush runs as a child process, and stopping the service waits for it."""

    def fake_conntrack(self, status: int, sleep: float = 0.0) -> tuple[str, str]:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        script, record = os.path.join(directory, "conntrack"), os.path.join(directory, "args")
        with open(script, "w") as f:
            f.write(f"#!/bin/sh\nsleep {sleep}\necho \"$@\" > {record}\nexit {status}\n")
        os.chmod(script, 0o755)
        return script, record

    def service(self, script: str) -> NetfilterService:
        return NetfilterService("node-a", 1, 100, required=True, reactor=reactor, conntrack=script,
                                families=(4,), lock=_NoLock)

    async def test_flush_runs_conntrack_delete(self):
        """``conntrack -D -d ADDRESS`` runs; status 1 (nothing to delete) is no error."""
        script, record = self.fake_conntrack(1)
        self.assertEqual(await self.service(script).flush_conntrack("198.51.100.2"), 1)
        with open(record) as f:
            self.assertEqual(f.read().split(), ["-D", "-d", "198.51.100.2"])

    async def test_stop_waits_for_a_running_flush(self):
        """A flush still running when the service stops is waited for, not left behind."""
        script, record = self.fake_conntrack(0, sleep=0.3)
        svc = self.service(script)
        svc.startService()
        svc.flush_conntrack("2001:db8:2::2")
        await svc.stopService()
        self.assertTrue(os.path.exists(record))
        self.assertEqual(svc._flushing, set())


# == the node: choosing the mode ====================================================================

class ModeChoiceTests(unittest.SynchronousTestCase):

    def node(self, mode: str | None, cap: bool, **programs) -> NodeService:
        data_dir = tempfile.mkdtemp(prefix="hoodyproxy-test-")
        self.addCleanup(shutil.rmtree, data_dir, True)
        doc: dict = {"node": {"data_dir": data_dir}, "audit": {"path": os.path.join(data_dir, "audit.log")}}
        if mode:
            doc["client_ip"] = {"mode": mode}
        if programs:
            doc["programs"] = {name: {"client_ip": value} for name, value in programs.items()}
        node = NodeService(settings_from_mapping(doc), reactor, has_net_admin=cap)
        self.addCleanup(node.stack.close)
        return node

    def test_auto_with_cap_is_transparent(self):
        """``auto`` with CAP_NET_ADMIN is transparent, with the netfilter service to start."""
        node = self.node(None, True)
        self.assertEqual(node.settings.client_ip_mode, "transparent")
        self.assertEqual(node.gateway.client_ip_mode, "transparent")
        self.assertIsNotNone(node.netfilter)
        self.assertTrue(node.netfilter.required is False)

    def test_auto_without_cap_is_headers_with_a_warning(self):
        """``auto`` without CAP_NET_ADMIN is headers, says why, and installs nothing."""
        node = self.node("auto", False)
        self.assertEqual(node.gateway.client_ip_mode, "headers")
        self.assertIsNone(node.netfilter)
        self.assertIn("no CAP_NET_ADMIN", node.client_ip_warning)

    def test_explicit_transparent_without_cap_cannot_start(self):
        """``transparent`` without CAP_NET_ADMIN is a start error naming what is missing and the fix."""
        e = self.assertRaises(StartError, self.node, "transparent", False)
        self.assertIn("CAP_NET_ADMIN", str(e))
        self.assertIn("root", str(e))

    def test_program_transparent_without_cap_cannot_start(self):
        """A program asking for ``transparent`` needs CAP_NET_ADMIN just the same."""
        self.assertRaises(StartError, self.node, "headers", False, terminal="transparent")

    def test_program_override(self):
        """A program's mode overrides the node's; the netfilter service is there if any mode is transparent."""
        node = self.node("headers", True, terminal="auto", http="proxy-protocol")
        self.assertEqual(node.gateway.client_ip_mode, "headers")
        self.assertEqual(node.gateway._program_client_ip, {"terminal": "transparent", "http": "proxy-protocol"})
        self.assertIsNotNone(node.netfilter)

    def test_proxy_protocol_needs_no_cap(self):
        """``proxy-protocol`` starts without CAP_NET_ADMIN and installs nothing."""
        node = self.node("proxy-protocol", False)
        self.assertEqual(node.gateway.client_ip_mode, "proxy-protocol")
        self.assertIsNone(node.netfilter)
        self.assertIsNone(node.client_ip_warning)


class AutoFallbackTests(unittest.TestCase):

    def test_auto_falls_back_when_rules_cannot_be_installed(self):
        """``auto`` whose rules cannot be installed serves with forwarding headers and warns once."""
        data_dir = tempfile.mkdtemp(prefix="hoodyproxy-test-")
        self.addCleanup(shutil.rmtree, data_dir, True)
        doc = {"node": {"data_dir": data_dir}, "audit": {"path": os.path.join(data_dir, "audit.log")},
               "listen": {"https": "127.0.0.1:0", "http": "127.0.0.1:0", "admin": "127.0.0.1:0"}}
        node = NodeService(settings_from_mapping(doc), reactor, has_net_admin=True)
        journal: list = []
        node.netfilter._mangle = lambda f: _FakeRules("mangle", f, journal, {}, fail_add=True)
        node.netfilter._routing = lambda f: _FakeRules("routing", f, journal, {})
        node.netfilter._lock = _NoLock
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        node.privilegedStartService()
        node.startService()
        self.addCleanup(node.stopService)
        self.assertEqual(node.gateway.client_ip_mode, "headers")
        self.assertIsNone(node.netfilter)
        warnings = [e for e in events if "could not be installed" in str(e.get("problem", ""))]
        self.assertEqual(len(warnings), 1)


# == PROXY protocol end to end (loopback, no privileges needed) =====================================

def _proxy_backend(case):
    """A container service that expects a PROXY v2 header and answers each request with what it said."""
    def script(proto, data):
        if not hasattr(proto, "header"):
            try:
                parsed = parse_v2(proto.received)
            except ProxyHeaderError:
                proto.header, proto.headers_seen = None, 0
                parsed = None
            else:
                if parsed is None:
                    return
                proto.header, proto.headers_seen = parsed[0], 1
                proto.received = proto.received[parsed[1]:]
        while b"\r\n\r\n" in proto.received:
            _head, _, proto.received = proto.received.partition(b"\r\n\r\n")
            body = json.dumps({"proxy": proto.header}).encode()
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                                  % len(body) + body)
    return raw_backend(case, script)


class _TLSClient:
    """A blocking HTTP/1.1-over-TLS client bound to a chosen loopback address, run in a thread."""

    def __init__(self, node, source: str) -> None:
        import ssl
        raw = socket.socket()
        raw.settimeout(10)
        raw.bind((source, 0))
        raw.connect(("127.0.0.1", node.https_port))
        self.port = raw.getsockname()[1]
        self.sock = ssl.create_default_context(cafile=node.ca_path).wrap_socket(
            raw, server_hostname=self.host(node))
        self.node = node
        self.buffer = b""

    @staticmethod
    def host(node, port: int | None = None) -> str:
        return route(port=port or node.backend_port)

    def get(self, path: str = "/") -> dict:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {self.host(self.node)}\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(65536)
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self.buffer = rest[length:]
        return json.loads(rest[:length])

    def close(self) -> None:
        self.sock.close()


class _ProxyBackendCase(unittest.TestCase):
    """A node and a container service that reports the PROXY header it got."""

    config: dict = {"client_ip": {"mode": "proxy-protocol"}}

    def setUp(self):
        self.node = start_node(self, self.config)
        self.node.backend_port, self.factory = _proxy_backend(self)
        register(self.node, self.node.backend_port)

    async def client(self, source: str = "127.0.0.1") -> _TLSClient:
        from twisted.internet.threads import deferToThread
        client = await deferToThread(_TLSClient, self.node, source)
        self.addCleanup(client.close)
        return client

    async def get(self, client: _TLSClient) -> dict:
        from twisted.internet.threads import deferToThread
        return await deferToThread(client.get)


class ProxyProtocolTests(_ProxyBackendCase):

    async def test_header_names_the_client_and_the_gateway(self):
        """The container reads the client's address and port, and the address and port it reached."""
        client = await self.client()
        answer = await self.get(client)
        self.assertEqual(answer["proxy"], ["127.0.0.1", client.port, "127.0.0.1", self.node.https_port])

    async def test_one_header_per_connection(self):
        """Requests that reuse a connection to the container do not repeat the header."""
        client = await self.client()
        first, second = await self.get(client), await self.get(client)
        self.assertEqual(first, second)
        self.assertEqual(len(self.factory.connections), 1)

    async def test_connections_are_per_client_address(self):
        """Another client address gets a connection of its own, whose header names it."""
        one, two = await self.client("127.0.0.1"), await self.client("127.0.0.2")
        self.assertEqual((await self.get(one))["proxy"][0], "127.0.0.1")
        self.assertEqual((await self.get(two))["proxy"][0], "127.0.0.2")
        self.assertEqual((await self.get(one))["proxy"][0], "127.0.0.1")
        self.assertEqual(len(self.factory.connections), 2)


class ProgramOverrideTests(_ProxyBackendCase):
    config = {"client_ip": {"mode": "headers"}, "programs": {"http": {"client_ip": "proxy-protocol"}}}

    async def test_program_proxy_protocol_on_a_headers_node(self):
        """A program set to proxy-protocol gets the header although the node's mode is headers."""
        client = await self.client()
        self.assertEqual((await self.get(client))["proxy"][0], "127.0.0.1")


class HeadersOverrideTests(_ProxyBackendCase):
    config = {"client_ip": {"mode": "proxy-protocol"}, "programs": {"http": {"client_ip": "headers"}}}

    async def test_program_headers_on_a_proxy_protocol_node(self):
        """A program set to headers gets no PROXY header although the node's mode is proxy-protocol."""
        client = await self.client()
        self.assertEqual(await self.get(client), {"proxy": None})


class _Asking:
    """What the gateway's choice of source reads of a request."""

    def __init__(self, client_ip: str) -> None:
        self.client_ip = client_ip


class TransparentSourceChoiceTests(unittest.TestCase):
    """Which source a transparent request's upstream connection comes from (no rules
    needed: the choice only)."""

    def setUp(self):
        self.gateway = start_node(self).gateway

    def test_one_source_per_client(self):
        """A client's requests share one source object (the pool's keys compare by
        identity); another client, or the same client to another container, has its own."""
        choose = self.gateway._source
        first = choose("transparent", _Asking("203.0.113.50"), "198.51.100.7")
        self.assertEqual(first, TransparentSource("203.0.113.50"))
        self.assertIs(choose("transparent", _Asking("203.0.113.50"), "198.51.100.7"), first)
        self.assertEqual(choose("transparent", _Asking("203.0.113.51"), "198.51.100.7"),
                         TransparentSource("203.0.113.51"))
        self.assertEqual(choose("transparent", _Asking("203.0.113.50"), "198.51.100.8"), first)

    def test_refusals_are_asked_again(self):
        """A client that cannot be joined transparently is not remembered as one that can:
        a loopback client to a networked container, and an IPv4 client of an IPv6 one."""
        choose = self.gateway._source
        for _ in range(2):
            self.assertIsNone(choose("transparent", _Asking("127.0.0.1"), "198.51.100.7"))
            self.assertIsNone(choose("transparent", _Asking("203.0.113.50"), "2001:db8::7"))
        self.assertEqual(choose("transparent", _Asking("127.0.0.1"), "127.0.0.1"), TransparentSource("127.0.0.1"))
        self.assertIsNone(choose("transparent", _Asking("127.0.0.1"), "198.51.100.7"))

    def test_the_table_is_bounded(self):
        """Past its bound the table starts again; every client still gets its own source."""
        from hoodyproxy import gateway as module
        choose = self.gateway._source
        for n in range(module._TRANSPARENT_SOURCES + 10):
            client = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
            self.assertEqual(choose("transparent", _Asking(client), "198.51.100.7").client_ip, client)
        self.assertLessEqual(len(self.gateway._transparent_sources), module._TRANSPARENT_SOURCES)


# == transparent on loopback (root: the node installs its rules in this namespace) ===================

class TransparentLoopbackTests(unittest.TestCase):
    skip = None if IS_ROOT else "needs root (CAP_NET_ADMIN) for transparent mode"

    def setUp(self):
        self.node = start_node(self, {"client_ip": {"mode": "transparent"}})
        from tests import backends
        self.backend = Backend(self, backends.app())
        register(self.node, self.backend.number)
        self.node.backend_port = self.backend.number

    async def peer(self, source: str) -> str:
        from twisted.internet.threads import deferToThread
        client = await deferToThread(_TLSClient, self.node, source)
        self.addCleanup(client.close)
        return (await deferToThread(client.get, "/headers"))["peer"]

    async def test_each_client_is_the_peer(self):
        """Each client's own address is the container's TCP peer, one client after another."""
        self.assertEqual(await self.peer("127.0.0.2"), "127.0.0.2")
        self.assertEqual(await self.peer("127.0.0.3"), "127.0.0.3")
        self.assertEqual(await self.peer("127.0.0.2"), "127.0.0.2")

    async def test_other_family_falls_back_once(self):
        """An IPv4 client of an IPv6 container is served with headers, and the log says so once."""
        from tests import backends
        from twisted.web.server import Site
        site = Site(backends.app())
        site.log = lambda request: None
        try:
            port = reactor.listenTCP(0, site, interface="::1")
        except Exception as e:  # pragma: no cover - hosts without IPv6 loopback
            raise unittest.SkipTest(f"no IPv6 loopback here: {e}")
        self.addCleanup(port.stopListening)
        other = "cccccccccccccccccccccccc"
        self.node.directory.put(Container(other, PROJECT, "::1"))
        self.node.backend_port = port.getHost().port
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        from twisted.internet.threads import deferToThread
        for _ in range(2):
            client = await deferToThread(_TLSClient, self.node, "127.0.0.1")
            self.addCleanup(client.close)
            client.host = lambda node, port=None: route(other, self.node.backend_port)
            self.assertEqual((await deferToThread(client.get, "/headers"))["peer"], "::1")
        said = [e for e in events if "IPv4 client cannot reach an IPv6 container" in str(e.get("why", ""))]
        self.assertEqual(len(said), 1)


# == capabilities: what a node without CAP_NET_ADMIN does (a real twistd) ===========================

def _without_net_admin() -> list[str] | None:
    """A command prefix that runs a program without CAP_NET_ADMIN, or None if there is none."""
    if not IS_ROOT:
        return [] if not has_net_admin() else None
    if shutil.which("setpriv") is None:
        return None
    # For root, execve makes the permitted and effective sets the bounding set.
    return ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]


class CapabilityTests(unittest.SynchronousTestCase):
    prefix = _without_net_admin()
    skip = None if prefix is not None else "cannot run a process without CAP_NET_ADMIN here (setpriv)"

    def twistd(self, *args: str) -> tuple[subprocess.Popen, str]:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        log = os.path.join(workdir, "output.log")
        env = dict(os.environ, PYTHONPATH=netns.REPO, PYTHONUNBUFFERED="1")
        with open(log, "wb") as f:
            proc = subprocess.Popen([*self.prefix, netns.TWISTD, "-n", "--pidfile", "", "hoodyproxy",
                                     "--data-dir", os.path.join(workdir, "data"), "--https", "127.0.0.1:0",
                                     "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0", *args],
                                    stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                    cwd=workdir, env=env)
        self.addCleanup(netns.stop_process, proc)
        return proc, log

    def test_explicit_transparent_fails_in_one_line(self):
        """``--client-ip-mode transparent`` without CAP_NET_ADMIN: one line saying what is missing and
        how to fix it, a non-zero exit, no traceback, nothing listening."""
        proc, log = self.twistd("--client-ip-mode", "transparent")
        self.assertNotEqual(proc.wait(netns.TIMEOUT), 0)
        with open(log) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("CAP_NET_ADMIN", lines[0])
        self.assertIn("run it as root", lines[0])
        self.assertNotIn("Traceback", lines[0])

    def test_auto_warns_once_and_uses_headers(self):
        """The default (``auto``) without CAP_NET_ADMIN starts in headers mode with one warning line."""
        proc, log = self.twistd()
        netns.wait_for(log, re.escape("hoodyproxy audit log:"), proc)
        with open(log) as f:
            text = f.read()
        self.assertIn("hoodyproxy client IP mode: headers", text)
        self.assertEqual(len(re.findall("no CAP_NET_ADMIN", text)), 1, text)
        self.assertIn(netns.stop_process(proc), netns.STOPPED_BY_SIGTERM)


# == three namespaces: the container sees the client ================================================

class _ThroughTheGateway:
    """The same specification over IPv4 and IPv6 (the subclasses give the addresses), with the
    gateway on its default listeners: one dual-stack ``[::]:8443`` socket (TCP, and UDP for
    HTTP/3) serves clients of both families."""

    skip = NAMESPACES_SKIP
    client_ip: str
    client2_ip: str
    gateway_ip: str
    container_ip: str
    iptables: str
    config = "[upstream]\nconnect_timeout = 1.0\n"

    def setUp(self):
        self.net = netns.Topology(self)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        service_log = os.path.join(self.workdir, "service.log")
        service = self.net.start(self.net.container, [netns.PYTHON, "-m", "tests.netns", "serve", str(SERVICE_PORT)],
                                 service_log)
        self.gateway = netns.NamespacedGateway(self.net, self.workdir, config=self.config)
        netns.wait_for(service_log, "serving on", service)
        self.gateway.wait_ready()
        self.gateway.put_container(CONTAINER, PROJECT, self.container_ip)

    def fetch(self, source: str, *curl_args: str, path: str = "/peer") -> tuple[int, dict | str]:
        """GET ``path`` through the gateway from the client namespace, from ``source``."""
        host = route()
        at = f"[{self.gateway_ip}]" if ":" in self.gateway_ip else self.gateway_ip
        result = self.net.run(self.net.client, "curl", "-sS", "--max-time", "15", "--cacert", self.gateway.ca_path,
                              "--resolve", f"{host}:{self.gateway.https_port}:{at}", "--interface", source,
                              "-w", "\n%{http_code}", *curl_args, f"https://{host}:{self.gateway.https_port}{path}",
                              check=False)
        body, _, status = result.stdout.rpartition("\n")
        try:
            return int(status), json.loads(body)
        except ValueError:
            return int(status or 0), body + result.stderr

    def test_gateway_listens_dual_stack_by_default(self):
        """With no listen address configured, HTTPS (TCP and UDP) and plain HTTP are on ``[::]``."""
        output = self.gateway.output()
        for kind, port in (("https", 8443), ("http", 8080), ("http3", 8443)):
            self.assertIn(f"hoodyproxy {kind} listening on [::]:{port}", output)

    def test_http_peer_is_the_client(self):
        """Over HTTP/1.1 the container's getpeername() is the client's own address; the headers
        and the audit line agree."""
        status, answer = self.fetch(self.client_ip, "--http1.1", path="/peer?h1")
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["peer"], self.client_ip)
        self.assertEqual(answer["x-forwarded-for"], self.client_ip)
        line = self.gateway.audit_line("/peer?h1")
        self.assertEqual((line["client"], line["status"]), (self.client_ip, 200))

    def test_http2_peer_is_the_client(self):
        """Over HTTP/2 the container's getpeername() is the client's own address."""
        status, answer = self.fetch(self.client_ip, "--http2")
        self.assertEqual(status, 200, answer)
        self.assertEqual((answer["peer"], answer["x-forwarded-for"]), (self.client_ip, self.client_ip))

    def test_http3_peer_is_the_client(self):
        """Over HTTP/3 (UDP on the same dual-stack port) the container's getpeername() is the
        client's own address."""
        result = self.net.run(self.net.client, netns.PYTHON, "-m", "tests.netns", "h3-get",
                              "--connect", self.gateway_ip, "--port", str(self.gateway.https_port),
                              "--host", route(), "--path", "/peer", "--cacert", self.gateway.ca_path,
                              "--source", self.client_ip, check=False)
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        status, _, body = result.stdout.partition("\n")
        self.assertEqual(status, "200", result.stdout)
        answer = json.loads(body)
        self.assertEqual((answer["peer"], answer["x-forwarded-for"]), (self.client_ip, self.client_ip))

    def test_each_client_is_seen_as_itself(self):
        """Connections to the container are per client: one client after another, each is its own peer."""
        for source in (self.client_ip, self.client2_ip, self.client_ip):
            status, answer = self.fetch(source)
            self.assertEqual((status, answer["peer"]), (200, source))

    def test_websocket_peer_is_the_client(self):
        """Over a WebSocket the container's getpeername() is the client's own address."""
        result = self.net.run(self.net.client, netns.PYTHON, "-m", "tests.netns", "ws-client",
                              "--connect", self.gateway_ip, "--port", str(self.gateway.https_port),
                              "--host", route(), "--path", "/ws", "--cacert", self.gateway.ca_path,
                              "--source", self.client_ip, check=False)
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        answer = json.loads(result.stdout)
        self.assertEqual(answer["peer"], self.client_ip)

    def test_container_firewall_works_on_client_addresses(self):
        """A DROP rule for one client inside the container stops that client only."""
        self.net.run(self.net.container, self.iptables, "-A", "INPUT", "-s", self.client_ip, "-p", "tcp",
                     "--dport", str(SERVICE_PORT), "-j", "DROP")
        status, answer = self.fetch(self.client_ip)
        self.assertEqual(status, 502, answer)
        status, answer = self.fetch(self.client2_ip)
        self.assertEqual((status, answer["peer"]), (200, self.client2_ip))

    def conntrack_entries(self) -> list[str]:
        result = self.net.run(self.net.gateway, "conntrack", "-L", "-f", self.conntrack_family,
                              "-d", self.container_ip, check=False)
        return [line for line in result.stdout.splitlines() if line.strip()]

    def test_conntrack_flushed_when_container_stops(self):
        """Connection tracking entries towards a container are flushed when it is stopped."""
        # Give the gateway's namespace connection tracking (a rule that needs it).
        self.net.run(self.net.gateway, self.iptables, "-A", "OUTPUT", "-m", "conntrack", "--ctstate",
                     "NEW,ESTABLISHED", "-j", "ACCEPT")
        status, answer = self.fetch(self.client_ip)
        self.assertEqual(status, 200, answer)
        entries = self.conntrack_entries()
        self.assertTrue(any(f"src={self.client_ip} " in line for line in entries), entries)
        self.gateway.put_container(CONTAINER, PROJECT, self.container_ip, state="stopped")
        deadline = time.monotonic() + netns.TIMEOUT
        while self.conntrack_entries() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(self.conntrack_entries(), [])


class IPv4ThroughTheGatewayTests(_ThroughTheGateway, unittest.SynchronousTestCase):
    """IPv4 clients of the dual-stack listener: the container, listening on an IPv4 socket
    of its own, sees 203.0.113.50 itself (never ``::ffff:203.0.113.50``)."""

    client_ip, client2_ip = netns.CLIENT_V4, netns.CLIENT2_V4
    gateway_ip, container_ip = netns.GATEWAY_CLIENT_SIDE_V4, netns.CONTAINER_V4
    iptables, conntrack_family = "iptables", "ipv4"


class IPv6ThroughTheGatewayTests(_ThroughTheGateway, unittest.SynchronousTestCase):
    """IPv6 clients of the default listener: the container sees 2001:db8:1::50 itself."""

    client_ip, client2_ip = netns.CLIENT_V6, netns.CLIENT2_V6
    gateway_ip, container_ip = netns.GATEWAY_CLIENT_SIDE_V6, netns.CONTAINER_V6
    iptables, conntrack_family = "ip6tables", "ipv6"


# == the rules the gateway adds, and only those ======================================================

_BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


def _save_lines(text: str) -> list[str]:
    """iptables-save output as comparable lines: rules and non-default chains, no dates or counters.

    A table whose built-in chains have their default policy and which holds no rule says
    nothing: the kernel keeps a table once something has read it, and that is no rule.
    """
    table, out = None, []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            if not (name in _BUILTIN_CHAINS and policy == "ACCEPT"):
                out.append(f"{table} :{name} {policy}")
        else:
            out.append(f"{table} {line}")
    return sorted(out)


class GatewayRulesTests(unittest.SynchronousTestCase):
    skip = NAMESPACES_SKIP
    comment = "hoodyproxy:node-local"

    def setUp(self):
        self.net = netns.Topology(self)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)

    def snapshot(self) -> dict[str, object]:
        """Everything a gateway could add, in its namespace: both iptables back ends, rules, routes."""
        ns, out = self.net.gateway, {}
        for save in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-save", "ip6tables-save"):
            out[save] = _save_lines(self.net.run(ns, save).stdout)
        for family in ("-4", "-6"):
            out[f"ip {family} rule"] = self.net.run(ns, "ip", family, "rule").stdout
            out[f"ip {family} route table all"] = self.net.run(ns, "ip", family, "route", "show", "table", "all").stdout
        return out

    def ours(self, snapshot: dict) -> dict[str, int]:
        """How many of each of the gateway's own rules and routes a snapshot holds."""
        return {
            "mangle v4": sum(self.comment in line for line in snapshot["iptables-legacy-save"]),
            "mangle v6": sum(self.comment in line for line in snapshot["ip6tables-legacy-save"]),
            "rule v4": snapshot["ip -4 rule"].count("fwmark 0x4870 lookup 4870"),
            "rule v6": snapshot["ip -6 rule"].count("fwmark 0x4870 lookup 4870"),
            "route v4": snapshot["ip -4 route table all"].count("local default dev lo table 4870"),
            "route v6": snapshot["ip -6 route table all"].count("local default dev lo table 4870"),
        }

    def start(self, data_dir: str | None = None) -> netns.NamespacedGateway:
        return netns.NamespacedGateway(self.net, self.workdir, data_dir=data_dir).wait_ready()

    def test_rules_while_running(self):
        """A running gateway has one mangle rule per family (in the legacy tables), one policy rule
        and one local route per family, and says so in its log."""
        gateway = self.start()
        self.assertEqual(set(self.ours(self.snapshot()).values()), {1})
        self.assertIn("hoodyproxy client IP mode: transparent; netfilter mark 0x4870, table 4870",
                      gateway.output())

    def test_stop_removes_every_rule_and_route(self):
        """After SIGTERM the namespace's rules, policy rules and routes are as before the start."""
        before = self.snapshot()
        gateway = self.start()
        self.assertNotEqual(self.snapshot(), before)
        self.assertIn(gateway.stop(), netns.STOPPED_BY_SIGTERM)
        self.assertEqual(self.snapshot(), before)

    def test_restart_after_sigkill_leaves_no_duplicates(self):
        """A gateway killed with SIGKILL leaves its rules; the next start replaces them (one of each),
        and its stop leaves the namespace as it was."""
        before = self.snapshot()
        first = self.start()
        self.assertEqual(first.stop(signal.SIGKILL), -signal.SIGKILL)
        self.assertEqual(set(self.ours(self.snapshot()).values()), {1})
        second = self.start(data_dir=first.data_dir)
        self.assertEqual(set(self.ours(self.snapshot()).values()), {1})
        self.assertIn("replaced 6 netfilter rule(s) or route(s)", second.output())
        self.assertIn(second.stop(), netns.STOPPED_BY_SIGTERM)
        self.assertEqual(self.snapshot(), before)

    def test_other_rules_are_left_alone(self):
        """Another node's mangle rule and another policy rule at the same priority survive a start and stop."""
        ns = self.net.gateway
        self.net.run(ns, "iptables-legacy", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-m", "socket",
                     "--transparent", "-m", "comment", "--comment", "hoodyproxy:other-node", "-j", "MARK",
                     "--set-mark", "0x4870")
        self.net.run(ns, "ip", "-4", "rule", "add", "priority", str(netfilter.RULE_PRIORITY), "fwmark", "0x99",
                     "lookup", "99")
        before = self.snapshot()
        gateway = self.start()
        self.assertIn(gateway.stop(), netns.STOPPED_BY_SIGTERM)
        self.assertEqual(self.snapshot(), before)
        self.assertIn("hoodyproxy:other-node", "\n".join(before["iptables-legacy-save"]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run with trial")
