"""A byte tunnel between a client and a container after a protocol upgrade (WebSocket).

No framing: bytes flow both ways as they come, each side registered as the other's
producer (the pattern of ``twisted.protocols.portforward``) once the tunnel has carried
enough for backpressure to matter, until either side closes or nothing has moved for
``idle_timeout`` seconds.  A close by either side is the normal end of a WebSocket
(``closed_by`` says whose); only an idle timeout, a failure or a read-only violation is
a ``reason``.

An idle WebSocket is mostly memory, so a tunnel is slotted, registers no producers while
it is quiet, and gives a TLS client connection fresh memory BIOs (see
:func:`hoodyproxy.tls.context.release_idle_buffers`) when it starts, a few seconds after
each large piece of data (a memory BIO keeps the size of the largest burst it carried:
about 100 KiB more per WebSocket after one 64 KiB message) and at each idle check.
"""

from __future__ import annotations

from typing import Callable

from hoodyproxy.tls.context import release_idle_buffers

#: What a tunnel relays before each side is registered as the other's producer, each
#: write counted with room for its TLS record's overhead.  A transport pauses its producer
#: only when its write buffer passes 64 KiB (Twisted's ``bufferSize``), so below this
#: nothing would ever be paused; and a registration costs an idle tunnel about 1 KB
#: (producer wrappers, and the bigger attribute tables of both transports).
COUPLE_AFTER = 16 * 1024
_WRITE_OVERHEAD = 64
#: A piece of data at least this large grows the client's TLS buffers to match ...
BURST = 4096
#: ... so this many seconds later they are given back (whether or not more came since).
RELEASE_AFTER_BURST = 5.0


def _release_client_buffers(transport) -> None:
    """Shrink the TLS buffers of a client transport that is Twisted's TLS protocol."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is not None and not getattr(transport, "disconnecting", False):
        release_idle_buffers(get_handle())


class Tunnel:
    """Relays bytes between a client transport and an upstream connection."""

    __slots__ = ("client", "upstream", "clock", "idle_timeout", "on_close", "bytes_up", "bytes_down",
                 "last_activity", "closed", "closed_by", "_idle_call", "read_only", "_uncoupled_budget",
                 "_release_call", "frames")

    def __init__(self, client_transport, upstream, clock, idle_timeout: float,
                 on_close: Callable[[int, int, str | None], None], read_only: bool = False) -> None:
        self.client = client_transport
        self.upstream = upstream
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.on_close = on_close
        self.bytes_up = 0
        self.bytes_down = 0
        self.last_activity = clock.seconds()
        self.closed = False
        #: "client" or "container" when that side ended the tunnel normally.
        self.closed_by: str | None = None
        self._idle_call = None
        self._release_call = None
        #: Bytes left to relay before the producers are registered; None once they are.
        self._uncoupled_budget: int | None = COUPLE_AFTER
        self.read_only = None
        #: A running tap's frame readers (client side, container side), or None.
        self.frames = None
        if read_only:
            from hoodyproxy.upstream.readonly import ReadOnlyClientSide
            self.read_only = ReadOnlyClientSide(self._to_upstream, self._client_sent_data)

    def start(self, client_leftover: bytes, upstream_leftover: bytes) -> None:
        """Wire both sides together and deliver what each had already sent."""
        self.upstream.listener = self
        self._idle_call = self.clock.callLater(self.idle_timeout, self._check_idle)
        if upstream_leftover:
            self.upstream_data(upstream_leftover)
        if client_leftover:
            self.client_data(client_leftover)
        # The handshake's flights are in the client's memory BIOs for good otherwise.
        _release_client_buffers(self.client)

    def _relaying(self, size: int) -> None:
        """Count ``size`` bytes about to be written; couple the producers when due (before
        the write, so that the transport that receives it knows whom to pause)."""
        if size >= BURST and self._release_call is None and not self.closed:
            self._release_call = self.clock.callLater(RELEASE_AFTER_BURST, self._release_after_burst)
        budget = self._uncoupled_budget
        if budget is not None:
            budget -= size + _WRITE_OVERHEAD
            if budget >= 0:
                self._uncoupled_budget = budget
            else:
                self._couple()

    def _release_after_burst(self) -> None:
        self._release_call = None
        _release_client_buffers(self.client)

    def _couple(self) -> None:
        """Each side the other's producer: a full socket pauses reading from the other side."""
        self._uncoupled_budget = None
        self.client.registerProducer(self.upstream, True)
        if self.upstream.transport is not None:
            self.upstream.transport.registerProducer(self.client, True)

    # client side (installed as the client connection's dataReceived / connectionLost)
    def client_data(self, data: bytes) -> None:
        self.bytes_up += len(data)
        self.last_activity = self.clock.seconds()
        self._relaying(len(data))
        if self.frames is not None:
            self.frames[0].feed(data)
        if self.read_only is not None:
            self.read_only.feed(data)
        else:
            self._to_upstream(data)

    def _to_upstream(self, data: bytes) -> None:
        if self.upstream.transport is not None:
            self.upstream.transport.write(data)

    def _client_sent_data(self) -> None:
        """A read-only WebSocket's client sent a data frame: close with 1008, both sides."""
        from hoodyproxy.upstream.readonly import POLICY_VIOLATION, close_frame
        self.client.write(close_frame(POLICY_VIOLATION, b"read-only"))
        self._close("read-only websocket: client sent data")
        self.client.loseConnection()
        if self.upstream.transport is not None:
            self.upstream.transport.loseConnection()

    def client_lost(self, reason=None) -> None:
        if not self.closed:
            self.closed_by = "client"
        self._close(None)
        if self.upstream.transport is not None:
            self.upstream.transport.loseConnection()

    # upstream side (the UpstreamConnection calls its listener)
    def upstream_data(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self.last_activity = self.clock.seconds()
        self._relaying(len(data))
        if self.frames is not None:
            self.frames[1].feed(data)
        self.client.write(data)

    def upstream_end(self) -> None:
        if not self.closed:
            self.closed_by = "container"
        self._close(None)
        self.client.loseConnection()

    def upstream_failed(self, why: str, got_response: bool) -> None:
        self._close("container " + why)
        self.client.loseConnection()

    def _check_idle(self) -> None:
        self._idle_call = None
        if self.closed:
            return
        idle_for = self.clock.seconds() - self.last_activity
        if idle_for >= self.idle_timeout:
            self._close("idle timeout")
            self.client.loseConnection()
            if self.upstream.transport is not None:
                self.upstream.transport.loseConnection()
            return
        # Whatever the last burst grew, a quiet tunnel gives back.
        _release_client_buffers(self.client)
        self._idle_call = self.clock.callLater(self.idle_timeout - idle_for, self._check_idle)

    def _close(self, reason: str | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._uncoupled_budget = None  # whatever still arrives, no producers now
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self._release_call is not None:
            self._release_call.cancel()
            self._release_call = None
        self.on_close(self.bytes_up, self.bytes_down, reason)
