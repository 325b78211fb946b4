"""RFC 6455 frame headers read out of a WebSocket's bytes, for a tap: observation only.

Unlike :mod:`hoodyproxy.upstream.readonly` (autobahn's parser, which enforces), this
reader never refuses anything and never changes a byte: whatever the extensions,
reserved bits or opcodes, it reports each frame's opcode, fin bit, length and first
bytes, holding at most a frame header plus those bytes.
"""

from __future__ import annotations

from hoodyproxy.observe._guard import guarded


class FrameReader:
    """RFC 6455 frames out of one direction of a WebSocket's bytes, for observation only.

    It reads the frame headers (and unmasks at most ``keep`` bytes of each payload); it
    never refuses anything (whatever the extensions, reserved bits or opcodes: checking
    is not its job) and never holds more than a frame header plus ``keep`` bytes.
    ``on_frame(opcode, fin, length, data)`` is called once per frame, when its captured
    part is in (for a long frame, before the rest of its payload has passed).
    """

    __slots__ = ("keep", "on_frame", "_head", "_need", "_opcode", "_fin", "_length", "_mask", "_data",
                 "_reported", "broken", "failed")

    def __init__(self, keep: int, on_frame) -> None:
        self.keep = keep
        self.on_frame = on_frame
        self._head = b""
        self._need = 0  # payload bytes still to pass of the current frame (0: reading a header)
        self._opcode = self._length = 0
        self._fin = True
        self._mask = b""
        self._data = bytearray()
        self._reported = True
        self.broken = False
        self.failed = False

    @guarded
    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        pos, end = 0, len(data)
        while pos < end:
            if self._need:
                take = min(self._need, end - pos)
                room = self.keep - len(self._data)
                if room > 0:
                    self._data += data[pos:pos + min(room, take)]
                self._need -= take
                pos += take
                if self._need == 0 or len(self._data) >= self.keep:
                    self._report()
                continue
            before = len(self._head)
            chunk = data[pos:pos + 14 - before]  # (a frame header is at most 14 bytes)
            self._head += chunk
            size = self._parse_head()
            if size is None:
                pos += len(chunk)
                continue
            pos += size - before
            self._head = b""

    def _parse_head(self):
        head = self._head
        if len(head) < 2:
            return None
        first, second = head[0], head[1]
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(head) < 4:
                return None
            length = int.from_bytes(head[2:4], "big")
            offset = 4
        elif length == 127:
            if len(head) < 10:
                return None
            length = int.from_bytes(head[2:10], "big")
            offset = 10
        masked = second & 0x80
        if masked:
            if len(head) < offset + 4:
                return None
            self._mask = head[offset:offset + 4]
            offset += 4
        else:
            self._mask = b""
        self._fin = bool(first & 0x80)
        self._opcode = first & 0x0F
        self._length = length
        self._need = length
        self._data = bytearray()
        self._reported = False
        if length == 0:
            self._report()
        return offset

    def _report(self) -> None:
        if self._reported:
            return
        self._reported = True
        data = bytes(self._data)
        if self._mask and data:
            size = len(data)
            mask = (self._mask * (size // 4 + 1))[:size]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(mask, "big")).to_bytes(size, "big")
        self.on_frame(self._opcode, self._fin, self._length, data)
