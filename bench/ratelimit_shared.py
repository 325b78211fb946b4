"""What shared rate limits cost (issue 13): ``python -m bench.ratelimit_shared [--rounds R] [--seconds S]``.

1. In process: a check with and without sharing (ns each), and a batch drained, encoded,
   decoded and applied, by size.
2. A real node, ``--workers 2``, under ``wrk -t1 -c50`` (HTTPS keep-alive, one client
   address, every feature on), ``shared = false`` and ``shared = true`` in alternating
   rounds: requests/s and the CPU of all the node's processes per request.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from twisted.internet.task import Clock

from hoodyproxy.limits import Limit, Limiters, RateLimitSettings, parse_rate, parse_rate_limits
from hoodyproxy.limits._sharing import decode_batch, encode_batch


def per_call_ns(call, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n * 1e9


def micro() -> None:
    rl = parse_rate_limits({"per_client": {"rate": "100000/s", "burst": 1000000},
                            "per_container": {"rate": "100000/s", "burst": 1000000}})
    for shared in (False, True):
        limiters = Limiters(RateLimitSettings(per_address=Limit(parse_rate("100000/s"), 1000000), shared=shared),
                            clock=Clock(), workers=2)
        best_client = min(per_call_ns(lambda: limiters.check_client("192.0.2.1"), 200_000) for _ in range(5))
        best_after = min(per_call_ns(lambda: limiters.check_after_decision(rl, "192.0.2.1", None, "p", "c"),
                                     200_000) for _ in range(5))
        limiters.drain_charges()
        print(f"shared={str(shared).lower():5}  check_client {best_client:6.0f} ns   "
              f"check_after_decision (2 limits) {best_after:6.0f} ns")
    for keys in (1, 100, 4096):
        wide = RateLimitSettings(per_address=Limit(parse_rate("100000/s"), 1000000), shared=True)
        source = Limiters(wide, clock=Clock(), workers=2)
        target = Limiters(wide, clock=Clock(), workers=2)
        ips = [f"10.{n // 65536}.{n // 256 % 256}.{n % 256}" for n in range(keys)]
        rounds = max(3, 2000 // keys)
        out = inn = 0.0
        size = 0
        for _ in range(rounds):
            for ip in ips:
                source.check_client(ip)
            t0 = time.perf_counter()
            line, _ = encode_batch(source.drain_charges(), 1)
            t1 = time.perf_counter()
            target.apply_charges(decode_batch(line)[1])
            t2 = time.perf_counter()
            out += t1 - t0
            inn += t2 - t1
            size = len(line)
        print(f"batch of {keys:4} keys ({size:6} bytes): drain+encode {out / rounds * 1e6:7.0f} us, "
              f"decode+apply {inn / rounds * 1e6:7.0f} us")


def node_round(shared: bool, seconds: float, backend_port: int) -> dict:
    from bench import loadgen
    from bench.procs import Gateway
    config = os.path.join(tempfile.mkdtemp(prefix="bench-shared-"), "shared.toml")
    with open(config, "w") as f:
        f.write('[ratelimit]\nper_address_rate = "100000/s"\nper_address_burst = 1000000\n'
                f'shared = {"true" if shared else "false"}\n')
    gateway = Gateway(["--workers", "2", "--config", config])  # the later --config wins
    try:
        host = gateway.register(backend_port)
        time.sleep(1.5)  # worker 1 listening (and joined)
        url = f"https://127.0.0.1:{gateway.https_port}/"
        loadgen.wrk(url, host, 50, 1)  # warm-up
        pids = loadgen.process_tree(gateway.pid)
        before = [loadgen.cpu_seconds([pid]) for pid in pids]
        result = loadgen.measured(gateway.pid, lambda: loadgen.wrk(url, host, 50, seconds))
        result["split"] = [round(loadgen.cpu_seconds([pid]) - b, 2) for pid, b in zip(pids, before)]
        return result
    finally:
        gateway.stop()
        os.unlink(config)
        os.rmdir(os.path.dirname(config))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--micro-only", action="store_true")
    args = parser.parse_args(argv)
    micro()
    if args.micro_only:
        return
    from bench.procs import start_backend
    backend, port = start_backend()
    results: dict[bool, list[dict]] = {False: [], True: []}
    try:
        for _ in range(args.rounds):
            for shared in (False, True):
                r = node_round(shared, args.seconds, port)
                results[shared].append(r)
                print(f"shared={str(shared).lower():5}  {r['rps']:8.0f} req/s  {r['cpu_us_per_op']:6.1f} us CPU/req  "
                      f"p50 {r['p50_us']} us  p99 {r['p99_us']} us  CPU s per process {r['split']}", flush=True)
    finally:
        backend.stop()
    for shared in (False, True):
        rs = results[shared]
        print(f"median shared={str(shared).lower():5}  {statistics.median(r['rps'] for r in rs):8.0f} req/s  "
              f"{statistics.median(r['cpu_us_per_op'] for r in rs):6.1f} us CPU/req")


if __name__ == "__main__":
    main(sys.argv[1:])
