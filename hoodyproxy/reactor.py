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

It also holds the writes of the gateway's eager TCP transports while it dispatches one
poll's ready events and sends them when the batch is done (every 64 events at most):
:mod:`hoodyproxy.eagertcp` says why.  Writes made outside a batch (timers, threads'
calls) are sent at once, as before.

This is a subclass using the reactor's documented extension points (``doPoll``,
``_doReadOrWrite``, ``_selectables``), not a patch: Twisted is left as it is, and a
reactor chosen with ``twistd --reactor`` wins (:func:`install_unless_chosen`).
"""

from __future__ import annotations

import errno
import sys

from twisted.internet.epollreactor import EPollReactor

from hoodyproxy.eagertcp import BATCH, Cork


class GatewayReactor(EPollReactor):
    """EPollReactor dispatching I/O events without ``log.callWithLogger``, holding the
    eager transports' writes until a batch of events is dispatched (:class:`Cork`)."""

    def __init__(self) -> None:
        self.cork = Cork()
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
        try:
            for count, (fd, event) in enumerate(events, 1):
                selectable = selectables.get(fd)
                if selectable is not None:
                    dispatch(selectable, fd, event)
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
