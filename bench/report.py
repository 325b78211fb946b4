"""Tables from a harness run: the markdown results file and docs/performance.rst's generated part."""

from __future__ import annotations

import os
import re
import statistics

from bench.systems import LABELS, SYSTEM_ORDER
from bench.tap_cost import LABELS as TAP_LABELS
from bench.tap_cost import STATES as TAP_STATES

BEGIN, END = ".. BEGIN GENERATED", ".. END GENERATED"

# metric -> (column title, the field of one round's figures that the table is about)
PRIMARY = {
    "rps": ("req/s", "rps"),
    "mbps": ("MB/s", "mbps"),
    "added": ("added p50", "p50_us"),
    "mps": ("messages/s", "mps"),
    "rtt": ("RTT p50", "rtt_p50_us"),
}


def _num(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _us(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f} us"


def _signed_us(x: float | None) -> str:
    return "-" if x is None else f"{x:+,.0f} us"


def _mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.1f} MiB"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "-"
    return f"{a / b:.2f}x"


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _spread(values: list[float], fmt) -> str:
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return "-"
    return f"{fmt(min(values))} - {fmt(max(values))}"


def short(sc, res: dict) -> str:
    """One measurement in a few characters, for the progress log."""
    if "error" in res:
        return "ERROR(" + res["error"][:60] + ")"
    if sc.metric == "idle":
        return f"{res['opened']} open, {res['kib_per_conn']:.1f} KiB/conn"
    if sc.metric == "stream":
        return (f"up peak {res['upload_peak_kib'] / 1024:.1f} MiB, down peak {res['download_peak_kib'] / 1024:.1f} "
                f"MiB")
    cpu = f"/{res['cpu_us_per_op']:.0f}us" if "cpu_us_per_op" in res else ""
    if sc.metric == "mbps":
        return f"{res['mbps']:.0f}MB/s{cpu}"
    if sc.metric == "added":
        return f"p50={res.get('p50_us', '?')}us{cpu}"
    if sc.metric == "mps":
        return f"{res['mps']:.0f}msg/s{cpu}"
    if sc.metric == "rtt":
        return f"rtt={res['rtt_p50_us']:.0f}us{cpu}"
    connects = f"/{res['upstream_connects']}conn" if "upstream_connects" in res else ""
    return f"{res['rps']:.0f}{cpu}{connects}"


# -- per-scenario statistics ------------------------------------------------------------

def _ok_rounds(entry: dict | None) -> list[dict]:
    if not entry:
        return []
    return [r for r in entry.get("rounds", []) if "error" not in r]


def system_stats(sc: dict, table: dict, key: str) -> dict | None:
    """Medians and spreads of one system in one scenario; None when nothing was measured."""
    entry = table.get(key)
    rounds = _ok_rounds(entry)
    if not rounds:
        return None
    metric = sc["metric"]
    _, field = PRIMARY[metric]
    direct = {r.get("round"): r for r in _ok_rounds(table.get("direct"))}
    st = {"n": len(rounds), "value": _median([r[field] for r in rounds]),
          "values": [r[field] for r in rounds]}
    if metric in ("added", "rtt"):
        added = [r[field] - direct[r.get("round")][field] for r in rounds if r.get("round") in direct]
        st["added"] = _median(added)
        st["added_values"] = added
    for extra in ("p50_us", "p99_us", "rtt_p50_us", "rtt_p99_us", "rps", "mps", "cpu_us_per_op", "rss_kib",
                  "upstream_connects", "time_wait_added"):
        if all(extra in r for r in rounds):
            st[extra] = _median([r[extra] for r in rounds])
    hwm = [r["hwm_kib"] for r in rounds if "hwm_kib" in r]
    st["hwm_kib"] = max(hwm) if hwm else None
    return st


def scenario_rows(sc: dict, table: dict) -> list[list[str]]:
    metric = sc["metric"]
    stats = {k: system_stats(sc, table, k) for k in SYSTEM_ORDER}
    base = {k: (stats[k] or {}).get("value") for k in ("direct", "nginx")}
    rows = []
    for key in SYSTEM_ORDER:
        if key not in sc["systems"] or key not in table:
            continue
        entry = table[key]
        label = LABELS[key]
        st = stats[key]
        failed = [r["error"] for r in entry.get("rounds", []) if "error" in r]
        if st is None:
            why = entry.get("na") and f"n/a: {entry['na']}" or (
                f"failed: {failed[0][:120]}" if failed else "not measured")
            rows.append([label, why] + ["-"] * (len(HEADERS[metric]) - 2))
            continue
        v = st["value"]
        if failed:
            label += f" ({len(failed)} of {len(failed) + st['n']} rounds failed: {failed[0][:80]})"
        cpu = _us(st.get("cpu_us_per_op")) if key != "direct" else "-"
        mem = "-" if key == "direct" else (
            f"{_mib(st.get('rss_kib'))} ({_mib(st.get('hwm_kib'))})" if st.get("hwm_kib") else _mib(st.get("rss_kib")))
        ratios = [_ratio(v, base["direct"]), _ratio(v, base["nginx"])]
        if metric == "rps":
            rows.append([label, _num(v), _spread(st["values"], _num), _us(st.get("p50_us")), _us(st.get("p99_us")),
                         *ratios, cpu, mem, _num(st.get("upstream_connects")), _num(st.get("time_wait_added"))])
        elif metric == "mbps":
            rows.append([label, _num(v), _spread(st["values"], _num), *ratios, cpu, mem])
        elif metric == "added":
            rows.append([label, _signed_us(st.get("added")), _spread(st.get("added_values", []), _signed_us),
                         _us(v), _us(st.get("p99_us")), _num(st.get("rps")), *ratios, cpu, mem])
        elif metric == "mps":
            rows.append([label, _num(v), _spread(st["values"], _num), _us(st.get("rtt_p50_us")),
                         _us(st.get("rtt_p99_us")), *ratios, cpu, mem])
        elif metric == "rtt":
            rows.append([label, _us(v), _spread(st["values"], _us), _signed_us(st.get("added")),
                         _num(st.get("mps")), *ratios, cpu, mem])
    return rows


HEADERS = {
    "rps": ["system", "req/s (median)", "min - max", "p50", "p99", "x direct", "x nginx", "CPU/request",
            "RSS (peak)", "upstream connects", "new TIME-WAIT"],
    "mbps": ["system", "MB/s (median)", "min - max", "x direct", "x nginx", "CPU/response", "RSS (peak)"],
    "added": ["system", "added p50 (median)", "min - max", "p50", "p99", "req/s", "x direct (p50)",
              "x nginx (p50)", "CPU/request", "RSS (peak)"],
    "mps": ["system", "messages/s (median)", "min - max", "RTT p50", "RTT p99", "x direct", "x nginx",
            "CPU/message", "RSS (peak)"],
    "rtt": ["system", "RTT p50 (median)", "min - max", "added RTT p50", "messages/s", "x direct (RTT)",
            "x nginx (RTT)", "CPU/message", "RSS (peak)"],
}
NUMERIC_FROM = 1


def _drop_empty_columns(headers: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Leave out columns (after the second) in which no row has a figure, e.g. h2load's latencies."""
    keep = [i for i in range(len(headers)) if i < 2 or any(r[i] != "-" for r in rows if len(r) > i)]
    return [headers[i] for i in keep], [[r[i] for i in keep if i < len(r)] for r in rows]


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    headers, rows = _drop_empty_columns(headers, rows)
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def idle_rows(table: dict) -> list[list[str]]:
    rows = []
    for key in ("gateway-1", "gateway-2"):
        entry = table.get(key)
        if entry is None:
            continue
        rounds = _ok_rounds(entry)
        if not rounds:
            why = entry.get("na") or (entry.get("rounds") or [{}])[0].get("error", "not measured")
            rows.append([LABELS[key], f"n/a: {why}"[:160], "-", "-", "-", "-"])
            continue
        per = [r["kib_per_conn"] for r in rounds]
        r0 = rounds[0]
        rows.append([LABELS[key], f"{r0['opened']:,} of {r0['conns']:,}", _mib(_median([r["rss_before_kib"] for r in rounds])),
                     _mib(_median([r["rss_after_kib"] for r in rounds])),
                     f"{_median(per):.1f} KiB" + (f" ({min(per):.1f} - {max(per):.1f})" if len(per) > 1 else ""),
                     f"{_median([r['open_s'] for r in rounds]):.1f} s"])
    return rows


def stream_rows(table: dict) -> list[list[str]]:
    rounds = _ok_rounds(table.get("gateway-1"))
    if not rounds:
        entry = table.get("gateway-1") or {}
        err = (entry.get("rounds") or [{}])[0].get("error", "not measured")
        return [["upload", f"failed: {err}"[:160], "-", "-"], ["download", "-", "-", "-"]]
    r = rounds[0]
    rate = lambda s: f"{r['size_mib'] / r[s]:,.0f} MiB/s"  # noqa: E731
    return [["upload", _mib(r["rss_before_kib"]), _mib(max(x["upload_peak_kib"] for x in rounds)), rate("upload_s")],
            ["download", _mib(r["rss_before_kib"]), _mib(max(x["download_peak_kib"] for x in rounds)),
             rate("download_s")]]


def _tap_stats(table: dict) -> dict[str, dict]:
    """Per tap state (bench/tap_cost.py): the rounds measured and their medians."""
    out = {}
    for state in TAP_STATES:
        rounds = _ok_rounds(table.get(state))
        cpu = [r["cpu_us_per_op"] for r in rounds if "cpu_us_per_op" in r]
        if not cpu:
            continue
        out[state] = {"n": len(rounds), "cpu": _median(cpu), "cpu_values": cpu,
                      "by_round": {r.get("round"): r["cpu_us_per_op"] for r in rounds if "cpu_us_per_op" in r},
                      "rps": _median([r["rps"] for r in rounds]), "p99_us": _median([r.get("p99_us") for r in rounds]),
                      "events": _median([r.get("tap_events_read") for r in rounds]),
                      "dropped": sum(r.get("tap_dropped") or 0 for r in rounds)}
    return out


def tap_ratio(table: dict, state: str) -> tuple[float | None, list[float]]:
    """``state``'s CPU per request over no tap's: (ratio of the medians, ratio within each round)."""
    stats = _tap_stats(table)
    base, mine = stats.get("off"), stats.get(state)
    if not base or not mine or not base["cpu"]:
        return None, []
    paired = [mine["by_round"][r] / base["by_round"][r] for r in mine["by_round"] if base["by_round"].get(r)]
    return mine["cpu"] / base["cpu"], paired


def tap_rows(table: dict) -> list[list[str]]:
    stats = _tap_stats(table)
    rows = []
    for state in TAP_STATES:
        entry = table.get(state)
        if entry is None:
            continue
        failed = [r["error"] for r in entry.get("rounds", []) if "error" in r]
        st = stats.get(state)
        label = TAP_LABELS[state]
        if st is None:
            why = entry.get("na") and f"n/a: {entry['na']}" or (
                f"failed: {failed[0][:120]}" if failed else "not measured")
            rows.append([label, why[:160]] + ["-"] * (len(TAP_HEADERS) - 2))
            continue
        if failed:
            label += f" ({len(failed)} of {len(failed) + st['n']} rounds failed: {failed[0][:80]})"
        ratio, paired = tap_ratio(table, state) if state != "off" else (None, [])
        rows.append([label, _us(st["cpu"]), _spread(st["cpu_values"], _us), _ratio(ratio, 1) if ratio else "-",
                     _spread(paired, lambda x: f"{x:.2f}x"), _num(st["rps"]), _us(st["p99_us"]),
                     "-" if state == "off" else _num(st["events"]), "-" if state == "off" else _num(st["dropped"])])
    return rows


TAP_HEADERS = ["state", "CPU/request (median)", "min - max", "x no tap", "paired, min - max", "req/s",
               "p99", "tap events read per run", "dropped (all runs)"]


def tap_summary(table: dict) -> str:
    """One sentence: CPU per request with no tap, a tap elsewhere, a tap capturing everything."""
    stats = _tap_stats(table)
    if "off" not in stats:
        return ""
    parts = [f"{_us(stats['off']['cpu'])} of CPU per request with no tap"]
    for state, what in (("elsewhere", "with a tap on another container"),
                        ("all", "with a tap capturing every exchange")):
        ratio, paired = tap_ratio(table, state)
        if ratio is not None:
            spread = f", {min(paired):.2f}-{max(paired):.2f}x paired" if len(paired) > 1 else ""
            parts.append(f"{_us(stats[state]['cpu'])} {what} ({ratio:.2f}x{spread})")
    return "Taps, 1 worker, TLS small responses: " + ", ".join(parts) + "."


# -- targets ---------------------------------------------------------------------------

def targets(meta: dict, results: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met/missed/n/a) for every target of the issue."""
    sc = {s["key"]: s for s in meta["scenarios"]}

    def st(scenario: str, key: str) -> dict | None:
        if scenario not in results or scenario not in sc:
            return None
        return system_stats(sc[scenario], results[scenario], key)

    rows = []

    def why_not(scenario: str, key: str) -> str:
        entry = (results.get(scenario) or {}).get(key) or {}
        if entry.get("na"):
            return f"n/a ({LABELS[key]}: {entry['na'][:80]})"
        errors = [r["error"] for r in entry.get("rounds", []) if "error" in r]
        return f"failed ({errors[0][:80]})" if errors else "not measured"

    def add(target: str, measured: float | None, ok, text, missing: tuple[str, str] = ("", "gateway-1")) -> None:
        if measured is None:
            rows.append((target, why_not(*missing) if missing[0] else "not measured", "n/a"))
        else:
            rows.append((target, text, "met" if ok else "missed"))

    s = st("tls-small", "gateway-1")
    cpu = s and s.get("cpu_us_per_op")
    add("CPU per request, TLS, HTTP/1.1 keep-alive, 1 worker: <= 120 us", cpu, cpu is not None and cpu <= 120,
        f"{cpu:,.0f} us" if cpu is not None else "", ("tls-small", "gateway-1"))
    gw = s and s.get("value")
    # CPU per request against the floor (bench/floor_proxy.py) and Caddy, same run, same scenario
    for peer, factor, target in (("floor", 1.5, "gateway CPU per request <= 1.5x the floor (1 worker, TLS, "
                                                "small responses)"),
                                 ("caddy", 1.0, "gateway CPU per request <= Caddy's")):
        p = st("tls-small", peer)
        pcpu = p and p.get("cpu_us_per_op")
        ratio = cpu / pcpu if cpu and pcpu else None
        add(target, ratio, ratio is not None and ratio <= factor,
            # (one decimal: two medians a microsecond apart would both print 60 here)
            f"{ratio:.2f}x ({cpu:,.1f} vs {pcpu:,.1f} us)" if ratio else "",
            ("tls-small", "gateway-1" if not cpu else peer))
    for peer, factor in (("twisted-rpr-ka", 2), ("mitmproxy", 4)):
        p = st("tls-small", peer)
        pv = p and p.get("value")
        ratio = gw / pv if gw and pv else None
        add(f"req/s over TLS, 1 worker >= {factor}x {LABELS[peer]}", ratio, ratio is not None and ratio >= factor,
            f"{ratio:.2f}x ({gw:,.0f} vs {pv:,.0f})" if ratio else "",
            ("tls-small", "gateway-1" if not gw else peer))
    g2, caddy = st("tls-small", "gateway-2"), st("tls-small", "caddy")
    g2v, cv = g2 and g2.get("value"), caddy and caddy.get("value")
    ratio = g2v / cv if g2v and cv else None
    add("req/s over TLS, 2 workers >= Caddy (GOMAXPROCS=1)", ratio, ratio is not None and ratio >= 1,
        f"{ratio:.2f}x ({g2v:,.0f} vs {cv:,.0f})" if ratio else "", ("tls-small", "gateway-2" if not g2v else "caddy"))
    off = st("tls-small", "gateway-1-nolimit")
    off_cpu = off and off.get("cpu_us_per_op")
    cost = (cpu / off_cpu - 1) * 100 if cpu and off_cpu else None
    add("rate limiter (a per-address limit that never triggers): < 5 % of a request's CPU", cost,
        cost is not None and cost < 5, f"{cost:+.1f} % ({cpu:,.0f} vs {off_cpu:,.0f} us)" if cost is not None else "",
        ("tls-small", "gateway-1-nolimit"))
    tap = results.get("tap") or {}
    ratio, paired = tap_ratio(tap, "elsewhere")
    cost = (ratio - 1) * 100 if ratio is not None else None
    tstats = _tap_stats(tap)
    within = (f"; paired {(min(paired) - 1) * 100:+.1f} to {(max(paired) - 1) * 100:+.1f} %" if len(paired) > 1
              else "")
    add("tap off or elsewhere: <5 % (nothing measurable)", cost, cost is not None and cost < 5,
        f"{cost:+.1f} % ({tstats['elsewhere']['cpu']:,.0f} vs {tstats['off']['cpu']:,.0f} us with no tap{within})"
        if cost is not None else "")
    # transparent client IP, the default as root: the pool keeps one client address's connections
    tp = st("tls-small", "gateway-1-transparent")
    tp_cpu = tp and tp.get("cpu_us_per_op")
    ratio = tp_cpu / cpu if tp_cpu and cpu else None
    add("transparent client IP (root's default): CPU per request <= 1.2x headers mode's, same run", ratio,
        ratio is not None and ratio <= 1.2, f"{ratio:.2f}x ({tp_cpu:,.0f} vs {cpu:,.0f} us)" if ratio else "",
        ("tls-small", "gateway-1-transparent" if not tp_cpu else "gateway-1"))
    connects = tp and tp.get("upstream_connects")
    conns = sc["tls-small"]["conns"] if "tls-small" in sc else 50
    add(f"transparent client IP, {conns} keep-alive connections from one address: at most {2 * conns} upstream "
        "connects per run", connects, connects is not None and connects <= 2 * conns,
        f"{connects:,.0f} (headers mode: {_num(s and s.get('upstream_connects'))})" if connects is not None else "",
        ("tls-small", "gateway-1-transparent"))
    s = st("tls-c1", "gateway-1")
    added = s and s.get("added")
    add("added p50 latency at c=1 (TLS), 1 worker: < 300 us", added, added is not None and added < 300,
        f"{added:+,.0f} us" if added is not None else "", ("tls-c1", "gateway-1"))
    add("added p50 latency at c=1 (TLS), 1 worker: <= 200 us", added, added is not None and added <= 200,
        f"{added:+,.0f} us" if added is not None else "", ("tls-c1", "gateway-1"))
    h2key = _h2_key(results)
    h2 = st(h2key, "gateway-1")
    h2cpu = h2 and h2.get("cpu_us_per_op")
    ratio = h2cpu / cpu if h2cpu and cpu else None
    add("HTTP/2 CPU per request <= 1.5x HTTP/1.1's (TLS, 1 worker)", ratio, ratio is not None and ratio <= 1.5,
        f"{ratio:.2f}x ({h2cpu:,.0f} vs {cpu:,.0f} us)" if ratio else "",
        (h2key if not h2cpu else "tls-small", "gateway-1"))
    s = st("tls-1m", "gateway-1")
    mb = s and s.get("value")
    add("1 MiB responses (TLS), 1 worker: >= 900 MB/s", mb, mb is not None and mb >= 900,
        f"{mb:,.0f} MB/s" if mb is not None else "", ("tls-1m", "gateway-1"))
    add("1 MiB responses (TLS), 1 worker: >= 374 MB/s (2x the 187 MB/s before the hot-path work)", mb,
        mb is not None and mb >= 374, f"{mb:,.0f} MB/s" if mb is not None else "", ("tls-1m", "gateway-1"))
    idle = _ok_rounds((results.get("ws-idle") or {}).get("gateway-1"))
    per = _median([r["kib_per_conn"] for r in idle]) if idle else None
    opened = idle[0]["opened"] if idle else 0
    add("gateway memory per idle WebSocket, over 10,000: <= 16 KiB", per, per is not None and per <= 16,
        f"{per:.1f} KiB (over {opened:,})" if per is not None else "", ("ws-idle", "gateway-1"))
    stream = _ok_rounds((results.get("stream") or {}).get("gateway-1"))
    for way in ("upload", "download"):
        peak = max(r[f"{way}_peak_kib"] for r in stream) if stream else None
        size = stream[0]["size_mib"] if stream else 1024
        add(f"1 GiB {way}: gateway peak RSS < 100 MiB", peak, peak is not None and peak < 100 * 1024,
            f"{peak / 1024:.1f} MiB" + ("" if size == 1024 else f" ({size} MiB transfer)") if peak else "",
            ("stream", "gateway-1"))
    return rows


def targets_markdown(meta: dict, results: dict) -> str:
    return _md_table(["target", "measured", ""], [list(t) for t in targets(meta, results)])


# -- the markdown results file ---------------------------------------------------------

def _busy_pct(meta: dict) -> float:
    return 100 * meta["foreign_cpu_s"] / max(meta["wall_s"], 1)


def _busy_warning(meta: dict) -> str:
    if _busy_pct(meta) < 20:
        return ""
    return (" -- the machine was busy with other work, which takes CPU from whichever system is being "
            "measured: absolute figures are low and spreads wide")


def _header(meta: dict) -> list[str]:
    env = meta["env"]
    fcpu, wall = meta["foreign_cpu_s"], meta["wall_s"]
    lines = [
        f"# hoodyproxy benchmark, {meta['started'].replace('T', ' ')}",
        "",
        f"`python -m bench {' '.join(meta['argv'])}`".replace(" `", "`") + f": {meta['rounds']} interleaved "
        f"round(s), wall time {wall / 60:.1f} min{' (--quick)' if meta['quick'] else ''}.",
        "",
        f"- machine: {env['cores']} cores ({env['cpu']}), Linux {env['kernel']}, Python {env['python']}, "
        f"Twisted {env['twisted']}",
        f"- peers: {env['nginx']}; {env['haproxy']}; caddy {env['caddy']}; {env['mitmproxy'].replace(chr(10), ' ')}",
        f"- load: {env['wrk']}; {env['h2load']}",
        f"- load average at start {' '.join(env['loadavg_start'])}, at end {' '.join(env.get('loadavg_end', []))}; "
        f"other processes used {fcpu:,.0f} CPU-seconds during the run ({_busy_pct(meta):.0f}% of one "
        f"core){_busy_warning(meta)}. Figures are only comparable within this file.",
        "",
        "Everything on 127.0.0.1, load generator, proxy and backend on the same cores; nothing pinned. "
        "Each cell is the median over rounds; *min - max* is the spread over rounds; *x direct* and "
        "*x nginx* are ratios of medians measured in this run. CPU/request is the proxy's utime+stime "
        "(all its processes) over the run divided by the requests completed; RSS is VmRSS of the proxy's "
        "processes at the end of a run (peak: VmHWM). Backend: nginx, one worker, keep-alive, 12-byte body "
        "at `/`, 1 MiB file at `/1m`; WebSocket backend: the demo's autobahn echo.",
    ]
    for note in meta.get("notes", []):
        lines += ["", f"Note: {note}"]
    return lines


def markdown(meta: dict, results: dict) -> str:
    out = _header(meta)
    out += ["", "## Targets", "", targets_markdown(meta, results)]
    for sc in meta["scenarios"]:
        table = results.get(sc["key"])
        if table is None:
            continue
        out += ["", f"## {sc['title']}", "", sc["notes"]]
        fcpu, wall = table.get("_foreign_cpu", [0, 1])
        if table.get("_deadline"):
            out += ["", "**Stopped at the time bound: some rounds are missing.**"]
        noise = [r["foreign_cpu_pct"] for k, e in table.items() if not k.startswith("_")
                 for r in e.get("rounds", []) if "foreign_cpu_pct" in r]
        worst = f"; at most {max(noise):.0f}% of a core during any one run" if noise else ""
        out += ["", f"(Other processes on the machine used {fcpu:,.1f} CPU-s over the {wall:,.0f} s of this "
                f"scenario{worst}.)", ""]
        if sc["metric"] == "idle":
            out.append(_md_table(["system", "open of attempted", "RSS before", "RSS after", "per connection",
                                  "time to open"], idle_rows(table)))
            rounds = _ok_rounds(table.get("gateway-1"))
            if rounds and rounds[0]["conns"] < rounds[0]["target"]:
                r0 = rounds[0]
                out += ["", f"{r0['conns']:,} connections were attempted, not {r0['target']:,}: the file descriptor hard limit "
                        f"here is {r0['fd_hard_limit']:,} and each idle WebSocket holds two descriptors in the "
                        "gateway (client and container); the limit cannot be raised without CAP_SYS_RESOURCE. "
                        "The per-connection figure is over the connections actually open."]
        elif sc["metric"] == "stream":
            out.append(_md_table(["transfer", "gateway RSS before", "peak RSS during", "throughput"],
                                 stream_rows(table)))
        elif sc["metric"] == "tap":
            out.append(_md_table(TAP_HEADERS, tap_rows(table)))
            if tap_summary(table):
                out += ["", tap_summary(table)]
        else:
            out.append(_md_table(HEADERS[sc["metric"]], scenario_rows(sc, table)))
    h2_headers, h2_rows, h2_text = http2_summary(meta, results)
    if h2_rows:
        out += ["", "## HTTP/2 by system", "",
                "Medians from the HTTP/2 scenarios above; HTTP/1.1 TLS CPU/req from the TLS keep-alive run of this "
                f"file where measured; *x Twisted H2* is req/s over {LABELS[H2_PEER]} served by Twisted's own "
                "HTTP/2 server.", "", _md_table(h2_headers, h2_rows)]
        if h2_text:
            out += ["", h2_text]
    return "\n".join(out) + "\n"


# -- docs/performance.rst --------------------------------------------------------------

def _rst_list_table(headers: list[str], rows: list[list[str]], widths: str | None = None) -> list[str]:
    out = [".. list-table::", "   :header-rows: 1", ""]
    for row in [headers] + rows:
        out.append("   * - " + (_rst(row[0]) or "\\ "))
        out += ["     - " + (_rst(c) or "\\ ") for c in row[1:]]
    return out


def _rst(text: str) -> str:
    if text in ("-", "+", "*"):
        return "\\" + text  # alone in a cell it would start a bullet list
    return text.replace("*", "\\*").replace("`", "'").replace("|", "\\|")


def _h2_key(results: dict) -> str:
    """The multiplexed HTTP/2 scenario: ``h2-mux`` (c4 m10), or ``h2`` (c10 m10) in runs before it."""
    return "h2-mux" if "h2-mux" in results else "h2"


def summary_rows(meta: dict, results: dict) -> tuple[list[str], list[list[str]]]:
    sc = {s["key"]: s for s in meta["scenarios"]}
    cols = [("tls-small", "value", "TLS req/s", _num), ("tls-small", "cpu_us_per_op", "TLS CPU/req", _us),
            ("tls-c1", "added", "TLS added p50, c=1", _signed_us), ("tls-1m", "value", "TLS 1 MiB MB/s", _num),
            (_h2_key(results), "value", "h2 req/s", _num), ("ws-echo", "value", "WS messages/s", _num),
            ("plain-small", "value", "plain req/s", _num), ("tls-small", "rss_kib", "RSS", _mib)]
    cols = [c for c in cols if c[0] in results and c[0] in sc]
    headers = ["system"] + [c[2] for c in cols]
    rows = []
    for key in SYSTEM_ORDER:
        cells, any_value = [], False
        for scen, field, _, fmt in cols:
            table = results[scen]
            st = system_stats(sc[scen], table, key) if key in table else None
            val = st.get(field) if st else None
            if key == "direct" and field in ("cpu_us_per_op", "rss_kib"):
                val = None
            if val is not None:
                any_value = True
            na = (table.get(key) or {}).get("na")
            cells.append(fmt(val) if val is not None else ("n/a" if na else "-"))
        if any_value:
            rows.append([LABELS[key]] + cells)
    return headers, rows


H2_PEER = "twisted-rpr-ka"   # Twisted's own HTTP/2 server in front of ReverseProxyResource


def http2_summary(meta: dict, results: dict) -> tuple[list[str], list[list[str]], str]:
    """The HTTP/2 table (one row per system that was measured over h2) and a sentence
    comparing the gateway (1 worker) with Twisted's own HTTP/2 server."""
    sc = {s["key"]: s for s in meta["scenarios"]}
    mux = _h2_key(results)
    if mux not in results or mux not in sc:
        return [], [], ""

    def st(scenario: str, key: str) -> dict | None:
        if scenario not in results or scenario not in sc or key not in results[scenario]:
            return None
        return system_stats(sc[scenario], results[scenario], key)

    m = sc[mux]
    cols = [(mux, "value", f"h2 req/s (c{m['conns']} m{m.get('streams', 10)})", _num),
            (mux, "cpu_us_per_op", "h2 CPU/req", _us),
            ("tls-small", "cpu_us_per_op", "HTTP/1.1 TLS CPU/req", _us),
            ("h2-c1", "added", "h2 added p50, c=1 m=1", _signed_us)]
    cols = [c for c in cols if c[0] in results and c[0] in sc]
    peer = st(mux, H2_PEER)
    peer_rps = peer and peer.get("value")
    headers = ["system"] + [c[2] for c in cols] + ["x Twisted H2 (req/s)"]
    rows = []
    for key in SYSTEM_ORDER:
        cells, any_value = [], False
        for scen, fld, _, fmt in cols:
            s = st(scen, key)
            val = s.get(fld) if s else None
            if key == "direct" and fld == "cpu_us_per_op":
                val = None
            any_value = any_value or (val is not None and scen != "tls-small")
            na = ((results.get(scen) or {}).get(key) or {}).get("na")
            cells.append(fmt(val) if val is not None else ("n/a" if na else "-"))
        if not any_value and not (results[mux].get(key) or {}).get("na"):
            continue
        mine = st(mux, key)
        cells.append(_ratio(mine and mine.get("value"), peer_rps))
        rows.append([LABELS[key]] + cells)
    gw = st(mux, "gateway-1")
    text = ""
    if gw and peer and gw.get("value") and peer_rps:
        text = (f"{LABELS['gateway-1']} over HTTP/2: {gw['value'] / peer_rps:.2f}x the requests per second of "
                f"Twisted's own HTTP/2 server ({gw['value']:,.0f} vs {peer_rps:,.0f})")
        if gw.get("cpu_us_per_op") and peer.get("cpu_us_per_op"):
            text += (f", at {gw['cpu_us_per_op']:,.0f} us of CPU per request against "
                     f"{peer['cpu_us_per_op']:,.0f} us ({gw['cpu_us_per_op'] / peer['cpu_us_per_op']:.2f}x)")
        text += "."
    return headers, rows, text


def doc_block(meta: dict, results: dict, results_path: str) -> str:
    env = meta["env"]
    lines = [
        BEGIN,
        f".. Written by ``python -m bench`` ({meta['started']}); edits between these markers are replaced.",
        "",
        "Latest run",
        "----------",
        "",
        f"{meta['started'].replace('T', ' ')}: {meta['rounds']} interleaved round(s), "
        f"{meta['wall_s'] / 60:.1f} minutes{' (--quick)' if meta['quick'] else ''}, on {env['cores']} cores "
        f"({env['cpu']}); other processes used {meta['foreign_cpu_s']:,.0f} CPU-seconds meanwhile "
        f"({_busy_pct(meta):.0f}% of one core){_busy_warning(meta)}. "
        f"Every table of the run, with spreads and ratios: ``bench/results/{os.path.basename(results_path)}``.",
        "",
        "Targets",
        "~~~~~~~",
        "",
    ]
    lines += _rst_list_table(["target", "measured", "status"], [list(t) for t in targets(meta, results)])
    headers, rows = summary_rows(meta, results)
    if rows:
        lines += ["", "Medians by system", "~~~~~~~~~~~~~~~~~", "",
                  "CPU/req and RSS are the proxy's (all its processes) in the TLS small-response run; "
                  "*added p50* is the system's median latency at one connection minus the backend's own.", ""]
        lines += _rst_list_table(headers, rows)
    h2_headers, h2_rows, h2_text = http2_summary(meta, results)
    if h2_rows:
        lines += ["", "HTTP/2 in this run", "~~~~~~~~~~~~~~~~~~", "",
                  "h2load over TLS with ALPN h2 only, 12-byte responses, the same backend over HTTP/1.1 behind "
                  "every proxy. Twisted's rows: ReverseProxyResource served by Twisted's own HTTP/2 server "
                  "(``H2Connection``). CPU/req is the proxy's, from the multiplexed run; the HTTP/1.1 column "
                  "is the TLS keep-alive run (``wrk -c50``) of the same run, where measured.", ""]
        lines += _rst_list_table(h2_headers, h2_rows)
        if h2_text:
            lines += ["", h2_text]
    idle = _ok_rounds((results.get("ws-idle") or {}).get("gateway-1"))
    stream = _ok_rounds((results.get("stream") or {}).get("gateway-1"))
    extra = []
    if idle:
        r = idle[0]
        limit = (f" ({r['conns']:,} rather than {r['target']:,}: the descriptor limit here is "
                 f"{r['fd_hard_limit']:,} and each holds two in the gateway)" if r["conns"] < r["target"] else "")
        extra.append(f"{r['opened']:,} idle WebSockets{limit} took the gateway (1 worker) from "
                     f"{_mib(r['rss_before_kib'])} to {_mib(r['rss_after_kib'])}: "
                     f"{_median([x['kib_per_conn'] for x in idle]):.1f} KiB each.")
    if stream:
        r = stream[0]
        extra.append(f"A {r['size_mib']} MiB upload peaked at {_mib(r['upload_peak_kib'])} of gateway RSS "
                     f"({r['size_mib'] / r['upload_s']:,.0f} MiB/s) and a {r['size_mib']} MiB download at "
                     f"{_mib(r['download_peak_kib'])} ({r['size_mib'] / r['download_s']:,.0f} MiB/s), from "
                     f"{_mib(r['rss_before_kib'])} before.")
    if tap_summary(results.get("tap") or {}):
        extra.append(tap_summary(results["tap"]))
    if extra:
        lines += [""] + [" ".join(extra)]
    lines += ["", END]
    return "\n".join(lines)


DOC_TEMPLATE = """Performance
===========

``make bench`` measures the gateway beside its peers, all on loopback on one machine, and
writes every table to ``bench/results/YYYY-MM-DD-HHMM.md``; the part of this page between
the ``BEGIN GENERATED`` and ``END GENERATED`` comments is rewritten from the latest run.
The rest of the page is written by hand.

Running it
----------

``make bench`` installs the Debian packages it needs when run as root
(``DEBIAN_BENCH_PACKAGES``: nginx, HAProxy, Caddy, wrk, h2load), creates
``bench/.venv-mitm`` with mitmproxy on first use, and runs ``python -m bench``: three
interleaved rounds of every scenario, in under 15 minutes on 2 cores.  Useful options
(``make bench ARGS='...'``): ``--quick`` (one short round, for development),
``--only tls,ws-idle`` (scenarios or prefixes: ``plain``, ``tls``, ``h2``, ``ws``,
``stream``), ``--rounds N``, ``--wait-quiet SECONDS`` (first wait for other processes
to leave the CPUs), ``--keep`` (keep the run folder with configs and logs), ``--no-doc``.
Only a full run (no ``--quick``, no ``--only``) rewrites the generated part of this page;
``python -m bench --render bench/results/FILE.raw`` renders a run's tables again.

What is measured
----------------

Every system forwards to the same backends: nginx (one worker, keep-alive) returning a
12-byte body at ``/`` and a 1 MiB file at ``/1m``, and the demo's autobahn WebSocket echo.
The systems are: the backend directly; hoodyproxy with one and with two worker processes
(``--workers``), over the real hostname route of a registered container; nginx, HAProxy
and Caddy from Debian with one worker or thread and upstream keep-alive (configs in
``bench/configs/``); mitmproxy in reverse mode; Twisted's ``ReverseProxyResource``, stock
and with keep-alive to clients (``bench/twisted_rpr.py``).

Rounds are interleaved (every system once, then every system again), the load generator
runs in its own process, and CPU per request is the proxy's own utime+stime (all its
processes) divided by the requests completed.  Load generator, proxy and backend share
the machine's cores, so anything else running takes CPU from whichever system is being
measured: the harness records how much CPU other processes used during each run (in the
results file).  Absolute figures drift between runs and machines; compare rows of one
run, and prefer the ratios.

{block}

Profiling notes
---------------

.. Written by hand.

Before and after
----------------

.. Written by hand.
"""


def update_doc(path: str, meta: dict, results: dict, results_path: str) -> None:
    """Replace the generated block of ``path`` (create the page, or append the block, if needed)."""
    block = doc_block(meta, results, results_path)
    if not os.path.exists(path):
        text = DOC_TEMPLATE.replace("{block}", block)
    else:
        with open(path) as f:
            text = f.read()
        pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: block, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
