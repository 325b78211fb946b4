"""The floor: the least a Twisted TLS reverse proxy can cost per request, as a benchmark row.

    python bench/floor_proxy.py --backend PORT --plain PORT --tls PORT --cert PEM --key PEM

One process, the epoll reactor, no features at all: no routing, no permissions, no audit,
no limits.  Client requests are parsed with httptools (llhttp); each client connection
owns one keep-alive HTTP/1.1 connection to ``127.0.0.1:BACKEND``, opened on its first
request and kept for the next ones (reopened if the backend closes it).  One request at a
time is in flight upstream; pipelined client requests wait in order.  The backend's
response is parsed with httptools' ``HttpResponseParser`` and streamed back (Content-Length
or chunked), hop-by-hop headers dropped; what one read of the backend produced goes to the
client in one write.  Both sides send eagerly (``hoodyproxy.eagertcp``: ``socket.send``
first, Twisted's queue only for what did not fit); the backend connection is the client
transport's streaming producer, so a slow client pauses it.  TLS: the run's certificate,
ALPN http/1.1 only (HTTP/2 and WebSocket scenarios report n/a).  GET only (501 otherwise).
Prints ``listening`` once both ports are bound.

What this is for: hoodyproxy's per-request CPU compared with this floor, measured in the
same run (bench/report.py targets), so the ratio is measured rather than remembered.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque

import httptools

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
NOT_IMPLEMENTED = (b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_QUEUED = 32  # pipelined requests parsed ahead before the client's reading is paused


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", type=int, required=True)
    parser.add_argument("--plain", type=int, required=True)
    parser.add_argument("--tls", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args(argv)

    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import reactor, ssl
    from twisted.internet.protocol import ClientFactory, Factory, Protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from hoodyproxy import eagertcp

    backend = args.backend

    class Upstream(Protocol):
        """One keep-alive connection to the backend, owned by one client connection."""

        def __init__(self, client: "Client") -> None:
            self.client = client
            self.ready = False
            self.parser = httptools.HttpResponseParser(self)
            self.out: list[bytes] = []
            self.headers: list[bytes] = []
            self.reason = b""
            self.chunked = False
            self.in_message = False
            self.completed = False
            self.keep_alive = True

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            self.ready = True
            if self.client is None:  # the client went away while connecting
                self.transport.loseConnection()
                return
            self.client.upstream_ready(self)

        def dataReceived(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.out.clear()
                self.transport.abortConnection()
                if self.client is not None:
                    self.client.fail()
                return
            if self.out and self.client is not None:
                self.client.transport.write(b"".join(self.out))
            self.out.clear()
            if self.completed:
                self.completed = False
                if self.client is not None:
                    self.client.response_done(self)

        def connectionLost(self, reason) -> None:
            client, self.client = self.client, None
            if client is not None:
                client.upstream_lost(self, self.in_message)

        # httptools callbacks
        def on_message_begin(self) -> None:
            self.in_message = True
            self.headers = []
            self.chunked = False
            self.reason = b""

        def on_status(self, status: bytes) -> None:
            self.reason += status

        def on_header(self, name: bytes, value: bytes) -> None:
            lower = name.lower()
            if lower in HOP_BY_HOP:
                if lower == b"transfer-encoding" and value.strip().lower() == b"chunked":
                    self.chunked = True
                return
            self.headers.append(name + b": " + value + b"\r\n")

        def on_headers_complete(self) -> None:
            if self.chunked:
                self.headers.append(b"Transfer-Encoding: chunked\r\n")
            self.out.append(b"HTTP/1.1 %d %s\r\n%s\r\n" % (self.parser.get_status_code(), self.reason,
                                                          b"".join(self.headers)))

        def on_body(self, body: bytes) -> None:
            if self.chunked:
                self.out.append(b"%x\r\n%s\r\n" % (len(body), body))
            else:
                self.out.append(body)

        def on_message_complete(self) -> None:
            if self.chunked:
                self.out.append(b"0\r\n\r\n")
            self.in_message = False
            self.completed = True
            self.keep_alive = self.parser.should_keep_alive()

    class UpstreamFactory(ClientFactory):
        def __init__(self, client: "Client") -> None:
            self.client = client

        def buildProtocol(self, addr):
            p = Upstream(self.client)
            self.client.upstream = p
            return p

        def clientConnectionFailed(self, connector, reason) -> None:
            self.client.fail()

    class Client(Protocol):
        """A client connection: parse requests, forward them one at a time, stream answers back."""

        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.queue: deque[tuple[bytes, bool]] = deque()
            self.in_flight: tuple[bytes, bool] | None = None
            self.upstream: Upstream | None = None
            self.connecting = False
            self.closed = False
            self.paused = False
            self.producing_upstream: Upstream | None = None
            self.headers: list[bytes] = []
            self.url = b""
            self.body: list[bytes] = []

        def connectionMade(self) -> None:
            # the TCP transport (under TLSMemoryBIOProtocol for TLS) for Nagle and read pausing
            self.raw = self.transport if hasattr(self.transport, "pauseProducing") else self.transport.transport
            self.raw.setTcpNoDelay(True)

        def dataReceived(self, data: bytes) -> None:
            if self.closed:
                return
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self.refuse(NOT_IMPLEMENTED)
            except httptools.HttpParserError:
                self.refuse(BAD_REQUEST)

        def refuse(self, answer: bytes) -> None:
            self.closed = True
            if self.in_flight is None and not self.queue:
                self.transport.write(answer)
            self.transport.loseConnection()

        # httptools callbacks
        def on_message_begin(self) -> None:
            self.headers = []
            self.url = b""
            self.body = []

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() not in HOP_BY_HOP:
                self.headers.append(name + b": " + value + b"\r\n")

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            if self.closed:
                return
            if self.parser.get_method() != b"GET":
                self.refuse(NOT_IMPLEMENTED)
                return
            head = b"GET %s HTTP/1.1\r\n%s\r\n" % (self.url, b"".join(self.headers))
            self.queue.append((head, self.parser.should_keep_alive()))
            if len(self.queue) > MAX_QUEUED and not self.paused:
                self.paused = True
                self.raw.pauseProducing()
            self.pump()

        # the upstream exchange
        def pump(self) -> None:
            if self.in_flight is not None or not self.queue:
                return
            up = self.upstream
            if up is None:
                if not self.connecting:
                    self.connecting = True
                    eagertcp.connect_tcp(reactor, "127.0.0.1", backend, UpstreamFactory(self))
                return
            if not up.ready:
                return
            self.in_flight = self.queue.popleft()
            if self.paused and len(self.queue) <= MAX_QUEUED // 2:
                self.paused = False
                self.raw.resumeProducing()
            up.transport.write(self.in_flight[0])

        def upstream_ready(self, up: Upstream) -> None:
            self.connecting = False
            if self.closed:
                up.transport.loseConnection()
                return
            self.transport.registerProducer(up.transport, True)
            self.producing_upstream = up
            self.pump()

        def response_done(self, up: Upstream) -> None:
            if self.in_flight is None:
                return
            _, keep_alive = self.in_flight
            self.in_flight = None
            if not up.keep_alive:
                self._drop_upstream(up)
                up.transport.loseConnection()
            if not keep_alive:
                self.closed = True
                self.transport.loseConnection()
                return
            self.pump()

        def _drop_upstream(self, up: Upstream) -> None:
            if self.producing_upstream is up:
                self.transport.unregisterProducer()
                self.producing_upstream = None
            up.client = None
            if self.upstream is up:
                self.upstream = None

        def upstream_lost(self, up: Upstream, mid_response: bool) -> None:
            self._drop_upstream(up)
            self.connecting = False
            if self.in_flight is not None:
                # lost with a request sent: mid-response nothing sensible can follow; before
                # any byte of the answer, a 502
                self.fail(started=mid_response)
            elif not self.closed:
                self.pump()

        def fail(self, started: bool = False) -> None:
            self.connecting = False
            if self.closed:
                return
            self.closed = True
            if not started:
                self.transport.write(BAD_GATEWAY)
            self.transport.loseConnection()

        def connectionLost(self, reason) -> None:
            self.closed = True
            up, self.upstream = self.upstream, None
            if up is not None:
                up.client = None
                up.transport.loseConnection()

    factory = Factory.forProtocol(Client)
    with open(args.cert, "rb") as f:
        cert_pem = f.read()
    with open(args.key, "rb") as f:
        key_pem = f.read()
    cert = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
    options = ssl.CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original,
                                     acceptableProtocols=[b"http/1.1"])
    eagertcp.listen_tcp(reactor, args.plain, factory, backlog=1024, interface="127.0.0.1")
    eagertcp.listen_tcp(reactor, args.tls, TLSMemoryBIOFactory(options, False, factory), backlog=1024,
                        interface="127.0.0.1")
    print("listening", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
