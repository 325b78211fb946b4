"""A quick price of one idle WebSocket in the gateway: ``python bench/ws_idle_quick.py [--conns 1000]``.

The ``ws-idle`` row of ``python -m bench`` opens 10,000; this opens fewer (1,000 by
default, well under a minute) for iterating on the cost.  One gateway (as shipped, under
``bench/memory_probe_twistd.py``, which only adds a SIGUSR2 report) in front of the
autobahn echo backend; the benchmark's own client opens the WebSockets over TLS.
Printed per idle WebSocket: the RSS delta, malloc's bytes in use (live C and large
Python allocations, no fragmentation), and the Python types that grew the most.

``--tracemalloc`` lists Python allocations by line; ``--burst BYTES`` has each WebSocket
echo one message first (``bench/ws_burst_client.py``) and measures again once the
tunnel has given its buffers back; ``--trim`` shows what ``malloc_trim`` would return;
``--patch NAME`` runs an experiment of ``bench/ws_idle_patches.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.procs import Gateway, Process, free_port, wait_for_line  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def probe(gw: Gateway, out: str) -> dict:
    if os.path.exists(out):
        os.unlink(out)
    os.kill(gw.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while not os.path.exists(out):
        if time.monotonic() > deadline:
            raise RuntimeError("no memory report from the gateway")
        time.sleep(0.1)
    with open(out) as f:
        return json.load(f)


def open_idle(port: int, host: str, conns: int, burst: int = 0) -> subprocess.Popen:
    if burst:
        args = [os.path.join(HERE, "ws_burst_client.py"), "--size", str(burst)]
    else:
        args = [os.path.join(HERE, "ws_client.py"), "idle", "--tls", "--concurrency", "100"]
    proc = subprocess.Popen([sys.executable, *args, "--port", str(port), "--host", host, "--conns", str(conns),
                             "--hold", "300"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if not line.startswith("OPEN "):
        proc.kill()
        raise RuntimeError(f"ws client: {line.strip()}")
    proc.opened = int(line.split()[1])
    return proc


def close_idle(proc: subprocess.Popen) -> None:
    proc.stdin.write("close\n")
    proc.stdin.flush()
    proc.stdout.readline()
    proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--top", type=int, default=15, help="Python types to list")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="trace Python allocations in the gateway and list the lines that grew")
    parser.add_argument("--burst", type=int, default=0, metavar="BYTES",
                        help="each WebSocket first echoes one message of BYTES; also measured again "
                             "after --settle seconds of idleness")
    parser.add_argument("--settle", type=float, default=7.0)
    parser.add_argument("--trim", action="store_true",
                        help="the gateway calls malloc_trim(0) before each report (what RSS could be)")
    parser.add_argument("--patch", action="append", default=[],
                        help="an experiment of bench/ws_idle_patches.py (repeatable)")
    args = parser.parse_args()
    ws_port = free_port()
    out = os.path.join(tempfile.mkdtemp(prefix="ws-idle-quick-"), "report.json")
    with Process([sys.executable, os.path.join(HERE, "ws_echo_backend.py"), "--port", str(ws_port)]) as backend:
        wait_for_line(backend.proc, r"listening on")
        wrapper = [sys.executable, os.path.join(HERE, "memory_probe_twistd.py"), out,
                   *(["--tracemalloc"] if args.tracemalloc else []), *(["--trim"] if args.trim else []),
                   *[a for name in args.patch for a in ("--patch", name)]]
        with Gateway(wrapper=wrapper) as gw:
            host = gw.register(ws_port)
            time.sleep(0.5)
            close_idle(open_idle(gw.https_port, host, 50))  # warm-up, as the harness does
            time.sleep(0.5)
            before = probe(gw, out)
            client = open_idle(gw.https_port, host, args.conns, args.burst)
            try:
                time.sleep(1.0)
                after = probe(gw, out)
                if args.burst:
                    n = client.opened
                    print(f"1 s after a {args.burst}-byte echo: {(after['rss_kib'] - before['rss_kib']) / n:.1f} KiB RSS, "
                          f"{(after['malloc_in_use'] - before['malloc_in_use']) / n / 1024:.1f} KiB malloc'd each")
                    time.sleep(args.settle)
                    after = probe(gw, out)
                    print(f"{args.settle + 1:.0f} s after:", end=" ")
            finally:
                close_idle(client)
    n = client.opened
    if after.get("trim_s") is not None:
        print(f"malloc_trim(0) took {after['trim_s'] * 1000:.1f} ms on a {after['arena'] / 2**20:.0f} MiB heap")
    result = {"opened": n, "rss_kib_per_ws": (after["rss_kib"] - before["rss_kib"]) / n,
              "malloc_B_per_ws": (after["malloc_in_use"] - before["malloc_in_use"]) / n,
              "rss_kib_before": before["rss_kib"], "rss_kib_after": after["rss_kib"]}
    grown = []
    for name, (count, size) in after["types"].items():
        c0, s0 = before["types"].get(name, (0, 0))
        if size - s0 > 0:
            grown.append((size - s0, count - c0, name))
    grown.sort(reverse=True)
    python_total = sum(g[0] for g in grown)
    result["python_B_per_ws"] = python_total / n
    print(f"{n} idle WebSockets: {result['rss_kib_per_ws']:.1f} KiB RSS each, "
          f"{result['malloc_B_per_ws'] / 1024:.1f} KiB malloc'd each, "
          f"{result['python_B_per_ws'] / 1024:.2f} KiB of it in Python objects (shallow, gc-tracked)")
    for size, count, name in grown[:args.top]:
        print(f"  {size / n:8.0f} B  {count / n:5.2f}/ws  {name}")
    if args.tracemalloc:
        import tracemalloc
        stats = tracemalloc.Snapshot.load(out + ".trace").statistics("lineno")
        traced = sum(s.size for s in stats)
        print(f"tracemalloc: {traced / n:.0f} B of Python allocations per idle WebSocket, by line:")
        for stat in stats[:args.top]:
            print(f"  {stat.size / n:8.0f} B  {stat.count / n:5.2f}/ws  {stat.traceback[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "types": [(name, size / n, count / n) for size, count, name in grown[:50]]}, f, indent=1)


if __name__ == "__main__":
    main()
