"""Raw clients for attack tests: bytes exactly as written, over plain TCP or TLS.

A :class:`RawClient` keeps what comes back and notes when the connection ends; a
:class:`Flood` pushes bytes into a connection only as fast as the transport takes them, so
how much it got rid of says how much the peer (and the kernel between) accepted.  They
run in Trial's reactor beside the node they attack: a blocking socket would stall it.
Every connection is aborted in the case's cleanup.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer


class RawClient(Protocol):
    """Keeps every byte received; ``closed`` fires when the connection ends."""

    def __init__(self) -> None:
        self.received = b""
        self.lost = False
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.lost = True
        self.closed.callback(None)

    @property
    def status_line(self) -> bytes:
        return self.received.split(b"\r\n", 1)[0]

    @property
    def head(self) -> bytes:
        return self.received.split(b"\r\n\r\n", 1)[0]

    @property
    def body(self) -> bytes:
        return self.received.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.received else b""

    def write_slowly(self, pieces, interval: float) -> None:
        """Write ``pieces`` one by one, ``interval`` seconds apart, until the connection ends."""
        pieces = list(pieces)

        def step():
            if self.lost or not pieces:
                return
            self.transport.write(pieces.pop(0))
            if pieces:
                self._slow_call = reactor.callLater(interval, step)
        step()

    def stop_writing(self) -> None:
        call = getattr(self, "_slow_call", None)
        if call is not None and call.active():
            call.cancel()


def _cleanup(case, client: RawClient) -> None:
    def close():
        client.stop_writing()
        if not client.lost:
            client.transport.abortConnection()
            return client.closed
    case.addCleanup(close)


async def tcp_client(case, port: int) -> RawClient:
    """A plain TCP connection to 127.0.0.1:``port``."""
    client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10), RawClient())
    _cleanup(case, client)
    return client


async def tls_client(case, port: int, server_name: str, ca_path: str) -> RawClient:
    """A TLS connection (trusting ``ca_path``, SNI ``server_name``, HTTP/1.1) to 127.0.0.1:``port``."""
    with open(ca_path, "rb") as f:
        ca = ssl.Certificate.loadPEM(f.read())
    options = ssl.optionsForClientTLS(server_name, trustRoot=ca, acceptableProtocols=[b"http/1.1"])
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10))
    client = await connectProtocol(endpoint, RawClient())
    _cleanup(case, client)
    return client


@implementer(IPushProducer)
class Flood:
    """Writes up to ``total`` bytes into ``transport``, a chunk each time it asks for more.

    Registered as a streaming producer: the transport pauses it when its buffer is full,
    so ``written`` is what the peer and the kernel took, give or take one buffer.
    """

    def __init__(self, transport, total: int, chunk: int = 64 * 1024) -> None:
        self.transport = transport
        self.total = total
        self.block = b"\0" * chunk
        self.written = 0
        self.paused = False
        self.stopped = False

    def start(self) -> "Flood":
        self.transport.registerProducer(self, True)
        self._fill()
        return self

    def _fill(self) -> None:
        while not (self.paused or self.stopped) and self.written < self.total:
            if getattr(self.transport, "disconnecting", False) or not getattr(self.transport, "connected", True):
                self.stopped = True
                return
            self.transport.write(self.block)
            self.written += len(self.block)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._fill()

    def stopProducing(self) -> None:
        self.stopped = True
