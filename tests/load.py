"""Load for the tests that change a node under it (a worker killed, a drain, an upgrade).

:class:`Wrk` runs ``wrk`` until the test stops it -- SIGINT makes wrk stop and print its
summary -- because the event the load must span (a new generation ready, a worker
replaced) takes as long as it takes: the test waits for the event, not for a clock.
wrk's duration is only a bound (:data:`BOUND`), and a stop the test forgot is done at
cleanup.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass

#: The longest a load runs if the test never stops it (seconds).
BOUND = 60
NO_WRK = "wrk is not installed (make deps installs it)" if shutil.which("wrk") is None else None


@dataclass
class WrkResult:
    requests: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int
    non_2xx: int
    output: str

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts


def parse_wrk(output: str) -> WrkResult:
    """The figures of wrk's summary (the error lines are absent when there were none)."""
    requests = re.search(r"(\d+) requests in", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if requests is None:
        raise AssertionError(f"wrk printed no summary:\n{output}")
    connect, read, write, timeout = (int(n) for n in errors.groups()) if errors else (0, 0, 0, 0)
    return WrkResult(int(requests.group(1)), connect, read, write, timeout,
                     int(non_2xx.group(1)) if non_2xx else 0, output)


def load_config(case, extra: str = "") -> str:
    """A config file for a node under load from one address: a per-address budget the load
    never meets (the default, 1000/s, is a guesser's, and wrk on loopback exceeds it).
    ``extra``: more TOML."""
    path = os.path.abspath(case.mktemp())
    with open(path, "w") as f:
        f.write('[ratelimit]\nper_address_rate = "100000/s"\nper_address_burst = 1000000\n' + extra)
    return path


class Wrk:
    """``wrk`` against ``url`` (with ``Host: host``), keep-alive, until :meth:`stop`."""

    def __init__(self, case, url: str, host: str, *, connections: int = 16, threads: int = 2) -> None:
        self.proc = subprocess.Popen(
            ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{BOUND}s", "--timeout", "10s",
             "-H", f"Host: {host}", url],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        self.result: WrkResult | None = None
        case.addCleanup(self.stop)

    def stop(self) -> WrkResult:
        """Stop the load and return its figures."""
        if self.result is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            try:
                output, _ = self.proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                output, _ = self.proc.communicate(timeout=10)
            self.result = parse_wrk(output)
        return self.result
