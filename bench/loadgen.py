"""Load generators (wrk, h2load, the WebSocket client) and per-process CPU/RSS readings.

Every load generator runs as its own process, bounded in time (its own duration plus a
subprocess timeout), so its CPU is never counted as the proxy's.  Only 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WRK_SCRIPT = os.path.join(HERE, "configs", "report.lua")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class LoadError(RuntimeError):
    """A load run that did not produce usable figures (the message says why)."""


# -- processes -------------------------------------------------------------------------

def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (scanning /proc), e.g. nginx master + workers."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if os.path.exists(f"/proc/{pid}"):
            tree.append(pid)
            todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (from /proc/PID/stat), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def rss(pids: list[int]) -> tuple[int, int]:
    """(sum of VmRSS, sum of VmHWM) of ``pids`` in KiB."""
    cur = peak = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        cur += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        peak += int(line.split()[1])
        except OSError:
            continue
    return cur, peak


def measured(root_pid: int | None, run) -> dict:
    """Run ``run()`` (a load run returning a dict with ``ops``) and add the proxy's CPU/RSS.

    ``root_pid`` None (direct to the backend) adds nothing.  CPU is utime+stime summed
    over the process tree before and after; RSS is read at the end of the run.
    """
    if root_pid is None:
        return run()
    pids = process_tree(root_pid)
    before = cpu_seconds(pids)
    result = run()
    pids_after = process_tree(root_pid)
    # a worker that appeared during the run started at 0 CPU: count all of its time
    result["cpu_s"] = cpu_seconds(pids_after) - before
    if result.get("ops"):
        result["cpu_us_per_op"] = result["cpu_s"] * 1e6 / result["ops"]
    result["rss_kib"], result["hwm_kib"] = rss(pids_after)
    return result


# -- wrk -------------------------------------------------------------------------------

def wrk(url: str, host: str | None, conns: int, duration: float, timeout_s: float = 5.0) -> dict:
    """``wrk -t1 -cN -dS`` with a JSON report; returns req/s, MB/s, latencies (us)."""
    args = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", f"--timeout={max(1, round(timeout_s))}s", "-s", WRK_SCRIPT]
    if host:
        args += ["-H", f"Host: {host}"]
    args.append(url)
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise LoadError("wrk did not finish in time")
    m = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        raise LoadError(f"wrk failed ({out.returncode}): {(out.stderr or out.stdout).strip()[:200]}")
    r = json.loads(m.group(1))
    seconds = r["duration_us"] / 1e6
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    if r["requests"] == 0:
        raise LoadError(f"wrk completed no request ({errors} errors)")
    if r["status"] > 0.01 * r["requests"] or r["connect"] + r["timeout"] > 0.01 * r["requests"] + 5:
        raise LoadError(f"wrk: {r['status']} non-2xx/3xx, {r['connect']} connect errors, "
                        f"{r['timeout']} timeouts of {r['requests']}")
    return {"ops": r["requests"], "seconds": seconds, "rps": r["requests"] / seconds,
            "mbps": r["bytes"] / seconds / 1e6, "p50_us": r["p50"], "p90_us": r["p90"],
            "p99_us": r["p99"], "errors": errors}


# -- h2load ----------------------------------------------------------------------------

class NoH2(LoadError):
    """The server did not negotiate h2."""


def h2load(url: str, host: str | None, clients: int, streams: int, duration: float) -> dict:
    """``h2load -t1 -cC -mM -D S`` over TLS offering only h2 (ALPN); req/s and latencies (us).

    Only a run in which ALPN settled on h2 counts: anything else raises :class:`NoH2`.
    Latency percentiles come from h2load's per-request log (``--log-file``).
    """
    import tempfile
    fd, log_path = tempfile.mkstemp(prefix="bench-h2load-", suffix=".log")
    os.close(fd)
    args = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", f"-D{max(1, round(duration))}", "--npn-list=h2",
            f"--log-file={log_path}"]
    if host:
        args += ["-H", f":authority: {host}"]
    args.append(url)
    try:
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30)
        except subprocess.TimeoutExpired:
            raise LoadError("h2load did not finish in time")
        text = out.stdout + out.stderr
        proto = re.search(r"Application protocol: (\S+)", text)
        if proto is None or proto.group(1) != "h2":
            raise NoH2("does not speak h2 (ALPN: " + (proto.group(1) if proto else "none") + ")")
        fin = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", text)
        req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", text)
        codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
        if not fin or not req:
            raise LoadError(f"h2load failed ({out.returncode}): {text.strip()[-200:]}")
        succeeded, failed = int(req.group(4)), int(req.group(5))
        bad = int(codes.group(3)) + int(codes.group(4)) if codes else 0
        if succeeded == 0 or failed + bad > 0.01 * succeeded:
            raise LoadError(f"h2load: {succeeded} succeeded, {failed} failed, {bad} 4xx/5xx")
        seconds = float(fin.group(1))
        result = {"ops": succeeded, "seconds": seconds, "rps": succeeded / seconds, "protocol": "h2",
                  "errors": failed + bad}
        latencies = []
        with open(log_path) as f:
            for line in f:
                cols = line.split("\t")
                if len(cols) >= 3 and cols[1].startswith("2"):
                    latencies.append(int(cols[2]))
        if latencies:
            latencies.sort()
            pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
            result.update(p50_us=pick(0.5), p90_us=pick(0.9), p99_us=pick(0.99))
        return result
    finally:
        with contextlib.suppress(OSError):
            os.unlink(log_path)


# -- WebSocket -------------------------------------------------------------------------

def ws_echo(port: int, host: str, conns: int, duration: float, tls: bool = True) -> dict:
    """The WebSocket echo client (bench/ws_client.py) in its own process; messages/s, RTT."""
    args = [sys.executable, os.path.join(HERE, "ws_client.py"), "echo", "--port", str(port),
            "--host", host, "--conns", str(conns), "--duration", str(duration)]
    if tls:
        args.append("--tls")
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise LoadError("ws client did not finish in time")
    m = re.search(r"^WSJSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        raise LoadError(f"ws client failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-200:]}")
    r = json.loads(m.group(1))
    if r["messages"] == 0:
        raise LoadError(f"no WebSocket echo came back ({r.get('error')})")
    return {"ops": r["messages"], "seconds": r["seconds"], "mps": r["messages"] / r["seconds"],
            "rtt_p50_us": r["rtt_p50_us"], "rtt_p99_us": r["rtt_p99_us"]}
