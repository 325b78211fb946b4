"""makeService: the twistd entry point, composing a node's MultiService from its config."""

from __future__ import annotations

import os
import secrets
import sys
import time

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
        ["docker-socket", None, None, "the Docker (or Podman) Engine API's UNIX socket, or tcp://host:port "
                                      "of a read-only socket proxy; turns --docker on (default: $DOCKER_HOST "
                                      "if unix://, else /var/run/docker.sock)"],
    ]
    optFlags = [
        ["demo", None, "also start a built-in sample service and register it as a container"],
        ["no-http3", None, "do not serve HTTP/3 (QUIC) nor advertise it"],
        ["no-http2", None, "do not offer HTTP/2 (ALPN h2) on the TLS port"],
        ["docker", None, "route the containers labelled hoody.project as Docker (or Podman) runs them "
                         "(docs/docker.rst)"],
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
            "docker.enabled": True if self["docker"] or self["docker-socket"] else None,
            "docker.socket": self["docker-socket"],
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
        from hoodyproxy.tls import CertificateStore
        from hoodyproxy.upstream.pool import ConnectionPool

        s = self.settings = settings
        self.reactor = reactor
        self.generate_certificates = generate_certificates
        #: What :meth:`https_factory` and :meth:`redirect_factory` built, for reloads.
        self._tls_factories: list = []
        self._plain_sites: list[Site] = []
        #: The HTTPS port number HTTP/3 is advertised beside (see :meth:`advertise_http3`).
        self._https_port: int | None = None
        self._https_factory = self.https_frontend = None
        os.makedirs(s.data_dir, mode=0o700, exist_ok=True)
        self.directory = SQLiteDirectory(open_database(os.path.join(s.data_dir, "hoodyproxy.db")))
        cert, key = self._certificate_paths(s)
        from hoodyproxy.aliases import AliasStore
        from hoodyproxy.tls.challenges import HTTP01Responder, TLSALPN01Responder
        # Files under the data directory let every worker answer a challenge worker 0 started.
        challenges_dir = os.path.join(s.data_dir, "acme", "challenges")
        self.http01 = HTTP01Responder(os.path.join(challenges_dir, "http-01"))
        self.tlsalpn01 = TLSALPN01Responder(os.path.join(challenges_dir, "tls-alpn-01"))
        self.certificates = CertificateStore(cert, key, alpn=_alpn(s), challenges=self.tlsalpn01)
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

    def _certificate_paths(self, s: Settings) -> tuple[str, str]:
        """The default certificate and key: ``[tls]``'s, else the generated development
        ones (made here unless ``generate_certificates`` is False: a worker's, which
        worker 0 made).  Sets ``ca_path`` (the development CA, or None)."""
        if s.tls_certificate:
            self.ca_path = None
            return s.tls_certificate, s.tls_key
        tls_dir = os.path.join(s.data_dir, "tls")
        if self.generate_certificates:
            from hoodyproxy.tls import ensure_dev_certificates
            dev = ensure_dev_certificates(tls_dir, s.node, s.zone)
            self.ca_path = dev.ca_path
            return dev.cert_path, dev.key_path
        self.ca_path = os.path.join(tls_dir, "ca.pem")
        return os.path.join(tls_dir, "wildcard.pem"), os.path.join(tls_dir, "wildcard-key.pem")

    def https_factory(self):
        """The TLS server factory for the HTTPS port: HTTP/2 or HTTP/1.1 by ALPN (one per
        process: every HTTPS socket is served by it, and it drains them all)."""
        if self._https_factory is not None:
            return self._https_factory
        from hoodyproxy.frontend.h1 import H1Factory
        from hoodyproxy.frontend.http2 import NegotiatingFactory
        from hoodyproxy.tls import SNIContextFactory
        factory = H1Factory(self.gateway, self.reactor, timeout=self.settings.client_idle_timeout)
        negotiating = NegotiatingFactory(factory, self.gateway, self.settings, self.certificates, self.reactor)
        self._tls_factories.append(negotiating)
        #: What drains the HTTPS connections (hoodyproxy.drain).
        self.https_frontend = negotiating
        from hoodyproxy.tls.transport import tls_factory
        self._https_factory = tls_factory(SNIContextFactory(self.certificates), False, self.https_frontend)
        self.tls_factories.append(self._https_factory)
        return self._https_factory

    def drain(self, frontends=()):
        """A :class:`hoodyproxy.drain.Drain` of this process's HTTPS connections, the
        ``frontends`` given (HTTP/3) and the WebSockets, with the ``[drain]`` settings."""
        from hoodyproxy.drain import Drain
        parts = ([self.https_frontend] if self.https_frontend is not None else []) + list(frontends)
        return Drain(self.reactor, parts, self.gateway.tunnels, timeout=self.settings.drain_timeout,
                     websocket_grace=self.settings.drain_websocket_grace)

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
        site = plain_http_site(RedirectToHTTPS(https_port, http01=self.http01), self.reactor,
                               self.settings.request_head_timeout)
        self._plain_sites.append(site)
        return site

    def advertise_http3(self, https_port: int) -> None:
        """Responses advertise HTTP/3 beside ``https_port`` (the port actually bound), as
        the settings say (``[http3] enabled``, ``advertised_port``)."""
        self._https_port = https_port
        self.gateway.alt_svc = self.settings.alt_svc_for(https_port)

    def apply_settings(self, s: Settings) -> None:
        """Serve from the very next request and connection with ``s`` (a config reload;
        the keys :data:`hoodyproxy.reload.RESTART_KEYS` names are expected unchanged).

        The one step that can fail comes first, so that a failure changes nothing: a new
        ``[tls]`` certificate that cannot be loaded raises ConfigError.  Then every
        holder of a setting takes its new value: the gateway (programs, timeouts,
        rate limits, client IP modes), the upstream pool, the TLS and plain-HTTP
        factories, the taps, the aliases' program table, the audit file, Alt-Svc.
        """
        old = self.settings
        audit_path = None if s.audit_file == "-" else s.audit_file
        audit = None
        if s.audit_file != old.audit_file:
            try:
                audit = self.audit.open_stream(audit_path)
            except OSError as e:
                raise ConfigError("[audit] path", f"cannot open {s.audit_file}: {e.strerror}") from None
        if (s.tls_certificate, s.tls_key) != (old.tls_certificate, old.tls_key):
            cert, key = self._certificate_paths(s)
            try:
                self.certificates.set_default(cert, key)
            except Exception as e:
                self._certificate_paths(old)  # (ca_path as it was)
                if audit is not None and audit[1]:
                    audit[0].close()
                raise ConfigError("[tls] certificate", f"cannot be used: {e}") from None
        if audit is not None:
            self.audit.move_to(audit_path, audit)
        self.certificates.reload_if_changed()  # (the [tls] files re-read if replaced)
        self.certificates.set_alpn(_alpn(s))
        self.settings = s
        self.gateway.reconfigure(s)
        self.pool.configure(connect_timeout=s.connect_timeout, idle_timeout=s.pool_idle_timeout,
                            max_idle=s.pool_max_idle)
        for negotiating in self._tls_factories:
            negotiating.use_settings(s)
            negotiating.h1.timeout = s.client_idle_timeout
        for site in self._plain_sites:
            site.head_timeout = s.request_head_timeout
        self.taps.configure(allow_unredacted=s.tap_allow_unredacted, max_taps=s.tap_max_taps,
                            queue_events=s.tap_queue_events)
        self.aliases.programs = s.programs
        if self._https_port is not None:
            self.advertise_http3(self._https_port)

    def close(self) -> None:
        self.pool.close()
        self.audit.close()


def _alpn(s: Settings) -> tuple[bytes, ...]:
    """The protocols the TLS port offers by ALPN."""
    return (b"h2", b"http/1.1") if s.http2_enabled else (b"http/1.1",)


class NodeService(service.MultiService):
    """A whole node: stores, gateway and listeners.  Listening happens at privileged start."""

    def __init__(self, settings: Settings, reactor=None, *, has_net_admin: bool | None = None,
                 config_source=None) -> None:
        """``config_source``: where a reload reads the settings again (a
        :class:`hoodyproxy.reload.ConfigSource`: the ``--config`` file and the command-line
        options on top); None: the node has no config file to reload."""
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config_source = config_source
        #: Config reloads so far, for metrics: applied, rejected, and when the last one
        #: applied (``time.time()``; None: none yet).
        self.reloads: dict = {"ok": 0, "failed": 0, "last_success": None}
        #: True once started (certificates and the live map loaded) until stopping.
        self.ready = False
        #: twistd's log file, when the node opened it (hoodyproxy.observe.logs), else None.
        self.diagnostic_log = None
        #: Made at privileged start.
        self.certificate_manager = self.admin_api = self.admin_site = None
        self.configured = settings
        self._has_net_admin = has_net_admin
        settings = self._resolve_client_ip(settings, has_net_admin)
        self.settings = settings
        self.ports: dict[str, list] = {"https": [], "http": [], "admin": [], "http3": []}
        self.demo_port = None
        self.demo = None
        self.workers = None
        docker_socket = self._docker_socket(settings)
        # One node per data directory, taken before anything in it is read or written.
        #: The listening sockets this process owns (hoodyproxy.sockets), from privileged start.
        self.listeners = None
        #: True from SIGTERM (stopService) on: the node drains; /readyz answers 503.
        self.draining = False
        #: The drain in progress (hoodyproxy.drain.Drain), once stopping.
        self.drainer = None
        #: The next generation took the sockets over (hoodyproxy.upgrade): what the node
        #: shares with it (netfilter rules, the demo's registration) is left in place.
        self.handed_over = False
        #: What starts a binary upgrade on SIGUSR2 (hoodyproxy.upgrade), under twistd.
        self.upgrader = None
        # One node per data directory, taken before anything in it is read or written
        # (in a binary upgrade, the generation before hands its lock over).
        from hoodyproxy import upgrade
        from hoodyproxy.datadir import DataDirInUse, DataDirLock
        #: (lock, ready pipe) descriptors from the generation before, in a binary upgrade.
        self.upgrade_from = upgrade.inherited()
        self.datadir_lock = DataDirLock(settings.data_dir)
        try:
            self.datadir_lock.acquire(inherited=self.upgrade_from[0] if self.upgrade_from else None)
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
        #: With [store] backend = "etcd": the shared store (hoodyproxy.store.node.SharedStore).
        self.shared_store = None
        if settings.store_backend == "etcd":
            from hoodyproxy.store.node import SharedStore
            self.shared_store = SharedStore(settings, self.directory._conn, self.directory,
                                            self.stack.permissions, self.stack.aliases, reactor)
            self.shared_store.setServiceParent(self)
        self.netfilter = None
        if "transparent" in client_ip_modes(settings):
            from hoodyproxy.netfilter import NetfilterService
            self.netfilter = NetfilterService(
                settings.node, settings.client_ip_mark, settings.client_ip_table,
                required="transparent" in client_ip_modes(self.configured),
                directory=self.directory, reactor=reactor, instance=settings.data_dir)
            self.netfilter.setServiceParent(self)
        #: The Docker provider (worker 0 only: the other workers read what it writes).
        self.docker = None
        if docker_socket is not None:
            from hoodyproxy.directory.docker import DockerProvider
            self.docker = DockerProvider(self.directory, docker_socket, reactor,
                                         label_prefix=settings.docker_label_prefix, network=settings.docker_network)
            self.docker.setServiceParent(self)

    @staticmethod
    def _docker_socket(settings: Settings) -> str | None:
        """The Docker provider's socket, or None when the provider is off."""
        if not settings.docker_enabled:
            return None
        from hoodyproxy.directory.docker import socket_path
        try:
            return socket_path(settings.docker_socket)
        except ValueError as e:
            raise StartError(str(e)) from None

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
        self.stack.apply_settings(self.settings)
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

    def _open_listeners(self):
        """The node's listening sockets: those handed in (socket activation, or the
        generation before), and the rest bound as ``[listen]`` says."""
        from hoodyproxy import listening, sockets
        listeners = sockets.Listeners()
        for kind, socks in sockets.handed_in().items():
            listeners.handed_in.add(kind)
            for sock in socks:
                listeners.add(kind, sock)
        https_addresses, http_addresses = self._listen_addresses()
        tcp_addresses = (*https_addresses, *http_addresses)
        for kind, addresses in (("https", https_addresses), ("http", http_addresses), ("admin", self.settings.admin)):
            if kind in listeners.handed_in:
                continue
            for addr in addresses:
                # [::] takes IPv4 too, whatever net.ipv6.bindv6only says.
                listeners.add(kind, sockets.bind_stream(
                    addr, v6only=kind != "admin" and listening.v6only_for(addr, tcp_addresses)))
        if listeners.handed_in:
            handed = ", ".join(f"{kind} " + " ".join(str(sockets.address_of(sock)) for sock in listeners.of(kind))
                               for kind in sockets.KINDS if kind in listeners.handed_in)
            log.info("hoodyproxy: listening sockets handed in: {handed}; [listen] is not used for them",
                     handed=handed)
        return listeners

    def privilegedStartService(self) -> None:
        from hoodyproxy import listening, sockets
        from hoodyproxy.admin.api import AdminAPI, admin_site
        from hoodyproxy.admin.metrics import MetricsEndpoint, NodeMetrics
        from hoodyproxy.admin.taps import TapEndpoints
        from hoodyproxy.workers import WorkerPool

        self.datadir_lock.write_pid()  # this process's, if twistd has daemonized since
        s = self.settings
        r = self.reactor
        https_factory = self.stack.https_factory()
        # This process owns the listening sockets (hoodyproxy.sockets): it serves each one
        # through a duplicate, and workers get them as inherited descriptors.
        self.listeners = listeners = self._open_listeners()
        for sock in listeners.of("https"):
            self.ports["https"].append(sockets.adopt_stream(r, sock, https_factory))
        # Redirect to the port actually bound (it differs from the config when that says 0).
        https_bound = [sockets.address_of(sock) for sock in listeners.of("https")]
        redirect = self.stack.redirect_factory(https_bound[0].port)
        for sock in listeners.of("http"):
            self.ports["http"].append(sockets.adopt_stream(r, sock, redirect))
        if s.http3_enabled:
            # QUIC on the HTTPS port numbers, over UDP (in this process only, with workers).
            from hoodyproxy.frontend.http3 import listen_http3
            if "http3" not in listeners.handed_in:
                for addr in https_bound:
                    listeners.add("http3", sockets.bind_datagram(addr, v6only=listening.v6only_for(addr, https_bound)))
            for sock in listeners.of("http3"):
                address = sockets.address_of(sock)
                self.ports["http3"].append(listen_http3(r, address.interface, address.port, gateway=self.gateway,
                                                        certificates=self.stack.certificates, settings=s,
                                                        sock=sock))
                self.stack.http3_listeners.append(self.ports["http3"][-1].protocol)
        self.stack.advertise_http3(https_bound[0].port)
        from hoodyproxy.aliases import alias_url
        from hoodyproxy.tls.manager import CertificateManager, CnameVerifier
        self.certificate_manager = CertificateManager(
            self.stack.certificates, self.stack.aliases, self._acme_issuer(s), s.data_dir, reactor=r,
            cname=CnameVerifier() if s.acme_verify_cname else None,
            on_issued=lambda domain: self.workers.notify_change() if self.workers else None)
        self.certificate_manager.setServiceParent(self)
        https_port = https_bound[0].port
        shared = self.shared_store
        self.admin_api = AdminAPI(self.directory, self.token,
                                  permissions=shared.permissions if shared else self.stack.permissions,
                                  registry=self.stack.registry,
                                  aliases=shared.aliases if shared else self.stack.aliases,
                                  shared=shared.state if shared else None,
                                  base_url_for=lambda alias: alias_url(alias, s.suffix, https_port),
                                  certificate_status=self.certificate_manager.status,
                                  rate_limits=self.stack.rate_limits,
                                  taps=TapEndpoints(self.stack.taps, self.stack.audit),
                                  readiness=self.readiness, reload=self.reload,
                                  metrics=MetricsEndpoint(NodeMetrics(self), s.metrics_token))
        self.admin_site = admin_site(self.admin_api, r, s.request_head_timeout)
        for sock in listeners.of("admin"):
            self.ports["admin"].append(sockets.adopt_stream(r, sock, self.admin_site))
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
            self.workers = WorkerPool(r, self.settings, listeners, s.workers,
                                      limiters=self.gateway.limiters, taps=self.stack.taps)
            self.workers.setServiceParent(self)
            self.directory.subscribe(self.workers.notify_change)
            self.stack.permissions.subscribe(lambda scope, set_id: self.workers.notify_change())
            self.stack.aliases.subscribe(lambda kind, name: self.workers.notify_change())

    def _acme_issuer(self, s: Settings):
        """The ACME issuer ``[acme]`` asks for, or None (serve what is stored, issue nothing)."""
        if not s.acme_directory:
            return None
        from hoodyproxy.tls.acme import AcmeIssuer
        return AcmeIssuer(s.acme_directory, s.data_dir, is_allowed=self.stack.aliases.is_attached,
                          challenge=s.acme_challenge, email=s.acme_email, ca_bundle=s.acme_ca_bundle,
                          http01=self.stack.http01, tlsalpn01=self.stack.tlsalpn01, reactor=self.reactor)

    # -- reload, log reopening, readiness --------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): ready once started (certificates and the live map loaded), not
        while starting, stopping or draining."""
        if getattr(self, "draining", False):
            return False, "draining"
        if not self.ready:
            return False, "starting"
        if not self.store_ready():
            return False, "loading the shared store"
        return True, "ready"

    def reload(self):
        """Read the config again and put in force what can change live (``SIGHUP``,
        ``POST /api/v1/reload``); returns the :class:`hoodyproxy.reload.ReloadPlan` applied.

        One log line says what changed and what needs a restart.  Raises
        :class:`hoodyproxy.reload.NoConfigFile` without a config file, and ConfigError
        (logged in one line, counted, the settings in force left as they were) for a
        config that does not validate or cannot be applied.
        """
        from hoodyproxy.reload import NoConfigFile, plan_reload
        if self.config_source is None:
            raise NoConfigFile()
        try:
            new = self.config_source.load()
            plan = plan_reload(self.configured, new, transparent_rules=self.netfilter is not None,
                               can_be_transparent=self._can_be_transparent())
            self._apply(plan.settings)
        except ConfigError as e:
            self.reloads["failed"] += 1
            log.error("hoodyproxy reload: config rejected, the one in force stays: {key}: {problem}",
                      key=e.key, problem=e.problem)
            raise
        except Exception:
            self.reloads["failed"] += 1
            log.failure("hoodyproxy reload: failed; what was applied before the failure stays")
            raise
        self.reloads["ok"] += 1
        self.reloads["last_success"] = time.time()
        log.info("hoodyproxy reload: {changed}{not_applied}",
                 changed="applied " + ", ".join(plan.changed) if plan.changed else "nothing to apply",
                 not_applied="; needs a restart, left as it was: " + ", ".join(plan.not_applied)
                 if plan.not_applied else "",
                 reload_changed=list(plan.changed), reload_not_applied=list(plan.not_applied))
        return plan

    def _can_be_transparent(self) -> bool:
        if self._has_net_admin is not None:
            return self._has_net_admin
        from hoodyproxy.netfilter import has_net_admin
        return has_net_admin()

    def _apply(self, configured: Settings) -> None:
        """Put ``configured`` (keys needing a restart unchanged) in force in this process,
        then in the workers."""
        old = self.settings
        s = resolve_client_ip(configured, self.netfilter is not None)
        self.stack.apply_settings(s)  # (first: the step that may refuse)
        self.configured, self.settings = configured, s
        for port in self.ports["http3"]:
            port.protocol.use_settings(s)
        if self.admin_site is not None:
            self.admin_site.head_timeout = s.request_head_timeout
        if s.admin_token != old.admin_token:
            self.token = admin_token(s)
            if self.admin_api is not None:
                self.admin_api.token = self.token.encode()
                from hoodyproxy.admin.discovery import publish_admin_api
                publish_admin_api(self)  # (its token_file follows the token)
        acme = ("acme_directory", "acme_email", "acme_challenge", "acme_ca_bundle", "acme_verify_cname")
        manager = self.certificate_manager
        if manager is not None and any(getattr(s, k) != getattr(old, k) for k in acme):
            from hoodyproxy.tls.manager import CnameVerifier
            manager.issuer = self._acme_issuer(s)  # (issuances under way finish with the old one)
            manager.cname = CnameVerifier() if s.acme_verify_cname else None
            if manager.running:
                manager.reconcile()
        if self.workers is not None:
            self.workers.reload(s)

    def reopen_logs(self) -> None:
        """Open the audit log and the diagnostic log (twistd's ``--logfile``) again by
        name, here and in every worker (``SIGUSR1``, after logrotate moved them)."""
        try:
            self.audit.reopen()
        except OSError as e:
            log.error("hoodyproxy: cannot reopen the audit log {path}: {problem}", path=self.audit.path,
                      problem=e.strerror)
        if self.diagnostic_log is not None:
            self.diagnostic_log.reopen()
        if self.workers is not None:
            self.workers.reopen_logs()
        log.info("hoodyproxy: logs reopened (audit log {audit})", audit=self.audit.path or "stdout")

    def store_ready(self) -> bool:
        """The readiness hook for ``readyz``: always true with the node's own SQLite store;
        with etcd, true once the first snapshot of this run is loaded (a node serving its
        last-known-good copy while etcd is unreachable is not ready)."""
        return self.shared_store is None or self.shared_store.ready

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
        if self.upgrade_from is None:
            # (in a binary upgrade the registration is the generation before's, in use:
            # the new one replaces it in one write below)
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
        self.ready = True
        # Once the reactor runs: twistd starts services before the reactor takes SIGTERM,
        # and a stop right after "ready" must find the drain, not the default action.
        self.reactor.callWhenRunning(self._say_ready)

    def _say_ready(self) -> None:
        """Tell systemd (Type=notify), and the generation before in a binary upgrade, that
        the node serves."""
        from hoodyproxy import notify, upgrade
        if self.upgrade_from is not None:
            log.info("hoodyproxy upgrade: this generation (pid {pid}) took the listening sockets over and serves",
                     pid=os.getpid())
            upgrade.say_ready(self.upgrade_from[1])
            self.upgrade_from = None
        else:
            notify.notify("READY=1", "STATUS=serving")

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
        """Drain (hoodyproxy.drain), then stop everything; the Deferred fires when done."""
        self.ready = False
        if self.draining:
            return self._stopping
        self.draining = True
        if not self.handed_over:
            from hoodyproxy.notify import notify
            notify("STOPPING=1", "STATUS=draining")
        from twisted.internet import defer
        self._stopping = defer.ensureDeferred(self._drain())
        self._stopping.addBoth(lambda _: self._stop())
        return self._stopping

    async def _drain(self) -> None:
        """Stop accepting, let what is in flight finish (bounded by ``[drain] timeout``).

        The admin port stays open, so that ``/readyz`` can say 503 while this runs --
        unless the sockets were handed over to the next generation, which answers there
        now."""
        from twisted.internet import defer
        if self.workers is not None:
            self.workers.drain()  # (they drain at the same time as this process)
        kinds = ("https", "http", "admin") if self.handed_over else ("https", "http")
        stopping = []
        for kind in kinds:
            stopping += [defer.maybeDeferred(port.stopListening) for port in self.ports[kind]]
            self.ports[kind].clear()
        if self.listeners is not None:
            # This process's descriptors: a socket no other process holds is closed, and
            # clients are refused at once instead of queueing where nobody accepts.
            self.listeners.close(kinds)
        await defer.DeferredList(stopping)
        listeners3 = [port.protocol for port in self.ports["http3"] if getattr(port, "protocol", None)]
        self.drainer = self.stack.drain(listeners3)
        await self.drainer.start()

    def _stop(self):
        self.stack.taps.end_all("shutdown")  # (their clients get an end line)
        if self.demo is not None and not self.handed_over:
            self.demo.remove()
            self.demo = None
        if self.handed_over and self.netfilter is not None:
            self.netfilter.keep_rules = True  # (the next generation installed the same, and uses them)
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
        if self.listeners is not None:
            self.listeners.close()
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
    from hoodyproxy.reload import ConfigSource
    source = ConfigSource(options["config"], options.overrides()) if options["config"] else None
    from hoodyproxy.observe.logs import diagnostic_log
    try:
        node = NodeService(settings, config_source=source)
        node.diagnostic_log = diagnostic_log(getattr(options, "parent", None))
    except (OSError, StartError) as e:
        sys.stderr.write(f"hoodyproxy: cannot start: {e}\n")
        raise SystemExit(1)
    return _ExitOnListenError(node)


class _ExitOnListenError(service.MultiService):
    """The node as twistd runs it: SIGHUP reloads and SIGUSR1 reopens the logs
    (:mod:`hoodyproxy.signals`); the log file twistd writes is the node's own (see
    :mod:`hoodyproxy.observe.logs`).  A port that cannot be bound (or netfilter rules that
    cannot be installed when transparent mode is required) is one clear line and a
    non-zero exit."""

    def __init__(self, node: NodeService) -> None:
        super().__init__()
        self.node = node
        node.setServiceParent(self)
        self._restore_signals = None

    def setServiceParent(self, parent) -> None:
        super().setServiceParent(parent)
        diagnostic = self.node.diagnostic_log
        if diagnostic is not None and hasattr(parent, "setComponent"):
            # twistd logs through the application's ILogObserver component when it has one.
            from twisted.logger import ILogObserver
            parent.setComponent(ILogObserver, diagnostic.observer)

    def startService(self) -> None:
        # SIGHUP (reload) and SIGUSR1 (reopen the logs); SIGUSR2: a binary upgrade.  Only
        # under twistd: a node in a test process takes no signals.  Taken before the node
        # says it is ready, so that no signal sent after that finds the default action
        # (the end of the process).
        import signal

        from hoodyproxy.signals import handle_signals
        from hoodyproxy.upgrade import Upgrader
        self._restore_signals = handle_signals(self.node, self.node.reactor)
        upgrader = self.node.upgrader = Upgrader(self.node, self.node.reactor)
        signal.signal(signal.SIGUSR2, lambda signum, frame: self.node.reactor.callFromThread(upgrader.start))
        super().startService()

    def stopService(self):
        if self._restore_signals is not None:
            self._restore_signals()
            self._restore_signals = None
        return super().stopService()

    def privilegedStartService(self) -> None:
        from hoodyproxy.netfilter import NetfilterError
        from hoodyproxy.sockets import ActivationError
        try:
            super().privilegedStartService()
        except ActivationError as e:
            exit_with_line(f"cannot start: listening sockets handed in: {e}")
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
