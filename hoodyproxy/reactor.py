"""The gateway's reactor: Twisted's epoll reactor without a log context per I/O event.

``EPollReactor.doPoll`` runs every ready descriptor's ``doRead``/``doWrite`` through
``twisted.python.log.callWithLogger``, which pushes a context holding the descriptor's
``logPrefix`` (for legacy ``log.msg`` lines) and pops it again: two context switches
per proxied request (the client's read and the container's), about 4 % of a request's
CPU in the profiles of docs/performance.rst.  :class:`GatewayReactor` calls
``_doReadOrWrite`` directly.  Nothing else changes: ``_doReadOrWrite`` still catches
whatever a protocol raises, logs it (``log.err``) and disconnects that descriptor; such a
line says ``-`` where it said the protocol's prefix, and the gateway logs through
``twisted.logger`` with its own namespaces anyway.

An event that says only "readable" on a TCP connection whose reading is Twisted's own
(``tcp.Connection.doRead`` and ``_dataReceived``, no ``doRead`` of the instance's) is read
by ``doPoll`` itself, as those three methods would: ``recv`` of ``bufferSize``, the bytes
to the protocol, end of stream as ``ConnectionDone``, a failed read as ``ConnectionLost``
(``EWOULDBLOCK`` as nothing), and what the protocol raises logged and the connection
dropped.  That is two such events per proxied request, each three Python calls fewer.

It also holds the writes of the gateway's eager TCP transports while it dispatches one
poll's ready events and sends them when the batch is done (every 64 events at most):
:mod:`hoodyproxy.eagertcp` says why.  Writes made outside a batch (timers, threads'
calls) are sent at once, as before.

This is a subclass using the reactor's extension points (``doPoll``, ``_doReadOrWrite``,
``_selectables``) and what a TCP connection's read is made of (``socket``, ``bufferSize``,
``protocol``), not a patch: Twisted is left as it is, a class whose reading differs goes
Twisted's way, and a reactor chosen with ``twistd --reactor`` wins
(:func:`install_unless_chosen`).
"""

from __future__ import annotations

import errno
import sys
from select import EPOLLIN

from twisted.internet import tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.python import log

from hoodyproxy.eagertcp import BATCH, Cork


_DO_READ = tcp.Connection.doRead


def _reads_plainly(kind: type) -> bool:
    """Whether ``kind`` reads as Twisted's TCP connection does (``doRead`` and
    ``_dataReceived`` its own): then :meth:`GatewayReactor.doPoll` may do that read itself."""
    return (issubclass(kind, tcp.Connection) and kind.doRead is tcp.Connection.doRead
            and kind._dataReceived is tcp.Connection._dataReceived)


class GatewayReactor(EPollReactor):
    """EPollReactor dispatching I/O events without ``log.callWithLogger``, holding the
    eager transports' writes until a batch of events is dispatched (:class:`Cork`)."""

    def __init__(self) -> None:
        self.cork = Cork()
        #: Selectable classes by whether they read plainly (:func:`_reads_plainly`).
        self._plain: dict[type, bool] = {}
        super().__init__()

    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        cork = self.cork
        # One ready event (one client, a quiet node) has nothing to be sent with: its
        # writes go at once, before the bookkeeping that follows them.
        cork.active = len(events) > 1
        plain = self._plain
        try:
            for count, (fd, event) in enumerate(events, 1):
                selectable = selectables.get(fd)
                if selectable is not None:
                    # Only readable (most events): a TCP connection's read, done here as
                    # _doReadOrWrite, doRead and _dataReceived would do it, without their
                    # three calls.  A connection still connecting, or aborted, has a doRead
                    # of its own and goes their way.  (Its __dict__ is not looked at:
                    # reading it would make CPython give the object a dict of its own,
                    # 0.7 KiB more per idle connection.)
                    reads = False
                    if event == EPOLLIN:
                        reads = plain.get(selectable.__class__)
                        if reads is None:
                            reads = plain[selectable.__class__] = _reads_plainly(selectable.__class__)
                        if reads:
                            try:
                                reads = selectable.doRead.__func__ is _DO_READ
                            except AttributeError:  # (a function of the instance's)
                                reads = False
                    if not reads:
                        dispatch(selectable, fd, event)
                    else:
                        why = None
                        try:
                            try:
                                data = selectable.socket.recv(selectable.bufferSize)
                            except OSError as error:
                                if error.args[0] != errno.EWOULDBLOCK:
                                    why = CONNECTION_LOST
                            else:
                                if data:
                                    selectable.protocol.dataReceived(data)
                                else:
                                    why = CONNECTION_DONE
                        except BaseException:
                            why = sys.exc_info()[1]
                            log.err()
                        if why:
                            self._disconnectSelectable(selectable, why, True)
                if not count % BATCH:
                    cork.release()
        finally:
            cork.active = False
            cork.release()

    doIteration = doPoll


def install() -> GatewayReactor:
    """Install a :class:`GatewayReactor` as this process's reactor."""
    from twisted.internet.main import installReactor

    reactor = GatewayReactor()
    installReactor(reactor)
    return reactor


def install_unless_chosen() -> bool:
    """Install :class:`GatewayReactor` unless a reactor is installed already (``twistd
    --reactor``, a test runner, an embedding program); True if it was installed."""
    if "twisted.internet.reactor" in sys.modules:
        return False
    try:
        install()
    except Exception:  # (a platform without epoll: Twisted's default stays)
        return False
    return True
