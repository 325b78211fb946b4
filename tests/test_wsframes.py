"""Where WebSocket frames end (hoodyproxy.upstream.wsframes): the tunnel closes with 1001
only between two frames, so the boundaries must be found in any stream, however it is cut."""

from __future__ import annotations

import os
import struct

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from hoodyproxy.upstream.wsframes import BOUNDARY, header_size, scan


def frame(payload: bytes, masked: bool, opcode: int = 2) -> bytes:
    n = len(payload)
    second = 0x80 if masked else 0
    if n < 126:
        head = bytes([0x80 | opcode, second | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, second | 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, second | 127]) + struct.pack("!Q", n)
    return head + (os.urandom(4) if masked else b"") + payload


#: Payload sizes: short, and around the 16-bit and 64-bit extended lengths' thresholds.
sizes = st.integers(min_value=0, max_value=300) | st.sampled_from([125, 126, 127, 65535, 65536, 70000])
frames = st.lists(st.tuples(sizes, st.booleans()), max_size=6)


def stream_of(items) -> tuple[bytes, list[int]]:
    """The bytes of the frames and the offset at which each ends."""
    data, ends = b"", []
    for size, masked in items:
        data += frame(bytes(range(256)) * (size // 256) + bytes(size % 256), masked)
        ends.append(len(data))
    return data, ends


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    pieces, start = [], 0
    for p in points + [len(data)]:
        pieces.append(data[start:p])
        start = p
    return pieces


class ScanTests(unittest.SynchronousTestCase):

    @settings(deadline=None, max_examples=100)
    @given(frames, st.lists(st.integers(min_value=0), max_size=8))
    def test_the_position_after_whole_frames_is_a_boundary(self, items, points):
        """However the stream is cut into reads, after whole frames the position is a boundary."""
        data, _ends = stream_of(items)
        need, head = BOUNDARY
        for piece in cut(data, points):
            need, head, offset = scan(need, head, piece)
            self.assertEqual(offset, len(piece))
        self.assertEqual((need, head), BOUNDARY)

    @settings(deadline=None, max_examples=100)
    @given(frames, st.sampled_from([1, 2, 3, 7, 13, 100, 4096, 100000]))
    def test_until_boundary_stops_exactly_at_each_frame_end(self, items, read_size):
        """From the first byte of each frame, scanning to the next boundary (in reads of
        any size) stops exactly where that frame ends."""
        data, ends = stream_of(items)
        starts = [0] + ends[:-1]
        for start, end in zip(starts, ends):
            need, head, _ = scan(0, b"", data[start:start + 1])
            position = start + 1
            while (need, head) != BOUNDARY:
                piece = data[position:position + read_size]
                need, head, offset = scan(need, head, piece, until_boundary=True)
                position += offset
                self.assertTrue(piece, "no boundary before the end of the data")
            self.assertEqual(position, end)

    def test_header_needs_every_byte(self):
        """A header is not read until all of it is in (extended length and mask included)."""
        whole = frame(b"y" * 300, masked=True)
        for size in range(0, 8):
            self.assertIsNone(header_size(whole[:size]))
        self.assertEqual(header_size(whole[:8]), (8, 300))

    def test_a_long_payload_is_skipped_in_one_step(self):
        """A payload longer than the read costs one subtraction, whatever its size."""
        head = frame(b"", masked=False)[:1] + bytes([127]) + struct.pack("!Q", 10 ** 9)
        need, rest, offset = scan(0, b"", head + b"z" * 1000)
        self.assertEqual((need, rest, offset), (10 ** 9 - 1000, b"", len(head) + 1000))
