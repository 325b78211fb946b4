"""CPU per response of the upstream client (hoodyproxy/upstream/http11.py), before and after.

    python -m bench.upstream_client [--before REV] [--rounds 5] [--n 20000]

Loads ``UpstreamConnection`` twice -- from git revision ``REV`` (default HEAD) and from
the working tree -- and times, in alternating rounds, one exchange on an open connection:
``send_head`` (with its response timeout), the response in one ``dataReceived``, the
events to a listener that does nothing.  The clock is the real reactor, not running, so
``callLater``/``cancel`` cost what they cost in the gateway (its timed-call heap is
emptied between batches).  ``inflight`` exchanges are started before their responses
arrive, as under load (the shared deadline sweep only pays off when more than one waits).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_FIELDS = (b"Server: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 02:00:00 GMT\r\nContent-Type: text/plain\r\n"
               b"Content-Length: 12\r\nLast-Modified: Tue, 01 Dec 2026 10:00:00 GMT\r\nConnection: keep-alive\r\n"
               b"ETag: \"6385f1e0-c\"\r\nAccept-Ranges: bytes\r\n")
RESPONSES = {
    "nginx-like, 8 fields, 12 bytes": b"HTTP/1.1 200 OK\r\n" + HEAD_FIELDS + b"\r\nhello world\n",
    "2 fields, 12 bytes": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n",
    "20 fields, 12 bytes": b"HTTP/1.1 200 OK\r\n" + HEAD_FIELDS + b"".join(
        b"X-Extra-%d: some value or other %d\r\n" % (i, i) for i in range(12)) + b"\r\nhello world\n",
    "chunked, 3 chunks": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"4\r\nhell\r\n4\r\no wo\r\n4\r\nrld\n\r\n0\r\n\r\n",
}


class Transport:
    """Just enough of a TCP transport."""

    disconnecting = False

    def write(self, data):
        pass

    def writeSequence(self, data):
        pass

    def setTcpNoDelay(self, on):
        pass

    def loseConnection(self):
        raise AssertionError("connection closed: the response was not reusable")

    abortConnection = loseConnection


class Listener:
    def upstream_head(self, status, reason, headers):
        pass

    def upstream_data(self, data):
        pass

    def upstream_end(self):
        pass

    def upstream_failed(self, why, got_response):
        raise AssertionError(why)

    def upstream_upgraded(self, leftover):
        pass


def load(label: str, path: str):
    spec = importlib.util.spec_from_file_location(f"http11_{label}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(module, reactor, response: bytes, n: int, inflight: int) -> float:
    """CPU seconds per exchange."""
    conns = []
    for i in range(inflight):
        c = module.UpstreamConnection(("10.0.0.1", 80), reactor)
        c.on_reusable = lambda conn: None
        c.makeConnection(Transport())
        conns.append(c)
    listener = Listener()
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    batches = max(1, n // inflight)
    start = time.process_time()
    for b in range(batches):
        for c in conns:
            c.send_head(head, listener, chunked_body=False, has_body=False, head_request=False,
                        upgrade=False, timeout=60.0)
        for c in conns:
            c.dataReceived(response)
        if b % 64 == 0:
            reactor.runUntilCurrent()  # drop cancelled timed calls, as the running reactor does
    elapsed = time.process_time() - start
    reactor.runUntilCurrent()
    return elapsed / (batches * inflight)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.upstream_client", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="HEAD", help="git revision of the 'before' (default HEAD)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=20000, help="exchanges per measurement")
    args = p.parse_args(argv)
    from twisted.internet import reactor

    old_source = subprocess.run(["git", "show", f"{args.before}:hoodyproxy/upstream/http11.py"], cwd=ROOT,
                                check=True, capture_output=True).stdout
    with tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False) as f:
        f.write(old_source)
    try:
        modules = {"before": load("before", f.name),
                   "after": load("after", os.path.join(ROOT, "hoodyproxy", "upstream", "http11.py"))}
    finally:
        os.unlink(f.name)
    print(f"us per exchange (median of {args.rounds} alternating rounds; before = {args.before})")
    print(f"{'response':34s} {'in flight':>9s} {'before':>8s} {'after':>8s} {'after/before':>12s}")
    for name, response in RESPONSES.items():
        for inflight in (1, 50):
            got: dict[str, list[float]] = {k: [] for k in modules}
            for _ in range(args.rounds):
                for label, module in modules.items():
                    got[label].append(timed(module, reactor, response, args.n, inflight))
            before, after = (statistics.median(got[k]) * 1e6 for k in ("before", "after"))
            print(f"{name:34s} {inflight:9d} {before:8.2f} {after:8.2f} {after / before:12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
