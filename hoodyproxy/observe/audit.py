"""The audit trail: one JSON line per exchange, through twisted.logger.

Records go to their own :class:`twisted.logger.LogPublisher` (namespace
``hoodyproxy.audit``), not the global one, so an audit line never lands in the
operator's diagnostic log and the diagnostic log never lands in the audit file.  The
file observer writes exactly the record's fields as one JSON object per line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO

from twisted.logger import Logger, LogPublisher
from zope.interface import implementer

from hoodyproxy.interfaces import IAuditSink


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + ".%03dZ" % int((ts % 1) * 1000)


class JSONLinesObserver:
    """A log observer writing each event's ``audit`` record as one JSON line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict) -> None:
        record = event.get("audit")
        if record is None:
            return
        self.stream.write(json.dumps(record, separators=(",", ":")) + "\n")


@implementer(IAuditSink)
class AuditLog:
    """Emits audit records through a twisted.logger Logger of its own."""

    def __init__(self, path: str | None) -> None:
        """``path`` is a file (appended, created 0600) or ``-`` for stdout."""
        self.path = path
        if path in (None, "-"):
            self._stream: IO[str] = sys.stdout
            self._owned = False
        else:
            directory = os.path.dirname(path)
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._stream = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
            self._owned = True
        self.publisher = LogPublisher(JSONLinesObserver(self._stream))
        self.log = Logger(namespace="hoodyproxy.audit", observer=self.publisher)

    def record(self, entry: dict) -> None:
        entry["time"] = _iso(entry["time"])
        self.log.info("audit", audit=entry)

    def close(self) -> None:
        if self._owned:
            self._stream.close()
