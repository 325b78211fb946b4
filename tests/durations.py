"""A Trial reporter that ends a run with its ten slowest tests: ``trial --reporter=durations``.

``make test`` uses it (``twisted/plugins/hoodyproxy_trial.py`` registers it), so that a
test creeping towards its timeout is seen long before it starts to fail one run in
three.  The output is Trial's usual tree, then -- before the errors and the closing
``PASSED``/``FAILED`` line, which ``.ci/run`` reads -- a block like::

    Slowest tests (10 of 812; the ones over a quarter of their timeout are marked !):
        3.91 s    tests.test_http2.FlowControlTests.test_slow_client_does_not_...
      119.62 s !  tests.test_example.SlowTests.test_big   (timeout 120 s)

A mark means the test is over a quarter of its Trial timeout (``TestCase.timeout``, 120
s by default): it should be made smaller.  ``SynchronousTestCase`` has no timeout and is
never marked.

Under ``trial -j N`` the reporter runs in the manager process, and Trial's
``DistReporter`` holds every call about a test until the test ends, then replays them
all at once; the reporter alone would measure nothing.  So the start is recorded where
the manager hands the test to a worker -- ``DistReporter.startTest``, wrapped here -- and
the end when the replayed ``stopTest`` arrives.  Each worker runs one test at a time, so
that is the test's time in its worker, plus a little AMP -- and, for the first test of
each worker, the worker's own start-up (a second or two).  Should a later Twisted move
that method, the wrapping is skipped and the block says the durations are unavailable
rather than print replay times.
"""

from __future__ import annotations

import sys
import time

from twisted.trial.reporter import TreeReporter

#: How many tests the closing block lists.
SLOWEST = 10
#: A test over this share of its timeout is marked.
TIMEOUT_SHARE = 0.25

#: test id -> monotonic start, as recorded where tests start (see the module docstring).
_starts: dict[str, float] = {}
_distributed = {"hooked": False}


def _record_distributed_starts() -> bool:
    """Wrap ``DistReporter.startTest`` (once per process) to record when each test starts."""
    if _distributed["hooked"]:
        return True
    try:
        from twisted.trial._dist.distreporter import DistReporter
        original = DistReporter.startTest
    except (ImportError, AttributeError):
        return False

    def startTest(self, test):
        _starts[test.id()] = time.monotonic()
        return original(self, test)

    DistReporter.startTest = startTest
    _distributed["hooked"] = True
    return True


def _timeout_of(test) -> float | None:
    get_timeout = getattr(test, "getTimeout", None)
    if get_timeout is None:
        return None
    try:
        timeout = get_timeout()
    except Exception:
        return None
    return float(timeout) if isinstance(timeout, (int, float)) else None


class DurationsReporter(TreeReporter):
    """:class:`TreeReporter` that also lists the slowest tests before its summary."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._can_time_distributed = _record_distributed_starts()
        #: (seconds, test id, timeout or None) of every test that ended
        self.durations: list[tuple[float, str, float | None]] = []

    def startTest(self, test) -> None:
        # Replayed at the end under -j: the start recorded by the DistReporter wins.
        _starts.setdefault(test.id(), time.monotonic())
        super().startTest(test)

    def stopTest(self, test) -> None:
        start = _starts.pop(test.id(), None)
        if start is not None:
            self.durations.append((time.monotonic() - start, test.id(), _timeout_of(test)))
        super().stopTest(test)

    def slowest_block(self) -> list[str]:
        """The closing block's lines (see the module docstring)."""
        if not self._can_time_distributed and self._is_distributed():
            return ["Slowest tests: unavailable (this Trial's DistReporter cannot be timed)"]
        ranked = sorted(self.durations, key=lambda d: d[0], reverse=True)[:SLOWEST]
        if not ranked:
            return []
        lines = [f"Slowest tests ({len(ranked)} of {len(self.durations)}; the ones over a quarter of "
                 f"their timeout are marked !):"]
        for seconds, test_id, timeout in ranked:
            over = timeout is not None and seconds > timeout * TIMEOUT_SHARE
            line = f"  {seconds:8.2f} s {'!' if over else ' '}  {test_id}"
            if over:
                line += f"   (timeout {timeout:g} s)"
            lines.append(line)
        return lines

    def _is_distributed(self) -> bool:
        return any(arg == "-j" or arg.startswith(("-j", "--jobs")) for arg in sys.argv[1:])

    def done(self) -> None:
        block = self.slowest_block()
        if block:
            self._write("\n")
            for line in block:
                self._write(line + "\n")
        super().done()
