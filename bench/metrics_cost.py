"""What counting metrics costs the request path, measured in one process, interleaved.

    PYTHONPATH=. python bench/metrics_cost.py [--requests N] [--rounds R]

The setting of ``bench/gateway_inproc.py`` (a node's GatewayStack serving HTTP/1.1 from a
StringTransport, fake containers), run in rounds that alternate two gateways' ways of
ending an exchange: as shipped (the audit line, then :meth:`RequestMetrics.observe`), and
with the audit line only (the emit_record of before metrics).  Alternating in one process
makes the difference stand out of the machine's noise, which moves both alike; a separate
``gateway_inproc.py`` run before and after the change shows the same within its noise.
Prints the best and the median of each, in microseconds of CPU per request.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gateway_inproc import CONTAINER, PROJECT, build  # noqa: E402


def _audit_only(self, record: dict) -> None:
    """Gateway.emit_record as it was before metrics: the duration and the audit line."""
    record["duration_ms"] = int((self.now() - record["time"]) * 1000000.0 + 0.5) / 1000.0
    self.audit.record(record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    data_dir = tempfile.mkdtemp(prefix="hoodyproxy-metrics-cost-")
    try:
        stack, client, transport, upstreams, _clock = build(data_dir)
        gateway = stack.gateway
        shipped = gateway.emit_record
        without = types.MethodType(_audit_only, gateway)
        host = b"%s-%s-http-3000.node-us.containers.example.com" % (PROJECT.encode(), CONTAINER.encode())
        request = b"GET /api/items?x=1 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"

        def run(n: int) -> float:
            started = time.thread_time()
            for i in range(n):
                client.dataReceived(request)
                for upstream in upstreams:
                    upstream.deliver()
                if i % 1000 == 999:
                    transport.clear()
            return (time.thread_time() - started) / n * 1e6

        run(2000)  # warm
        times: dict[str, list[float]] = {"with metrics": [], "audit only": []}
        for _ in range(args.rounds):
            for name, emit in (("with metrics", shipped), ("audit only", without)):
                gateway.emit_record = emit
                times[name].append(run(args.requests))
        gateway.emit_record = shipped
        stack.close()
        for name, values in times.items():
            print(f"{name:>12}: best {min(values):.1f} us, median {statistics.median(values):.1f} us per request")
        print(f"{'difference':>12}: best {min(times['with metrics']) - min(times['audit only']):+.2f} us, "
              f"median {statistics.median(times['with metrics']) - statistics.median(times['audit only']):+.2f} us "
              f"({args.rounds} rounds of {args.requests:,} each)")
    finally:
        shutil.rmtree(data_dir, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
