"""Multi-core: worker processes that serve the node's listening sockets.

With ``--workers N`` the twistd process is worker 0 and starts N-1 more
(``python -m hoodyproxy.workers SPEC``).  Worker 0 owns the HTTPS and HTTP listening
sockets (:mod:`hoodyproxy.sockets`) and hands them to each worker as inherited
descriptors (3, 4, ...); every process accepts from the same sockets.  A worker that
dies closes no listener and resets no connection waiting to be accepted: the other
processes accept it, and the worker started in its place adopts the same sockets.  HTTP/3
(UDP) and the admin API stay in worker 0.  Each worker has its own reactor, gateway and upstream pool;
all read the same state (the SQLite store).  Workers need no coordination on the request
path.  With ``[ratelimit] shared = true`` worker 0 also relays, every few tens of
milliseconds, what each worker's rate limiters charged to the others, over a UNIX socket
(:mod:`hoodyproxy.limits.shared`); the checks themselves stay local.  The admin API runs
in worker 0 only.

Worker 0 talks to each worker over its stdin, one line at a time (:class:`_Control`):

- an empty line (a lone ``\n``): the store changed, re-read the live map at once
  (without it, a worker sees another process's writes within 50 ms);
- ``{"settings": {...}}``: a config reload, the settings (``settings_to_mapping``) to
  serve with from now on; the worker logs ``settings reloaded`` once it has;
- ``{"reopen": "logs"}``: open the audit log again by name (``SIGUSR1``).

A worker ignores ``SIGHUP`` (worker 0 reloads and tells it) and reopens its audit log on
``SIGUSR1`` itself too, for a signal sent to the whole group.  A worker whose stdin
closes (worker 0 stops or died) or that gets SIGTERM drains (:mod:`hoodyproxy.drain`)
and exits; a worker that dies is started again, with the settings in force.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.application import service
from twisted.internet import protocol
from twisted.logger import Logger

from hoodyproxy.config import ConfigError, Settings, settings_from_mapping, settings_to_mapping

log = Logger()

#: The listening sockets workers serve (HTTP/3 and the admin API stay in worker 0).
WORKER_KINDS = ("https", "http")
#: Seconds a stopping worker is given beyond ``[drain] timeout`` before it is killed.
STOP_MARGIN = 5.0


class _WorkerProcess(protocol.ProcessProtocol):
    """Worker 0's view of one child worker: its log lines, its exit."""

    def __init__(self, pool: "WorkerPool", number: int) -> None:
        self.pool = pool
        self.number = number
        self._partial = b""
        self.told_to_stop = False

    def errReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                log.info("worker {n}: {line}", n=self.number, line=line.decode("utf-8", "replace"))

    outReceived = errReceived

    def processEnded(self, reason) -> None:
        self.pool._ended(self)


class WorkerPool(service.Service):
    """Starts, watches and stops worker processes 1..N-1 (this process is worker 0)."""

    restart_delay = 1.0

    def __init__(self, reactor, settings: Settings, listeners, count: int, limiters=None, taps=None) -> None:
        """``listeners``: worker 0's listening sockets (:class:`hoodyproxy.sockets.Listeners`),
        of which each worker inherits the HTTPS and HTTP ones; ``limiters``: worker 0's,
        whose charges are shared with the other workers' when they are sharing
        (``[ratelimit] shared = true``)."""
        self.reactor = reactor
        self.count = count
        self.listeners = listeners
        self.limiters = limiters
        self.shared_limits = None
        #: Worker 0's TapHub: the workers' exchanges reach its taps through a relay.
        self.taps = taps
        self.tap_relay = None
        self.use_settings(settings)
        self.processes: dict[int, _WorkerProcess] = {}
        self.stopping = False
        #: Workers that exited and were started again (a metric).
        self.restarts = 0
        #: Where a scrape gathers the workers' metrics (hoodyproxy.observe.gather).
        self.metrics_hub = None

    def use_settings(self, settings: Settings) -> None:
        """The settings workers started from now on get (before ``startService``: all of them)."""
        self.settings = settings

    def reload(self, settings: Settings) -> None:
        """Every worker serves with ``settings`` from now on (a config reload), and so do
        the workers started later."""
        self.use_settings(settings)
        self._tell({"settings": settings_to_mapping(settings)})

    def reopen_logs(self) -> None:
        """Every worker opens its audit log again by name."""
        self._tell({"reopen": "logs"})

    def _tell(self, command: dict) -> None:
        line = json.dumps(command, separators=(",", ":")).encode() + b"\n"
        for proto in self.processes.values():
            if proto.transport is not None:
                proto.transport.write(line)

    def inherited(self) -> list[tuple[str, int]]:
        """(kind, descriptor in worker 0) of each socket a worker inherits, in the order of
        its descriptors 3, 4, ..."""
        return [(kind, sock.fileno()) for kind in WORKER_KINDS for sock in self.listeners.of(kind)]

    @property
    def spec(self) -> str:
        """What a worker is started with (its one argument besides its number)."""
        from hoodyproxy.sockets import FIRST_FD, address_of
        return json.dumps({
            "settings": settings_to_mapping(self.settings),
            "listeners": [[kind, FIRST_FD + i] for i, (kind, _fd) in enumerate(self.inherited())],
            "https_port": address_of(self.listeners.of("https")[0]).port,
            "ratelimit_socket": self.shared_limits.path if self.shared_limits is not None else None,
            "tap_socket": self.tap_relay.path if self.tap_relay is not None else None,
            "metrics_socket": self.metrics_hub.path if self.metrics_hub is not None else None,
        })

    def startService(self) -> None:
        super().startService()
        if self.limiters is not None and self.limiters.sharing:
            from hoodyproxy.limits.shared import SharedLimitsHub, socket_path
            path, temp_dir = socket_path(self.settings.data_dir)
            self.shared_limits = SharedLimitsHub(self.reactor, self.limiters, path,
                                                 self.settings.ratelimit.shared_sync_ms / 1000, temp_dir)
            self.shared_limits.startService()
        if self.taps is not None:
            from hoodyproxy.observe.relay import TapRelayServer
            self.tap_relay = TapRelayServer(self.reactor, self.taps, self.settings.data_dir)
            self.tap_relay.startService()
        from hoodyproxy.observe.gather import MetricsHub
        self.metrics_hub = MetricsHub(self.reactor, self.settings.data_dir)
        self.metrics_hub.startService()
        for number in range(1, self.count):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        if self.stopping:
            return
        from hoodyproxy.sockets import FIRST_FD
        proto = _WorkerProcess(self, number)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_") and k != "NOTIFY_SOCKET"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        fds: dict[int, object] = {0: "w", 1: "r", 2: "r"}
        for i, (_kind, fd) in enumerate(self.inherited()):
            fds[FIRST_FD + i] = fd
        self.reactor.spawnProcess(proto, sys.executable,
                                  [sys.executable, "-m", "hoodyproxy.workers", self.spec, str(number)],
                                  env=env, childFDs=fds)
        self.processes[number] = proto

    def _ended(self, proto: _WorkerProcess) -> None:
        if self.processes.get(proto.number) is proto:
            del self.processes[proto.number]
        if not self.stopping:
            self.restarts += 1
            log.warn("worker {n} exited; starting it again", n=proto.number)
            self.reactor.callLater(self.restart_delay, self._spawn, proto.number)

    def release_socket_paths(self) -> None:
        """Stop listening on worker 0's UNIX sockets (shared rate limits, taps) before the
        next generation binds the same paths: the workers keep their connections, and
        closing these ports later would unlink the paths under the new generation."""
        for hub in (self.shared_limits, self.tap_relay):
            port = getattr(hub, "port", None)
            if port is not None:
                hub.port = None
                port.stopListening()

    def notify_change(self, _container_id=None) -> None:
        """Tell every worker the store changed (it re-reads at once)."""
        for proto in self.processes.values():
            if proto.transport is not None:
                proto.transport.write(b"\n")

    def drain(self) -> None:
        """Tell every worker to drain and exit (SIGTERM, and its stdin closed); none is
        started again."""
        self.stopping = True
        for proto in list(self.processes.values()):
            if proto.transport is not None and not proto.told_to_stop:
                proto.told_to_stop = True
                proto.transport.closeStdin()
                try:
                    proto.transport.signalProcess("TERM")
                except Exception:
                    pass

    def stopService(self):
        from twisted.internet import defer, task
        super().stopService()
        self.drain()

        async def wait_all():
            # Each drains for up to [drain] timeout; past it (and a margin), it is killed.
            deadline = self.reactor.seconds() + self.settings.drain_timeout + STOP_MARGIN
            while self.processes and self.reactor.seconds() < deadline:
                await task.deferLater(self.reactor, 0.05, lambda: None)
            if self.processes:
                for proto in list(self.processes.values()):
                    try:
                        proto.transport.signalProcess("KILL")
                    except Exception:
                        pass
            # Last, so that no worker logs that it lost it while stopping.
            if self.shared_limits is not None:
                await self.shared_limits.stopService()
            if self.tap_relay is not None:
                await self.tap_relay.stopService()
            if self.metrics_hub is not None:
                await self.metrics_hub.stopService()
        return defer.ensureDeferred(wait_all())


class _Control(protocol.Protocol):
    """A worker's stdin: worker 0's lines (see the module's docstring); end of file means 'exit'."""

    #: The longest line kept (a settings mapping is a few kilobytes).
    max_line = 1 << 20

    def __init__(self, stack, reactor, certificates=None) -> None:
        self.stack = stack
        self.reactor = reactor
        self.certificates = certificates
        self._partial = b""

    def dataReceived(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > self.max_line:
            log.error("control line over {n} bytes dropped", n=self.max_line)
            self._partial = b""
        if any(not line.strip() for line in lines):
            self.refresh()
        for line in lines:
            if line.strip():
                self.command(line)

    def refresh(self) -> None:
        """The store changed: read it again now."""
        self.stack.directory.refresh()
        self.stack.permissions.refresh()
        self.stack.aliases.refresh()
        if self.certificates is not None:
            self.certificates.reconcile()

    def command(self, line: bytes) -> None:
        try:
            command = json.loads(line)
            if "settings" in command:
                self.stack.apply_settings(settings_from_mapping(command["settings"]))
                log.info("settings reloaded")
            elif command.get("reopen") == "logs":
                reopen_audit_log(self.stack)
            else:
                log.error("unknown control line ignored")
        except ConfigError as e:
            log.error("settings not reloaded, the ones in force stay: {key}: {problem}", key=e.key,
                      problem=e.problem)
        except Exception:
            log.failure("control line failed")

    def connectionLost(self, reason=None) -> None:
        if self.reactor.running:
            self.reactor.stop()


def reopen_audit_log(stack) -> None:
    """Open a worker's audit log again by name (a line from worker 0, or SIGUSR1)."""
    try:
        stack.audit.reopen()
    except OSError as e:
        log.error("cannot reopen the audit log {path}: {problem}", path=stack.audit.path, problem=e.strerror)
    else:
        log.info("audit log reopened")


def _handle_signals(stack, reactor) -> None:
    """SIGHUP is worker 0's to act on; SIGUSR1 reopens this worker's audit log."""
    import signal
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, lambda signum, frame: reactor.callFromThread(reopen_audit_log, stack))


def worker_main(argv: list[str]) -> None:
    """Entry point of a worker process: serve the inherited sockets until told to stop
    (stdin closes, or SIGTERM), then drain and exit."""
    from hoodyproxy.reactor import install_unless_chosen
    install_unless_chosen()
    import socket

    from twisted.internet import defer, reactor, stdio
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from hoodyproxy.service import GatewayStack
    from hoodyproxy.sockets import adopt_stream

    spec = json.loads(argv[0])
    number = argv[1]
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    settings = settings_from_mapping(spec["settings"])
    stack = GatewayStack(settings, reactor, generate_certificates=False)
    # Worker 0 serves HTTP/3 on the HTTPS port number actually bound; say so here too.
    stack.advertise_http3(spec["https_port"])
    factories = {"https": stack.https_factory(), "http": stack.redirect_factory(spec["https_port"])}
    ports = []
    for kind, fd in spec["listeners"]:
        inherited = socket.socket(fileno=fd)
        ports.append(adopt_stream(reactor, inherited, factories[kind]))
        inherited.close()  # (the port serves a duplicate; worker 0 keeps the socket)
    from hoodyproxy.tls.manager import CertificateManager
    # Serves the certificates worker 0 issued (no issuer here: only worker 0 talks ACME).
    certificates = CertificateManager(stack.certificates, stack.aliases, None, settings.data_dir, reactor=reactor)
    certificates.startService()
    stops = []
    if spec.get("ratelimit_socket") and stack.gateway.limiters.sharing:
        from hoodyproxy.limits.shared import SharedLimitsClient
        shared = SharedLimitsClient(reactor, stack.gateway.limiters, spec["ratelimit_socket"],
                                    settings.ratelimit.shared_sync_ms / 1000, int(number))
        shared.startService()
        stops.append(shared.stopService)
    if spec.get("tap_socket"):
        from hoodyproxy.observe.relay import TapRelayClient
        stack.taps.set_worker(int(number))
        relay = TapRelayClient(reactor, stack.taps, spec["tap_socket"])
        relay.start()
        stops.append(relay.stop)
    if spec.get("metrics_socket"):
        from hoodyproxy.observe.gather import MetricsReporter
        reporter = MetricsReporter(reactor, spec["metrics_socket"], int(number), stack.metrics_snapshot)
        reporter.start()
        stops.append(reporter.stop)
    stdio.StandardIO(_Control(stack, reactor, certificates), stdout=os.open(os.devnull, os.O_WRONLY))
    _handle_signals(stack, reactor)
    log.info("worker {n} serving (pid {pid})", n=number, pid=os.getpid())

    async def shutdown() -> None:
        # One step after another (system event triggers of one phase run side by side):
        # stop accepting, drain, then what the requests needed.
        await defer.DeferredList([defer.maybeDeferred(port.stopListening) for port in ports])
        await stack.drain().start()
        for stop in stops:
            await defer.maybeDeferred(stop)
        stack.close()
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(shutdown()))
    reactor.run()


if __name__ == "__main__":
    worker_main(sys.argv[1:])
