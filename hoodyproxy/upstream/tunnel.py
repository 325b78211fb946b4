"""A byte tunnel between a client and a container after a protocol upgrade (WebSocket).

No framing: bytes flow both ways as they come, each side registered as the other's
producer (the pattern of ``twisted.protocols.portforward``), until either side closes or
nothing has moved for ``idle_timeout`` seconds.  A close by either side is the normal
end of a WebSocket (``closed_by`` says whose); only an idle timeout, a failure or a
read-only violation is a ``reason``.
"""

from __future__ import annotations

from typing import Callable


class Tunnel:
    """Relays bytes between a client transport and an upstream connection."""

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
        self.read_only = None
        if read_only:
            from hoodyproxy.upstream.readonly import ReadOnlyClientSide
            self.read_only = ReadOnlyClientSide(self._to_upstream, self._client_sent_data)

    def start(self, client_leftover: bytes, upstream_leftover: bytes) -> None:
        """Wire both sides together and deliver what each had already sent."""
        self.upstream.listener = self
        self.client.registerProducer(self.upstream, True)
        self.upstream.transport.registerProducer(self.client, True)
        self._idle_call = self.clock.callLater(self.idle_timeout, self._check_idle)
        if upstream_leftover:
            self.upstream_data(upstream_leftover)
        if client_leftover:
            self.client_data(client_leftover)

    # client side (installed as the client connection's dataReceived / connectionLost)
    def client_data(self, data: bytes) -> None:
        self.bytes_up += len(data)
        self.last_activity = self.clock.seconds()
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
        self._idle_call = self.clock.callLater(self.idle_timeout - idle_for, self._check_idle)

    def _close(self, reason: str | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        self.on_close(self.bytes_up, self.bytes_down, reason)
