"""Draining: stop taking new work, let what is in flight finish, then let the process end.

``SIGTERM`` (twistd's ``reactor.stop``; a worker's closed stdin) drains every process
the same way, before anything else stops:

- the listening ports stop accepting (the node's :meth:`~hoodyproxy.service.NodeService.stopService`
  closes them first; the socket itself lives on while another process holds it);
- HTTP/1.1: each connection's next answer says ``Connection: close`` and the connection
  ends after it; one idle for :data:`~hoodyproxy.frontend.h1guard.DRAIN_IDLE` seconds ends then;
- HTTP/2 and HTTP/3: a GOAWAY notice, then a GOAWAY naming the last request served; the
  connection ends when those requests have;
- requests in flight finish as usual;
- WebSockets get ``[drain] websocket_grace`` seconds to end by themselves, then the
  gateway closes them with 1001 (going away) to the client and to the container;
- after ``[drain] timeout`` seconds whatever is left is cut.

The drain is over when nothing is left: :meth:`Drain.start`'s Deferred fires, and the
process goes on stopping.  Each frontend says what it has left (``remaining()``), checked
every :data:`POLL` seconds: a bounded wait, no callback threaded through every place a
connection can end.
"""

from __future__ import annotations

from typing import Iterable, Protocol

from twisted.internet import defer
from twisted.logger import Logger

__all__ = ["Drain", "Drainable", "POLL"]

log = Logger()

#: Seconds between two looks at what is left.
POLL = 0.1
#: After the timeout cut the connections, at most this many seconds for them to be gone
#: (an aborted connection ends on the next reactor turn; its request's audit line with it).
CUT_WAIT = 1.0


class Drainable(Protocol):
    """A frontend that can drain (the HTTPS factory, the HTTP/3 listener)."""

    def drain(self) -> None:
        """Take no new request; end connections once their requests are answered."""

    def remaining(self) -> int:
        """How many connections are still open."""

    def abort(self) -> None:
        """End every connection now (the drain's timeout)."""


class Drain:
    """One process's drain: its frontends, its WebSocket tunnels, two deadlines."""

    def __init__(self, reactor, frontends: Iterable[Drainable], tunnels: set, *, timeout: float,
                 websocket_grace: float, poll: float = POLL) -> None:
        self.reactor = reactor
        self.frontends = list(frontends)
        #: The open tunnels (the gateway's set: a tunnel leaves it when it closes).
        self.tunnels = tunnels
        self.timeout = timeout
        self.websocket_grace = websocket_grace
        self.poll = poll
        self.started: float | None = None
        self.done: defer.Deferred | None = None
        #: True once the timeout cut what was left.
        self.cut = False
        self._calls: list = []

    def remaining(self) -> tuple[int, int]:
        """(connections, WebSockets) still open."""
        return sum(f.remaining() for f in self.frontends), len(self.tunnels)

    def start(self) -> defer.Deferred:
        """Begin (once); the Deferred fires with True when nothing was left, False when the
        timeout cut what was."""
        if self.done is not None:
            return self.done
        self.done = defer.Deferred()
        self.started = self.reactor.seconds()
        for frontend in self.frontends:
            frontend.drain()
        connections, websockets = self.remaining()
        if connections or websockets:
            log.info("hoodyproxy draining: {connections} connections and {websockets} WebSockets open; "
                     "WebSockets are closed after {grace:g} s, the rest cut after {timeout:g} s",
                     connections=connections, websockets=websockets, grace=self.websocket_grace,
                     timeout=self.timeout)
        self._calls = [self.reactor.callLater(self.websocket_grace, self._grace_over),
                       self.reactor.callLater(self.timeout, self._time_is_up)]
        self._check()
        return self.done

    def _grace_over(self) -> None:
        tunnels = list(self.tunnels)
        if tunnels:
            log.info("hoodyproxy draining: closing {n} WebSockets (1001 going away)", n=len(tunnels))
        for tunnel in tunnels:
            tunnel.go_away()

    def _check(self) -> None:
        if self.done is None or self.done.called:
            return
        connections, websockets = self.remaining()
        if not connections and not websockets:
            self._finish(not self.cut)
            return
        self._calls.append(self.reactor.callLater(self.poll, self._check))

    def _time_is_up(self) -> None:
        connections, websockets = self.remaining()
        log.warn("hoodyproxy drain timeout ({timeout:g} s): cutting {connections} connections and "
                 "{websockets} WebSockets", timeout=self.timeout, connections=connections, websockets=websockets)
        self.cut = True
        for frontend in self.frontends:
            frontend.abort()
        for tunnel in list(self.tunnels):
            tunnel.abort()
        # (the poll sees them gone; if some never go, the drain ends anyway)
        self._calls.append(self.reactor.callLater(CUT_WAIT, self._finish, False))

    def _finish(self, clean: bool) -> None:
        if self.done is None or self.done.called:
            return
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        if clean and self.started is not None:
            log.info("hoodyproxy drained in {took:.1f} s", took=self.reactor.seconds() - self.started)
        done, self.done = self.done, defer.succeed(clean)
        done.callback(clean)
