"""Test harness: a real node on loopback (real TLS), real backends, real clients.

Everything a helper starts is stopped by the test that called it (``addCleanup``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl as stdlib_ssl
import subprocess
import tempfile

import treq
from twisted.internet import defer, reactor, ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from hoodyproxy.config import settings_from_mapping
from hoodyproxy.directory import Container
from hoodyproxy.service import NodeService

PROJECT = "67e89abc123def456789abcd"
CONTAINER = "890abcdef12345678901cdef"
OTHER_PROJECT = "0000000000000000000000aa"


def host_for(program: str = "http", index: int = 8000, project: str = PROJECT,
             container: str = CONTAINER, suffix: str = "node-local.containers.localhost") -> str:
    return f"{project}-{container}-{program}-{index}.{suffix}"


def start_node(case, config: dict | None = None) -> NodeService:
    """A started NodeService on ephemeral loopback ports with its own data directory."""
    data_dir = tempfile.mkdtemp(prefix="hoodyproxy-test-")
    case.addCleanup(shutil.rmtree, data_dir, True)
    doc = {"node": {"data_dir": data_dir},
           "listen": {"https": "127.0.0.1:0", "http": "127.0.0.1:0", "admin": "127.0.0.1:0"},
           "audit": {"path": os.path.join(data_dir, "audit.log")},
           # Tests in the host namespace leave its netfilter rules alone; transparent mode is
           # tested inside namespaces of its own (tests/test_real_client_ip.py).
           "client_ip": {"mode": "headers"}}
    for section, table in (config or {}).items():
        doc.setdefault(section, {}).update(table)
    node = NodeService(settings_from_mapping(doc), reactor)
    node.privilegedStartService()
    node.startService()
    # (A test may have stopped the node itself, e.g. to start another on its data.)
    case.addCleanup(lambda: node.stopService() if node.running else None)
    node.https_port = node.ports["https"][0].getHost().port
    node.http_port = node.ports["http"][0].getHost().port
    node.admin_port = node.ports["admin"][0].getHost().port
    node.data_dir = data_dir
    return node


def register(node: NodeService, port: int, *, container: str = CONTAINER, project: str = PROJECT,
             address: str = "127.0.0.1", state: str = "running", ports: dict | None = None) -> None:
    node.directory.put(Container(container, project, address, state, ports or {}))


def audit_lines(node: NodeService) -> list[dict]:
    node.audit.flush()
    with open(node.settings.audit_file) as f:
        return [json.loads(line) for line in f if line.strip()]


@implementer(IPolicyForHTTPS)
class _TrustNodeCA:
    """Trust the node's generated CA and connect every hostname to loopback."""

    def __init__(self, ca_path: str) -> None:
        with open(ca_path, "rb") as f:
            self.ca = ssl.Certificate.loadPEM(f.read())

    def creatorForNetloc(self, hostname, port):
        return ssl.optionsForClientTLS(hostname.decode(), trustRoot=self.ca)


@implementer(IAgentEndpointFactory)
class _PinnedEndpoints:
    """Connect every URI to 127.0.0.1 (its port), with TLS for https, keeping the hostname for SNI."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def endpointForURI(self, uri):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", uri.port, timeout=10)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def https_agent(case, node: NodeService, persistent: bool = True) -> Agent:
    """An Agent that trusts the node's CA and sends every hostname to 127.0.0.1."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    case.addCleanup(pool.closeCachedConnections)
    return Agent.usingEndpointFactory(reactor, _PinnedEndpoints(_TrustNodeCA(node.ca_path)), pool=pool)


def url(node: NodeService, path: str = "/", **host_kw) -> str:
    return f"https://{host_for(**host_kw)}:{node.https_port}{path}"


def curl(node: NodeService, *args: str, host: str | None = None, timeout: float = 30) -> defer.Deferred:
    """Run curl against the node in a thread; fires with CompletedProcess (bytes)."""
    host = host or host_for()
    cmd = ["curl", "-sS", "--max-time", str(timeout), "--cacert", node.ca_path,
           "--resolve", f"{host}:{node.https_port}:127.0.0.1", *args]
    return deferToThread(subprocess.run, cmd, capture_output=True, timeout=timeout + 10)


class Backend:
    """A real HTTP backend on loopback: a twisted.web Site with resources a test defines."""

    def __init__(self, case, resource) -> None:
        from twisted.web.server import Site
        self.site = Site(resource)
        self.site.log = lambda request: None
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        case.addCleanup(self.port.stopListening)
        self.number = self.port.getHost().port


class RawServer(Protocol):
    """A backend speaking raw bytes: ``script(protocol, data)`` decides what to answer."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.received = b""

    def dataReceived(self, data):
        self.received += data
        self.factory.script(self, data)

    def connectionLost(self, reason):
        self.factory.lost.append(self)


def raw_backend(case, script) -> tuple[int, Factory]:
    """Listen on loopback with a RawServer running ``script``; returns (port, factory)."""
    factory = Factory.forProtocol(RawServer)
    factory.script = script
    factory.connections = []
    factory.lost = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")

    def stop():
        for conn in factory.connections:
            if conn.transport is not None:
                conn.transport.abortConnection()
        return port.stopListening()
    case.addCleanup(stop)
    return port.getHost().port, factory


def tls_exchange(node, host: str, payload: bytes, *, linger: float = 1.5, source: str | None = None) -> bytes:
    """Send ``payload`` on a fresh TLS connection (SNI ``host``, HTTP/1.1; from the
    loopback address ``source`` if given) and return all that came back until the gateway
    closed or ``linger`` seconds passed quietly.  Blocking: run it in a thread."""
    context = stdlib_ssl.create_default_context(cafile=node.ca_path)
    context.set_alpn_protocols(["http/1.1"])
    bind = (source, 0) if source is not None else None
    with socket.create_connection(("127.0.0.1", node.https_port), timeout=10, source_address=bind) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(payload)
            tls.settimeout(linger)
            received = b""
            while True:
                try:
                    data = tls.recv(65536)
                except (socket.timeout, TimeoutError):
                    break
                except (stdlib_ssl.SSLError, ConnectionError):
                    break
                if not data:
                    break
                received += data
            return received


def wait(seconds: float) -> defer.Deferred:
    """Let the reactor run (used only to give a peer time to act, never to assert speed)."""
    return deferLater(reactor, seconds, lambda: None)


async def until(predicate, timeout: float = 10.0, step: float = 0.02) -> None:
    """Wait until ``predicate()`` is true; fail after ``timeout`` seconds."""
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError("condition not reached")
        await wait(step)
        waited += step


__all__ = ["treq", "Backend", "raw_backend", "start_node", "register", "host_for", "url",
           "curl", "audit_lines", "https_agent", "until", "wait", "tls_exchange"]
