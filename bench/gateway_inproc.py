"""The gateway's own Python cost per request, in process: no sockets, no TLS, no kernel.

    PYTHONPATH=. python bench/gateway_inproc.py [--requests N] [--fields small|browser] [--profile]
                                                [--tap none|other|all] [--runs N]
                                                [--response small|nginx]

A node's GatewayStack (its real directory, policy, limits, audit file) serves HTTP/1.1
requests from an H1Connection on a StringTransport; the pool's connections are
UpstreamConnections on fake transports that answer each request head with a 12-byte
response, delivered after the client's read, as a container's would be.  What is left
is the gateway's own work per request (parse, route, locate, decide, forward, the
response, the audit line): the part of ``make bench``'s CPU per request that is ours
and not TLS's, the kernel's or the reactor's.  ``--profile`` prints cProfile's table.
``--tap other`` runs with a tap on another container (every request is matched against
it, none is captured); ``--tap all``, with a tap capturing every exchange (headers and
4 KiB of each body; its events are made, serialized and thrown away).  ``--response
nginx`` answers with the five fields the benchmark's nginx sends for ``return 200``
(Server, Date, Content-Type, Content-Length, Connection: keep-alive) instead of three.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from hoodyproxy.config import settings_from_mapping
from hoodyproxy.directory import Container
from hoodyproxy.frontend.h1 import H1Factory
from hoodyproxy.service import GatewayStack

PROJECT, CONTAINER = "67e89abc123def456789abcd", "890abcdef12345678901cdef"
RESPONSE = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n"
#: What the benchmark's nginx answers to ``return 200 "hello world\n"`` (bench/configs).
NGINX_RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 15:00:00 GMT\r\n"
                  b"Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\nhello world\n")
BROWSER = (b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0\r\n"
           b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
           b"Accept-Language: en-US,en;q=0.9\r\nAccept-Encoding: gzip, deflate, br\r\n"
           b"Connection: keep-alive\r\nUpgrade-Insecure-Requests: 1\r\nSec-Fetch-Dest: document\r\n"
           b"Sec-Fetch-Mode: navigate\r\nSec-Fetch-Site: none\r\nSec-Fetch-User: ?1\r\n"
           b"Cache-Control: max-age=0\r\nCookie: a=b; c=d\r\n")


class FakeUpstream(StringTransport):
    """A container connection: each request head written gets RESPONSE on deliver()."""

    response = RESPONSE

    def __init__(self, protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.due = 0

    def write(self, data: bytes) -> None:
        self.due += data.count(b"\r\n\r\n")

    def deliver(self) -> None:
        while self.due:
            self.due -= 1
            self.protocol.dataReceived(self.response)


def build(data_dir: str):
    settings = settings_from_mapping({
        "node": {"data_dir": data_dir, "name": "node-us", "zone": "containers.example.com"},
        "listen": {"https": "127.0.0.1:0", "http": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "audit": {"path": os.path.join(data_dir, "audit.log")},
        "client_ip": {"mode": "headers"},
        "ratelimit": {"per_address_rate": "100000/s", "per_address_burst": 1000000},
    })
    # The real reactor as the clock (never run): timers cost what they cost in a node,
    # which twisted's test Clock (a sorted list) would not show.
    from twisted.internet import reactor as clock
    stack = GatewayStack(settings, clock)
    upstreams: list[FakeUpstream] = []

    def connect(address, port, factory, timeout, source=None):
        protocol = factory.buildProtocol(IPv4Address("TCP", address, port))
        transport = FakeUpstream(protocol)
        upstreams.append(transport)
        protocol.makeConnection(transport)
        return None

    stack.pool._connect = connect
    stack.directory.put(Container(CONTAINER, PROJECT, "127.0.0.1", "running", {}))
    factory = H1Factory(stack.gateway, clock, timeout=75.0)
    client = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000),
                                hostAddress=IPv4Address("TCP", "198.51.100.1", 443))
    client.makeConnection(transport)
    return stack, client, transport, upstreams, clock


def run(requests: int, fields: str, profile: bool, tap: str = "none", response: str = "small") -> float:
    FakeUpstream.response = NGINX_RESPONSE if response == "nginx" else RESPONSE
    data_dir = tempfile.mkdtemp(prefix="hoodyproxy-inproc-")
    try:
        stack, client, transport, upstreams, clock = build(data_dir)
        if tap != "none":
            from hoodyproxy.observe.tap import TapSpec
            match = {"container": "0" * 24} if tap == "other" else {}
            stack.taps.add(TapSpec.from_json({"match": match, "max_events": 10_000_000}), lambda line: None,
                           lambda: None)
        host = b"%s-%s-http-3000.node-us.containers.example.com" % (PROJECT.encode(), CONTAINER.encode())
        request = b"GET /api/items?x=1 HTTP/1.1\r\nHost: " + host + b"\r\n" + (BROWSER if fields == "browser" else b"") + b"\r\n"

        def one() -> None:
            client.dataReceived(request)
            for upstream in upstreams:
                upstream.deliver()

        for _ in range(200):  # warm: the pool's connection, the caches
            one()
        if b"200 OK" not in transport.value():
            raise SystemExit("the gateway did not answer 200:\n" + transport.value()[-600:].decode("latin-1"))
        transport.clear()
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        started = time.thread_time()
        for i in range(requests):
            one()
            if i % 1000 == 999:
                transport.clear()
        took = time.thread_time() - started
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("ROWS", "30")))
        stack.close()
        return took / requests * 1e6
    finally:
        shutil.rmtree(data_dir, True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--fields", choices=("small", "browser"), default="small")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tap", choices=("none", "other", "all"), default="none")
    parser.add_argument("--runs", type=int, default=3, help="runs, the best reported (default 3)")
    parser.add_argument("--response", choices=("small", "nginx"), default="small")
    args = parser.parse_args(argv)
    if args.profile:
        run(args.requests, args.fields, True, args.tap, args.response)
        return 0
    best = min(run(args.requests, args.fields, False, args.tap, args.response) for _ in range(max(1, args.runs)))
    print(f"{best:.1f} us of the gateway's own CPU per request ({args.fields} fields; {args.response} response; "
          f"tap: {args.tap}; best of "
          f"{max(1, args.runs)} runs of {args.requests:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
