"""Dual-stack listeners: ``[::]`` by default, IPv4 clients through it, and everyone sees plain IPv4.

The HTTPS and HTTP listeners default to ``[::]`` with ``IPV6_V6ONLY`` off (TCP, and UDP
for HTTP/3), so IPv6 clients are served as well as IPv4 ones.  IPv4 clients of such a
socket appear as ``::ffff:a.b.c.d``; the audit line, IP groups, forwarding headers, and
the PROXY-protocol and transparent sources must all see ``a.b.c.d``.

The node tests listen on ``[::]`` with ephemeral ports and reach them over loopback only
(``127.0.0.1`` and ``::1``).  One test runs in a network namespace of its own (root), to
show the listeners ignore a host default of ``net.ipv6.bindv6only = 1``.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap

import treq
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from hoodyproxy import listening
from hoodyproxy.config import ListenAddress, settings_from_mapping
from hoodyproxy.listening import listen_tcp, listen_udp, unmapped_ip, v6only_for, without_ipv6
from hoodyproxy.upstream.proxy_protocol import ProxyHeaderError, ProxySource, parse_v2
from hoodyproxy.upstream.transparent import TransparentSource
from tests import backends, netns
from tests.h3client import connect, within
from tests.support import CONTAINER, PROJECT, Backend, audit_lines, host_for, raw_backend, register, start_node, until


def _ipv6_loopback() -> str | None:
    """Why IPv6 loopback cannot be used here, or None."""
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            probe.bind(("::1", 0))
        finally:
            probe.close()
    except OSError as e:
        return f"no IPv6 loopback here: {e}"
    return None


NO_IPV6_LOOPBACK = _ipv6_loopback()
#: The listen values that mean "the default interface, any free port".
DEFAULT_INTERFACES = {"listen": {"https": "0", "http": "0"}}


def v6only(port) -> int:
    return port.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


# == the addresses, as plain data ================================================================

class AddressTests(unittest.SynchronousTestCase):

    def test_mapped_address_is_unwrapped(self):
        """``::ffff:a.b.c.d`` is ``a.b.c.d``, in either case of the prefix."""
        self.assertEqual(unmapped_ip("::ffff:203.0.113.50"), "203.0.113.50")
        self.assertEqual(unmapped_ip("::FFFF:127.0.0.1"), "127.0.0.1")

    def test_other_addresses_are_unchanged(self):
        """IPv4, IPv6 (including ones that merely start alike) and non-addresses are left alone."""
        for host in ("203.0.113.50", "2001:db8:1::50", "::1", "::ffff:cb00:7132:1", "unix:/x", ""):
            self.assertEqual(unmapped_ip(host), host)

    def test_default_listeners_are_dual_stack(self):
        """HTTPS and HTTP default to ``[::]``, and so does a bare port; an explicit address is
        kept as written; the admin API stays on loopback."""
        s = settings_from_mapping({})
        self.assertEqual((s.https, s.http), ((ListenAddress("::", 8443),), (ListenAddress("::", 8080),)))
        s = settings_from_mapping({"listen": {"https": 443, "http": "80", "admin": 9000}})
        self.assertEqual((s.https, s.http, s.admin), ((ListenAddress("::", 443),), (ListenAddress("::", 80),),
                                                      (ListenAddress("127.0.0.1", 9000),)))
        s = settings_from_mapping({"listen": {"https": "0.0.0.0:443", "http": "[::1]:80"}})
        self.assertEqual((s.https, s.http), ((ListenAddress("0.0.0.0", 443),), (ListenAddress("::1", 80),)))

    def test_without_ipv6_the_wildcard_is_ipv4(self):
        """On a host without IPv6, ``::`` becomes ``0.0.0.0``, once per port; the rest is kept."""
        self.assertEqual(without_ipv6([ListenAddress("::", 8443), ListenAddress("127.0.0.1", 9443)]),
                         (ListenAddress("0.0.0.0", 8443), ListenAddress("127.0.0.1", 9443)))
        self.assertEqual(without_ipv6([ListenAddress("0.0.0.0", 443), ListenAddress("::", 443)]),
                         (ListenAddress("0.0.0.0", 443),))
        self.assertEqual(without_ipv6([ListenAddress("::", 0), ListenAddress("::", 0)]),
                         (ListenAddress("0.0.0.0", 0), ListenAddress("0.0.0.0", 0)))

    def test_wildcard_leaves_ipv4_to_an_ipv4_listener_on_its_port(self):
        """``[::]`` takes IPv4 too, unless the same list has an IPv4 address on that port,
        which then takes IPv4 itself (both bind, as written)."""
        both = [ListenAddress("0.0.0.0", 443), ListenAddress("::", 443)]
        self.assertTrue(v6only_for(both[1], both))
        self.assertFalse(v6only_for(ListenAddress("::", 443), [ListenAddress("::", 443)]))
        self.assertFalse(v6only_for(ListenAddress("::", 443), [ListenAddress("0.0.0.0", 8443)]))
        self.assertFalse(v6only_for(ListenAddress("::", 0), [ListenAddress("0.0.0.0", 0)]))
        self.assertFalse(v6only_for(ListenAddress("::1", 443), both))

    def test_proxy_header_of_an_ipv4_client_on_a_dual_stack_port(self):
        """An IPv4 client's PROXY header is TCP over IPv4, whether the gateway's own address is
        mapped (TCP) or the listener's ``::`` (HTTP/3), which keeps its port."""
        for dest in ("::ffff:127.0.0.1", "127.0.0.1"):
            header = ProxySource("::ffff:127.0.0.1", 5000, dest, 8443).preamble
            self.assertEqual(parse_v2(header)[0], ("127.0.0.1", 5000, "127.0.0.1", 8443))
        self.assertEqual(parse_v2(ProxySource("127.0.0.1", 5000, "::", 8443).preamble)[0],
                         ("127.0.0.1", 5000, "0.0.0.0", 8443))
        self.assertEqual(parse_v2(ProxySource("::1", 5000, "::", 8443).preamble)[0], ("::1", 5000, "::", 8443))

    def test_transparent_source_is_plain(self):
        """A transparent source binds the plain IPv4 address, and is one pool key with it."""
        self.assertEqual(TransparentSource("::ffff:203.0.113.50"), TransparentSource("203.0.113.50"))
        self.assertEqual(TransparentSource("::ffff:203.0.113.50").client_ip, "203.0.113.50")


# == the sockets =====================================================================================

class SocketOptionTests(unittest.TestCase):
    skip = NO_IPV6_LOOPBACK

    def test_wildcard_sockets_take_ipv4_unless_told(self):
        """The TCP and UDP ports on ``::`` set ``IPV6_V6ONLY`` themselves: off, or on when asked.
        (A specific IPv6 address is IPv6 only whatever the option: the kernel sees to it.)"""
        for wanted in (False, True):
            tcp = listen_tcp(reactor, ListenAddress("::", 0), Factory.forProtocol(Protocol), v6only=wanted)
            self.addCleanup(tcp.stopListening)
            udp = listen_udp(reactor, ListenAddress("::", 0), DatagramProtocol(), v6only=wanted)
            self.addCleanup(udp.stopListening)
            self.assertEqual((v6only(tcp), v6only(udp)), (int(wanted), int(wanted)))

    def test_a_host_default_of_v6only_is_overridden(self):
        """Where ``net.ipv6.bindv6only`` is 1 (in a namespace of this test's own), Twisted's
        ``[::]`` port refuses IPv4 clients while ours serves them."""
        if netns.missing_requirements() is not None or shutil.which("unshare") is None:
            raise unittest.SkipTest("needs root and unshare (a network namespace of its own)")
        script = textwrap.dedent("""
            import json, socket, subprocess
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            subprocess.run(["sysctl", "-q", "-w", "net.ipv6.bindv6only=1"], check=True)
            from twisted.internet import reactor
            from twisted.internet.protocol import Factory, Protocol
            from hoodyproxy.config import ListenAddress
            from hoodyproxy.listening import listen_tcp

            def reaches(port):
                try:
                    socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5).close()
                    return True
                except OSError:
                    return False
            factory = Factory.forProtocol(Protocol)
            twisteds = reactor.listenTCP(0, factory, interface="::")
            ours = listen_tcp(reactor, ListenAddress("::", 0), factory)
            print(json.dumps({"twisted": reaches(twisteds), "ours": reaches(ours)}))
        """)
        # The namespace ends with the process: nothing is left to remove.
        result = subprocess.run(["unshare", "--net", netns.PYTHON, "-c", script], capture_output=True, text=True,
                                timeout=netns.TIMEOUT, env=netns.environment())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), {"twisted": False, "ours": True})


# == a node on its default interfaces ================================================================

class _DefaultListenerCase(unittest.TestCase):
    """A node on the default listen interfaces (``[::]``, free ports) and one container service."""

    skip = NO_IPV6_LOOPBACK
    config: dict = {}

    def setUp(self):
        self.node = start_node(self, {**DEFAULT_INTERFACES, **self.config})
        self.container_port = self.start_container()
        register(self.node, self.container_port)

    def start_container(self) -> int:
        """The container service (on loopback): one that answers with what it was sent."""
        return Backend(self, backends.app()).number

    def host(self) -> str:
        return host_for(index=self.container_port)

    def curl(self, source: str, *args: str, scheme: str = "https", path: str = "/headers"):
        """curl from ``source`` (127.0.0.1 or ::1) to the same address; fires with
        (status, body)."""
        port = self.node.https_port if scheme == "https" else self.node.http_port
        at = f"[{source}]" if ":" in source else source
        cmd = ["curl", "-sS", "--max-time", "10", "--cacert", self.node.ca_path, "--interface", source,
               "--resolve", f"{self.host()}:{port}:{at}", "-w", "\n%{http_code}", *args,
               f"{scheme}://{self.host()}:{port}{path}"]

        def run():
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            body, _, status = result.stdout.rpartition("\n")
            return int(status or 0), body + result.stderr
        return deferToThread(run)

    async def audit_of(self, path: str, client: str) -> dict:
        """The audit line of the request for ``path`` whose client is ``client``."""
        def matching():
            return [line for line in audit_lines(self.node) if line.get("path") == path
                    and line.get("client") == client]
        await until(lambda: matching(), timeout=10)
        return matching()[-1]


class DefaultListenerTests(_DefaultListenerCase):

    def test_every_listener_is_one_dual_stack_socket(self):
        """HTTPS, plain HTTP and HTTP/3 each listen on ``[::]`` with ``IPV6_V6ONLY`` off."""
        for kind in ("https", "http", "http3"):
            (port,) = self.node.ports[kind]
            self.assertEqual((kind, port.getHost().host, v6only(port)), (kind, "::", 0))

    async def test_https_serves_ipv4_and_ipv6_clients(self):
        """Over HTTP/1.1 a client on 127.0.0.1 and one on ::1 reach the container; each is
        named plainly in the forwarding headers and in its audit line."""
        for source in ("127.0.0.1", "::1"):
            path = f"/headers?from={source}"
            status, body = await self.curl(source, "--http1.1", path=path)
            self.assertEqual(status, 200, body)
            headers = json.loads(body)["headers"]
            self.assertEqual(headers["x-forwarded-for"], [source])
            self.assertEqual(headers["x-real-ip"], [source])
            self.assertEqual(headers["forwarded"][0].split(";")[0],
                             f'for="[{source}]"' if ":" in source else f"for={source}")
            line = await self.audit_of(path, source)
            self.assertEqual((line["status"], line["http"]), (200, "1.1"))

    async def test_http2_serves_ipv4_and_ipv6_clients(self):
        """Over HTTP/2 the same: the IPv4 client is 127.0.0.1, never ::ffff:127.0.0.1."""
        for source in ("127.0.0.1", "::1"):
            path = f"/headers?h2={source}"
            status, body = await self.curl(source, "--http2", path=path)
            self.assertEqual(status, 200, body)
            self.assertEqual(json.loads(body)["headers"]["x-forwarded-for"], [source])
            line = await self.audit_of(path, source)
            self.assertEqual(line["http"], "2")

    async def test_http3_serves_ipv4_and_ipv6_clients(self):
        """Over HTTP/3 (UDP on the same port number) a client on 127.0.0.1 and one on ::1 are
        served, and named plainly."""
        (udp,) = self.node.ports["http3"]
        for source in ("127.0.0.1", "::1"):
            client = await connect(self, reactor, udp.getHost().port, server_name=self.host(),
                                   ca_path=self.node.ca_path, host=source)
            path = f"/headers?h3={source}"
            stream = client.request("GET", path, self.host())
            await within(stream.done)
            self.assertEqual(stream.status, 200)
            self.assertEqual(stream.json()["headers"]["x-forwarded-for"], [source])
            line = await self.audit_of(path, source)
            self.assertEqual(line["http"], "3")

    async def test_plain_http_serves_ipv4_and_ipv6_clients(self):
        """The plain HTTP listener answers both families with its redirect to HTTPS."""
        for source in ("127.0.0.1", "::1"):
            status, body = await self.curl(source, scheme="http", path="/x")
            self.assertEqual(status, 308, body)


class NoIPv6HostTests(unittest.TestCase):

    def test_host_without_ipv6_listens_on_ipv4_and_says_so(self):
        """Where ``::`` cannot be listened on (a kernel without IPv6; stood in for here, as no
        test can take IPv6 from the kernel), the default listeners are ``0.0.0.0`` and one
        line says so."""
        from twisted.logger import formatEvent, globalLogPublisher
        self.patch(listening, "ipv6_available", lambda: False)
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        node = start_node(self, DEFAULT_INTERFACES)
        self.assertEqual({kind: [p.getHost().host for p in node.ports[kind]] for kind in ("https", "http", "http3")},
                         {"https": ["0.0.0.0"], "http": ["0.0.0.0"], "http3": ["0.0.0.0"]})
        said = [formatEvent(e) for e in events if "no IPv6" in formatEvent(e)]
        self.assertEqual(said, ["hoodyproxy: this host has no IPv6, so the [::] listeners listen on 0.0.0.0 "
                                "(IPv4 only)"])


class IPGroupTests(_DefaultListenerCase):

    async def test_ip_group_matches_an_ipv4_client_of_the_dual_stack_port(self):
        """An ``ip`` group on 127.0.0.0/8 lets the IPv4 client in (its address is not the
        mapped one) and keeps the ::1 client out."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        body = {"project": PROJECT, "groups": {"local": {"type": "ip", "range": "127.0.0.0/8"}},
                "permissions": {"local": {"http": True}}, "default": "deny"}
        response = await treq.request(
            "PUT", f"http://127.0.0.1:{self.node.admin_port}/api/v1/containers/{CONTAINER}/proxy/permissions",
            agent=Agent(reactor, pool=pool), headers={"Authorization": f"Bearer {self.node.token}"},
            data=json.dumps(body).encode())
        self.assertIn(response.code, (200, 201), await response.content())
        self.assertEqual((await self.curl("127.0.0.1"))[0], 200)
        self.assertEqual((await self.curl("::1"))[0], 403)


class ProxyProtocolTests(_DefaultListenerCase):
    config = {"client_ip": {"mode": "proxy-protocol"}}

    def start_container(self) -> int:
        """A container service that answers each request with the PROXY v2 header it was sent."""
        def script(proto, data):
            if not hasattr(proto, "header"):
                try:
                    parsed = parse_v2(proto.received)
                except ProxyHeaderError:
                    parsed = (None, 0)
                if parsed is None:
                    return
                proto.header, used = parsed
                proto.received = proto.received[used:]
            while b"\r\n\r\n" in proto.received:
                _head, _, proto.received = proto.received.partition(b"\r\n\r\n")
                body = json.dumps({"proxy": proto.header}).encode()
                proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                                      % len(body) + body)
        return raw_backend(self, script)[0]

    async def test_header_of_an_ipv4_client_is_ipv4(self):
        """The PROXY header of an IPv4 client of the dual-stack port is TCP over IPv4, naming
        127.0.0.1 and the gateway's own 127.0.0.1 and port."""
        status, body = await self.curl("127.0.0.1", "--http1.1")
        self.assertEqual(status, 200, body)
        client, _port, dest, dest_port = json.loads(body)["proxy"]
        self.assertEqual((client, dest, dest_port), ("127.0.0.1", "127.0.0.1", self.node.https_port))

    async def test_header_over_http3_names_the_client_and_the_port(self):
        """Over HTTP/3 an IPv4 client's header is TCP over IPv4 too; the destination is
        ``0.0.0.0`` (the UDP socket is the wildcard ``::``) with the port the client reached."""
        (udp,) = self.node.ports["http3"]
        client = await connect(self, reactor, udp.getHost().port, server_name=self.host(),
                               ca_path=self.node.ca_path, host="127.0.0.1")
        stream = client.request("GET", "/", self.host())
        await within(stream.done)
        self.assertEqual(stream.status, 200)
        client_ip, _port, dest, dest_port = stream.json()["proxy"]
        self.assertEqual((client_ip, dest, dest_port), ("127.0.0.1", "0.0.0.0", self.node.https_port))

    async def test_header_of_an_ipv6_client_is_ipv6(self):
        """The PROXY header of the ::1 client is TCP over IPv6."""
        status, body = await self.curl("::1", "--http1.1")
        self.assertEqual(status, 200, body)
        client, _port, dest, dest_port = json.loads(body)["proxy"]
        self.assertEqual((client, dest, dest_port), ("::1", "::1", self.node.https_port))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run with trial")
