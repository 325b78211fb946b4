"""One budget for N workers: worker 0 relays what each worker charged to the others.

With ``--workers N`` and ``[ratelimit] shared = true``, every worker enforces the full
budgets with its own tables, synchronously, as a single process would: the request path
never waits on anything here.  What makes the budget the node's is that every
``shared_sync_ms`` (50 ms) each worker sends what it charged since the last time (per
table, per key, in seconds: :mod:`hoodyproxy.limits._sharing`) and applies what the
others charged, so each worker's tables count the whole node's requests, at most one
exchange late.

Worker 0 (the twistd process, which starts the others) holds the exchange: a
:class:`SharedLimitsHub` listening on a UNIX socket, ``<data-dir>/ratelimit.sock``
(mode 0600; in a fresh 0700 temporary directory when that path is over 100 bytes, too
long for a socket address), removed when the node stops.  Each other worker runs a
:class:`SharedLimitsClient`.  A batch is one line of JSON, at most :data:`MAX_BATCH_KEYS`
keys (the rest follow in the next batch) and :data:`MAX_LINE` bytes.

**Why a relay and not a sum.**  The hub forwards each worker's line, as received, to every
other worker, and applies it to worker 0's own tables (worker 0 is a worker too; its own
batches go out from the same loop).  So every process decodes each other worker's line
once, worker 0 included, and nothing is re-encoded; a charge reaches the others one
interval and one hop after it was made.  Summing at the hub and sending each worker the
others' total would make worker 0 decode, add and encode N lines per interval (on the
core that also serves requests and the admin API) and add a second interval of lag, to
save bytes only when many workers charge the same keys: the copies are small lines on a
local socket.  ``bench/ratelimit_shared.py`` measures the cost.

**The bound.**  For one key of a limit of rate ``r`` and burst ``b``, ``N`` workers, and a
lag ``L`` (the longest time from a request admitted on one worker to its charge counted
on all others: one interval plus delivery, a few ms more than ``shared_sync_ms`` on a
node whose reactors keep up), the node admits in any window of ``t`` seconds at most::

    b + r*t + (N - 1) * (b + r*L)

where one process admits ``b + r*t`` and N workers that do not share ``N * (b + r*t)``.
Why: let ``v`` be the last admission in the window ``[s, s+t]``, on worker ``i``.  By
``v``, worker ``i`` had counted every request it admitted in ``[s, v]`` and every one
the others admitted in ``[s, v-L]``, and GCRA let it admit at ``v``, so those are at most
``(v-s)*r + b``; what the others admitted in ``(v-L, v]`` is at most ``b + r*L`` each, by
their own tables.  The excess is a one-off, not a rate (the long-run rate is ``r``): it
needs every worker hit within ``L`` of each other while its bucket is full, and requests
more than ``L`` apart see none.  The debt such a burst builds is paid back (a worker
refuses with the true wait) instead of forgiven, see :mod:`hoodyproxy.limits._sharing`.
With 2 workers, ``1/min`` and a burst of 10, concurrent requests get at most 20 (+ ``r*L``,
nothing at that rate), and the next one only 11 minutes later, when one process would
have let as many through; requests arriving more than ``L`` apart get exactly 10.  Failed
authentications are shared the same way (the overshoot of verifications running
concurrently in one worker, :meth:`Limiters.record_failed_auth`, comes on top).

The bound does not hold, and each worker counts alone (as with ``shared = false``):

- while a worker cannot reach worker 0: it logs one line, keeps limiting with the full
  budget from what it has counted so far, discards what it charges meanwhile (no queue
  grows), and retries with a backoff from 0.1 s doubling to 5 s; it logs again when
  connected.  Worker 0 going away means the node is stopping (its workers exit with it);
- for a worker just (re)started, whose tables start empty;
- for keys not shared: a table with :data:`MAX_PENDING_KEYS` keys waiting, or a key longer
  than :data:`MAX_KEY_LENGTH` characters (``unshared`` counts them);
- for the charges a worker that does not read its socket misses (the hub drops lines for
  it while its socket buffer is full, and logs it once per stall);
- for debt beyond ``N * (burst window + lag)``, with ``lag`` 20 intervals or 1 s: a worker
  that is further behind than that has it forgiven, as a loosened limit's debt is.

Charges are applied at their arrival, so a remote charge expires up to ``L`` later than
if it had been counted where it was made: the error is on the safe side.

Security: the socket is 0600 in a 0700 directory, and both ends check with
``SO_PEERCRED`` that the peer runs as the same user.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import tempfile

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from hoodyproxy.limits._limiters import Limiters
from hoodyproxy.limits._sharing import (MAX_BATCH_KEYS, MAX_KEY_LENGTH, MAX_LINE, MAX_PENDING_KEYS,
                                        decode_batch, encode_batch)

__all__ = ["MAX_BATCH_KEYS", "MAX_KEY_LENGTH", "MAX_LINE", "MAX_PENDING_KEYS",
           "SharedLimitsClient", "SharedLimitsHub", "close_unix", "listen_unix", "socket_path"]

log = Logger()

SOCKET_NAME = "ratelimit.sock"
#: Longest socket path used as is (the kernel's limit is 107 bytes).
MAX_SOCKET_PATH = 100


def socket_path(data_dir: str, name: str = SOCKET_NAME) -> tuple[str, str | None]:
    """Where worker 0 listens: ``(path, temporary directory to remove or None)``."""
    path = os.path.join(os.path.abspath(data_dir), name)
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path, None
    directory = tempfile.mkdtemp(prefix="hoodyproxy-")  # 0700
    return os.path.join(directory, name), directory


def listen_unix(reactor, path: str, factory):
    """Listen on the UNIX socket ``path`` (mode 0600), replacing one a crashed node left
    there (the data directory is locked: never a live node's).  Raises what
    ``listenUNIX`` raises."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    return reactor.listenUNIX(path, factory, mode=0o600)


def close_unix(port, connections, temp_dir: str | None, waits=()) -> defer.Deferred:
    """Stop listening on ``port`` (None: nothing), close ``connections`` (protocols), and
    once that and ``waits`` are done remove ``temp_dir`` (from :func:`socket_path`)."""
    waits = list(waits)
    if port is not None:
        waits.append(defer.maybeDeferred(port.stopListening))
    for connection in list(connections):
        connection.transport.loseConnection()

    def cleanup(result):
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        return result
    return defer.DeferredList(waits).addBoth(cleanup)


def _same_user(transport) -> bool:
    """Whether the process at the other end of a UNIX socket runs as this one's user."""
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is None:  # not Linux: the 0600 socket in a 0700 directory is the guard
        return True
    try:
        raw = transport.getHandle().getsockopt(socket.SOL_SOCKET, peercred, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", raw)
    return uid == os.getuid()


@implementer(IPushProducer)
class PauseFlag:
    """A connection registered as its own transport's producer only to know when the peer
    is not keeping up: ``paused`` while the transport's write buffer is full (what is not
    written meanwhile is the connection's to drop and count)."""

    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True


class _Line(PauseFlag, LineOnlyReceiver):
    """A line-per-batch connection that writes only while the peer keeps up."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def connectionMade(self) -> None:
        if not _same_user(self.transport):
            log.error("shared rate limits: refused a connection from another user's process")
            self.transport.loseConnection()
            return
        self.transport.registerProducer(self, True)
        self.ready()

    def ready(self) -> None:
        """The peer is who it should be."""

    def send(self, line: bytes) -> bool:
        """Write one line, or nothing (False) while the peer's buffer is full."""
        if self.paused or self.transport is None:
            return False
        self.transport.writeSequence((line, b"\n"))
        return True

    def lineLengthExceeded(self, line: bytes) -> None:
        log.error("shared rate limits: a line over {n} bytes; closing the connection", n=self.MAX_LENGTH)
        self.transport.loseConnection()


def _apply(limiters: Limiters, line: bytes, said: list[bool]) -> None:
    """Apply one received batch; a line that cannot be read is dropped (said once)."""
    try:
        _worker, charges = decode_batch(line)
    except ValueError as e:
        if not said[0]:
            said[0] = True
            log.error("shared rate limits: dropped a batch that could not be read ({problem})", problem=str(e))
        return
    limiters.apply_charges(charges)


class _Member(_Line):
    """The hub's end of one worker's connection: its first line says who it is."""

    worker: int | None = None

    def __init__(self, hub: SharedLimitsHub) -> None:
        self.hub = hub
        self.stalled = False

    def makeConnection(self, transport) -> None:
        self.hub.connections.add(self)
        super().makeConnection(transport)

    def lineReceived(self, line: bytes) -> None:
        if self.worker is None:
            try:
                hello = json.loads(line)
                self.worker = int(hello["hello"])
            except (ValueError, TypeError, KeyError):
                log.error("shared rate limits: a connection that is not a worker's; closing it")
                self.transport.loseConnection()
                return
            self.hub._joined(self)
            return
        self.hub._received(self, line)

    def deliver(self, line: bytes) -> None:
        if self.send(line):
            self.stalled = False
        elif not self.stalled:
            self.stalled = True
            self.hub.dropped += 1
            log.warn("shared rate limits: worker {n} is not reading; charges for it are dropped until it does",
                     n=self.worker)
        else:
            self.hub.dropped += 1

    def connectionLost(self, reason=None) -> None:
        self.hub._left(self)


class _HubFactory(protocol.Factory):
    noisy = False

    def __init__(self, hub: SharedLimitsHub) -> None:
        self.hub = hub

    def buildProtocol(self, addr):
        return _Member(self.hub)


class SharedLimitsHub(service.Service):
    """Worker 0's end: listens on ``path``, relays every worker's batches to the others,
    applies them to worker 0's ``limiters``, and sends worker 0's own every ``interval``."""

    def __init__(self, reactor, limiters: Limiters, path: str, interval: float,
                 temp_dir: str | None = None) -> None:
        self.reactor = reactor
        self.limiters = limiters
        self.path = path
        self.interval = interval
        self.temp_dir = temp_dir
        #: Every open connection, and those of workers that said who they are.
        self.connections: set[_Member] = set()
        self.members: list[_Member] = []
        self.port = None
        #: Lines not delivered to a worker that did not read; keys left out of a batch.
        self.dropped = 0
        self.skipped = 0
        self._said_bad = [False]
        self._gone: dict[_Member, defer.Deferred] = {}
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        try:
            self.port = listen_unix(self.reactor, self.path, _HubFactory(self))
        except CannotListenError as e:
            # The workers say they cannot reach it and limit alone; the node still serves.
            log.error("shared rate limits: cannot listen on {path} ({why}); each worker limits alone",
                      path=self.path, why=str(e.socketError))
        else:
            log.info("shared rate limits: worker 0 exchanges charges every {ms:g} ms on {path}",
                     ms=self.interval * 1000, path=self.path)
        self._loop.start(self.interval, now=False)  # drains worker 0's charges either way

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        port, self.port = self.port, None
        gone = [self._gone.setdefault(member, defer.Deferred()) for member in self.connections]
        return close_unix(port, self.connections, self.temp_dir, gone)

    def _joined(self, member: _Member) -> None:
        self.members.append(member)
        log.info("shared rate limits: worker {n} joined", n=member.worker)

    def _left(self, member: _Member) -> None:
        self.connections.discard(member)
        if member in self.members:
            self.members.remove(member)
            if self.running:
                log.info("shared rate limits: worker {n} left", n=member.worker)
        gone = self._gone.pop(member, None)
        if gone is not None:
            gone.callback(None)

    def _received(self, source: _Member, line: bytes) -> None:
        for member in self.members:
            if member is not source:
                member.deliver(line)
        _apply(self.limiters, line, self._said_bad)

    def _tick(self) -> None:
        charges = self.limiters.drain_charges()
        if charges and self.members:
            line, skipped = encode_batch(charges, 0)
            self.skipped += skipped
            for member in self.members:
                member.deliver(line)


class _Link(_Line):
    """A worker's connection to the hub."""

    def __init__(self, client: SharedLimitsClient) -> None:
        self.client = client

    def ready(self) -> None:
        self.send(json.dumps({"hello": self.client.worker}).encode())
        self.client._connected(self)

    def lineReceived(self, line: bytes) -> None:
        _apply(self.client.limiters, line, self.client._said_bad)

    def connectionLost(self, reason=None) -> None:
        self.client._lost(self, reason)


class _LinkFactory(protocol.Factory):
    noisy = False  # no line per attempt while worker 0 is away

    def __init__(self, client: SharedLimitsClient) -> None:
        self.client = client

    def buildProtocol(self, addr):
        return _Link(self.client)


class SharedLimitsClient(service.Service):
    """A worker's end (workers 1..N-1): sends its charges every ``interval`` to the hub at
    ``path`` and applies the others' as they come; reconnects with a capped backoff."""

    initial_delay = 0.1
    max_delay = 5.0
    connect_timeout = 5.0

    def __init__(self, reactor, limiters: Limiters, path: str, interval: float, worker: int) -> None:
        self.reactor = reactor
        self.limiters = limiters
        self.path = path
        self.interval = interval
        self.worker = worker
        self.link: _Link | None = None
        #: None before the first attempt ends, then whether the last one is connected.
        self.up: bool | None = None
        self.skipped = 0
        self._said_bad = [False]
        self._delay = self.initial_delay
        self._retry = None
        self._attempt: defer.Deferred | None = None
        self._closed: defer.Deferred | None = None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        self._connect()
        self._loop.start(self.interval, now=False)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        if self.link is not None:
            self._closed = defer.Deferred()
            self.link.transport.loseConnection()
            return self._closed
        return None

    def _connect(self) -> None:
        from twisted.internet.endpoints import UNIXClientEndpoint
        self._retry = None
        attempt = self._attempt = UNIXClientEndpoint(self.reactor, self.path,
                                                     timeout=self.connect_timeout).connect(_LinkFactory(self))

        def ended(result):
            self._attempt = None
            return result
        attempt.addBoth(ended).addErrback(lambda failure: self._lost(None, failure))

    def _connected(self, link: _Link) -> None:
        if not self.running:
            link.transport.loseConnection()
            return
        self.link = link
        self._delay = self.initial_delay
        if self.up is False:
            log.info("shared rate limits: worker {n} connected to worker 0 again; budgets are shared",
                     n=self.worker)
        else:
            log.info("shared rate limits: worker {n} connected to worker 0", n=self.worker)
        self.up = True

    def _lost(self, link: _Link | None, reason) -> None:
        if link is not None and self.link is not None and link is not self.link:
            return  # not the connection in use
        # The connection in use, or an attempt that failed (or was refused as another user's)
        self.link = None
        if self._closed is not None:
            closed, self._closed = self._closed, None
            closed.callback(None)
        if not self.running:
            return
        if self.up is not False:
            why = reason.getErrorMessage() if reason is not None else "closed"
            log.warn("shared rate limits: worker {n} cannot reach worker 0 ({why}); limiting alone "
                     "with the full budget, retrying", n=self.worker, why=why)
        self.up = False
        if self._retry is None:
            self._retry = self.reactor.callLater(self._delay, self._connect)
            self._delay = min(self._delay * 2, self.max_delay)

    def _tick(self) -> None:
        link = self.link
        if link is not None and link.paused:
            return  # the hub is behind: the charges wait (bounded) for the next batch
        charges = self.limiters.drain_charges()
        if not charges or link is None:
            return  # not connected: counted here alone, nothing queues up
        line, skipped = encode_batch(charges, self.worker)
        self.skipped += skipped
        link.send(line)
