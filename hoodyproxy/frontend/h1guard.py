"""The HTTP/1.1 connection's one timer, its refusals and its ways of closing.

:class:`H1Guard` is the half of :class:`hoodyproxy.frontend.h1.H1Connection` that bounds
what a client can make it wait for or hold.  One timer per connection keeps the idle
timeout and the request-head deadline (``[limits] request_head_timeout``: 408): it notes
activity and, when it fires, checks how long the connection has really been idle, so
nothing is scheduled or cancelled per request.  A refusal answers the request being
received and closes without reading it (lingering: what the client still sends is read
and dropped for a while, so that a reset does not destroy the answer); a close after the
last answer is aborted if the peer does not finish it within :data:`CLOSE_GRACE`.
"""

from __future__ import annotations

from twisted.logger import Logger

from hoodyproxy import errors
from hoodyproxy.frontend.http1 import LINGER_BYTES, LINGER_SECONDS, RequestTimeout, end_sending, error_response
from hoodyproxy.listening import unmapped_ip

log = Logger()

#: The longest a connection asked to close may take to do so (a TLS close waits for the
#: peer's close_notify).
CLOSE_GRACE = 15.0
#: While the node drains, a keep-alive connection idle this long is closed.  Not at once:
#: a client that has just had an answer may have its next request on the wire already,
#: and a close that crosses it loses that request (clients that do not retry, wrk among
#: them, count an error).  A connection busy with requests ends after its next answer,
#: which says ``Connection: close``.
DRAIN_IDLE = 0.5


class H1Guard:
    """The timer, refusing and closing of an HTTP/1.1 connection (a mixin: the connection
    provides ``factory``, ``gateway``, ``clock``, ``transport``, ``parser``, ``peer`` and
    the request state it names)."""

    closing = False
    lost = False
    _timer = None
    _head_started: float | None = None
    _linger_left = 0

    # -- the one timer -----------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        head_timeout = self.factory.head_timeout
        if head_timeout is not None and head_timeout < seconds:
            seconds = head_timeout
        self._timer = self.clock.callLater(max(seconds, 0.0), self._check_idle)

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _check_idle(self) -> None:
        self._timer = None
        if self.closing or self._tunnel is not None:
            return
        now = self.clock.seconds()
        head_left = None
        started, head_timeout = self._head_started, self.factory.head_timeout
        if started is not None and head_timeout is not None:
            head_left = started + head_timeout - now
            if head_left <= 0:
                self.refuse(RequestTimeout(reason="request head timeout"))
                return
        period = self._idle_period()
        active = self.active
        if period is None or (active is not None and active.body_complete) or "body" in self._paused:
            # A request is being answered (its response has its own timeout), or the
            # client is held back for the container's sake: not idle.
            self._last_activity = now
            self._sleep(head_left if head_left is not None else (period or 60.0))
            return
        idle = now - self._last_activity
        if idle >= period:
            self.close()
        else:
            self._sleep(period - idle if head_left is None else min(period - idle, head_left))

    def _idle_period(self) -> float | None:
        """The idle timeout; while the node drains, :data:`DRAIN_IDLE` for a connection
        with nothing received, waiting or being answered."""
        period = self.factory.timeout
        if (self.factory.draining and self.active is None and self.receiving is None and not self.waiting
                and self._head_started is None):
            return DRAIN_IDLE if period is None else min(period, DRAIN_IDLE)
        return period

    def drain(self) -> None:
        """The node drains: the next answer says ``Connection: close`` and the connection
        ends after it (see ``H1Request.last_on_connection``); an idle one ends once it has
        been idle :data:`DRAIN_IDLE` seconds."""
        if self.closing or self._tunnel is not None:
            return
        self._stop_timer()
        self._sleep(0.0)

    # -- refusing and closing ----------------------------------------------------------------

    def refuse(self, error: errors.GatewayError) -> None:
        """Answer ``error`` to the request being received, and end the connection without
        reading any more of it."""
        if self.closing:
            return
        if self.active is not None and (self.active.started or not self.active.finished):
            # An answer is being written: never one inside another.
            self.closing = True
            self.abort()
            return
        self.transport.writeSequence(error_response(error))
        self._audit_refusal(error)
        self.linger_close()

    def _audit_refusal(self, error: errors.GatewayError) -> None:
        gateway = self.gateway
        started = self._head_started
        took = self.clock.seconds() - started if started is not None else 0.0
        request = self.receiving
        hosts = request.requestHeaders.getRawHeaders(b"host") if request is not None else None
        method = uri = None
        version = "1.1"
        if request is not None:
            uri = request.uri.decode("latin-1") if request.uri else None
            try:
                method = self.parser.get_method().decode("latin-1") if request.uri else None
            except Exception:  # (no method parsed yet)
                method = None
            version = request.http_version
        gateway.emit_refusal({
            "time": gateway.now() - took, "client": unmapped_ip(getattr(self.peer, "host", "")),
            "host": hosts[0].decode("latin-1") if hosts else None, "route": None,
            "method": method, "path": uri, "http": version,
            "status": error.status, "reason": error.reason, "bytes_in": 0, "bytes_out": len(error.body())})

    def close(self) -> None:
        """End the connection once what is written is out (aborted if that takes more
        than :data:`CLOSE_GRACE`: a TLS close waits for the peer's close_notify)."""
        if self.closing:
            return
        self.closing = True
        self._head_started = None
        self._stop_timer()
        self._linger_left = LINGER_BYTES
        self._timer = self.clock.callLater(CLOSE_GRACE, self._time_is_up)
        if self._paused:
            # Reading may have been paused (requests waiting): the peer's close must be seen.
            self._paused.clear()
            self.transport.resumeProducing()
        self.transport.loseConnection()

    def linger_close(self) -> None:
        """Stop parsing and close lingering, as
        :meth:`hoodyproxy.frontend.http1.GuardedChannel.linger_close` does (and why)."""
        if self.closing:
            return
        self.closing = True
        self.persistent = False
        self._head_started = None
        self._linger_left = LINGER_BYTES
        self._stop_timer()
        self._timer = self.clock.callLater(LINGER_SECONDS, self._time_is_up)
        self.unregister_producer()
        self._paused.clear()
        end_sending(self.transport)

    def _drop(self, size: int) -> None:
        self._linger_left -= size
        if self._linger_left < 0:
            self.abort()

    def _time_is_up(self) -> None:
        """A close or a linger took too long."""
        self._timer = None
        self.abort()

    def abort(self) -> None:
        # (the one timer stays as it is: connectionLost cancels it)
        if self.transport is not None and not self.lost:
            self.closing = True
            self.transport.abortConnection()
