"""The benchmark harness behind ``make bench`` / ``python -m bench``.

Starts the backends and every system (bench/systems.py), then for each scenario runs
interleaved rounds (for round in 1..R: for system in systems: run), each load run bounded
in time, and writes ``bench/results/YYYY-MM-DD-HHMM.md`` (plus the raw figures as
``.raw`` JSON beside it) and the generated part of ``docs/performance.rst``.
Everything it starts is stopped at the end, on errors and on Ctrl-C/SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from bench import loadgen, report
from bench.procs import Gateway
from bench.systems import LABELS, SYSTEM_ORDER, VARIANTS, RunDir, Systems, upstream_delta

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
DOC = os.path.join(ROOT, "docs", "performance.rst")
IDLE_TARGET = 10_000


@dataclass
class Scenario:
    key: str
    title: str
    kind: str                 # wrk | h2load | ws | ws-idle | stream | tap
    transport: str = "tls"    # plain | tls | ws (WebSocket over TLS)
    path: str = "/"
    conns: int = 50
    duration: float = 3.0
    metric: str = "rps"       # rps | mbps | added | mps | rtt | idle | stream | tap
    notes: str = ""
    systems: list[str] = field(default_factory=lambda: [k for k in SYSTEM_ORDER if k not in VARIANTS])
    streams: int = 1          # h2load: concurrent streams per connection (-m)


def make_scenarios(d: int, dl: int, idle_conns: int, stream_mib: int) -> list[Scenario]:
    """All scenarios; ``d`` seconds per throughput run, ``dl`` per one-connection run."""
    return [
        Scenario("plain-small", "HTTP/1.1 keep-alive, small responses, plain HTTP", "wrk", "plain", "/", 50, d,
                 notes=f"wrk -t1 -c50 -d{d:g}s, 12-byte body. The gateway listens for HTTPS only."),
        Scenario("plain-1m", "1 MiB responses, plain HTTP", "wrk", "plain", "/1m", 8, d, "mbps",
                 notes=f"wrk -t1 -c8 -d{d:g}s /1m; MB/s = 10^6 bytes/s of response (head and body)."),
        Scenario("plain-c1", "Added latency at one connection, plain HTTP", "wrk", "plain", "/", 1, dl, "added",
                 notes=f"wrk -t1 -c1 -d{dl:g}s; added p50 = the system's p50 minus direct's p50 in the same round."),
        Scenario("tls-small", "HTTP/1.1 keep-alive over TLS, small responses", "wrk", "tls", "/", 50, d,
                 notes=f"wrk -t1 -c50 -d{d:g}s, 12-byte body; TLS to the proxy, plain HTTP/1.1 to the backend "
                       "(direct: the backend's own TLS port). The gateway rows have a per-address rate limit "
                       "that never triggers; a third row has rate limiting off, to price the limiter. The gateway "
                       "rows give the container the client's address in forwarding headers (--client-ip-mode "
                       "headers) but one: 'transparent client IP', what a node run as root does by default, "
                       "connects to the container from the client's own address (IP_TRANSPARENT, the netfilter "
                       "rules installed; measured only as root). Upstream connects: the connections the backend "
                       "accepted during the run (a pool that keeps them opens about one per client connection); "
                       "new TIME-WAIT: the proxy's closed connections to the backend still in TIME-WAIT at the end "
                       "(those the backend closed wait on its side and are not counted). "
                       "The floor row "
                       "(bench/floor_proxy.py) is the least a Twisted TLS proxy costs: httptools parsing, one "
                       "keep-alive upstream connection per client connection, eager writes, no features.",
                 systems=list(SYSTEM_ORDER)),
        Scenario("tls-1m", "1 MiB responses over TLS", "wrk", "tls", "/1m", 8, d, "mbps",
                 notes=f"wrk -t1 -c8 -d{d:g}s /1m."),
        Scenario("tls-c1", "Added latency at one connection over TLS", "wrk", "tls", "/", 1, dl, "added",
                 notes=f"wrk -t1 -c1 -d{dl:g}s; added p50 = p50 minus direct's (TLS) p50 in the same round."),
        Scenario("h2-mux", "HTTP/2 over TLS, 4 connections x 10 streams, small responses", "h2load", "tls", "/", 4,
                 d, streams=10,
                 notes=f"h2load -t1 -c4 -m10 -D{d:g} --npn-list=h2, 12-byte body; only a run whose ALPN settled on "
                       "h2 counts (n/a otherwise). Upstream: HTTP/1.1 to the same backend (direct: the backend's "
                       "own h2 TLS port). Twisted's rows are ReverseProxyResource served by Twisted's own HTTP/2 "
                       "server (twisted.web._http2.H2Connection, chosen by ALPN)."),
        Scenario("h2-c1", "HTTP/2 over TLS, one connection, one stream: added latency", "h2load", "tls", "/", 1, dl,
                 "added", streams=1,
                 notes=f"h2load -t1 -c1 -m1 -D{dl:g} --npn-list=h2; p50/p99 from h2load's per-request log; "
                       "added p50 = the system's p50 minus direct's (h2) p50 in the same round."),
        Scenario("ws-echo", "WebSocket echo over TLS, 16 connections", "ws", "ws", "/echo", 16, d, "mps",
                 notes=f"bench/ws_client.py: 16 connections, one 32-byte binary message in flight on each, "
                       f"{d:g}s; backend: the demo's autobahn echo (direct: its own TLS port)."),
        Scenario("ws-c1", "WebSocket round trip over TLS, one connection", "ws", "ws", "/echo", 1, dl, "rtt",
                 notes=f"bench/ws_client.py: 1 connection, one message in flight, {dl:g}s."),
        Scenario("tap", "Tap cost: HTTP/1.1 keep-alive over TLS, small responses, 1 worker", "tap", "tls", "/", 50,
                 d, "tap", systems=["gateway-1"],
                 notes=f"wrk -t1 -c50 -d{d:g}s, 12-byte body, as the TLS small row, against one gateway of its own "
                       "(1 worker, the same settings) in three states, interleaved (the order turns each round): "
                       "no tap; a tap on another container (every exchange matched against it, none captured); "
                       "a tap matching every exchange, capturing heads and 4 KiB of each body, its client (a "
                       "thread of the harness) reading the NDJSON stream line by line and discarding it. Each "
                       "tap is opened before its run and ended (DELETE) after it (bench/tap_cost.py). *x no tap*: "
                       "ratio of the medians; *paired*: the same ratio within each round, min - max."),
        Scenario("ws-idle", f"{idle_conns:,} idle WebSockets through the gateway", "ws-idle", conns=idle_conns,
                 metric="idle", systems=["gateway-1", "gateway-2"],
                 notes="A fresh gateway per round; bench/ws_client.py idle opens the connections over TLS "
                       "(100 handshakes at a time) and sends nothing; gateway RSS (all its processes) before "
                       "and after, divided by the connections open."),
        Scenario("stream", f"{stream_mib} MiB upload and {stream_mib} MiB download through the gateway", "stream",
                 conns=stream_mib, metric="stream", systems=["gateway-1"],
                 notes="bench/streaming.py: a fresh gateway and the sink backend, curl over TLS, gateway RSS "
                       "sampled every 50 ms."),
    ]


def select(all_scenarios: list[Scenario], only: str | None) -> list[Scenario]:
    if not only:
        return all_scenarios
    words = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [s for s in all_scenarios if any(s.key == w or s.key.startswith(w + "-") for w in words)]
    unknown = [w for w in words if not any(s.key == w or s.key.startswith(w + "-") for s in all_scenarios)]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; known: "
                         + ", ".join(s.key for s in all_scenarios) + " (or a prefix: plain, tls, h2, ws)")
    return chosen


# -- CPU used by other processes while we measure ----------------------------------------

def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def _own_ticks() -> int:
    """CPU ticks of this process and all its descendants, living or reaped."""
    total = 0
    for pid in loadgen.process_tree(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total


class ForeignCPU:
    """CPU seconds used on the machine by processes that are not ours, between two marks."""

    def __init__(self) -> None:
        self.busy, self.own, self.t = _busy_ticks(), _own_ticks(), time.monotonic()

    def seconds(self) -> tuple[float, float]:
        """(foreign CPU seconds, wall seconds) since creation."""
        busy, own = _busy_ticks() - self.busy, _own_ticks() - self.own
        return max(0.0, (busy - own) / loadgen.CLK_TCK), time.monotonic() - self.t


def wait_quiet(limit: float, threshold: float = 0.15, window: float = 3.0) -> None:
    """Wait (at most ``limit`` seconds) until other processes use under ``threshold`` of a core."""
    deadline = time.monotonic() + limit
    while True:
        mark = ForeignCPU()
        time.sleep(window)
        cpu, wall = mark.seconds()
        if cpu / wall < threshold:
            print(f"bench: machine quiet (others at {100 * cpu / wall:.0f}% of a core)", flush=True)
            return
        if time.monotonic() > deadline:
            print(f"bench: still busy after {limit:g}s (others at {100 * cpu / wall:.0f}% of a core); "
                  "starting anyway", flush=True)
            return
        print(f"bench: waiting for a quiet machine (others at {100 * cpu / wall:.0f}% of a core)", flush=True)


# -- running ---------------------------------------------------------------------------

class Deadline(Exception):
    pass


def turned(order: list[str], round_index: int) -> list[str]:
    """The systems of round ``round_index``: ``direct`` first (the round's reference), the
    others turned by one place each round, so that no system always runs right after
    another (the one after ``direct`` meets a backend that has just served tens of
    thousands of requests a second)."""
    first = [k for k in order if k == "direct"]
    rest = [k for k in order if k != "direct"]
    if not rest:
        return first
    n = round_index % len(rest)
    return first + rest[n:] + rest[:n]


class Harness:
    def __init__(self, args) -> None:
        self.args = args
        self.quick = args.quick
        self.rounds = args.rounds or (1 if self.quick else 3)
        d, dl = (2, 1) if self.quick else (args.duration, args.latency_duration)
        idle = args.idle_conns or (2000 if self.quick else IDLE_TARGET)
        stream = args.stream_mib or (256 if self.quick else 1024)
        self.scenarios = select(make_scenarios(d, dl, idle, stream), args.only)
        if args.systems:
            keep = [w.strip() for w in args.systems.split(",") if w.strip()]
            unknown = [k for k in keep if k not in SYSTEM_ORDER]
            if unknown:
                raise SystemExit(f"unknown system(s): {', '.join(unknown)}; known: {', '.join(SYSTEM_ORDER)}")
            for sc in self.scenarios:  # direct stays: the ratios and added latencies are against it
                sc.systems = [k for k in sc.systems if k in keep or k == "direct"]
        self.started = time.monotonic()
        self.deadline = self.started + args.max_minutes * 60
        # The single-shot scenarios run last: keep time for them when the load rounds run long.
        reserve = 0.0
        for sc in self.scenarios:
            if sc.kind == "ws-idle":
                reserve += len(sc.systems) * (15 + 60 * sc.conns / IDLE_TARGET)
            elif sc.kind == "stream":
                reserve += 15 + 30 * sc.conns / 1024
        self.load_deadline = self.deadline - reserve
        self.results: dict[str, dict] = {}
        self.notes: list[str] = []

    def log(self, msg: str) -> None:
        stamp = f"[{time.monotonic() - self.started:6.1f}s]"
        print(f"{stamp} {msg}", flush=True)

    def wanted_systems(self) -> list[str]:
        keys = set()
        for sc in self.scenarios:
            if sc.kind in ("wrk", "h2load", "ws"):
                keys.update(sc.systems)
        return [k for k in SYSTEM_ORDER if k in keys]

    def run(self) -> dict:
        rundir = RunDir(keep=self.args.keep)
        self.log(f"run folder {rundir.path}")
        try:
            with contextlib.ExitStack() as stack:
                wanted = self.wanted_systems() or ["direct"]
                systems = stack.enter_context(Systems(rundir, wanted, log=self.log))
                self.notes.extend(systems.notes)
                self.systems = systems
                self.log("started: " + ", ".join(k for k, s in systems.systems.items() if "all" not in s.na))
                if any(sc.kind in ("wrk", "h2load", "ws") for sc in self.scenarios):
                    self.warm_up(systems)
                for sc in self.scenarios:
                    foreign = ForeignCPU()
                    try:
                        if sc.kind in ("wrk", "h2load", "ws"):
                            self.run_load(sc, systems)
                        elif sc.kind == "ws-idle":
                            self.run_idle(sc, systems)
                        elif sc.kind == "stream":
                            self.run_stream(sc)
                        elif sc.kind == "tap":
                            self.run_tap(sc, systems)
                    except Deadline:
                        self.log(f"{sc.key}: stopped at the time bound ({self.args.max_minutes:g} min)")
                        self.results.setdefault(sc.key, {})["_deadline"] = True
                    cpu, wall = foreign.seconds()
                    self.results.setdefault(sc.key, {})["_foreign_cpu"] = [cpu, wall]
        finally:
            rundir.cleanup()
        return self.results

    def check_deadline(self, load: bool = False) -> None:
        if time.monotonic() > (self.load_deadline if load else self.deadline):
            raise Deadline()

    def warm_up(self, systems: Systems) -> None:
        """A second of load over TLS on each proxy (not recorded): pools, caches, lazy imports."""
        self.log("warm-up")
        for key, s in systems.systems.items():
            if s.tls is not None and s.root_pid is not None and "all" not in s.na:
                with contextlib.suppress(loadgen.LoadError):
                    loadgen.wrk(f"https://127.0.0.1:{s.tls.port}/", s.tls.host, 10, 1)

    def run_load(self, sc: Scenario, systems: Systems) -> None:
        table = self.results.setdefault(sc.key, {})
        order = [k for k in sc.systems if k in systems.systems]
        for r in range(self.rounds):
            line = []
            for key in turned(order, r):
                self.check_deadline(load=True)
                s = systems.systems[key]
                entry = table.setdefault(key, {"rounds": []})
                if "na" in entry:
                    continue
                reason = s.na.get("all") or s.na.get(sc.transport)
                ep = {"plain": s.plain, "tls": s.tls, "ws": s.ws}[sc.transport]
                if reason or ep is None:
                    entry["na"] = reason or "not supported"
                    continue
                foreign = ForeignCPU()
                # upstream connections opened (the nginx backend's accepts): a proxy's, not wrk's own
                counted = sc.kind in ("wrk", "h2load") and s.root_pid is not None
                before = systems.upstream_counters() if counted else None
                try:
                    res = loadgen.measured(s.root_pid, lambda: self.one(sc, ep))
                except loadgen.NoH2 as e:
                    entry["na"] = str(e)
                    continue
                except loadgen.LoadError as e:
                    res = {"error": str(e)}
                if counted:
                    res.update(upstream_delta(before, systems.upstream_counters()))
                cpu, wall = foreign.seconds()
                res["round"], res["foreign_cpu_pct"] = r, 100 * cpu / max(wall, 0.1)
                entry["rounds"].append(res)
                line.append(f"{key}={report.short(sc, res)}")
            self.log(f"{sc.key} round {r + 1}/{self.rounds}: " + "  ".join(line))

    def one(self, sc: Scenario, ep) -> dict:
        if sc.kind == "wrk":
            scheme = "http" if sc.transport == "plain" else "https"
            return loadgen.wrk(f"{scheme}://127.0.0.1:{ep.port}{sc.path}", ep.host, sc.conns, sc.duration)
        if sc.kind == "h2load":
            return loadgen.h2load(f"https://127.0.0.1:{ep.port}{sc.path}", ep.host, sc.conns, sc.streams, sc.duration)
        return loadgen.ws_echo(ep.port, ep.host or "localhost", sc.conns, sc.duration, tls=True)

    # what a tap costs --------------------------------------------------------------------

    def run_tap(self, sc: Scenario, systems: Systems) -> None:
        """One gateway of its own, no tap / a tap elsewhere / a tap capturing everything, interleaved."""
        from bench import tap_cost
        table = self.results.setdefault(sc.key, {})
        if "gateway-1" not in sc.systems:
            self.log(f"{sc.key}: not run (--systems leaves out gateway-1)")
            return
        try:
            gw = Gateway([])
        except RuntimeError as e:
            for state in tap_cost.STATES:
                table[state] = {"na": f"gateway did not start: {e}", "rounds": []}
            return
        with gw:
            try:
                host = gw.register(systems.ports["BACKEND_PORT"])
            except OSError as e:
                for state in tap_cost.STATES:
                    table[state] = {"na": f"the container could not be registered: {e}", "rounds": []}
                return
            url = f"https://127.0.0.1:{gw.https_port}{sc.path}"

            def load() -> dict:
                return loadgen.wrk(url, host, sc.conns, sc.duration)
            # not recorded: pools, caches, lazy imports, the tap code's first events
            with contextlib.suppress(loadgen.LoadError, tap_cost.TapError):
                tap_cost.measured_with_tap(gw, "all", lambda: loadgen.wrk(url, host, 10, 1), loadgen.measured)
            for r in range(self.rounds):
                line = []
                turn = r % len(tap_cost.STATES)
                for state in tap_cost.STATES[turn:] + tap_cost.STATES[:turn]:
                    self.check_deadline(load=True)
                    entry = table.setdefault(state, {"rounds": []})
                    foreign = ForeignCPU()
                    try:
                        res = tap_cost.measured_with_tap(gw, state, load, loadgen.measured)
                    except (loadgen.LoadError, tap_cost.TapError) as e:
                        res = {"error": str(e)}
                    cpu, wall = foreign.seconds()
                    res["round"], res["foreign_cpu_pct"] = r, 100 * cpu / max(wall, 0.1)
                    entry["rounds"].append(res)
                    line.append(f"{state}={report.short(sc, res)}")
                self.log(f"{sc.key} round {r + 1}/{self.rounds}: " + "  ".join(line))

    # 10,000 idle WebSockets --------------------------------------------------------------

    def run_idle(self, sc: Scenario, systems: Systems) -> None:
        table = self.results.setdefault(sc.key, {})
        ws_port = systems.ports["WS_BACKEND_PORT"]
        for r in range(self.rounds if self.args.heavy_rounds else 1):
            self.check_deadline()
            for key, extra in (("gateway-1", []), ("gateway-2", ["--workers", "2"])):
                if key not in sc.systems:
                    continue
                entry = table.setdefault(key, {"rounds": []})
                if "na" in entry:
                    continue
                try:
                    res = self.idle_once(extra, ws_port, sc.conns)
                except _NotAvailable as e:
                    entry["na"] = str(e)
                    continue
                except (loadgen.LoadError, RuntimeError, OSError) as e:
                    res = {"error": str(e)}
                entry["rounds"].append(res)
                self.log(f"ws-idle round {r + 1}: {key}: {report.short(sc, res)}")

    def idle_once(self, extra: list[str], ws_port: int, target: int) -> dict:
        try:
            gw = Gateway(extra)
        except RuntimeError as e:
            raise _NotAvailable(f"gateway did not start with {' '.join(extra)}: {e}")
        with gw:
            host = gw.register(ws_port)
            time.sleep(0.5)  # workers settle
            pids = loadgen.process_tree(gw.pid)
            used = max(len(os.listdir(f"/proc/{p}/fd")) for p in pids)
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            # each idle WebSocket holds two descriptors in the gateway: the client's and the container's
            conns = min(target, (hard - used - 64) // 2)
            # warm-up: a few connections opened and closed, so that the baseline has its buffers
            self._idle_client(gw.https_port, host, 50, lambda: None)
            time.sleep(0.3)
            before = loadgen.rss(loadgen.process_tree(gw.pid))[0]
            after: list[int] = []

            def at_peak() -> None:
                time.sleep(1.0)
                after.append(loadgen.rss(loadgen.process_tree(gw.pid))[0])
            opened, seconds, first_error = self._idle_client(gw.https_port, host, conns, at_peak)
            if not after or opened == 0:
                raise loadgen.LoadError(f"no idle WebSocket opened ({first_error})")
            res = {"target": target, "conns": conns, "opened": opened, "open_s": seconds,
                   "rss_before_kib": before, "rss_after_kib": after[0], "fd_hard_limit": hard,
                   "kib_per_conn": (after[0] - before) / opened, "workers": len(loadgen.process_tree(gw.pid))}
            if first_error:
                res["first_error"] = first_error
            return res

    def _idle_client(self, port: int, host: str, conns: int, at_peak) -> tuple[int, float, str]:
        args = [sys.executable, os.path.join(HERE, "ws_client.py"), "idle", "--tls", "--port", str(port),
                "--host", host, "--conns", str(conns), "--concurrency", "100", "--open-timeout", "150",
                "--hold", "60"]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            line = _readline(proc, 200)
            if not line.startswith("OPEN "):
                raise loadgen.LoadError(f"ws client: {line.strip()[:200] or 'no output'}")
            parts = line.split(None, 4)
            opened, seconds = int(parts[1]), float(parts[3])
            first_error = parts[4].strip() if len(parts) > 4 else ""
            at_peak()
            proc.stdin.write("close\n")
            proc.stdin.flush()
            _readline(proc, 60)
            return opened, seconds, first_error
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

    # 1 GiB up and down ----------------------------------------------------------------

    def run_stream(self, sc: Scenario) -> None:
        from bench import streaming
        table = self.results.setdefault(sc.key, {})
        entry = table.setdefault("gateway-1", {"rounds": []})
        for r in range(self.rounds if self.args.heavy_rounds else 1):
            self.check_deadline()
            try:
                res = streaming.measure(sc.conns, timeout=180)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                res = {"error": str(e)}
            entry["rounds"].append(res)
            self.log(f"stream round {r + 1}: {report.short(sc, res)}")


class _NotAvailable(Exception):
    pass


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """One line of ``proc``'s output, or '' after ``timeout`` seconds."""
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else ""


# -- environment -----------------------------------------------------------------------

def _version(args: list[str], pattern: str | None = None) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "not found"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def _mitmproxy_version() -> str:
    from bench.systems import MITM_VENV
    mitm = os.path.join(MITM_VENV, "bin", "mitmdump")
    return _version([mitm, "--version"]) if os.path.exists(mitm) else "not installed"


def environment() -> dict:
    import twisted
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
        "twisted": twisted.__version__,
        "nginx": _version(["nginx", "-v"]), "haproxy": _version(["haproxy", "-v"]),
        "caddy": _version(["caddy", "version"]), "wrk": _version(["wrk", "-v"]),
        "h2load": _version(["h2load", "--version"]),
        "mitmproxy": _mitmproxy_version(),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


# -- entry point -----------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="hoodyproxy benchmark harness (make bench)")
    p.add_argument("--quick", action="store_true", help="one round, short runs, smaller heavy scenarios")
    p.add_argument("--only", help="comma-separated scenarios or prefixes (plain, tls, h2, ws, ws-idle, stream, "
                   "tap...)")
    p.add_argument("--systems", help="comma-separated systems to measure, direct always among them "
                   "(e.g. gateway-1,gateway-1-transparent,floor; default: every system a scenario names)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--duration", type=int, default=3, help="seconds per throughput run (default 3)")
    p.add_argument("--latency-duration", type=int, default=2, help="seconds per c=1 run (default 2)")
    p.add_argument("--idle-conns", type=int, help=f"idle WebSockets (default {IDLE_TARGET:,}; --quick 2,000)")
    p.add_argument("--stream-mib", type=int, help="upload/download size in MiB (default 1024; --quick 256)")
    p.add_argument("--heavy-rounds", action="store_true",
                   help="also repeat ws-idle and stream every round (default: once per run)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="first wait up to SECONDS for other processes to use under 15%% of a core")
    p.add_argument("--max-minutes", type=float, default=14.0, help="stop starting runs after this (default 14)")
    doc = p.add_mutually_exclusive_group()
    doc.add_argument("--doc", action="store_true", default=None,
                     help="update docs/performance.rst even after --quick or --only")
    doc.add_argument("--no-doc", dest="doc", action="store_false",
                     default=None, help="do not update docs/performance.rst (default for --quick and --only)")
    p.add_argument("--keep", action="store_true", help="keep the run folder (configs, logs)")
    p.add_argument("--out", default=RESULTS, help="results folder (default bench/results)")
    p.add_argument("--render", metavar="RAW", help="measure nothing: write the tables of a saved run "
                   "(bench/results/*.raw) again, and the doc's generated part with --doc")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(args)
    # Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt once, so that every process started
    # is stopped on the way out; a second signal does not interrupt that cleanup.
    def _interrupt(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    # Children inherit the limit: the gateway needs two descriptors per idle WebSocket.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for tool in ("wrk", "h2load", "nginx", "haproxy", "caddy", "openssl", "curl"):
        if not shutil.which(tool):
            print(f"bench: {tool} is not installed (make bench installs DEBIAN_BENCH_PACKAGES as root)",
                  file=sys.stderr)
            return 2
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    harness = Harness(args)
    started_at = datetime.datetime.now()
    env = environment()
    harness.log(f"{len(harness.scenarios)} scenarios, {harness.rounds} round(s); "
                f"{env['cores']} cores, load average {' '.join(env['loadavg_start'])}")
    whole = ForeignCPU()
    try:
        results = harness.run()
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    foreign, wall = whole.seconds()
    env["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    if env["mitmproxy"] == "not installed":
        env["mitmproxy"] = _mitmproxy_version()  # (a first run installs it: systems.mitmdump_path)
    meta = {"started": started_at.isoformat(timespec="seconds"), "wall_s": wall, "foreign_cpu_s": foreign,
            "rounds": harness.rounds, "quick": harness.quick, "env": env, "notes": harness.notes,
            "scenarios": [vars(sc) for sc in harness.scenarios], "labels": LABELS,
            "argv": sys.argv[1:] if argv is None else argv}
    os.makedirs(args.out, exist_ok=True)
    stamp = started_at.strftime("%Y-%m-%d-%H%M") + ("-quick" if args.quick else "") + ("-partial" if args.only else "")
    md_path = os.path.join(args.out, f"{stamp}.md")
    with open(os.path.join(args.out, f"{stamp}.raw"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    markdown = report.markdown(meta, results)
    with open(md_path, "w") as f:
        f.write(markdown)
    harness.log(f"wrote {os.path.relpath(md_path, ROOT)} ({wall / 60:.1f} min)")
    if args.doc or (args.doc is None and not args.quick and not args.only):
        report.update_doc(DOC, meta, results, os.path.relpath(md_path, os.path.dirname(DOC)))
        harness.log(f"updated {os.path.relpath(DOC, ROOT)}")
    print(report.targets_markdown(meta, results))
    return 0


def render(args) -> int:
    """``--render RAW``: the markdown file (and with --doc, the doc) from a saved run."""
    with open(args.render) as f:
        saved = json.load(f)
    meta, results = saved["meta"], saved["results"]
    md_path = os.path.splitext(args.render)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(report.markdown(meta, results))
    print(f"wrote {md_path}")
    if args.doc:
        report.update_doc(DOC, meta, results, md_path)
        print(f"updated {DOC}")
    return 0
