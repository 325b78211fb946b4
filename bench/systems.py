"""The systems under test, each started in its own process(es) on loopback ports.

A :class:`RunDir` holds everything a run writes (certificate, 1 MiB file, rendered
configs, logs); :class:`Systems` starts the backends and every proxy inside an
``ExitStack`` so that each process is stopped at the end, on error or on Ctrl-C too.
Every system forwards to the same backends: nginx (a 12-byte body at ``/`` and a 1 MiB
file at ``/1m``, keep-alive on) and the autobahn WebSocket echo at ``/echo``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import venv
from dataclasses import dataclass, field

from bench.procs import Gateway, Process, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "configs")
MITM_VENV = os.path.join(HERE, ".venv-mitm")
SMALL_BODY = b"hello world\n"


class StartError(RuntimeError):
    """A system that could not be started or did not answer correctly."""


# -- the run folder --------------------------------------------------------------------

class RunDir:
    """A fresh folder (readable by nginx's unprivileged workers) with TLS material and data."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.path = tempfile.mkdtemp(prefix="hoodyproxy-bench-run-")
        os.chmod(self.path, 0o755)
        for sub in ("tls", "data", "backend", "nginx", "caddy", "mitm", "logs"):
            os.makedirs(self.sub(sub), mode=0o755, exist_ok=True)
        self.cert, self.key = self.sub("tls", "cert.pem"), self.sub("tls", "key.pem")
        self.combined = self.sub("tls", "combined.pem")
        # Same key type as the gateway's generated certificates (ECDSA P-256).
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", self.key, "-out", self.cert, "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=30)
        with open(self.combined, "wb") as out:
            for name in (self.cert, self.key):
                with open(name, "rb") as f:
                    out.write(f.read())
        with open(self.sub("data", "1m.bin"), "wb") as f:
            f.write(os.urandom(1 << 20))
        for root, dirs, files in os.walk(self.path):
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)

    def sub(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def render(self, template: str, dest: str, ports: dict[str, int]) -> str:
        """``bench/configs/<template>`` with RUNDIR and ``@NAME@`` port tokens replaced."""
        with open(os.path.join(CONFIGS, template)) as f:
            text = f.read().replace("RUNDIR", self.path)
        for name, port in ports.items():
            text = text.replace(f"@{name}@", str(port))
        leftover = re.findall(r"@[A-Z_]+@", re.sub(r"(?m)^\s*#.*$", "", text))
        if leftover:
            raise StartError(f"{template}: unreplaced tokens {leftover}")
        path = self.sub(dest)
        with open(path, "w") as f:
            f.write(text)
        return path

    def cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


# -- processes -------------------------------------------------------------------------

def _drain(proc: Process, log_path: str) -> None:
    """Copy a child's output to a log file so that it never blocks on a full pipe."""
    def run() -> None:
        with open(log_path, "a") as log:
            for line in iter(proc.proc.stdout.readline, ""):
                log.write(line)
                log.flush()
    threading.Thread(target=run, daemon=True).start()


def _tail(path: str, n: int = 400) -> str:
    try:
        with open(path) as f:
            return f.read()[-n:].strip()
    except OSError:
        return ""


def wait_port(port: int, proc: Process, log: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            time.sleep(0.2)
            raise StartError(f"exited with {proc.proc.returncode}: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise StartError(f"port {port} not listening after {timeout:g}s: {_tail(log)}")


def start_process(stack: contextlib.ExitStack, rundir: RunDir, name: str, args: list[str],
                  ports: list[int], env: dict | None = None) -> Process:
    """Start ``args`` (stopped when ``stack`` closes), its output to logs/NAME.log; wait for ``ports``."""
    log = rundir.sub("logs", f"{name}.log")
    proc = Process(args, env=env, cwd=rundir.path)
    stack.callback(proc.stop)
    _drain(proc, log)
    for port in ports:
        wait_port(port, proc, log)
    return proc


# -- what a load generator needs to know ------------------------------------------------

@dataclass
class Endpoint:
    port: int
    host: str | None = None  # the Host header to send (None: the URL's, 127.0.0.1:PORT)


@dataclass
class System:
    key: str
    label: str
    root_pid: int | None = None            # the proxy's process (tree) for CPU and RSS; None: direct
    plain: Endpoint | None = None
    tls: Endpoint | None = None
    ws: Endpoint | None = None             # WebSocket over TLS
    na: dict[str, str] = field(default_factory=dict)  # "plain"/"tls"/"ws"/"all" -> why not measured


SYSTEM_ORDER = ["direct", "gateway-1", "gateway-1-transparent", "gateway-2", "gateway-1-nolimit", "floor", "nginx",
                "haproxy", "caddy", "mitmproxy", "twisted-rpr-ka", "twisted-rpr"]
#: Systems that only the scenarios naming them run (a variant measured for one question).
VARIANTS = ("gateway-1-transparent", "gateway-1-nolimit")
#: The gateway rows forward the client's address in headers (``--client-ip-mode headers``)
#: unless their key says otherwise; ``-transparent`` is what a node run as root does by
#: default (docs/real-client-ip.rst).
LABELS = {
    "direct": "direct to backend",
    "gateway-1": "hoodyproxy, 1 worker",
    "gateway-1-transparent": "hoodyproxy, 1 worker, transparent client IP (root's default)",
    "gateway-2": "hoodyproxy, 2 workers",
    "gateway-1-nolimit": "hoodyproxy, 1 worker, rate limiting off",
    "floor": "floor: minimal Twisted proxy (httptools, pooled upstream, eager writes)",
    "nginx": "nginx (1 worker, upstream keepalive 32)",
    "haproxy": "HAProxy (nbthread 1)",
    "caddy": "Caddy (GOMAXPROCS=1)",
    "mitmproxy": "mitmproxy, reverse mode",
    "twisted-rpr-ka": "Twisted ReverseProxyResource, keep-alive to clients",
    "twisted-rpr": "Twisted ReverseProxyResource, stock",
}


def check_http(system: System, tls: bool) -> None:
    """One GET / (and /1m) through ``system``: it must answer the backend's bodies."""
    ep = system.tls if tls else system.plain
    if ep is None:
        return
    for path, expect in (("/", SMALL_BODY), ("/1m", 1 << 20)):
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            conn = http.client.HTTPSConnection("127.0.0.1", ep.port, timeout=10, context=ctx)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", ep.port, timeout=10)
        try:
            conn.request("GET", path, headers={"Host": ep.host} if ep.host else {})
            resp = conn.getresponse()
            body = resp.read()
        except OSError as e:
            raise StartError(f"GET {path} ({'TLS' if tls else 'plain'}) failed: {e}")
        finally:
            conn.close()
        ok = resp.status == 200 and (body == expect if isinstance(expect, bytes) else len(body) == expect)
        if not ok:
            raise StartError(f"GET {path} ({'TLS' if tls else 'plain'}): {resp.status}, {len(body)} bytes")


def upstream_delta(before: dict | None, after: dict | None) -> dict:
    """The figures of one run from two :meth:`Systems.upstream_counters` readings."""
    if before is None or after is None:
        return {}
    # the later reading's own connection is among its accepts
    return {"upstream_connects": max(0, after["accepts"] - before["accepts"] - 1),
            # sockets of earlier runs leave TIME-WAIT after 60 s: the difference is a floor
            "time_wait_end": after["time_wait"], "time_wait_added": max(0, after["time_wait"] - before["time_wait"])}


# -- mitmproxy's own venv ---------------------------------------------------------------

def mitmdump_path(log=print) -> tuple[str | None, str]:
    """``bench/.venv-mitm/bin/mitmdump``, creating the venv (``pip install mitmproxy``) if needed.

    Returns (path or None, note).  A failed install is reported, not raised.
    """
    exe = os.path.join(MITM_VENV, "bin", "mitmdump")
    ignore = os.path.join(MITM_VENV, ".gitignore")
    if os.path.isdir(MITM_VENV) and not os.path.exists(ignore):
        with open(ignore, "w") as f:
            f.write("# created by bench/ (make bench): not part of the repository\n*\n")
    if os.path.exists(exe):
        return exe, ""
    log(f"creating {os.path.relpath(MITM_VENV)} and installing mitmproxy (once)")
    try:
        if not os.path.exists(os.path.join(MITM_VENV, "bin", "python")):
            venv.EnvBuilder(with_pip=True, clear=True).create(MITM_VENV)
            with open(ignore, "w") as f:
                f.write("# created by bench/ (make bench): not part of the repository\n*\n")
        result = subprocess.run([os.path.join(MITM_VENV, "bin", "python"), "-m", "pip", "install", "-q",
                                 "--disable-pip-version-check", "mitmproxy"],
                                capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"mitmproxy could not be installed: {e}"
    if result.returncode != 0 or not os.path.exists(exe):
        lines = [l for l in (result.stderr or result.stdout).splitlines() if not l.startswith("WARNING")]
        return None, "mitmproxy could not be installed: " + (" ".join(lines[-2:]) or f"pip exit {result.returncode}")
    return exe, ""


def start_backend_nginx(stack: contextlib.ExitStack, rundir: RunDir) -> dict[str, int]:
    """The nginx backend every scenario proxies to (bench/configs/backend-nginx.conf),
    stopped with ``stack``; returns its ports (plain, TLS, stub_status)."""
    ports = {"BACKEND_PORT": free_port(), "BACKEND_TLS_PORT": free_port(), "BACKEND_STATUS_PORT": free_port()}
    conf = rundir.render("backend-nginx.conf", "backend/nginx.conf", ports)
    start_process(stack, rundir, "backend-nginx",
                  ["nginx", "-p", rundir.sub("backend") + "/", "-e", rundir.sub("backend", "error.log"), "-c", conf],
                  [ports["BACKEND_PORT"], ports["BACKEND_TLS_PORT"]])
    return ports


# -- starting everything ---------------------------------------------------------------

class Systems:
    """The backends and every system under test; ``with Systems(...) as s:`` stops them all."""

    def __init__(self, rundir: RunDir, wanted: list[str], log=print) -> None:
        self.rundir, self.wanted, self.log = rundir, wanted, log
        self.stack = contextlib.ExitStack()
        self.systems: dict[str, System] = {}
        self.notes: list[str] = []
        self.versions: dict[str, str] = {}

    def __enter__(self) -> "Systems":
        try:
            self._start_all()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    # backends -------------------------------------------------------------------------

    def _start_all(self) -> None:
        rd = self.rundir
        self.ports = start_backend_nginx(self.stack, rd)
        self.ports.update(WS_BACKEND_PORT=free_port(), WS_BACKEND_TLS_PORT=free_port())
        start_process(self.stack, rd, "ws-backend",
                      [sys.executable, os.path.join(HERE, "ws_echo_backend.py"), "--port", str(self.ports["WS_BACKEND_PORT"]),
                       "--tls-port", str(self.ports["WS_BACKEND_TLS_PORT"]), "--cert", rd.cert, "--key", rd.key],
                      [self.ports["WS_BACKEND_PORT"], self.ports["WS_BACKEND_TLS_PORT"]])

        direct = System("direct", LABELS["direct"], None, Endpoint(self.ports["BACKEND_PORT"]),
                        Endpoint(self.ports["BACKEND_TLS_PORT"]), Endpoint(self.ports["WS_BACKEND_TLS_PORT"]))
        check_http(direct, False)
        check_http(direct, True)
        self.systems["direct"] = direct
        for key in SYSTEM_ORDER[1:]:
            if key not in self.wanted:
                continue
            starter = getattr(self, "_start_" + key.replace("-", "_"))
            try:
                system = starter()
                for tls in (False, True):
                    check_http(system, tls)
            except StartError as e:
                self.log(f"  {key}: not measured: {e}")
                system = System(key, LABELS[key], na={"all": str(e)})
            self.systems[key] = system

    def upstream_counters(self) -> dict[str, int] | None:
        """Connections the backend nginx has accepted so far, and sockets in TIME-WAIT towards its
        plain port (the proxies' upstream side); None if either cannot be read.

        Taken before and after a run, the difference is how many upstream connections a proxy
        opened: a pool that keeps its connections opens about one per client connection, one
        that churns opens one per request.  Reading the status itself is one accepted
        connection (counted in the later reading; see :func:`upstream_delta`).
        """
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.ports["BACKEND_STATUS_PORT"], timeout=5)
            try:
                conn.request("GET", "/")
                text = conn.getresponse().read().decode("ascii", "replace")
            finally:
                conn.close()
            accepts = int(re.search(r"requests\s*\n\s*(\d+)", text).group(1))
            out = subprocess.run(["ss", "-Htan", "state", "time-wait", "dport", "=", f":{self.ports['BACKEND_PORT']}"],
                                 capture_output=True, text=True, timeout=10)
        except (OSError, AttributeError, ValueError, subprocess.SubprocessError):
            return None
        if out.returncode != 0:
            return None
        return {"accepts": accepts, "time_wait": sum(1 for line in out.stdout.splitlines() if line.strip())}

    # proxies --------------------------------------------------------------------------

    def _gateway(self, key: str, extra: list[str], ratelimit: bool = True) -> System:
        try:
            gw = Gateway(extra, ratelimit=ratelimit)
        except RuntimeError as e:
            raise StartError(f"gateway did not start with {' '.join(extra) or 'defaults'}: {e}")
        self.stack.callback(gw.stop)
        host = gw.register(self.ports["BACKEND_PORT"])
        ws_host = gw.register(self.ports["WS_BACKEND_PORT"])
        return System(key, LABELS[key], gw.pid, None, Endpoint(gw.https_port, host), Endpoint(gw.https_port, ws_host),
                      na={"plain": "TLS only"})

    def _start_gateway_1(self) -> System:
        return self._gateway("gateway-1", [])

    def _start_gateway_1_transparent(self) -> System:
        """The gateway as a root node runs it by default: upstream connections from the client's
        own address (IP_TRANSPARENT), pooled per client address, netfilter rules installed at
        start and removed at stop.  Loopback client to loopback backend stays transparent
        (hoodyproxy.gateway.Gateway._source)."""
        from hoodyproxy.netfilter import has_net_admin
        if not has_net_admin():
            why = ("not root: transparent mode needs CAP_NET_ADMIN (for IP_TRANSPARENT and its netfilter "
                   "rules); run make bench as root to measure it")
            self.notes.append(f"{LABELS['gateway-1-transparent']}: {why}.")
            raise StartError(why)
        return self._gateway("gateway-1-transparent", ["--client-ip-mode", "transparent"])

    def _start_gateway_1_nolimit(self) -> System:
        return self._gateway("gateway-1-nolimit", [], ratelimit=False)

    def _start_gateway_2(self) -> System:
        try:
            return self._gateway("gateway-2", ["--workers", "2"])
        except StartError as e:
            raise StartError(f"--workers rejected ({e})")

    def _peer_ports(self) -> dict[str, int]:
        return {**self.ports, "PLAIN_PORT": free_port(), "TLS_PORT": free_port()}

    def _start_nginx(self) -> System:
        ports = self._peer_ports()
        conf = self.rundir.render("proxy-nginx.conf", "nginx/nginx.conf", ports)
        proc = start_process(self.stack, self.rundir, "nginx",
                             ["nginx", "-p", self.rundir.sub("nginx") + "/", "-e", self.rundir.sub("nginx", "error.log"),
                              "-c", conf], [ports["PLAIN_PORT"], ports["TLS_PORT"]])
        return self._peer("nginx", proc, ports)

    def _start_haproxy(self) -> System:
        ports = self._peer_ports()
        conf = self.rundir.render("haproxy.cfg", "haproxy.cfg", ports)
        proc = start_process(self.stack, self.rundir, "haproxy", ["haproxy", "-db", "-f", conf],
                             [ports["PLAIN_PORT"], ports["TLS_PORT"]])
        return self._peer("haproxy", proc, ports)

    def _start_caddy(self) -> System:
        ports = self._peer_ports()
        conf = self.rundir.render("Caddyfile", "caddy/Caddyfile", ports)
        home = self.rundir.sub("caddy")
        proc = start_process(self.stack, self.rundir, "caddy",
                             ["caddy", "run", "--config", conf, "--adapter", "caddyfile"],
                             [ports["PLAIN_PORT"], ports["TLS_PORT"]],
                             env={"GOMAXPROCS": "1", "HOME": home, "XDG_DATA_HOME": home, "XDG_CONFIG_HOME": home})
        return self._peer("caddy", proc, ports)

    def _start_mitmproxy(self) -> System:
        exe, note = mitmdump_path(self.log)
        if exe is None:
            self.notes.append(note)
            raise StartError(note)
        ports = {**self.ports, "PLAIN_PORT": free_port(), "WS_PORT": free_port()}
        b, w = self.ports["BACKEND_PORT"], self.ports["WS_BACKEND_PORT"]
        # Reverse mode takes TLS or plain HTTP on the same port (it looks at the first bytes).
        proc = start_process(self.stack, self.rundir, "mitmproxy",
                             [exe, "-q", "--listen-host", "127.0.0.1",
                              "--mode", f"reverse:http://127.0.0.1:{b}@{ports['PLAIN_PORT']}",
                              "--mode", f"reverse:http://127.0.0.1:{w}@{ports['WS_PORT']}",
                              "--set", f"confdir={self.rundir.sub('mitm')}",
                              "--certs", f"*={self.rundir.combined}", "--set", "termlog_verbosity=warn"],
                             [ports["PLAIN_PORT"], ports["WS_PORT"]])
        return System("mitmproxy", LABELS["mitmproxy"], proc.pid, Endpoint(ports["PLAIN_PORT"]),
                      Endpoint(ports["PLAIN_PORT"]), Endpoint(ports["WS_PORT"]))

    def _start_floor(self) -> System:
        """bench/floor_proxy.py: the least a Twisted TLS proxy costs per request (no features)."""
        ports = self._peer_ports()
        proc = start_process(self.stack, self.rundir, "floor",
                             [sys.executable, os.path.join(HERE, "floor_proxy.py"),
                              "--backend", str(ports["BACKEND_PORT"]), "--plain", str(ports["PLAIN_PORT"]),
                              "--tls", str(ports["TLS_PORT"]), "--cert", self.rundir.cert, "--key", self.rundir.key],
                             [ports["PLAIN_PORT"], ports["TLS_PORT"]])
        return System("floor", LABELS["floor"], proc.pid, Endpoint(ports["PLAIN_PORT"]), Endpoint(ports["TLS_PORT"]),
                      None, na={"ws": "the floor relays GET requests only (no upgrades)"})

    def _twisted_rpr(self, key: str, extra: list[str]) -> System:
        ports = self._peer_ports()
        proc = start_process(self.stack, self.rundir, key,
                             [sys.executable, os.path.join(HERE, "twisted_rpr.py"),
                              "--backend", str(ports["BACKEND_PORT"]), "--plain", str(ports["PLAIN_PORT"]),
                              "--tls", str(ports["TLS_PORT"]), "--cert", self.rundir.cert,
                              "--key", self.rundir.key, *extra],
                             [ports["PLAIN_PORT"], ports["TLS_PORT"]])
        return System(key, LABELS[key], proc.pid, Endpoint(ports["PLAIN_PORT"]), Endpoint(ports["TLS_PORT"]),
                      None, na={"ws": "ReverseProxyResource does not relay upgrades"})

    def _start_twisted_rpr_ka(self) -> System:
        return self._twisted_rpr("twisted-rpr-ka", ["--keep-alive"])

    def _start_twisted_rpr(self) -> System:
        return self._twisted_rpr("twisted-rpr", [])

    def _peer(self, key: str, proc: Process, ports: dict[str, int]) -> System:
        return System(key, LABELS[key], proc.pid, Endpoint(ports["PLAIN_PORT"]), Endpoint(ports["TLS_PORT"]),
                      Endpoint(ports["TLS_PORT"]))
