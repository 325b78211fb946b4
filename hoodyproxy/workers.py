"""Multi-core: worker processes that share the listening ports (SO_REUSEPORT).

With ``--workers N`` the twistd process is worker 0 and starts N-1 more
(``python -m hoodyproxy.workers SPEC``).  Every worker binds its own socket to the same
address with ``SO_REUSEPORT``, so the kernel spreads connections across them with no
accept lock and no hand-off.  Each worker has its own reactor, gateway and upstream pool;
all read the same state (the SQLite store).  Workers need no coordination on the request
path.  With ``[ratelimit] shared = true`` worker 0 also relays, every few tens of
milliseconds, what each worker's rate limiters charged to the others, over a UNIX socket
(:mod:`hoodyproxy.limits.shared`); the checks themselves stay local.  The admin API runs
in worker 0 only; after each change it writes a byte to every worker's stdin and the
worker re-reads the live map at once (without that, a worker sees another process's
writes within 50 ms).  A worker whose stdin closes (worker 0 died) exits; a worker that
dies is started again.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.application import service
from twisted.internet import protocol
from twisted.logger import Logger

from hoodyproxy.config import ListenAddress, Settings, settings_from_mapping, settings_to_mapping
from hoodyproxy.listening import v6only_for

log = Logger()


def listen_reuseport(reactor, address: ListenAddress, factory, backlog: int = 1024, v6only: bool = False):
    """Listen on ``address`` with SO_REUSEPORT set (so other workers can bind it too); a
    ``[::]`` address takes IPv4 clients too unless ``v6only``."""
    from hoodyproxy.listening import listen_tcp
    return listen_tcp(reactor, address, factory, backlog=backlog, v6only=v6only, reuse_port=True)


class _WorkerProcess(protocol.ProcessProtocol):
    """Worker 0's view of one child worker: its log lines, its exit."""

    def __init__(self, pool: "WorkerPool", number: int) -> None:
        self.pool = pool
        self.number = number
        self._partial = b""

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

    def __init__(self, reactor, settings: Settings, https: list[ListenAddress], http: list[ListenAddress],
                 count: int, limiters=None, taps=None) -> None:
        """``limiters``: worker 0's, whose charges are shared with the other workers' when
        they are sharing (``[ratelimit] shared = true``)."""
        self.reactor = reactor
        self.count = count
        self.https, self.http = https, http
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

    @property
    def spec(self) -> str:
        """What a worker is started with (its one argument besides its number)."""
        return json.dumps({
            "settings": settings_to_mapping(self.settings),
            "https": [[a.interface, a.port] for a in self.https],
            "http": [[a.interface, a.port] for a in self.http],
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
        proto = _WorkerProcess(self, number)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.reactor.spawnProcess(proto, sys.executable,
                                  [sys.executable, "-m", "hoodyproxy.workers", self.spec, str(number)],
                                  env=env, childFDs={0: "w", 1: "r", 2: "r"})
        self.processes[number] = proto

    def _ended(self, proto: _WorkerProcess) -> None:
        if self.processes.get(proto.number) is proto:
            del self.processes[proto.number]
        if not self.stopping:
            self.restarts += 1
            log.warn("worker {n} exited; starting it again", n=proto.number)
            self.reactor.callLater(self.restart_delay, self._spawn, proto.number)

    def notify_change(self, _container_id=None) -> None:
        """Tell every worker the store changed (it re-reads at once)."""
        for proto in self.processes.values():
            if proto.transport is not None:
                proto.transport.write(b"\n")

    def stopService(self):
        from twisted.internet import defer, task
        self.stopping = True
        super().stopService()
        for proto in list(self.processes.values()):
            if proto.transport is not None:
                proto.transport.closeStdin()
                try:
                    proto.transport.signalProcess("TERM")
                except Exception:
                    pass

        async def wait_all():
            for _ in range(100):
                if not self.processes:
                    break
                await task.deferLater(self.reactor, 0.05, lambda: None)
            else:
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
    """A worker's stdin: a byte means 'the store changed'; end of file means 'exit'."""

    def __init__(self, stack, reactor, certificates=None) -> None:
        self.stack = stack
        self.reactor = reactor
        self.certificates = certificates

    def dataReceived(self, data: bytes) -> None:
        self.stack.directory.refresh()
        self.stack.permissions.refresh()
        self.stack.aliases.refresh()
        if self.certificates is not None:
            self.certificates.reconcile()

    def connectionLost(self, reason=None) -> None:
        if self.reactor.running:
            self.reactor.stop()


def worker_main(argv: list[str]) -> None:
    """Entry point of a worker process: serve the listed ports until stdin closes."""
    from hoodyproxy.reactor import install_unless_chosen
    install_unless_chosen()
    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from hoodyproxy.service import GatewayStack

    spec = json.loads(argv[0])
    number = argv[1]
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    settings = settings_from_mapping(spec["settings"])
    stack = GatewayStack(settings, reactor, generate_certificates=False)
    # Worker 0 serves HTTP/3 on the HTTPS port number actually bound; say so here too.
    stack.gateway.alt_svc = settings.alt_svc_for(spec["https"][0][1])
    ports = []
    every = [ListenAddress(i, p) for i, p in spec["https"] + spec["http"]]
    for interface, port in spec["https"]:
        address = ListenAddress(interface, port)
        ports.append(listen_reuseport(reactor, address, stack.https_factory(), v6only=v6only_for(address, every)))
    for interface, port in spec["http"]:
        address = ListenAddress(interface, port)
        ports.append(listen_reuseport(reactor, address, stack.redirect_factory(spec["https"][0][1]),
                                      v6only=v6only_for(address, every)))
    from hoodyproxy.tls.manager import CertificateManager
    # Serves the certificates worker 0 issued (no issuer here: only worker 0 talks ACME).
    certificates = CertificateManager(stack.certificates, stack.aliases, None, settings.data_dir, reactor=reactor)
    certificates.startService()
    if spec.get("ratelimit_socket") and stack.gateway.limiters.sharing:
        from hoodyproxy.limits.shared import SharedLimitsClient
        shared = SharedLimitsClient(reactor, stack.gateway.limiters, spec["ratelimit_socket"],
                                    settings.ratelimit.shared_sync_ms / 1000, int(number))
        shared.startService()
        reactor.addSystemEventTrigger("before", "shutdown", shared.stopService)
    if spec.get("tap_socket"):
        from hoodyproxy.observe.relay import TapRelayClient
        stack.taps.set_worker(int(number))
        relay = TapRelayClient(reactor, stack.taps, spec["tap_socket"])
        relay.start()
        reactor.addSystemEventTrigger("before", "shutdown", relay.stop)
    if spec.get("metrics_socket"):
        from hoodyproxy.observe.gather import MetricsReporter
        reporter = MetricsReporter(reactor, spec["metrics_socket"], int(number), stack.metrics_snapshot)
        reporter.start()
        reactor.addSystemEventTrigger("before", "shutdown", reporter.stop)
    stdio.StandardIO(_Control(stack, reactor, certificates), stdout=os.open(os.devnull, os.O_WRONLY))
    log.info("worker {n} serving (pid {pid})", n=number, pid=os.getpid())
    reactor.addSystemEventTrigger("before", "shutdown", stack.close)
    reactor.run()


if __name__ == "__main__":
    worker_main(sys.argv[1:])
