"""Bodies stream through the gateway process: its memory does not grow with their size."""

from twisted.trial import unittest

from bench.streaming import measure

SIZE_MIB = 256
#: Allowed growth of the gateway's RSS while SIZE_MIB pass through (buffers, TLS state).
MAX_GROWTH_KIB = 24 * 1024


class StreamingMemoryTests(unittest.SynchronousTestCase):

    def test_large_upload_and_download_keep_gateway_memory_flat(self):
        """256 MiB up and 256 MiB down through a real twistd gateway over TLS: RSS grows < 24 MiB."""
        figures = measure(SIZE_MIB, timeout=300)
        self.assertLess(figures["upload_peak_kib"] - figures["rss_before_kib"], MAX_GROWTH_KIB, figures)
        self.assertLess(figures["download_peak_kib"] - figures["rss_before_kib"], MAX_GROWTH_KIB, figures)
