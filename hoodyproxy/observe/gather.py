"""Metrics across workers: worker 0 asks every worker for its numbers when it is scraped.

With ``--workers N`` each worker counts its own exchanges
(:mod:`hoodyproxy.observe.metrics`); a scrape reaches worker 0, the admin API's process,
which adds them up.  Worker 0 listens on a UNIX socket, ``<data-dir>/metrics.sock``
(0600; in a temporary 0700 directory when that path is too long; both ends check that the
peer runs as the same user); each other worker connects at start and again after a loss,
and says who it is (its number and pid) with its first snapshot.  A scrape sends
``{"ask": n}`` to every connected worker and each answers with one line,
``{"worker": k, "pid": p, "answer": n, "snapshot": {...}}``.  :meth:`MetricsHub.gather`
fires when every worker asked has answered, or after :attr:`MetricsHub.timeout` with the
last snapshot of those that did not: a scrape never blocks the reactor, and a stuck
worker costs it a second, not the whole answer.

Counters never go back.  Worker 0 keeps each worker's last snapshot: a worker that died
still adds its counters to the totals (its gauges, connections and requests in flight,
leave at once), and when a new process takes its number the old one's counters are folded
into a retired total that every later scrape adds.  What a worker counted after the last
snapshot worker 0 has of it dies with it (a scrape just before a SIGKILL loses nothing).
"""

from __future__ import annotations

import json
import os

from twisted.application import service
from twisted.internet import defer
from twisted.internet.protocol import Factory, ReconnectingClientFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from hoodyproxy.limits.shared import _same_user, close_unix, listen_unix, socket_path
from hoodyproxy.observe.metrics import Snapshot, counters_only, merge, total

log = Logger()

SOCKET_NAME = "metrics.sock"
#: The longest line either side accepts (a snapshot with tens of thousands of series fits).
MAX_LINE = 64 * 1024 * 1024


def _line(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


class _Known:
    """What worker 0 knows of one worker number: the process behind it and its last numbers."""

    __slots__ = ("pid", "snapshot", "connection")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.snapshot: Snapshot = {}
        self.connection: _WorkerSide | None = None


class _Gathering:
    """One scrape's question: the workers asked that have not answered yet."""

    def __init__(self, ask: int, pending: set[int]) -> None:
        self.ask = ask
        self.pending = pending
        self.fresh: set[int] = set()
        self.done: defer.Deferred = defer.Deferred()
        self.timer = None


class _WorkerSide(LineOnlyReceiver):
    """Worker 0's end of one worker's connection."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def connectionMade(self) -> None:
        if not _same_user(self.transport):
            log.error("metrics: refused a connection from another user's process")
            self.transport.loseConnection()
            return
        self.factory.hub.connections.add(self)

    def lineReceived(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            number, pid, snapshot = message["worker"], message["pid"], message["snapshot"]
            if type(number) is not int or type(pid) is not int or not isinstance(snapshot, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            log.warn("metrics: a worker sent a line that is not a snapshot; ignored")
            return
        self.factory.hub.received(self, number, pid, snapshot, message.get("answer"))

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn("metrics: a worker sent a line over {n} bytes; its connection is dropped", n=MAX_LINE)
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.factory.hub.lost(self)


class MetricsHub(service.Service):
    """Worker 0's side: the workers' last snapshots, and asking them afresh."""

    #: Seconds a scrape waits for the workers' answers.
    timeout = 1.0

    def __init__(self, reactor, data_dir: str) -> None:
        self.reactor = reactor
        self.path, self.temp_dir = socket_path(data_dir, SOCKET_NAME)
        self.connections: set[_WorkerSide] = set()
        self.workers: dict[int, _Known] = {}
        #: The counters of worker processes replaced since, and their requests by number.
        self.retired: Snapshot = {}
        self.retired_requests: dict[int, float] = {}
        self._asks = 0
        self._gatherings: list[_Gathering] = []
        self.port = None

    def startService(self) -> None:
        super().startService()
        factory = Factory.forProtocol(_WorkerSide)
        factory.hub = self
        try:
            self.port = listen_unix(self.reactor, self.path, factory)
        except Exception as e:
            log.error("metrics: cannot listen on {path} ({why}); /metrics shows worker 0's numbers only",
                      path=self.path, why=str(e))

    def stopService(self):
        super().stopService()
        for gathering in list(self._gatherings):
            self._finish(gathering)
        port, self.port = self.port, None
        return close_unix(port, self.connections, self.temp_dir)

    # -- what the workers say -------------------------------------------------------------

    def received(self, connection: _WorkerSide, number: int, pid: int, snapshot: Snapshot,
                 answer: int | None) -> None:
        known = self.workers.get(number)
        if known is not None and known.pid != pid:
            self._retire(number, known)
            known = None
        if known is None:
            known = self.workers[number] = _Known(pid)
        known.snapshot = snapshot
        known.connection = connection
        if answer is not None:
            for gathering in list(self._gatherings):
                if gathering.ask <= answer and number in gathering.pending:
                    gathering.pending.discard(number)
                    gathering.fresh.add(number)
                    if not gathering.pending:
                        self._finish(gathering)

    def lost(self, connection: _WorkerSide) -> None:
        self.connections.discard(connection)
        for number, known in self.workers.items():
            if known.connection is connection:
                known.connection = None
                for gathering in list(self._gatherings):
                    gathering.pending.discard(number)
                    if not gathering.pending:
                        self._finish(gathering)

    def _retire(self, number: int, known: _Known) -> None:
        """A new process took ``number``: the old one's counters count on, as retired."""
        self.retired = merge(self.retired, counters_only(known.snapshot))
        self.retired_requests[number] = (self.retired_requests.get(number, 0)
                                         + total(known.snapshot, "hoodyproxy_requests_total"))
        if known.connection is not None:
            known.connection.transport.loseConnection()

    # -- a scrape -------------------------------------------------------------------------

    def gather(self) -> defer.Deferred:
        """Ask every connected worker; fires with :meth:`current` once all answered or
        :attr:`timeout` passed."""
        self._asks += 1
        ask = self._asks
        asked = {number for number, known in self.workers.items() if known.connection is not None}
        gathering = _Gathering(ask, set(asked))
        if not asked:
            return defer.succeed(self.current(gathering.fresh))
        self._gatherings.append(gathering)
        line = _line({"ask": ask})
        for number in asked:
            self.workers[number].connection.sendLine(line)
        gathering.timer = self.reactor.callLater(self.timeout, self._finish, gathering)
        return gathering.done

    def _finish(self, gathering: _Gathering) -> None:
        if gathering in self._gatherings:
            self._gatherings.remove(gathering)
        if gathering.timer is not None and gathering.timer.active():
            gathering.timer.cancel()
        gathering.timer = None
        if not gathering.done.called:
            gathering.done.callback(self.current(gathering.fresh))

    def current(self, fresh: set[int] = frozenset()) -> tuple[list[Snapshot], dict[int, float], int]:
        """(the snapshots to add up, requests per worker number, workers with fresh
        numbers): the retired counters, each worker's last counters, and the gauges of
        those still connected.  (Adding them up is left to the caller: it may do it off
        the reactor's thread, since nothing here changes them afterwards.)"""
        parts = [self.retired]
        requests = dict(self.retired_requests)
        for number, known in self.workers.items():
            snapshot = known.snapshot if known.connection is not None else counters_only(known.snapshot)
            parts.append(snapshot)
            requests[number] = requests.get(number, 0) + total(known.snapshot, "hoodyproxy_requests_total")
        return parts, requests, len(fresh)


class _Worker0Side(LineOnlyReceiver):
    """A worker's end: answers each ask with its snapshot."""

    delimiter = b"\n"
    MAX_LENGTH = 1024

    def connectionMade(self) -> None:
        self.factory.resetDelay()
        self.factory.reporter.protocol = self
        self.send(None)

    def lineReceived(self, line: bytes) -> None:
        try:
            ask = json.loads(line)["ask"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            log.warn("metrics: worker 0 sent a line that is not a question; ignored")
            return
        self.send(ask if type(ask) is int else None)

    def send(self, answer: int | None) -> None:
        reporter = self.factory.reporter
        try:
            snapshot = reporter.snapshot()
        except Exception:
            log.failure("metrics: this worker's snapshot failed")
            snapshot = {}
        self.sendLine(_line({"worker": reporter.number, "pid": os.getpid(), "answer": answer,
                             "snapshot": snapshot}))

    def connectionLost(self, reason=None) -> None:
        if self.factory.reporter.protocol is self:
            self.factory.reporter.protocol = None


class _Reconnecting(ReconnectingClientFactory):
    protocol = _Worker0Side
    maxDelay = 5.0
    initialDelay = 0.2


class MetricsReporter:
    """A worker's side: connects to worker 0's socket (and keeps connecting) and answers
    with ``snapshot()``."""

    def __init__(self, reactor, path: str, number: int, snapshot) -> None:
        self.reactor = reactor
        self.path = path
        self.number = number
        self.snapshot = snapshot
        self.factory = _Reconnecting()
        self.factory.reporter = self
        self.protocol: _Worker0Side | None = None

    def start(self) -> None:
        self.reactor.connectUNIX(self.path, self.factory, timeout=5)

    def stop(self) -> None:
        self.factory.stopTrying()
        if self.protocol is not None:
            self.protocol.transport.loseConnection()
