"""``/api/v1/taps``: start a tap (its events stream back), list the running ones, end one.

``POST /api/v1/taps`` with a tap's match and capture (:class:`hoodyproxy.observe.tap.TapSpec`)
answers 200 with ``Content-Type: application/x-ndjson`` and a body that goes on for as
long as the tap runs: first a ``tap`` line with its id, then its events, last an ``end``
line (time limit, event limit, ``DELETE``, the node stopping).  A client that closes the
connection ends its tap.  ``GET /api/v1/taps`` lists the running taps, ``GET`` and
``DELETE /api/v1/taps/{id}`` show and end one.  Starting and ending a tap is written to
the audit log: who (the admin client's address and the admin token), what it matched
and captured, why it ended.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger

from hoodyproxy.observe.tap import InvalidTap, TapSpec, dumps

log = Logger()

#: What :meth:`TapEndpoints.dispatch` returns when it answers with a stream itself.
STREAMING = object()


class TapEndpoints:
    """The tap endpoints of the admin API, on a process's :class:`~hoodyproxy.observe.tap.TapHub`."""

    def __init__(self, hub, audit=None) -> None:
        self.hub = hub
        self.audit = audit

    def dispatch(self, api, request, rest: list[str]) -> tuple[int, Any]:
        from hoodyproxy.admin.api import ApiError, _json_body
        if not rest:
            api._allow(request, b"GET", b"POST")
            if request.method == b"GET":
                return 200, {"taps": self.hub.describe()}
            try:
                spec = TapSpec.from_json(_json_body(request), allow_unredacted=self.hub.allow_unredacted)
            except InvalidTap as e:
                raise ApiError(422, "invalid", e.message, field=e.field) from None
            if len(self.hub.taps) >= self.hub.max_taps:
                raise ApiError(429, "too_many_taps",
                               f"{self.hub.max_taps} taps are running already ([tap] max_taps)",
                               {b"Retry-After": b"1"})
            self._start(api, request, spec)
            return 200, STREAMING
        if len(rest) == 1:
            api._allow(request, b"GET", b"DELETE")
            tap = self.hub.taps.get(rest[0])
            if tap is None:
                raise ApiError(404, "not_found", "no such tap (it may have ended)")
            if request.method == b"GET":
                return 200, [t for t in self.hub.describe() if t["id"] == tap.id][0]
            self.hub.remove(tap.id, "deleted")
            return 204, None
        raise ApiError(404, "not_found", "no such endpoint")

    def _start(self, api, request, spec: TapSpec) -> None:
        from hoodyproxy.frontend.http1 import REASONS, SERVER
        client = _client_of(request)
        request.setResponseCode(200, REASONS.get(200))
        request.setHeader(b"Server", SERVER)
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Type", b"application/x-ndjson")
        # (nginx in front of the admin port: do not buffer the stream)
        request.setHeader(b"X-Accel-Buffering", b"no")
        state = {"open": True}

        def write(line: bytes) -> None:
            if state["open"]:
                request.write(line)

        def finish() -> None:
            if state["open"]:
                state["open"] = False
                try:
                    request.unregisterProducer()
                    request.finish()
                except Exception:
                    pass  # (the client went at the same moment)

        def ended(tap, reason: str) -> None:
            log.info("tap {tap} ended ({reason}; {events} events, {dropped} dropped)", tap=tap.id,
                     reason=reason, events=tap.events, dropped=tap.dropped)
            self._audit(request, client, spec, "tap_end", ended=reason, events=tap.events,
                        dropped=tap.dropped)

        tap = self.hub.add(spec, write, finish, on_end=ended)
        request.registerProducer(tap, True)

        def gone(_):
            state["open"] = False
            tap.end("client closed")
        request.notifyFinish().addBoth(gone)
        request.write(dumps({"type": "tap", **spec.to_json()}))
        log.info("tap {tap} started by {client}: {match}", tap=spec.id, client=client,
                 match=spec.to_json()["match"])
        self._audit(request, client, spec, "tap_start", match=spec.to_json()["match"],
                    capture=spec.to_json()["capture"], redact=spec.redact, ttl_s=spec.ttl)

    def _audit(self, request, client: str, spec: TapSpec, event: str, **fields) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record({"time": time.time(), "client": client, "host": None, "route": None,
                               "method": request.method.decode("latin-1"),
                               "path": request.path.decode("latin-1"), "status": 200, "bytes_in": 0,
                               "bytes_out": 0, "duration_ms": 0.0, "event": event, "tap": spec.id,
                               "by": "admin token", **fields})
        except Exception:
            log.failure("tap {tap}: the audit record could not be written", tap=spec.id)


def _client_of(request) -> str:
    peer = request.getClientAddress()
    return getattr(peer, "host", None) or str(peer)
