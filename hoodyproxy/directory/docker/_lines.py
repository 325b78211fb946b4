"""A bounded line buffer: bytes in as they arrive, whole lines out (the events stream's framing).

The Engine API's ``/events`` answer is one JSON document per line, sent in chunks that
split lines anywhere (a chunk may end mid-line, mid-character, or hold many lines).  The
buffer keeps the unfinished tail and hands out complete lines only; a line that grows
past ``max_line`` bytes raises :class:`LineTooLong` instead of growing without bound.
"""

from __future__ import annotations

#: Longest event line accepted: an event is a few hundred bytes plus the container's
#: labels; a megabyte is far more than any real one.
MAX_LINE = 1024 * 1024


class LineTooLong(ValueError):
    """A line grew past the buffer's bound without ending."""


class LineBuffer:
    """Splits a byte stream on ``\\n`` (a ``\\r`` before it is dropped); empty lines are skipped."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._tail = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes, in order; raises LineTooLong when the unfinished
        line is longer than ``max_line``."""
        self._tail += data
        end = self._tail.rfind(b"\n")
        if end < 0:
            if len(self._tail) > self.max_line:
                raise LineTooLong(f"a line longer than {self.max_line} bytes")
            return []
        complete, self._tail = bytes(self._tail[:end]), self._tail[end + 1:]
        lines = [line.rstrip(b"\r") for line in complete.split(b"\n")]
        if len(self._tail) > self.max_line or any(len(line) > self.max_line for line in lines):
            raise LineTooLong(f"a line longer than {self.max_line} bytes")
        return [line for line in lines if line.strip()]

    @property
    def pending(self) -> int:
        """Bytes of the unfinished line held."""
        return len(self._tail)
