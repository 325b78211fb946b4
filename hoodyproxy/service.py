"""makeService: the twistd entry point, composing a node's MultiService from its config."""

from __future__ import annotations

import os
import secrets
import sys

from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from hoodyproxy.config import (ConfigError, ListenAddress, Settings, client_ip_modes, load_settings,
                               resolve_client_ip)
from hoodyproxy.tls.devca import write_atomic

log = Logger()

#: The container the ``--demo`` sample service is registered as.
DEMO_PROJECT = "0123456789abcdef01234567"
DEMO_CONTAINER = "89abcdef0123456789abcdef"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run a hoodyproxy node: the HTTPS gateway in which the hostname is the route. "
                "With no options it runs on embedded defaults (see docs/configuration.rst).")
    optParameters = [
        ["config", "c", None, "TOML config file (command-line options override it)"],
        ["data-dir", "d", None, "state directory (default: /var/lib/hoodyproxy as root, "
                                "else ~/.local/share/hoodyproxy; or $HOODYPROXY_DATA_DIR)"],
        ["node", None, None, "node name (default node-local)"],
        ["zone", None, None, "zone (default containers.localhost)"],
        ["https", None, None, "HTTPS listen address, [address:]port (default [::]:8443, which takes IPv4 too)"],
        ["http", None, None, "plain HTTP listen address (redirects to HTTPS; default [::]:8080)"],
        ["admin", None, None, "admin API listen address (default 127.0.0.1:8081)"],
        ["tls-cert", None, None, "PEM certificate chain for *.<node>.<zone>"],
        ["tls-key", None, None, "PEM private key for --tls-cert"],
        ["audit", None, None, "audit log file, or - for stdout (default <data-dir>/audit.log)"],
        ["workers", "w", None, "worker processes sharing the ports (default 1)", int],
        ["client-ip-mode", None, None, "how containers learn the client's address: auto (default), "
                                       "transparent, proxy-protocol or headers"],
        ["acme-directory", None, None, "ACME directory URL: custom domains get certificates (off when unset)"],
        ["acme-email", None, None, "contact e-mail for the ACME account"],
        ["acme-challenge", None, None, "http-01 (default) or tls-alpn-01"],
        ["acme-ca-bundle", None, None, "CA bundle to trust a private ACME server (pebble)"],
        ["http3-advertised-port", None, None, "UDP port advertised for HTTP/3 in Alt-Svc, for a node "
                                              "behind NAT (default: the HTTPS port)", int],
    ]
    optFlags = [
        ["demo", None, "also start a built-in sample service and register it as a container"],
        ["no-http3", None, "do not serve HTTP/3 (QUIC) nor advertise it"],
        ["no-http2", None, "do not offer HTTP/2 (ALPN h2) on the TLS port"],
    ]

    def postOptions(self) -> None:
        # Parsed before twistd first imports the reactor: the gateway's own epoll reactor
        # (hoodyproxy/reactor.py) is installed unless twistd --reactor chose another.
        from hoodyproxy.reactor import install_unless_chosen
        install_unless_chosen()

    def overrides(self) -> dict:
        return {
            "node.data_dir": self["data-dir"],
            "node.name": self["node"],
            "node.zone": self["zone"],
            "listen.https": self["https"],
            "listen.http": self["http"],
            "listen.admin": self["admin"],
            "tls.certificate": self["tls-cert"],
            "tls.key": self["tls-key"],
            "audit.path": self["audit"],
            "demo.enabled": True if self["demo"] else None,
            "node.workers": self["workers"],
            "client_ip.mode": self["client-ip-mode"],
            "acme.directory": self["acme-directory"],
            "acme.email": self["acme-email"],
            "acme.challenge": self["acme-challenge"],
            "acme.ca_bundle": self["acme-ca-bundle"],
            "http3.enabled": False if self["no-http3"] else None,
            "http3.advertised_port": self["http3-advertised-port"],
            "http2.enabled": False if self["no-http2"] else None,
        }


class StartError(Exception):
    """The node cannot start as configured; the message is the one line to show."""


def transparent_needs_cap_message() -> str:
    return ("client IP mode 'transparent' needs CAP_NET_ADMIN, which this process does not have: "
            "run it as root or grant the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN), "
            "or use --client-ip-mode auto or headers")


def admin_token(settings: Settings) -> str:
    """The configured admin token, or the one generated at first start (mode 0600)."""
    if settings.admin_token:
        return settings.admin_token
    path = os.path.join(settings.data_dir, "admin-token")
    try:
        with open(path) as f:
            token = f.read().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    write_atomic(path, token.encode() + b"\n", mode=0o600)
    return token


class GatewayStack:
    """The stores and the gateway one process serves with (worker 0 and every other worker)."""

    def __init__(self, settings: Settings, reactor, *, generate_certificates: bool = True) -> None:
        from hoodyproxy.directory import SQLiteDirectory, open_database
        from hoodyproxy.gateway import Gateway
        from hoodyproxy.observe.audit import AuditLog
        from hoodyproxy.tls import CertificateStore, ensure_dev_certificates
        from hoodyproxy.upstream.pool import ConnectionPool

        s = self.settings = settings
        self.reactor = reactor
        os.makedirs(s.data_dir, mode=0o700, exist_ok=True)
        self.directory = SQLiteDirectory(open_database(os.path.join(s.data_dir, "hoodyproxy.db")))
        if s.tls_certificate:
            cert, key, self.ca_path = s.tls_certificate, s.tls_key, None
        elif generate_certificates:
            dev = ensure_dev_certificates(os.path.join(s.data_dir, "tls"), s.node, s.zone)
            cert, key, self.ca_path = dev.cert_path, dev.key_path, dev.ca_path
        else:
            tls_dir = os.path.join(s.data_dir, "tls")
            cert, key = os.path.join(tls_dir, "wildcard.pem"), os.path.join(tls_dir, "wildcard-key.pem")
            self.ca_path = os.path.join(tls_dir, "ca.pem")
        from hoodyproxy.aliases import AliasStore
        from hoodyproxy.tls.challenges import HTTP01Responder, TLSALPN01Responder
        # Files under the data directory let every worker answer a challenge worker 0 started.
        challenges_dir = os.path.join(s.data_dir, "acme", "challenges")
        self.http01 = HTTP01Responder(os.path.join(challenges_dir, "http-01"))
        self.tlsalpn01 = TLSALPN01Responder(os.path.join(challenges_dir, "tls-alpn-01"))
        alpn = (b"h2", b"http/1.1") if s.http2_enabled else (b"http/1.1",)
        self.certificates = CertificateStore(cert, key, alpn=alpn, challenges=self.tlsalpn01)
        self.audit = AuditLog(None if s.audit_file == "-" else s.audit_file, clock=reactor)
        self.pool = ConnectionPool(reactor, connect_timeout=s.connect_timeout,
                                   idle_timeout=s.pool_idle_timeout, max_idle=s.pool_max_idle)
        from hoodyproxy.access.capabilities import service_kinds
        from hoodyproxy.access.groups import group_types
        from hoodyproxy.access.policy import Policy
        from hoodyproxy.access.store import PermissionStore
        self.registry = group_types()
        self.permissions = PermissionStore(self.directory._conn, self.registry)
        self.policy = Policy(self.permissions, self.registry, service_kinds())
        self.aliases = AliasStore(self.directory._conn, node=s.node, zone=s.zone, programs=s.programs)
        from hoodyproxy.limits.store import RateLimitStore
        self.rate_limits = RateLimitStore(self.directory._conn)
        self.gateway = Gateway(s, self.directory, self.pool, self.audit, reactor, policy=self.policy,
                               aliases=self.aliases, rate_limits=self.rate_limits)
        self.gateway.alt_svc = s.alt_svc_for(s.https_port)
        from hoodyproxy.observe.tap import TapHub
        self.taps = self.gateway.taps = TapHub(reactor, allow_unredacted=s.tap_allow_unredacted,
                                                max_taps=s.tap_max_taps, queue_events=s.tap_queue_events)
        #: The HTTPS ports' TLS factories and the HTTP/3 listeners: their open connections
        #: are counted when metrics are asked for.
        self.tls_factories: list = []
        self.http3_listeners: list = []

    def https_factory(self):
        """The TLS server factory for the HTTPS port: HTTP/2 or HTTP/1.1 by ALPN."""
        from hoodyproxy.frontend.h1 import H1Factory
        from hoodyproxy.frontend.http2 import NegotiatingFactory
        from hoodyproxy.tls import SNIContextFactory
        factory = H1Factory(self.gateway, self.reactor, timeout=self.settings.client_idle_timeout)
        negotiating = NegotiatingFactory(factory, self.gateway, self.settings, self.certificates, self.reactor)
        from hoodyproxy.tls.transport import tls_factory
        tls = tls_factory(SNIContextFactory(self.certificates), False, negotiating)
        self.tls_factories.append(tls)
        return tls

    def open_connections(self) -> dict[str, int]:
        """Client connections open now, by protocol (``tls`` while in the handshake)."""
        from hoodyproxy.frontend.http2 import connection_protocol
        counts = {"tls": 0, "h1": 0, "h2": 0, "h3": 0}
        for factory in self.tls_factories:
            for wrapper in list(factory.protocols):
                protocol = connection_protocol(getattr(wrapper, "wrappedProtocol", None))
                counts[protocol] += 1
        for listener in self.http3_listeners:
            counts["h3"] += len(listener.sessions)
        return counts

    def metrics_snapshot(self) -> dict:
        """This process's metrics (:func:`hoodyproxy.observe.metrics.process_snapshot`)."""
        from hoodyproxy.observe.metrics import process_snapshot
        gateway = self.gateway
        return process_snapshot(gateway.metrics, kinds={n: p.kind for n, p in gateway.settings.programs.items()},
                                limiters=gateway.limiters, connections=self.open_connections())

    def redirect_factory(self, https_port: int) -> Site:
        """The plain-HTTP factory: a 308 to HTTPS on ``https_port``, given from the request
        head (a body is never read)."""
        from hoodyproxy.frontend.redirect import RedirectToHTTPS, plain_http_site
        return plain_http_site(RedirectToHTTPS(https_port, http01=self.http01), self.reactor,
                               self.settings.request_head_timeout)

    def close(self) -> None:
        self.pool.close()
        self.audit.close()


class NodeService(service.MultiService):
    """A whole node: stores, gateway and listeners.  Listening happens at privileged start."""

    def __init__(self, settings: Settings, reactor=None, *, has_net_admin: bool | None = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.configured = settings
        self._has_net_admin = has_net_admin
        settings = self._resolve_client_ip(settings, has_net_admin)
        self.settings = settings
        self.ports: dict[str, list] = {"https": [], "http": [], "admin": [], "http3": []}
        self.demo_port = None
        self.demo = None
        self.workers = None
        # One node per data directory, taken before anything in it is read or written.
        from hoodyproxy.datadir import DataDirInUse, DataDirLock
        self.datadir_lock = DataDirLock(settings.data_dir)
        try:
            self.datadir_lock.acquire()
        except DataDirInUse as e:
            raise StartError(str(e)) from None
        try:
            self.stack = GatewayStack(settings, reactor)
        except BaseException:
            self.datadir_lock.release()
            raise
        self.directory = self.stack.directory
        self.certificates = self.stack.certificates
        self.audit = self.stack.audit
        self.pool = self.stack.pool
        self.gateway = self.stack.gateway
        self.ca_path = self.stack.ca_path
        self.token = admin_token(settings)
        self.netfilter = None
        if "transparent" in client_ip_modes(settings):
            from hoodyproxy.netfilter import NetfilterService
            self.netfilter = NetfilterService(
                settings.node, settings.client_ip_mark, settings.client_ip_table,
                required="transparent" in client_ip_modes(self.configured),
                directory=self.directory, reactor=reactor, instance=settings.data_dir)
            self.netfilter.setServiceParent(self)

    def _resolve_client_ip(self, settings: Settings, has_net_admin: bool | None) -> Settings:
        """Make ``auto`` concrete: transparent with CAP_NET_ADMIN, else headers (with a warning)."""
        modes = client_ip_modes(settings)
        self.client_ip_warning = None
        if not modes & {"auto", "transparent"}:
            return settings
        if has_net_admin is None:
            from hoodyproxy.netfilter import has_net_admin as check
            has_net_admin = check()
        if not has_net_admin:
            if "transparent" in modes:
                raise StartError(transparent_needs_cap_message())
            self.client_ip_warning = ("no CAP_NET_ADMIN, so containers see the gateway's address as the "
                                      "peer and the client's in forwarding headers only (run as root or "
                                      "grant CAP_NET_ADMIN for transparent mode; [client_ip] mode = "
                                      "\"headers\" says this is meant)")
        return resolve_client_ip(settings, has_net_admin)

    def _client_ip_unavailable(self, why: str) -> None:
        """``auto`` cannot be transparent after all: fall back to forwarding headers."""
        self.settings = resolve_client_ip(self.configured, False)
        self.stack.settings = self.settings
        self.gateway.settings = self.settings
        self.gateway.configure_client_ip(self.settings)
        if self.workers is not None:
            self.workers.use_settings(self.settings)
        self.client_ip_warning = (f"{why}, so containers see the gateway's address as the peer and the "
                                  f"client's in forwarding headers only")

    def _listen_addresses(self) -> tuple[tuple[ListenAddress, ...], tuple[ListenAddress, ...]]:
        """The HTTPS and HTTP addresses to bind: as configured, except that ``[::]`` (the
        default, which takes IPv4 too) is ``0.0.0.0`` on a host whose kernel has no IPv6."""
        from hoodyproxy import listening
        s = self.settings
        if all(a.interface != listening.ANY_V6 for a in (*s.https, *s.http)) or listening.ipv6_available():
            return s.https, s.http
        log.warn("hoodyproxy: this host has no IPv6, so the [::] listeners listen on 0.0.0.0 (IPv4 only)")
        return listening.without_ipv6(s.https), listening.without_ipv6(s.http)

    def privilegedStartService(self) -> None:
        from hoodyproxy import listening
        from hoodyproxy.admin.api import AdminAPI, admin_site
        from hoodyproxy.admin.metrics import MetricsEndpoint, NodeMetrics
        from hoodyproxy.admin.taps import TapEndpoints
        from hoodyproxy.workers import WorkerPool

        self.datadir_lock.write_pid()  # this process's, if twistd has daemonized since
        s = self.settings
        r = self.reactor
        https_factory = self.stack.https_factory()
        https_addresses, http_addresses = self._listen_addresses()
        tcp_addresses = (*https_addresses, *http_addresses)

        def listen(addr: ListenAddress, factory):
            # [::] takes IPv4 too, whatever net.ipv6.bindv6only says; with workers, the
            # port is shared (SO_REUSEPORT).
            return listening.listen_tcp(r, addr, factory, v6only=listening.v6only_for(addr, tcp_addresses),
                                        reuse_port=s.workers > 1)
        for addr in https_addresses:
            self.ports["https"].append(listen(addr, https_factory))
        # Redirect to the port actually bound (it differs from the config when that says 0).
        https_bound = [ListenAddress(a.interface, p.getHost().port)
                       for a, p in zip(https_addresses, self.ports["https"])]
        redirect = self.stack.redirect_factory(https_bound[0].port)
        for addr in http_addresses:
            self.ports["http"].append(listen(addr, redirect))
        http_bound = [ListenAddress(a.interface, p.getHost().port) for a, p in zip(http_addresses, self.ports["http"])]
        if s.http3_enabled:
            # QUIC on the HTTPS port numbers, over UDP (in this process only, with workers).
            from hoodyproxy.frontend.http3 import listen_http3
            for addr in https_bound:
                self.ports["http3"].append(listen_http3(r, addr.interface, addr.port, gateway=self.gateway,
                                                        certificates=self.stack.certificates, settings=s,
                                                        v6only=listening.v6only_for(addr, https_bound)))
                self.stack.http3_listeners.append(self.ports["http3"][-1].protocol)
        self.gateway.alt_svc = s.alt_svc_for(https_bound[0].port)
        from hoodyproxy.aliases import alias_url
        from hoodyproxy.tls.manager import CertificateManager, CnameVerifier
        issuer = None
        if s.acme_directory:
            from hoodyproxy.tls.acme import AcmeIssuer
            issuer = AcmeIssuer(s.acme_directory, s.data_dir, is_allowed=self.stack.aliases.is_attached,
                                challenge=s.acme_challenge, email=s.acme_email, ca_bundle=s.acme_ca_bundle,
                                http01=self.stack.http01, tlsalpn01=self.stack.tlsalpn01, reactor=r)
        self.certificate_manager = CertificateManager(
            self.stack.certificates, self.stack.aliases, issuer, s.data_dir, reactor=r,
            cname=CnameVerifier() if s.acme_verify_cname else None,
            on_issued=lambda domain: self.workers.notify_change() if self.workers else None)
        self.certificate_manager.setServiceParent(self)
        https_port = https_bound[0].port
        admin = admin_site(AdminAPI(self.directory, self.token, permissions=self.stack.permissions,
                                    registry=self.stack.registry, aliases=self.stack.aliases,
                                    base_url_for=lambda alias: alias_url(alias, s.suffix, https_port),
                                    certificate_status=self.certificate_manager.status,
                                    rate_limits=self.stack.rate_limits,
                                    taps=TapEndpoints(self.stack.taps, self.stack.audit),
                                    metrics=MetricsEndpoint(NodeMetrics(self), s.metrics_token)),
                           r, s.request_head_timeout)
        for addr in s.admin:
            self.ports["admin"].append(r.listenTCP(addr.port, admin, interface=addr.interface))
        # The netfilter rules go in once every port is bound (a port in use ends the start).
        super().privilegedStartService()
        if self.netfilter is not None and self.netfilter.failed is not None:
            self._client_ip_unavailable("the netfilter rules transparent mode needs could not be "
                                        f"installed ({self.netfilter.failed})")
            self.netfilter.disownServiceParent()
            self.netfilter = None
        elif self.netfilter is not None and 6 not in self.netfilter.families_installed:
            self.gateway.transparent_ipv6 = False
        if s.workers > 1:
            # Created after the client IP mode is final: the workers are given these settings.
            self.workers = WorkerPool(r, self.settings, https_bound, http_bound, s.workers,
                                      limiters=self.gateway.limiters, taps=self.stack.taps)
            self.workers.setServiceParent(self)
            self.directory.subscribe(self.workers.notify_change)
            self.stack.permissions.subscribe(lambda scope, set_id: self.workers.notify_change())
            self.stack.aliases.subscribe(lambda kind, name: self.workers.notify_change())

    #: Seconds between checks for replaced certificate files.
    certificate_check_interval = 10.0

    def startService(self) -> None:
        self._check_capability_kept()
        super().startService()
        s = self.settings
        from twisted.internet.task import LoopingCall
        self._cert_check = LoopingCall(self.certificates.reload_if_changed)
        self._cert_check.clock = self.reactor
        self._cert_check.start(self.certificate_check_interval, now=False)
        self._remove_demo_leftover()
        if s.demo:
            self._start_demo()
        from hoodyproxy.listening import display
        for kind, ports in self.ports.items():
            for port in ports:
                host = port.getHost()
                log.info("hoodyproxy {kind} listening on {address}", kind=kind, address=display(host.host, host.port),
                         host=host.host, port=host.port)
        if self.ca_path:
            log.info("hoodyproxy development CA (trust it to browse without warnings): {ca}", ca=self.ca_path)
        self._log_client_ip()
        log.info("hoodyproxy admin token file: {path}",
                 path="(from config)" if s.admin_token else os.path.join(s.data_dir, "admin-token"))
        from hoodyproxy.admin.discovery import publish_admin_api
        publish_admin_api(self)  # <data-dir>/admin.json, for the hoodyproxy command
        log.info("hoodyproxy audit log: {path}", path=s.audit_file)

    def _check_capability_kept(self) -> None:
        """Transparent sockets need CAP_NET_ADMIN on every connect, not only at start: twistd's
        ``--uid`` drops it after the privileged start."""
        if self.netfilter is None or self._has_net_admin is not None:
            return
        from hoodyproxy.netfilter import has_net_admin
        if has_net_admin():
            return
        if self.netfilter.required:
            exit_with_line(f"cannot start: {transparent_needs_cap_message()} (it was lost when privileges "
                           f"were dropped: keep it, e.g. systemd AmbientCapabilities, instead of twistd --uid)")
        # Without the capability the rules cannot be removed either: the next start replaces them.
        self.netfilter.disownServiceParent()
        self.netfilter = None
        self._client_ip_unavailable("CAP_NET_ADMIN was lost when privileges were dropped (keep it, e.g. "
                                    "systemd AmbientCapabilities, instead of twistd --uid)")

    def _log_client_ip(self) -> None:
        s = self.settings
        overrides = sorted((name, p.client_ip) for name, p in s.programs.items()
                           if p.client_ip and p.client_ip != s.client_ip_mode)
        detail = "".join(f", program {name}: {mode}" for name, mode in overrides)
        if self.netfilter is not None:
            detail += f"; netfilter mark {s.client_ip_mark:#x}, table {s.client_ip_table}"
        log.info("hoodyproxy client IP mode: {mode}{detail}", mode=s.client_ip_mode, detail=detail)
        if self.client_ip_warning:
            # (not "warning": trial's reporter takes events with that key for Python warnings)
            log.warn("hoodyproxy client IP: {problem}", problem=self.client_ip_warning)

    def _remove_demo_leftover(self) -> None:
        """A node that died with ``--demo`` left its sample container in the live map."""
        from hoodyproxy.demo import DemoRegistration
        if DemoRegistration(self.directory, self.settings.data_dir, DEMO_CONTAINER, DEMO_PROJECT).remove():
            log.info("hoodyproxy demo: removed the sample container an earlier run left in the live map")

    def _start_demo(self) -> None:
        from hoodyproxy.demo import DemoRegistration, listen_demo

        self.demo_port = listen_demo(self.reactor)
        port = self.demo_port.getHost().port
        self.demo = DemoRegistration(self.directory, self.settings.data_dir, DEMO_CONTAINER, DEMO_PROJECT)
        self.demo.register(port)
        https_port = self.ports["https"][0].getHost().port if self.ports["https"] else self.settings.https_port
        url = f"https://{DEMO_PROJECT}-{DEMO_CONTAINER}-http-80.{self.settings.suffix}:{https_port}/"
        log.info("hoodyproxy demo: open {url} (WebSocket echo at {ws})", url=url,
                 ws=url.replace("https://", "wss://") + "echo")
        self.demo_url = url

    def stopService(self):
        self.stack.taps.end_all("shutdown")  # (their clients get an end line)
        if self.demo is not None:
            self.demo.remove()
            self.demo = None
        stopped = super().stopService()
        if getattr(self, "_cert_check", None) is not None and self._cert_check.running:
            self._cert_check.stop()
        from twisted.internet import defer
        waits = [defer.maybeDeferred(p.stopListening) for ports in self.ports.values() for p in ports]
        if stopped is not None:
            waits.append(stopped)
        if self.demo_port is not None:
            waits.append(defer.maybeDeferred(self.demo_port.stopListening))
        for ports in self.ports.values():
            ports.clear()
        self.stack.close()
        stopping = defer.DeferredList(waits)

        def release(result):
            # Last: the netfilter rules (tagged with this data directory) are gone by now.
            self.datadir_lock.release()
            return result
        return stopping.addBoth(release)


def makeService(options: Options) -> service.IService:
    """Build the node from command-line options; a bad config exits with one line."""
    try:
        settings = load_settings(options["config"], options.overrides())
    except ConfigError as e:
        sys.stderr.write(f"hoodyproxy: config error: {e}\n")
        raise SystemExit(2)
    try:
        node = NodeService(settings)
    except (OSError, StartError) as e:
        sys.stderr.write(f"hoodyproxy: cannot start: {e}\n")
        raise SystemExit(1)
    return _ExitOnListenError(node)


class _ExitOnListenError(service.MultiService):
    """Turns a port that cannot be bound (or netfilter rules that cannot be installed when
    transparent mode is required) into one clear line and a non-zero exit."""

    def __init__(self, node: NodeService) -> None:
        super().__init__()
        self.node = node
        node.setServiceParent(self)

    def privilegedStartService(self) -> None:
        from hoodyproxy.netfilter import NetfilterError
        try:
            super().privilegedStartService()
        except NetfilterError as e:
            exit_with_line(f"cannot start: client IP mode 'transparent': {e} (see docs/real-client-ip.rst)")
        except CannotListenError as e:
            from hoodyproxy.listening import display
            exit_with_line(f"cannot listen on {display(e.interface, e.port)}: {e.socketError}")


def exit_with_line(problem: str) -> None:
    """End the process with one line ``hoodyproxy: PROBLEM`` on the real stderr and status 1.

    (twistd has redirected sys.stderr into its log by the time services start.)
    """
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"hoodyproxy: {problem}\n")
    stream.flush()
    os._exit(1)
