"""Test support: a real three-member etcd cluster on loopback (Debian's ``etcd-server``).

:func:`start_cluster` starts the members on free loopback ports with a temporary data
directory; a member can be killed (``SIGKILL``, by its PID) and started again on the same
data and ports; :meth:`EtcdCluster.stop` kills every member and removes the directory.
A start costs a few seconds, so a test module shares one (:func:`shared_cluster`, started
at first use, stopped when the test process exits); the members are also told to die
with the test process (``PR_SET_PDEATHSIG``), so a killed run leaves none behind.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

ETCD = "/usr/bin/etcd"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def available() -> str | None:
    """None when a cluster can be started, else why not (a reason to skip)."""
    if not os.access(ETCD, os.X_OK):
        return f"{ETCD} is not installed (apt-get install etcd-server; make test installs it)"
    return None


class Member:
    def __init__(self, name: str, client_port: int, peer_port: int, data_dir: str) -> None:
        self.name = name
        self.client_port, self.peer_port = client_port, peer_port
        self.data_dir = data_dir
        self.url = f"http://127.0.0.1:{client_port}"
        self.peer_url = f"http://127.0.0.1:{peer_port}"
        self.process: subprocess.Popen | None = None
        self.log = os.path.join(os.path.dirname(data_dir), f"{name}.log")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class EtcdCluster:
    """Three etcd members on loopback; ``endpoints`` are their client URLs."""

    def __init__(self, size: int = 3) -> None:
        self.root = tempfile.mkdtemp(prefix="hoodyproxy-etcd-")
        ports = free_ports(2 * size)
        self.members = [Member(f"m{i}", ports[2 * i], ports[2 * i + 1], os.path.join(self.root, f"m{i}"))
                        for i in range(size)]
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def start_member(self, member: Member, state: str = "new") -> None:
        args = [ETCD, "--name", member.name, "--data-dir", member.data_dir,
                "--listen-client-urls", member.url, "--advertise-client-urls", member.url,
                "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
                "--initial-cluster", self.initial, "--initial-cluster-state", state,
                "--initial-cluster-token", os.path.basename(self.root),
                "--experimental-watch-progress-notify-interval", "1s",
                "--log-level", "warn", "--logger", "zap"]
        with open(member.log, "ab") as log:
            member.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              preexec_fn=_die_with_parent)

    def start(self, timeout: float = 60.0) -> None:
        for member in self.members:
            self.start_member(member)
        self.wait_healthy(self.members, timeout)

    def wait_healthy(self, members: list[Member], timeout: float = 60.0) -> None:
        """Wait (bounded) until each of ``members`` answers a linearizable read."""
        deadline = time.monotonic() + timeout
        for member in members:
            while True:
                if not member.running:
                    raise RuntimeError(f"etcd member {member.name} exited; see {member.log}")
                try:
                    request = urllib.request.Request(f"{member.url}/v3/kv/range", data=json.dumps(
                        {"key": "aGVhbHRo"}).encode(), method="POST")
                    with urllib.request.urlopen(request, timeout=2) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member {member.name} not healthy within {timeout}s")
                time.sleep(0.1)

    def leader(self) -> Member:
        """The member that leads now (asked of the running members)."""
        for member in self.members:
            if not member.running:
                continue
            request = urllib.request.Request(f"{member.url}/v3/maintenance/status", data=b"{}", method="POST")
            with urllib.request.urlopen(request, timeout=5) as answer:
                status = json.load(answer)
            if status.get("leader") == status.get("header", {}).get("member_id"):
                return member
        raise RuntimeError("no member says it leads")

    def kill(self, member: Member) -> None:
        """SIGKILL the member by its PID (its data stays)."""
        if member.running:
            os.kill(member.process.pid, signal.SIGKILL)
            member.process.wait(10)

    def restart(self, member: Member) -> None:
        """Start a killed member again on its data and ports."""
        self.kill(member)
        self.start_member(member, state="existing")

    def stop(self) -> None:
        for member in self.members:
            self.kill(member)
        shutil.rmtree(self.root, ignore_errors=True)


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


_shared: EtcdCluster | None = None


def shared_cluster() -> EtcdCluster:
    """The test process's cluster, started at first use with every member running (a
    member a test killed is started again here); skips the test when etcd is missing."""
    global _shared
    why = available()
    if why:
        from twisted.trial.unittest import SkipTest
        raise SkipTest(why)
    if _shared is None:
        _shared = start_cluster()
        atexit.register(_shared.stop)
    stopped = [m for m in _shared.members if not m.running]
    for member in stopped:
        _shared.start_member(member, state="existing")
    if stopped:
        _shared.wait_healthy(_shared.members)
    return _shared


def start_cluster(size: int = 3) -> EtcdCluster:
    cluster = EtcdCluster(size)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
