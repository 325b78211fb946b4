"""What a tap costs the request path: the ``tap`` scenario of ``python -m bench``.

One gateway (1 worker, the TLS small row's settings) in three states, interleaved over
rounds: no tap (``off``), a tap running on another container (``elsewhere``: every
exchange is matched against it, none is captured), and a tap matching every exchange
with its heads and 4 KiB of each body (``all``), its client reading and discarding the
NDJSON stream.  A tap is opened before its load run and ended (``DELETE``) after it, so
the ``off`` state has no tap at all.  docs/observe.rst, "Never slowing the traffic".
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from typing import Callable

STATES = ("off", "elsewhere", "all")
LABELS = {
    "off": "no tap",
    "elsewhere": "a tap on another container",
    "all": "a tap capturing every exchange (heads, 4 KiB of bodies)",
}
#: A container no request of the run goes to.
OTHER_CONTAINER = "0" * 24
#: An event line longer than this is read in pieces (and counted once, at its end).
MAX_LINE = 1 << 20


class TapError(RuntimeError):
    """A tap that could not be opened (the message says why)."""


def tap_request(state: str) -> dict | None:
    """The ``POST /api/v1/taps`` body for ``state``; None for no tap."""
    if state == "off":
        return None
    match = {"container": OTHER_CONTAINER} if state == "elsewhere" else {}
    # every event of a run must reach the client: the default max_events could end the tap
    return {"match": match, "capture": {"headers": True, "body_bytes": 4096}, "ttl_s": 3600,
            "max_events": 10_000_000}


class TapConsumer:
    """A tap opened on a node's admin API, its stream read line by line and discarded in
    a thread until :meth:`stop`; every blocking read has a timeout."""

    def __init__(self, admin_port: int, token: str, body: dict, timeout: float = 60.0) -> None:
        self.admin_port, self.token, self.timeout = admin_port, token, timeout
        self.lines = self.bytes = 0
        self.end: dict | None = None
        self.error = ""
        self.conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=timeout)
        try:
            self.conn.connect()
            self.sock = self.conn.sock
            self.conn.request("POST", "/api/v1/taps", body=json.dumps(body),
                              headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            self.response = self.conn.getresponse()
            if self.response.status != 200:
                raise TapError(f"POST /api/v1/taps: {self.response.status} "
                               f"{self.response.read(500).decode('utf-8', 'replace').strip()}")
            first = json.loads(self.response.readline(MAX_LINE))
            if first.get("type") != "tap" or not first.get("id"):
                raise TapError(f"POST /api/v1/taps: the first line is not the tap: {str(first)[:200]}")
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.conn.close()
            raise TapError(f"POST /api/v1/taps failed: {e}") from None
        except BaseException:
            self.conn.close()
            raise
        self.id: str = first["id"]
        self.thread = threading.Thread(target=self._read, name=f"tap {self.id}", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                line = self.response.readline(MAX_LINE)
                if not line:
                    return
                self.bytes += len(line)
                if line.endswith(b"\n"):
                    self.lines += 1
                    if b'"type":"end"' in line[:20]:
                        self.end = json.loads(line)
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.error = str(e) or type(e).__name__

    def stop(self) -> dict:
        """End the tap (``DELETE``), wait for its stream to end (bounded), close the
        connection; the figures of its run: events sent and read, bytes, dropped."""
        deleted = None
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
            try:
                conn.request("DELETE", f"/api/v1/taps/{self.id}", headers={"Authorization": f"Bearer {self.token}"})
                resp = conn.getresponse()
                resp.read()
                deleted = resp.status
            finally:
                conn.close()
        except (OSError, http.client.HTTPException) as e:
            self.error = self.error or f"DELETE: {e}"
        self.thread.join(15)
        if self.thread.is_alive():
            # a stream that did not end: closing the socket ends both the read and the tap
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.thread.join(5)
        self.conn.close()
        end = self.end or {}
        result = {"tap_events_read": max(0, self.lines - (1 if self.end else 0)), "tap_bytes": self.bytes,
                  "tap_events": end.get("events"), "tap_dropped": end.get("dropped"), "tap_deleted": deleted}
        if self.error:
            result["tap_error"] = self.error[:200]
        return result


def measured_with_tap(gateway, state: str, run: Callable[[], dict], measure: Callable[[int, Callable], dict]) -> dict:
    """``measure(gateway.pid, run)`` (bench.loadgen.measured) with ``state``'s tap running."""
    body = tap_request(state)
    if body is None:
        return measure(gateway.pid, run)
    consumer = TapConsumer(gateway.admin_port, gateway.token, body)
    try:
        result = measure(gateway.pid, run)
    finally:
        figures = consumer.stop()
    result.update(figures)
    return result
