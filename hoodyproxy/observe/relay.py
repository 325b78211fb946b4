"""Taps across workers: worker 0 tells the other workers which taps run, they send back events.

With ``--workers N`` a tap's client is connected to worker 0 (the admin API's process),
but any worker may serve the exchanges it wants to see.  Worker 0 listens on a UNIX
socket, ``<data-dir>/tap.sock`` (0600; in a temporary 0700 directory when that path is
too long); each other worker connects to it at start and again after a loss.  Both
directions carry one JSON object per line:

- worker 0 to a worker: ``{"taps": [spec, ...]}`` (:meth:`TapSpec.to_json`), at connect
  and whenever a tap starts or ends; the worker matches its exchanges against them;
- a worker to worker 0: its events, each naming its tap, which worker 0 puts in that
  tap's queue like its own; and ``{"type": "dropped", "tap": id, "count": n}`` for events
  it dropped while its socket was full (worker 0 counts them in the tap's ``dropped``).

A worker never blocks and never buffers without bound: while its socket's buffer is
full (the transport paused it) it drops events and counts them.  While it is not
connected, it runs no taps.
"""

from __future__ import annotations

import json

from twisted.application import service
from twisted.internet.protocol import Factory, ReconnectingClientFactory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.logger import Logger

from hoodyproxy.limits.shared import PauseFlag, _same_user, close_unix, listen_unix, socket_path
from hoodyproxy.observe.tap import InvalidTap, TapSpec, dumps

log = Logger()

SOCKET_NAME = "tap.sock"
#: The longest line either side accepts (an event with two 1 MiB bodies in base64 fits).
MAX_LINE = 8 * 1024 * 1024


class _WorkerSide(LineOnlyReceiver):
    """Worker 0's end of one worker's connection."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def connectionMade(self) -> None:
        if not _same_user(self.transport):
            log.error("taps: refused a relay connection from another user's process")
            self.transport.loseConnection()
            return
        self.factory.relay.connections.add(self)
        self.sendLine(self.factory.relay.specs_line())

    def lineReceived(self, line: bytes) -> None:
        hub = self.factory.relay.hub
        try:
            event = json.loads(line)
            tap = hub.taps.get(event["tap"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            log.warn("taps: a worker sent a line that is not an event; ignored")
            return
        if tap is None:
            return  # (ended meanwhile)
        if event.get("type") == "dropped":
            count = event.get("count")
            if type(count) is int and count > 0:
                tap.dropped += count
                tap._dropped_since += count
            return
        tap.offer(event)

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn("taps: a worker sent a line over {n} bytes; its connection is dropped", n=MAX_LINE)
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.factory.relay.connections.discard(self)


class TapRelayServer(service.Service):
    """Worker 0's side: the running taps out to the workers, their events in."""

    def __init__(self, reactor, hub, data_dir: str) -> None:
        self.reactor = reactor
        self.hub = hub
        self.path, self.temp_dir = socket_path(data_dir, SOCKET_NAME)
        self.connections: set[_WorkerSide] = set()
        self.port = None

    def specs_line(self) -> bytes:
        return dumps({"taps": [spec.to_json() for spec in self.hub.specs.values()]}).rstrip(b"\n")

    def _changed(self, _specs) -> None:
        line = self.specs_line()
        for connection in list(self.connections):
            connection.sendLine(line)

    def startService(self) -> None:
        super().startService()
        factory = Factory.forProtocol(_WorkerSide)
        factory.relay = self
        try:
            self.port = listen_unix(self.reactor, self.path, factory)
        except Exception as e:
            log.error("taps: cannot listen on {path} ({why}); taps see worker 0's exchanges only",
                      path=self.path, why=str(e))
            return
        self.hub.on_change.append(self._changed)

    def stopService(self):
        super().stopService()
        if self._changed in self.hub.on_change:
            self.hub.on_change.remove(self._changed)
        port, self.port = self.port, None
        return close_unix(port, self.connections, self.temp_dir)


class _Worker0Side(PauseFlag, LineOnlyReceiver):
    """A worker's end: taps in, events out (dropped while the socket is full)."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def connectionMade(self) -> None:
        self.factory.resetDelay()
        self.dropped: dict[str, int] = {}
        self.transport.registerProducer(self, True)
        self.factory.client.connected(self)

    def lineReceived(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            specs = [TapSpec.from_relay(data) for data in message["taps"]]
        except (ValueError, KeyError, TypeError, InvalidTap, UnicodeDecodeError):
            log.warn("taps: worker 0 sent a line that is not a tap list; ignored")
            return
        self.factory.client.hub.set_specs(specs)

    def send(self, tap_id: str, event: dict) -> None:
        if self.paused:
            self.dropped[tap_id] = self.dropped.get(tap_id, 0) + 1
            return
        if self.dropped:
            for tap, count in self.dropped.items():
                self.transport.write(dumps({"type": "dropped", "tap": tap, "count": count}))
            self.dropped = {}
        self.transport.write(dumps(event))

    def connectionLost(self, reason=None) -> None:
        self.factory.client.lost(self)


class _Reconnecting(ReconnectingClientFactory):
    protocol = _Worker0Side
    maxDelay = 5.0
    initialDelay = 0.2


class TapRelayClient:
    """A worker's side: connects to worker 0's socket and keeps connecting."""

    def __init__(self, reactor, hub, path: str) -> None:
        self.reactor = reactor
        self.hub = hub
        self.path = path
        self.factory = _Reconnecting()
        self.factory.client = self
        self.protocol: _Worker0Side | None = None
        self.connector = None

    def start(self) -> None:
        self.connector = self.reactor.connectUNIX(self.path, self.factory, timeout=5)

    def stop(self) -> None:
        self.factory.stopTrying()
        if self.protocol is not None:
            self.protocol.transport.loseConnection()

    def connected(self, protocol: _Worker0Side) -> None:
        self.protocol = protocol
        self.hub.sink = protocol.send

    def lost(self, protocol: _Worker0Side) -> None:
        if self.protocol is protocol:
            self.protocol = None
            self.hub.sink = _nowhere
            self.hub.set_specs([])


def _nowhere(tap_id: str, event: dict) -> None:
    """Where a worker's events go while it is not connected to worker 0: nowhere."""
