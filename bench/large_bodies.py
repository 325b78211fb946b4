"""Large responses through the gateway: MB/s and CPU per MiB, optionally profiled or patched.

    python -m bench.large_bodies [--seconds 5] [--conns 8] [--rounds 3] [--profile]
                                 [--path /1m] [--variants "base;readsize=262144;..."]

Starts the bench's nginx backend (``/1m`` is a 1 MiB file) and, per variant and round
(interleaved, so the machine's noise hits every variant alike), a fresh gateway
(``bench/patched_twistd.py``: the variant's experimental patches, then twistd), loads
``/1m`` over TLS with ``wrk -t1 -cN`` and prints MB/s, the gateway's CPU per MiB and
its peak RSS.  With ``--profile`` the last round runs under cProfile and the top
functions by own time are printed.  ``--path /`` (12 bytes) with ``--conns 50`` prices
small responses the same way (CPU per response).  A variant is ``;``-separated from the next and is a
``,``-separated list of patches (see bench/patched_twistd.py); ``base`` patches nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time

from bench import loadgen
from bench.procs import Gateway
from bench.systems import RunDir, start_backend_nginx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024 * 1024


def run_one(variant: str, backend_port: int, args, prof: str | None) -> dict:
    os.environ["HOODY_BENCH_PATCHES"] = "" if variant == "base" else variant
    wrapper = [sys.executable, os.path.join(ROOT, "bench", "patched_twistd.py"), prof or "-"]
    with Gateway(wrapper=wrapper) as gw:
        host = gw.register(backend_port)
        url = f"https://127.0.0.1:{gw.https_port}{args.path}"
        loadgen.wrk(url, host, args.conns, 1)  # warm: pools, lazy imports
        res = loadgen.measured(gw.pid, lambda: loadgen.wrk(url, host, args.conns, args.seconds))
    res["cpu_us_per_resp"] = res["cpu_s"] * 1e6 / res["ops"]
    return res


def top(prof: str, ops: int, n: int) -> None:
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())
    print(f"  profiler clock {total * 1e6 / ops:,.0f} us per response; top {n} by own time:")
    for (f, line, name), v in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:n]:
        where = name if f == "~" else f"{f.split('site-packages/')[-1].split(ROOT + '/')[-1]}:{line}({name})"
        print(f"  {v[2] * 1e6 / ops:9.1f} us {v[1] / ops:8.1f} calls  {where[:90]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.large_bodies", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="base")
    p.add_argument("--path", default="/1m", help="/1m (1 MiB) or / (12 bytes)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    rundir = RunDir()
    workdir = tempfile.mkdtemp(prefix="hoodyproxy-large-")
    try:
        with contextlib.ExitStack() as stack:
            ports = start_backend_nginx(stack, rundir)
            for r in range(args.rounds):
                for v in variants:
                    prof = os.path.join(workdir, f"{len(results[v])}-{abs(hash(v))}.prof") \
                        if args.profile and r == args.rounds - 1 else None
                    res = run_one(v, ports["BACKEND_PORT"], args, prof)
                    results[v].append(res)
                    print(f"round {r + 1} {v:40s} {res['mbps']:7.0f} MB/s {res['cpu_us_per_resp']:7.0f} us CPU/resp "
                          f"peak RSS {res['hwm_kib'] / 1024:5.0f} MiB", flush=True)
                    if prof:
                        for _ in range(50):
                            if os.path.exists(prof):
                                break
                            time.sleep(0.1)
                        top(prof, res["ops"], args.top)
    finally:
        rundir.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)  # (the profiles were read above)
    print("\nmedians (profiled rounds included only if --profile was off):")
    for v, rs in results.items():
        rs = [x for x in rs if not args.profile] or rs[:-1] or rs
        print(f"  {v:40s} {statistics.median(x['mbps'] for x in rs):7.0f} MB/s "
              f"{statistics.median(x['cpu_us_per_resp'] for x in rs):7.0f} us CPU/resp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
