"""Profile the gateway (1 worker) under load with cProfile: HTTP/2 (h2load), HTTP/1.1 (wrk), or both.

    python -m bench.profile_h2 [--proto h2,h1] [--seconds 10] [--clients 4] [--streams 10]
                               [--top 30] [--keep-profiles DIR]

Starts the bench's backend (nginx, 12-byte body at ``/``) and, per protocol, a fresh
``twistd -n hoodyproxy`` under cProfile (``bench/profiled_twistd.py``); registers a container at the
backend, loads it over TLS for ``--seconds`` (h2load ``-cC -mM`` for h2, ``wrk -c C*M``
for HTTP/1.1: the same requests in flight), stops it (SIGTERM: cProfile writes its
profile on the way out) and prints, per protocol:

- the gateway's CPU per request with the profiler on (cProfile roughly doubles it: read
  the shares, not the absolute figures; ``python -m bench --only h2`` measures without);
- time by component (the gateway's own modules, h2/hpack, twisted, pyOpenSSL ...), in
  microseconds per request of the profiler's own clock;
- the top functions by own time and, for the gateway's frontend modules, by cumulative time.

Everything is stopped at the end, on errors and on Ctrl-C too.  Nothing here is part of
``make bench``; it is the tool behind the HTTP/2 notes in docs/performance.rst.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import shutil
import sys
import tempfile
import time

from bench import loadgen
from bench.procs import Gateway
from bench.systems import RunDir, start_backend_nginx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: (label, test on a profile entry's file name); the first that matches counts.
COMPONENTS = [
    ("hoodyproxy/frontend/http2.py", lambda f: f.endswith("hoodyproxy/frontend/http2.py")),
    ("hoodyproxy/frontend/stream.py", lambda f: f.endswith("hoodyproxy/frontend/stream.py")),
    ("hoodyproxy/frontend/http1.py", lambda f: f.endswith("hoodyproxy/frontend/http1.py")),
    ("hoodyproxy (other modules)", lambda f: "/hoodyproxy/" in f),
    ("h2 (state machine, frames)", lambda f: "/h2/" in f or "/hyperframe/" in f),
    ("hpack", lambda f: "/hpack/" in f),
    ("twisted.web", lambda f: "/twisted/web/" in f),
    ("twisted TLS (twisted.protocols.tls)", lambda f: f.endswith("twisted/protocols/tls.py")),
    ("twisted (other)", lambda f: "/twisted/" in f),
    ("pyOpenSSL + cryptography", lambda f: "/OpenSSL/" in f or "/cryptography/" in f or "_openssl" in f
     or "cffi" in f),
    ("socket / epoll / builtins", lambda f: f == "~"),
]


def component(filename: str) -> str:
    for label, test in COMPONENTS:
        if test(filename):
            return label
    return "other Python"


def load(proto: str, gw: Gateway, host: str, clients: int, streams: int, seconds: float) -> dict:
    url = f"https://127.0.0.1:{gw.https_port}/"
    if proto == "h2":
        return loadgen.h2load(url, host, clients, streams, seconds)
    return loadgen.wrk(url, host, clients * streams, seconds)


def profile_one(proto: str, backend_port: int, args, workdir: str) -> tuple[str, dict, int]:
    """Run the gateway under cProfile with ``proto`` load; (profile path, measured figures, requests)."""
    prof = os.path.join(workdir, f"gateway-{proto}.prof")
    wrapper = [sys.executable, os.path.join(ROOT, "bench", "profiled_twistd.py"), prof]
    with Gateway(wrapper=wrapper) as gw:
        host = gw.register(backend_port)
        time.sleep(0.5)
        warm = load(proto, gw, host, args.clients, args.streams, 1)  # pools, caches, lazy imports
        res = loadgen.measured(gw.pid, lambda: load(proto, gw, host, args.clients, args.streams, args.seconds))
    # Gateway.stop (the with block) sent SIGTERM and waited: bench/profiled_twistd.py wrote the profile.
    for _ in range(50):
        if os.path.exists(prof):
            break
        time.sleep(0.1)
    if not os.path.exists(prof):
        raise RuntimeError(f"no profile written for {proto} (did twistd exit cleanly?)")
    return prof, res, warm["ops"] + res["ops"]


def report(proto: str, prof: str, res: dict, requests: int, top: int) -> None:
    st = pstats.Stats(prof)
    per = 1e6 / requests
    stats = st.stats  # (file, line, name) -> (primitive calls, calls, tottime, cumtime, callers)
    total = sum(v[2] for v in stats.values())
    print(f"\n=== {proto}: {requests:,} requests profiled; measured run: {res['rps']:,.0f} req/s, "
          f"{res.get('cpu_us_per_op', 0):,.0f} us CPU/request with the profiler on; "
          f"profiler clock {total * per:,.0f} us/request ===")
    by: dict[str, float] = {}
    for (filename, _, _), v in stats.items():
        by[component(filename)] = by.get(component(filename), 0.0) + v[2]
    print(f"\n{'component (own time)':45s} {'us/req':>8s} {'share':>6s}")
    for label, t in sorted(by.items(), key=lambda kv: -kv[1]):
        print(f"{label:45s} {t * per:8.1f} {100 * t / total:5.1f}%")

    def short(key) -> str:
        filename, line, name = key
        if filename == "~":
            return name
        for marker in ("/site-packages/", ROOT + "/", "/lib/python3"):
            if marker in filename:
                filename = filename.split(marker, 1)[1]
                break
        return f"{filename}:{line}({name})"

    print(f"\ntop {top} by own time{'':32s} {'own us/req':>10s} {'cum us/req':>10s} {'calls/req':>9s}")
    for key, v in sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]:
        print(f"{short(key)[:70]:70s} {v[2] * per:10.1f} {v[3] * per:10.1f} {v[1] / requests:9.2f}")
    print(f"\nhoodyproxy/frontend functions by cumulative time{'':20s} {'own us/req':>10s} {'cum us/req':>10s} "
          f"{'calls/req':>9s}")
    frontend = [(k, v) for k, v in stats.items() if "/hoodyproxy/frontend/" in k[0]]
    for key, v in sorted(frontend, key=lambda kv: -kv[1][3])[:top]:
        print(f"{short(key)[:70]:70s} {v[2] * per:10.1f} {v[3] * per:10.1f} {v[1] / requests:9.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_h2", description=__doc__.split("\n\n")[0])
    p.add_argument("--proto", default="h2,h1", help="h2, h1 or both (default h2,h1)")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--clients", type=int, default=4, help="connections (h2load -c; wrk -c is clients*streams)")
    p.add_argument("--streams", type=int, default=10, help="streams per connection (h2load -m)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--keep-profiles", metavar="DIR", help="copy the .prof files here")
    args = p.parse_args(argv)
    protos = [x.strip() for x in args.proto.split(",") if x.strip()]
    if any(x not in ("h2", "h1") for x in protos):
        p.error("--proto: h2 and/or h1")
    workdir = tempfile.mkdtemp(prefix="hoodyproxy-profile-")
    rundir = RunDir()
    try:
        with contextlib.ExitStack() as stack:
            ports = start_backend_nginx(stack, rundir)
            for proto in protos:
                prof, res, requests = profile_one(proto, ports["BACKEND_PORT"], args, workdir)
                report(proto, prof, res, requests, args.top)
                if args.keep_profiles:
                    os.makedirs(args.keep_profiles, exist_ok=True)
                    shutil.copy(prof, args.keep_profiles)
    except KeyboardInterrupt:
        print("interrupted; everything started has been stopped", file=sys.stderr)
        return 130
    finally:
        rundir.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
