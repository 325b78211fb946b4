"""What counting metrics costs the request path, measured two ways.

    PYTHONPATH=. python bench/metrics_cost.py [--requests N] [--rounds R]
    PYTHONPATH=. python bench/metrics_cost.py --instructions      (needs valgrind)

The setting of ``bench/gateway_inproc.py`` (a node's GatewayStack serving HTTP/1.1 from a
StringTransport, fake containers), with two ways of ending an exchange: as shipped (the
audit line, then :meth:`RequestMetrics.observe`), and with the audit line only (the
emit_record of before metrics).

By default the two alternate in rounds in one process (ABBA, the setting's heap frozen
and a collection before each run), and it prints the best and the median of each and the median of the rounds'
differences, in microseconds of CPU per request.  On a busy machine the difference of a
microsecond or two is within the noise; ``--instructions`` counts instead: each way runs
under valgrind's callgrind with a fake clock (so that every run takes the same paths),
for 1,000 and 5,000 requests, and the difference per request between the two is the
instructions metrics add, exactly enough to compare with the gateway's own total.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("with metrics", "audit only")


def _audit_only(self, record: dict) -> None:
    """Gateway.emit_record as it was before metrics: the duration and the audit line."""
    record["duration_ms"] = int((self.now() - record["time"]) * 1000000.0 + 0.5) / 1000.0
    self.audit.record(record)


def _setting(data_dir: str):
    """(gateway, one request's work, the transport) in gateway_inproc's setting."""
    sys.path.insert(0, HERE)
    from gateway_inproc import CONTAINER, PROJECT, build
    stack, client, transport, upstreams, _clock = build(data_dir)
    host = b"%s-%s-http-3000.node-us.containers.example.com" % (PROJECT.encode(), CONTAINER.encode())
    request = b"GET /api/items?x=1 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"

    def one() -> None:
        client.dataReceived(request)
        for upstream in upstreams:
            upstream.deliver()
    return stack, one, transport


def _ways(gateway) -> dict:
    return {"with metrics": gateway.emit_record, "audit only": types.MethodType(_audit_only, gateway)}


def interleaved(requests: int, rounds: int) -> None:
    data_dir = tempfile.mkdtemp(prefix="hoodyproxy-metrics-cost-")
    try:
        stack, one, transport = _setting(data_dir)
        ways = _ways(stack.gateway)

        def run(n: int) -> float:
            started = time.thread_time()
            for i in range(n):
                one()
                if i % 1000 == 999:
                    transport.clear()
            return (time.thread_time() - started) / n * 1e6

        run(2000)  # warm
        # The setting's heap only grows: frozen, a full collection does not cost one mode
        # more than the other by where it happens to fall.
        gc.collect()
        gc.freeze()
        times: dict[str, list[float]] = {name: [] for name in MODES}
        for round_number in range(rounds):
            # ABBA: neither goes first every time (the first run after a switch may differ).
            for name in (MODES if round_number % 2 == 0 else MODES[::-1]):
                stack.gateway.emit_record = ways[name]
                gc.collect()
                times[name].append(run(requests))
        stack.close()
        for name, values in times.items():
            print(f"{name:>12}: best {min(values):.1f} us, median {statistics.median(values):.1f} us per request")
        # Each round's two runs are adjacent in time: their difference is the least noisy.
        paired = [a - b for a, b in zip(times["with metrics"], times["audit only"])]
        print(f"{'difference':>12}: median of the rounds' differences {statistics.median(paired):+.2f} us, "
              f"best-to-best {min(times['with metrics']) - min(times['audit only']):+.2f} us "
              f"({rounds} rounds of {requests:,} each)")
    finally:
        shutil.rmtree(data_dir, True)


def serve(mode: str, requests: int) -> None:
    """Run ``requests`` requests one way with a fake clock (under valgrind)."""
    now = [1_700_000_000.0, 1000.0]

    def wall() -> float:
        now[0] += 1e-6
        return now[0]

    def monotonic() -> float:
        now[1] += 1e-6
        return now[1]
    # Before anything imports them: every run takes the same time-dependent paths.
    time.time, time.monotonic, time.perf_counter = wall, monotonic, monotonic
    data_dir = tempfile.mkdtemp(prefix="hoodyproxy-metrics-cost-")
    try:
        stack, one, transport = _setting(data_dir)
        stack.gateway.emit_record = _ways(stack.gateway)[mode]
        for _ in range(200):
            one()
        gc.collect()
        gc.freeze()
        for i in range(requests):
            one()
            if i % 1000 == 999:
                transport.clear()
    finally:
        shutil.rmtree(data_dir, True)


def instructions() -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")

    def count(mode: str, requests: int) -> int:
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
             "--serve", mode, "--requests", str(requests)],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, timeout=1800)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise SystemExit(done.stderr[-2000:])
        return int(found.group(1))
    per_request = {}
    for mode in MODES:
        per_request[mode] = (count(mode, 5000) - count(mode, 1000)) / 4000
        print(f"{mode:>12}: {per_request[mode]:,.0f} instructions per request")
    added = per_request["with metrics"] - per_request["audit only"]
    print(f"{'difference':>12}: {added:+,.0f} instructions per request "
          f"({added / per_request['audit only'] * 100:+.2f}% of the gateway's own)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--instructions", action="store_true")
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.requests)
    elif args.instructions:
        instructions()
    else:
        interleaved(args.requests, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
