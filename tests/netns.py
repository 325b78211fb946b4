"""Three network namespaces for real-client-IP tests, and the programs that run in them.

::

    client ns                    gateway ns                           container ns
    eth0 203.0.113.50/24 ─veth─ c0 203.0.113.1/24    s0 198.51.100.1/24 ─veth─ eth0 198.51.100.2/24
         203.0.113.51/24                (forwarding on)                  default via 198.51.100.1
         2001:db8:1::50/64           2001:db8:1::1/64    2001:db8:2::1/64      2001:db8:2::2/64
         2001:db8:1::51/64
    default via 203.0.113.1 / 2001:db8:1::1

Documentation ranges only (RFC 5737, RFC 3849).  Each :class:`Topology` has names of
its own (the pid and a counter), so tests may run side by side; it removes its
namespaces -- and first every process it started in them -- in the test's cleanup.

Run as a program (inside a namespace) it is the test's container service or client::

    python -m tests.netns serve PORT        HTTP /peer (JSON: the TCP peer) and WebSocket /ws
                                            (one text message: the same JSON), on 0.0.0.0:PORT
                                            and, IPv6 only, [::]:PORT
    python -m tests.netns ws-client ...     a WebSocket client that prints the first message
    python -m tests.netns h3-get ...        an HTTP/3 GET that prints the status and the body
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
#: bound on every wait (start-up, exit, a request); never an assertion about speed
TIMEOUT = 20.0

CLIENT_V4, CLIENT2_V4 = "203.0.113.50", "203.0.113.51"
GATEWAY_CLIENT_SIDE_V4, GATEWAY_CONTAINER_SIDE_V4 = "203.0.113.1", "198.51.100.1"
CONTAINER_V4 = "198.51.100.2"
CLIENT_V6, CLIENT2_V6 = "2001:db8:1::50", "2001:db8:1::51"
GATEWAY_CLIENT_SIDE_V6, GATEWAY_CONTAINER_SIDE_V6 = "2001:db8:1::1", "2001:db8:2::1"
CONTAINER_V6 = "2001:db8:2::2"

_counter = itertools.count(1)


def missing_requirements() -> str | None:
    """Why the namespace tests cannot run here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces, iptables, policy routing)"
    for tool in ("ip", "iptables", "ip6tables", "iptables-legacy-save", "ip6tables-legacy-save", "curl",
                 "conntrack"):
        if shutil.which(tool) is None:
            return f"needs the {tool} command (make deps installs it)"
    try:
        import iptc  # noqa: F401
    except Exception as e:
        return f"needs python-iptables: {e}"
    return None


def environment() -> dict:
    """This environment with the repository importable (``python -m tests.netns``)."""
    variables = dict(os.environ)
    variables["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, variables.get("PYTHONPATH")]))
    variables["PYTHONUNBUFFERED"] = "1"
    variables.pop("HOODYPROXY_DATA_DIR", None)
    return variables


def _run(args: list[str], check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=environment())
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


class Topology:
    """The three namespaces, their links, addresses and routes; removed in the test's cleanup."""

    def __init__(self, case) -> None:
        self.case = case
        tag = f"hpx{os.getpid()}n{next(_counter)}"
        self.client, self.gateway, self.container = f"{tag}c", f"{tag}g", f"{tag}s"
        self.processes: list[subprocess.Popen] = []
        self.created: list[str] = []
        case.addCleanup(self.destroy)
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise

    def _create(self) -> None:
        for ns in (self.client, self.gateway, self.container):
            _run(["ip", "netns", "add", ns])
            self.created.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # No duplicate address detection on the links made next: addresses (link-local ones
            # too, which neighbour discovery uses) are usable at once.
            for scope in ("all", "default"):
                self.sysctl(ns, f"net.ipv6.conf.{scope}.accept_dad", "0")
        # veth pairs made inside the namespaces: no interface name ever exists on the host.
        _run(["ip", "-n", self.client, "link", "add", "eth0", "type", "veth", "peer", "name", "c0",
              "netns", self.gateway])
        _run(["ip", "-n", self.container, "link", "add", "eth0", "type", "veth", "peer", "name", "s0",
              "netns", self.gateway])
        for ns, dev, addresses in (
                (self.client, "eth0", [f"{CLIENT_V4}/24", f"{CLIENT2_V4}/24", f"{CLIENT_V6}/64",
                                       f"{CLIENT2_V6}/64"]),
                (self.gateway, "c0", [f"{GATEWAY_CLIENT_SIDE_V4}/24", f"{GATEWAY_CLIENT_SIDE_V6}/64"]),
                (self.gateway, "s0", [f"{GATEWAY_CONTAINER_SIDE_V4}/24", f"{GATEWAY_CONTAINER_SIDE_V6}/64"]),
                (self.container, "eth0", [f"{CONTAINER_V4}/24", f"{CONTAINER_V6}/64"])):
            for address in addresses:
                extra = ["nodad"] if ":" in address else []  # usable at once, no duplicate detection wait
                _run(["ip", "-n", ns, "addr", "add", address, "dev", dev, *extra])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        self.sysctl(self.gateway, "net.ipv4.ip_forward", "1")
        self.sysctl(self.gateway, "net.ipv6.conf.all.forwarding", "1")
        _run(["ip", "-n", self.client, "route", "add", "default", "via", GATEWAY_CLIENT_SIDE_V4])
        _run(["ip", "-n", self.client, "-6", "route", "add", "default", "via", GATEWAY_CLIENT_SIDE_V6])
        _run(["ip", "-n", self.container, "route", "add", "default", "via", GATEWAY_CONTAINER_SIDE_V4])
        _run(["ip", "-n", self.container, "-6", "route", "add", "default", "via", GATEWAY_CONTAINER_SIDE_V6])

    def sysctl(self, ns: str, key: str, value: str) -> None:
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"])

    def run(self, ns: str, *args: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        """Run a command inside namespace ``ns`` and wait for it."""
        return _run(["ip", "netns", "exec", ns, *args], check=check, timeout=timeout)

    def start(self, ns: str, args: list[str], log_path: str, env: dict | None = None) -> subprocess.Popen:
        """Start a process inside ``ns`` (output to ``log_path``); it is killed at cleanup."""
        variables = environment()
        variables.update(env or {})
        with open(log_path, "ab") as log:
            # `ip netns exec` enters the namespace and execs: the pid is the program's own.
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=variables,
                                    cwd=os.path.dirname(log_path))
        self.processes.append(proc)
        return proc

    def destroy(self) -> None:
        for proc in self.processes:
            stop_process(proc)
        self.processes.clear()
        for ns in reversed(self.created):
            _run(["ip", "netns", "del", ns], check=False)
        self.created.clear()


#: What a twistd stopped by SIGTERM exits with: Twisted stops cleanly, then ends by the signal.
STOPPED_BY_SIGTERM = (0, -signal.SIGTERM)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    """Stop ``proc`` (``sig``, then SIGKILL after 10 s); its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def wait_for(path: str, pattern: str, proc: subprocess.Popen | None = None, timeout: float = TIMEOUT) -> re.Match:
    """The first match of ``pattern`` in the file ``path``; raises if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        match = re.search(pattern, text)
        if match:
            return match
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited ({proc.returncode}) without printing {pattern!r}:\n{text}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {pattern!r} within {timeout}s:\n{text}")
        time.sleep(0.05)


class NamespacedGateway:
    """``twistd -n hoodyproxy`` in the gateway namespace on its default listeners -- HTTPS on
    [::]:8443 (TCP and UDP) and plain HTTP on [::]:8080, both taking IPv4 too -- with the
    admin API on 127.0.0.1:8081."""

    https_port = 8443
    admin_port = 8081

    def __init__(self, topology: Topology, workdir: str, *args: str, data_dir: str | None = None,
                 config: str | None = None) -> None:
        self.topology = topology
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.data_dir = data_dir or os.path.join(workdir, "data")
        self.audit_path = os.path.join(workdir, "audit.log")
        self.log_path = os.path.join(workdir, f"gateway-{next(_counter)}.log")
        open(self.log_path, "wb").close()
        extra = list(args)
        if config is not None:
            path = os.path.join(workdir, "gateway.toml")
            with open(path, "w") as f:
                f.write(config)
            extra = ["--config", path, *extra]
        self.proc = topology.start(topology.gateway, [
            TWISTD, "-n", "--pidfile", "", "hoodyproxy", "--data-dir", self.data_dir,
            "--admin", f"127.0.0.1:{self.admin_port}", "--audit", self.audit_path, *extra], self.log_path)

    def wait_ready(self) -> "NamespacedGateway":
        wait_for(self.log_path, re.escape("hoodyproxy audit log:"), self.proc)
        return self

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def audit_line(self, path: str, timeout: float = TIMEOUT) -> dict:
        """The audit line of the (one) request for ``path``, once the gateway has written it
        (it flushes its audit file every 0.1 s)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.audit_path, "rb") as f:
                    lines = [json.loads(line) for line in f if line.strip()]
            except FileNotFoundError:
                lines = []
            found = [line for line in lines if line.get("path") == path]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no audit line for {path} within {timeout}s: {lines}")
            time.sleep(0.05)

    @property
    def ca_path(self) -> str:
        return os.path.join(self.data_dir, "tls", "ca.pem")

    def token(self) -> str:
        with open(os.path.join(self.data_dir, "admin-token")) as f:
            return f.read().strip()

    def put_container(self, container: str, project: str, address: str, state: str = "running") -> None:
        """Register (or update) a container through the admin API, from inside the namespace."""
        body = json.dumps({"project": project, "address": address, "state": state})
        result = self.topology.run(
            self.topology.gateway, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
            "-X", "PUT", "-H", f"Authorization: Bearer {self.token()}", "-d", body,
            f"http://127.0.0.1:{self.admin_port}/api/v1/containers/{container}")
        if result.stdout not in ("200", "201"):
            raise RuntimeError(f"admin PUT answered {result.stdout}: {result.stderr}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return stop_process(self.proc, sig)


# -- the programs run inside the namespaces ----------------------------------------------------

def serve(port: int) -> None:
    """The container's service: who is my TCP peer, over HTTP and over WebSocket.

    It listens on each family's own socket, so the peer is reported exactly as the kernel
    gives it: an IPv4 connection is ``203.0.113.50``, never ``::ffff:203.0.113.50``.
    """
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    def view(peer, headers) -> bytes:
        return json.dumps({"peer": peer.host, "port": peer.port,
                           "x-forwarded-for": headers.get("x-forwarded-for")}).encode()

    class Peer(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"content-type", b"application/json")
            xff = request.getHeader(b"x-forwarded-for")
            return view(request.getClientAddress(), {"x-forwarded-for": xff.decode() if xff else None})

    class SayPeer(WebSocketServerProtocol):
        def onConnect(self, request):
            self.forwarded = request.headers.get("x-forwarded-for")

        def onOpen(self):
            self.sendMessage(view(self.transport.getPeer(), {"x-forwarded-for": self.forwarded}), False)

    factory = WebSocketServerFactory(reactor=reactor)
    factory.protocol = SayPeer
    factory.setProtocolOptions(allowedOrigins=["*"], allowNullOrigin=True)
    root = Resource()
    root.putChild(b"peer", Peer())
    root.putChild(b"ws", WebSocketResource(factory))
    site = Site(root)
    site.log = lambda request: None
    from hoodyproxy.config import ListenAddress
    from hoodyproxy.listening import listen_tcp
    reactor.listenTCP(port, site, interface="0.0.0.0")
    listening = listen_tcp(reactor, ListenAddress("::", port), site, v6only=True)
    print(f"serving on {listening.getHost().port}", flush=True)
    reactor.run()


def ws_client(connect: str, port: int, host: str, path: str, cacert: str, source: str) -> None:
    """Open a WebSocket through the gateway from ``source``; print the first message it gets."""
    import base64
    import socket
    import ssl
    import struct

    family = socket.AF_INET6 if ":" in connect else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_STREAM)
    raw.settimeout(TIMEOUT)
    raw.bind((source, 0))
    raw.connect((connect, port))
    context = ssl.create_default_context(cafile=cacert)
    sock = context.wrap_socket(raw, server_hostname=host)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise SystemExit(f"closed during the handshake: {data!r}")
        data += chunk
    head, _, data = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        raise SystemExit(f"no upgrade: {status.decode('latin-1')}")

    def need(n: int) -> bytes:
        nonlocal data
        while len(data) < n:
            chunk = sock.recv(4096)
            if not chunk:
                raise SystemExit("closed before a whole frame came")
            data += chunk
        out, data = data[:n], data[n:]
        return out

    first, second = need(2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", need(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", need(8))[0]
    payload = need(length)
    print(payload.decode("utf-8"), flush=True)
    sock.close()


def h3_get(connect: str, port: int, host: str, path: str, cacert: str, source: str) -> None:
    """One HTTP/3 GET through the gateway from ``source``; print the status, then the body."""
    from twisted.internet import reactor

    from tests.h3client import H3ClientProtocol
    client = H3ClientProtocol(reactor, (connect, port), server_name=host, ca_path=cacert)
    client._port = reactor.listenUDP(0, client, interface=source)
    outcome: list = []

    def request(_):
        stream = client.request("GET", path, f"{host}:{port}")
        return stream.done.addCallback(lambda _: outcome.append((stream.status, stream.sink.body)))

    def end(result):
        if not outcome:
            outcome.append(result)
        client.close().addBoth(lambda _: reactor.stop())
    client.connected.addTimeout(TIMEOUT, reactor).addCallback(request).addBoth(end)
    reactor.run()
    if not isinstance(outcome[0], tuple):
        raise SystemExit(f"HTTP/3 request failed: {outcome[0]}")
    status, body = outcome[0]
    print(status, flush=True)
    print(body.decode("utf-8", "replace"), flush=True)


def main(argv: list[str]) -> None:
    if argv[:1] == ["serve"]:
        serve(int(argv[1]))
    elif argv[:1] in (["ws-client"], ["h3-get"]):
        import argparse
        parser = argparse.ArgumentParser()
        for name in ("--connect", "--host", "--path", "--cacert", "--source"):
            parser.add_argument(name, required=True)
        parser.add_argument("--port", type=int, required=True)
        a = parser.parse_args(argv[1:])
        program = ws_client if argv[0] == "ws-client" else h3_get
        program(a.connect, a.port, a.host, a.path, a.cacert, a.source)
    else:
        raise SystemExit("usage: python -m tests.netns serve PORT | ws-client ... | h3-get ...")


if __name__ == "__main__":
    main(sys.argv[1:])
