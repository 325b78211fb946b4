"""A byte tunnel between a client and a container after a protocol upgrade (WebSocket).

No framing: bytes flow both ways as they come, each side registered as the other's
producer (the pattern of ``twisted.protocols.portforward``) once the tunnel has carried
enough for backpressure to matter, until either side closes or nothing has moved for
``idle_timeout`` seconds.  A close by either side is the normal end of a WebSocket
(``closed_by`` says whose); only an idle timeout, a failure or a read-only violation is
a ``reason``.

When the node drains (:mod:`hoodyproxy.drain`), a WebSocket still open after
``[drain] websocket_grace`` is closed by the tunnel itself with 1001 (going away), a close
frame to each side.  A close frame may only go between two frames, so the tunnel keeps,
in each direction, where the current frame ends (:mod:`hoodyproxy.upstream.wsframes`: a
header read per frame, payloads skipped); a direction in the middle of a frame gets the
rest of that frame first, and nothing after the close frame.

An idle WebSocket is mostly memory, so a tunnel is slotted, registers no producers while
it is quiet, and when it starts has a TLS 1.3 client connection give its OpenSSL object
up for a small record layer of the gateway's own (about 24 KiB less per WebSocket: see
:mod:`hoodyproxy.tls.records`).  A connection that keeps OpenSSL (TLS 1.2, say) gets
fresh memory BIOs instead (see :func:`hoodyproxy.tls.context.release_idle_buffers`): when
the tunnel starts, a few seconds after each large piece of data (a memory BIO keeps the
size of the largest burst it carried: about 100 KiB more per WebSocket after one 64 KiB
message) and at each idle check; each of those tries the record layer again first.
"""

from __future__ import annotations

from typing import Callable

from hoodyproxy.tls.context import release_idle_buffers
from hoodyproxy.upstream.wsframes import scan

#: The close code a draining node's WebSockets get (RFC 6455 7.4.1: going away).
GOING_AWAY = 1001

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
    """Shrink the TLS state of a client transport that is Twisted's TLS protocol: a TLS 1.3
    connection gives its OpenSSL object up (``shed_openssl``), another its memory BIOs."""
    if getattr(transport, "disconnecting", False):
        return
    shed = getattr(transport, "shed_openssl", None)
    if shed is not None and shed():
        return
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is not None:
        release_idle_buffers(get_handle())


class Tunnel:
    """Relays bytes between a client transport and an upstream connection."""

    __slots__ = ("client", "upstream", "clock", "idle_timeout", "on_close", "bytes_up", "bytes_down",
                 "last_activity", "closed", "closed_by", "_idle_call", "read_only", "_uncoupled_budget",
                 "_release_call", "frames", "registry", "going_away", "_up", "_down", "_up_closed",
                 "_down_closed")

    def __init__(self, client_transport, upstream, clock, idle_timeout: float,
                 on_close: Callable[[int, int, str | None], None], read_only: bool = False,
                 registry: set | None = None) -> None:
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
        #: The set of open tunnels this one is in while open (the gateway's), or None.
        self.registry = registry
        #: Closing with 1001 (the node drains): each side gets a close frame at its next
        #: frame boundary, and nothing after it.
        self.going_away = False
        #: Where the frame being relayed ends, towards the container and towards the
        #: client: (payload bytes still to come, header bytes so far).
        self._up: tuple[int, bytes] = (0, b"")
        self._down: tuple[int, bytes] = (0, b"")
        self._up_closed = self._down_closed = False
        if read_only:
            from hoodyproxy.upstream.readonly import ReadOnlyClientSide
            self.read_only = ReadOnlyClientSide(self._to_upstream, self._client_sent_data)

    def start(self, client_leftover: bytes, upstream_leftover: bytes) -> None:
        """Wire both sides together and deliver what each had already sent."""
        self.upstream.listener = self
        self._idle_call = self.clock.callLater(self.idle_timeout, self._check_idle)
        if self.registry is not None:
            self.registry.add(self)
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
        if self.going_away:
            self._relay_until_boundary(data, upward=True)
        elif self.read_only is not None:
            # (what reaches the container is whole control frames, re-framed: always at a boundary)
            self.read_only.feed(data)
        else:
            need, head, _ = scan(*self._up, data)
            self._up = (need, head)
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
        if self.going_away:
            self._relay_until_boundary(data, upward=False)
            return
        need, head, _ = scan(*self._down, data)
        self._down = (need, head)
        self.client.write(data)

    def upstream_end(self) -> None:
        if not self.closed:
            self.closed_by = "container"
        self._close(None)
        self.client.loseConnection()

    def upstream_failed(self, why: str, got_response: bool) -> None:
        self._close("container " + why)
        self.client.loseConnection()

    # -- going away (the node drains) ------------------------------------------------------

    def go_away(self) -> None:
        """Close the WebSocket with 1001 to both sides, each at its next frame boundary."""
        if self.closed or self.going_away:
            return
        self.going_away = True
        self._relay_until_boundary(b"", upward=True)
        self._relay_until_boundary(b"", upward=False)

    def _relay_until_boundary(self, data: bytes, upward: bool) -> None:
        """Relay ``data`` up to the end of the frame in progress, then the close frame;
        nothing after it."""
        from hoodyproxy.upstream.readonly import close_frame, masked_frame
        if self.closed or (self._up_closed if upward else self._down_closed):
            return
        position = self._up if upward else self._down
        if self.read_only is not None and upward:
            position, data = (0, b""), b""  # (whole control frames only go up: at a boundary)
        need, head, offset = scan(*position, data, until_boundary=True)
        relay = self._to_upstream if upward else self.client.write
        if offset:
            relay(data[:offset])
        if need or head:
            if upward:
                self._up = (need, head)
            else:
                self._down = (need, head)
            return  # (the rest of the frame comes with the next data)
        code = GOING_AWAY.to_bytes(2, "big")
        if upward:
            self._up_closed = True
            relay(masked_frame(0x8, code))
        else:
            self._down_closed = True
            relay(close_frame(GOING_AWAY))
        if self._up_closed and self._down_closed:
            self._close("going away (node draining)")
            self.client.loseConnection()
            if self.upstream.transport is not None:
                self.upstream.transport.loseConnection()

    def abort(self) -> None:
        """End the tunnel now, both sides (the drain's timeout)."""
        self._close("going away (node draining): drain timeout")
        getattr(self.client, "abortConnection", self.client.loseConnection)()
        if self.upstream.transport is not None:
            self.upstream.transport.abortConnection()

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
        if self.registry is not None:
            self.registry.discard(self)
        self._uncoupled_budget = None  # whatever still arrives, no producers now
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self._release_call is not None:
            self._release_call.cancel()
            self._release_call = None
        self.on_close(self.bytes_up, self.bytes_down, reason)
