"""A Docker daemon of the tests' own, and a tiny image built without a registry.

:func:`shared_daemon` starts Debian's ``dockerd`` (package docker.io) by hand, once per
test process, with everything of its own under one temporary directory -- socket, data
root, exec root, pidfile, ``daemon.json`` -- and a bridge of its own addressed from a
documentation range (RFC 5737: a free ``/25`` of 198.51.100.0/24; further networks get a
``/27`` of 203.0.113.0/24).  It changes nothing of the host's firewall or forwarding
(``--iptables=false --ip-forward=false --ip-masq=false``): the gateway on the host
reaches the containers through the bridge, whose address is the host's.

The image is a tar of a root filesystem holding a static busybox (package
busybox-static; ``/bin/sh`` links to it) and a page, ``docker import``-ed; its command is
``busybox httpd -f -p 80 -h /www``.  Containers run with ``--init``, so a stop is quick.

Teardown (:meth:`Dockerd.cleanup`, at the process's exit: Trial has no per-module
fixture, and one daemon for the whole module keeps the suite fast): every container,
the daemon by its PID (then its containerd and shims, found by the temporary directory
in their command line), every bridge made, whatever is still mounted under the
directory, and the directory.  Each test removes the containers and networks it made.
Where dockerd cannot start, the tests skip with the reason.
"""

from __future__ import annotations

import atexit
import fcntl
import io
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import tempfile
import time

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

DOCKERD = "/usr/sbin/dockerd"
BUSYBOX = "/bin/busybox"
IMAGE = "hoodyproxy-busybox:test"
PAGE = b"<h1>hello from a container</h1>\n"
#: Bound on every wait (the daemon's start and stop, a CLI command); never a speed assertion.
TIMEOUT = 60.0
#: Where the bridges' subnets come from: documentation ranges only (RFC 5737).
BRIDGE_RANGE = ipaddress.ip_network("198.51.100.0/24")
NETWORK_RANGE = ipaddress.ip_network("203.0.113.0/24")
#: Held while a subnet is chosen and put on a bridge, so two test processes pick different ones.
SUBNET_LOCK = "/run/lock/hoodyproxy-test-subnets" if os.path.isdir("/run/lock") else "/tmp/hoodyproxy-test-subnets"


def docker_cli() -> str | None:
    """The docker.io client (it matches the daemon), else any ``docker`` on PATH."""
    if os.access("/usr/bin/docker", os.X_OK):
        return "/usr/bin/docker"
    return shutil.which("docker")


def _is_static(path: str) -> bool:
    """An ELF executable without a program interpreter (PT_INTERP): it runs in an empty image."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def missing_requirements() -> str | None:
    """Why no daemon can be started here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (dockerd, a bridge of its own)"
    if not os.access(DOCKERD, os.X_OK):
        return f"needs {DOCKERD} (Debian package docker.io; make deps installs it)"
    if docker_cli() is None:
        return "needs the docker command (Debian package docker.io)"
    if not os.path.exists(BUSYBOX) or not _is_static(BUSYBOX):
        return f"needs a static {BUSYBOX} (Debian package busybox-static; make deps installs it)"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    return None


def _host_networks() -> list:
    """The IPv4 networks of this host's interface addresses."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                         timeout=TIMEOUT).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            found.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    return found


def _free_subnet(space, prefix: int):
    """A ``/prefix`` of ``space`` that overlaps no address of this host (call with SUBNET_LOCK held)."""
    used = _host_networks()
    for subnet in space.subnets(new_prefix=prefix):
        if not any(subnet.overlaps(n) for n in used):
            return subnet
    raise RuntimeError(f"no free /{prefix} left in {space} on this host")


class DockerdUnavailable(Exception):
    """dockerd cannot run here; the message says why (the tests skip with it)."""


class Dockerd:
    """One dockerd with its own socket, data root, exec root, pidfile and bridge."""

    _count = 0

    def __init__(self) -> None:
        Dockerd._count += 1
        self.tag = f"{os.getpid() % 100000}x{Dockerd._count}"
        self.root = tempfile.mkdtemp(prefix="hoodyproxy-dockerd-")
        os.chmod(self.root, 0o755)
        self.socket = os.path.join(self.root, "docker.sock")
        self.config_dir = os.path.join(self.root, "cli")
        os.makedirs(self.config_dir)
        self.bridge = f"hpd{self.tag}"
        self.bridges: list[str] = []
        self.subnet = None
        self.process: subprocess.Popen | None = None
        self.log_path = os.path.join(self.root, "dockerd.log")
        self._networks = 0

    # -- start and stop -----------------------------------------------------------------

    def start(self) -> "Dockerd":
        """The bridge, the daemon, the image (blocking; before any node runs)."""
        self.subnet = self._add_bridge(self.bridge, BRIDGE_RANGE, 25)
        self.start_daemon()
        self._import_image()
        return self

    def _add_bridge(self, name: str, space, prefix: int):
        """A bridge of our own with the first address of a free subnet; returns the subnet."""
        with open(SUBNET_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            subnet = _free_subnet(space, prefix)
            gateway = next(subnet.hosts())
            self._ip("link", "add", name, "type", "bridge")
            self.bridges.append(name)
            self._ip("addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", name)
            self._ip("link", "set", name, "up")
        return subnet

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=TIMEOUT)

    def daemon_args(self, socket_path: str) -> list[str]:
        config = os.path.join(self.root, "daemon.json")
        with open(config, "w") as f:
            f.write("{}\n")  # never the host's /etc/docker/daemon.json
        return [DOCKERD, "--host", f"unix://{socket_path}", "--config-file", config,
                "--data-root", os.path.join(self.root, "data"), "--exec-root", os.path.join(self.root, "exec"),
                "--pidfile", os.path.join(self.root, "docker.pid"), "--bridge", self.bridge,
                "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--userland-proxy=false",
                "--shutdown-timeout", "5"]

    def start_daemon(self, socket_path: str | None = None) -> None:
        """Start dockerd on ``socket_path`` (default: its own socket) and wait until it answers."""
        socket_path = socket_path or self.socket
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(self.daemon_args(socket_path), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + TIMEOUT
        while not self._answers(socket_path):
            if self.process.poll() is not None:
                raise DockerdUnavailable(f"dockerd exited with status {self.process.returncode}: "
                                         f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DockerdUnavailable(f"dockerd did not answer within {TIMEOUT:g} s: {self.log_tail()}")
            time.sleep(0.05)

    @staticmethod
    def _answers(socket_path: str) -> bool:
        """``GET /_ping`` answers OK."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(socket_path)
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.0 200")
        except OSError:
            return False

    def stop_daemon(self) -> None:
        """SIGTERM the daemon (it stops its containers and its containerd) and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(TIMEOUT)

    def log_tail(self, lines: int = 3) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return " | ".join(line.strip() for line in f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- the docker command -------------------------------------------------------------

    def env(self, socket_path: str | None = None) -> dict:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DOCKER_HOST": f"unix://{socket_path or self.socket}",
                "DOCKER_CONFIG": self.config_dir}

    def docker(self, *args: str, socket_path: str | None = None, data: bytes | None = None) -> str:
        """Run ``docker ARGS`` (blocking: outside the reactor's turn only); its stdout."""
        done = subprocess.run([docker_cli(), *args], input=data, capture_output=True, timeout=TIMEOUT,
                              env=self.env(socket_path))
        if done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout.decode().strip()

    async def run(self, *args: str) -> str:
        """``docker ARGS`` without blocking the reactor; its stdout."""
        out, err, code = await getProcessOutputAndValue(docker_cli(), args, env=self.env(), reactor=reactor)
        if code != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {err.decode(errors='replace').strip()}")
        return out.decode().strip()

    def _import_image(self) -> None:
        """The image: /bin/busybox and /www/index.html, imported from a tar made here."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for directory in ("bin", "www", "tmp"):
                info = tarfile.TarInfo(directory)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            tar.add(BUSYBOX, "bin/busybox")
            info = tarfile.TarInfo("bin/sh")  # for health checks (CMD-SHELL)
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
            info = tarfile.TarInfo("www/index.html")
            info.size, info.mode = len(PAGE), 0o644
            tar.addfile(info, io.BytesIO(PAGE))
        cmd = json.dumps(["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"])
        self.docker("import", "--change", f"CMD {cmd}", "-", IMAGE, data=buffer.getvalue())

    async def network(self) -> tuple[str, object]:
        """A bridge network of its own (a free /27 of 203.0.113.0/24); (its name, its subnet)."""
        self._networks += 1
        name = f"hpn{self.tag}n{self._networks}"
        with open(SUBNET_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            subnet = _free_subnet(NETWORK_RANGE, 27)
            self.bridges.append(name)
            await self.run("network", "create", "--driver", "bridge", "--subnet", str(subnet),
                           "-o", f"com.docker.network.bridge.name={name}", name)
        return name, subnet

    # -- teardown -----------------------------------------------------------------------

    def cleanup(self) -> None:
        """Everything this daemon left: containers, the daemon, its helpers, mounts, bridges, files."""
        if self.process is not None and self.process.poll() is None:
            try:
                ids = self.docker("ps", "-aq").split()
                if ids:
                    self.docker("rm", "-f", *ids)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        self.stop_daemon()
        self._kill_leftovers()
        self._unmount()
        for bridge in self.bridges:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=TIMEOUT)
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """containerd and shims of this daemon still running (their command line names our directory)."""
        marker = self.root.encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker in f.read():
                        os.kill(int(entry), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass

    def _unmount(self) -> None:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in sorted((p for p in points if p.startswith(self.root + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=TIMEOUT)


_shared: Dockerd | None = None
_unavailable: str | None = None


def shared_daemon() -> Dockerd:
    """This process's daemon, started at the first call (raises DockerdUnavailable, with the
    reason, where it cannot run); torn down when the process exits."""
    global _shared, _unavailable
    if _shared is not None:
        return _shared
    if _unavailable is None:
        _unavailable = missing_requirements()
    if _unavailable is not None:
        raise DockerdUnavailable(_unavailable)
    daemon = Dockerd()
    atexit.register(daemon.cleanup)
    try:
        daemon.start()
    except (DockerdUnavailable, RuntimeError, subprocess.SubprocessError, OSError) as e:
        _unavailable = f"dockerd cannot start here: {e}"
        daemon.cleanup()
        raise DockerdUnavailable(_unavailable) from None
    _shared = daemon
    return daemon
