"""Binary upgrade: the next generation of the node takes the listening sockets over, then
the old one drains, and no request is lost.

``SIGUSR2`` to the node's main process (worker 0; ``systemctl kill -s USR2
--kill-whom=main hoodyproxy`` under systemd) starts it, the way nginx's binary upgrade
and HAProxy's and Envoy's hot restarts do it: both generations serve the same sockets
for a moment, so a client is never refused and a connection in the accept queue is never
reset.

1. The old node starts the new one with its own command line (the ``twistd`` at the same
   path: a new version installed there is what runs), through :mod:`hoodyproxy.sdexec`.
   Every listening socket goes along as descriptors 3, 4, ... named in
   ``LISTEN_FDNAMES`` -- socket activation's protocol, so the new node takes them the
   way it takes systemd's (:func:`hoodyproxy.sockets.handed_in`) -- and two more
   descriptors, named in ``HOODYPROXY_UPGRADE``: the data directory's lock (the same
   open file, so the same lock: no third node can slip in between) and a pipe.
2. The new node starts as any node does, adopting the sockets instead of binding them.
   Once it serves, it writes ``ready`` on the pipe and tells systemd it is the main
   process now (``MAINPID=``, ``READY=1``; the unit needs ``NotifyAccess=all``).
3. On ``ready`` the old node drains (:mod:`hoodyproxy.drain`; admin port included, since
   the new one answers there now) and exits.  It leaves in place what the new one shares
   with it: the netfilter rules of transparent mode and the demo's registration.

If the new node exits, or is not ready within :data:`READY_TIMEOUT` seconds (then it is
sent SIGTERM), the old one logs why and goes on serving: a broken version never takes
the node down.  A second ``SIGUSR2`` while one upgrade runs is ignored.

What does not carry over: requests in flight on the old generation finish there (that
is the drain); rate-limit counters and running taps live in memory and start afresh;
HTTP/3 packets of the old generation's connections may reach the new one (they share
the UDP socket), which drops them -- QUIC retransmits, and a packet that reaches the old
one carries on, but a long HTTP/3 transfer may slow down for the moment of the drain.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import protocol
from twisted.logger import Logger

__all__ = ["Upgrader", "ENV", "inherited", "say_ready", "READY_TIMEOUT"]

log = Logger()

#: In the new generation: "<lock descriptor>:<ready pipe descriptor>".
ENV = "HOODYPROXY_UPGRADE"
#: Seconds the new generation has to say it is ready.
READY_TIMEOUT = 120.0


def inherited(environ=None) -> tuple[int, int] | None:
    """(lock descriptor, ready pipe descriptor) handed to this process by the generation
    before, or None; the variable is removed (no child process inherits it)."""
    environ = os.environ if environ is None else environ
    value = environ.pop(ENV, None)
    if value is None:
        return None
    lock, _, ready = value.partition(":")
    if not (lock.isdigit() and ready.isdigit()):
        return None
    return int(lock), int(ready)


def say_ready(ready_fd: int, previous: str | None = None) -> None:
    """Tell the generation before (on its pipe) and systemd that this one serves."""
    from hoodyproxy.notify import notify
    try:
        os.write(ready_fd, b"ready\n")
    except OSError as e:
        log.warn("hoodyproxy upgrade: could not tell the generation before that this one is ready ({why})",
                 why=e.strerror)
    finally:
        try:
            os.close(ready_fd)
        except OSError:
            pass
    notify(f"MAINPID={os.getpid()}", "READY=1", "STATUS=serving (took the sockets over)")


def command_line(argv: list[str] | None = None) -> list[str]:
    """How this process was started (twistd's ``sys.argv``), as a program to exec."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(".py"):
        return [sys.executable, *argv]
    return argv


class _NextGeneration(protocol.ProcessProtocol):
    """The old node's view of the new one: its ready pipe and its end."""

    def __init__(self, upgrader: "Upgrader", ready_fd: int) -> None:
        self.upgrader = upgrader
        self.ready_fd = ready_fd
        self.ready = False
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == self.ready_fd and b"ready" in data and not self.ready:
            self.ready = True
            self.upgrader.ready(self)

    def processEnded(self, reason) -> None:
        if not self.ready:
            code = getattr(reason.value, "exitCode", None)
            signal = getattr(reason.value, "signal", None)
            why = f"exited with status {code}" if code is not None else f"ended by signal {signal}"
            self.upgrader.failed(self, why)


class Upgrader:
    """Worker 0's side of a binary upgrade (see the module docstring)."""

    def __init__(self, node, reactor, argv: list[str] | None = None) -> None:
        self.node = node
        self.reactor = reactor
        self.argv = argv
        self.next: _NextGeneration | None = None
        self._timer = None

    def start(self) -> None:
        """Start the next generation on this node's sockets (SIGUSR2)."""
        from hoodyproxy.sockets import FIRST_FD, activation_environment
        node = self.node
        if self.next is not None:
            log.info("hoodyproxy upgrade: one is in progress already (pid {pid})", pid=self.next.pid)
            return
        if node.draining or node.listeners is None:
            log.info("hoodyproxy upgrade: not now, this node is stopping")
            return
        named = [(kind, sock.fileno()) for kind, sock in node.listeners.named()]
        lock_fd = FIRST_FD + len(named)
        ready_fd = lock_fd + 1
        fds: dict[int, object] = {0: 0, 1: 1, 2: 2}
        for i, (_kind, fd) in enumerate(named):
            fds[FIRST_FD + i] = fd
        fds[lock_fd] = node.datadir_lock.fileno()
        fds[ready_fd] = "r"
        env = activation_environment(named, os.environ)
        env[ENV] = f"{lock_fd}:{ready_fd}"
        if node.workers is not None:
            node.workers.release_socket_paths()  # (the next generation's worker 0 binds them)
        self.next = _NextGeneration(self, ready_fd)
        argv = [sys.executable, "-m", "hoodyproxy.sdexec", *command_line(self.argv)]
        try:
            self.reactor.spawnProcess(self.next, sys.executable, argv, env=env, childFDs=fds)
        except Exception as e:
            self.next = None
            log.error("hoodyproxy upgrade: cannot start the next generation: {why}", why=str(e))
            return
        log.info("hoodyproxy upgrade: started the next generation (pid {pid}) on this node's "
                 "{n} listening sockets; this one drains once it is ready", pid=self.next.pid, n=len(named))
        self._timer = self.reactor.callLater(READY_TIMEOUT, self._too_slow)

    def ready(self, generation: _NextGeneration) -> None:
        self._cancel_timer()
        log.info("hoodyproxy upgrade: generation {pid} serves; this one (pid {me}) drains and exits",
                 pid=generation.pid, me=os.getpid())
        self.node.handed_over = True
        if self.reactor.running:
            self.reactor.stop()

    def failed(self, generation: _NextGeneration, why: str) -> None:
        self._cancel_timer()
        if self.next is generation:
            self.next = None
        log.error("hoodyproxy upgrade: the next generation (pid {pid}) {why} before it was ready; "
                  "this one goes on serving", pid=generation.pid, why=why)
        netfilter = getattr(self.node, "netfilter", None)
        if netfilter is not None and netfilter.installed:
            # Its stop took away the rules it had replaced ours with: put them back.
            try:
                netfilter.install()
            except Exception as e:
                log.error("hoodyproxy upgrade: could not reinstall the netfilter rules: {why}", why=str(e))

    def _too_slow(self) -> None:
        self._timer = None
        generation = self.next
        if generation is None or generation.ready:
            return
        log.error("hoodyproxy upgrade: the next generation (pid {pid}) is not ready after {t:g} s: "
                  "stopping it", pid=generation.pid, t=READY_TIMEOUT)
        try:
            generation.transport.signalProcess("TERM")
        except Exception:
            pass

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
