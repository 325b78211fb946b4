"""TOML config -> validated, immutable settings; every error names the key at fault.

The embedded defaults run a development node with nothing configured.  A config file
overrides the defaults and command-line options override the file.  Validation happens
before anything listens, so a bad config never leaves a half-started node.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

from hoodyproxy.limits import DEFAULT_SETTINGS as DEFAULT_RATELIMIT, InvalidRateLimit, RateLimitSettings

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
PROGRAM_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
INDEX_KINDS = ("instance", "port")
SERVICE_KINDS = ("terminal", "display", "sqlite", "files", "http", "generic")
#: How a container learns the client's address (see docs/real-client-ip.rst).
CLIENT_IP_MODES = ("auto", "transparent", "proxy-protocol", "headers")
#: The method and path sets each built-in service kind lets a program set, and whether
#: each holds paths or methods (see docs/permissions.rst).
KIND_OPTIONS: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "terminal": MappingProxyType({"exec_paths": "paths"}),
    "files": MappingProxyType({"read_methods": "methods"}),
    "display": MappingProxyType({"view_methods": "methods"}),
    "sqlite": MappingProxyType({"query_methods": "methods", "query_paths": "paths"}),
})
_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}$")
_OPTION_PATH = re.compile(r"^/[!$&'()*+,=:@A-Za-z0-9._~/-]{0,255}$")
#: Routing tables the kernel reserves (unspec, default, main, local): never ours.
RESERVED_TABLES = frozenset({0, 253, 254, 255})


class ConfigError(ValueError):
    """A config value that cannot be used; ``key`` names it as ``[section] name``."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


@dataclass(frozen=True)
class ListenAddress:
    """An interface and a port to listen on (port 0 picks a free one)."""

    interface: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.interface}]" if ":" in self.interface else self.interface
        return f"{host}:{self.port}"


#: Where shared state lives: the node's own SQLite database, or an etcd cluster shared by
#: many nodes (docs/scale-out.rst).
STORE_BACKENDS = ("sqlite", "etcd")


@dataclass(frozen=True)
class EtcdSettings:
    """``[store.etcd]``: how a node reaches the etcd cluster it shares state through."""

    #: Client URLs of the cluster's members (``http://`` or ``https://``), tried in turn.
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    #: Every key the node reads or writes starts with this.
    prefix: str = "/hoody/v1"
    username: str | None = None
    password: str | None = None
    #: PEM files: the CA that signed the members' certificates, and a client certificate
    #: and key (set both or neither).
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    #: Seconds to wait for a TCP (and TLS) connection to a member.
    dial_timeout: float = 2.0
    #: Seconds a request may take (a write without quorum fails after it: 503).
    request_timeout: float = 5.0
    #: Seconds the node's published containers outlive the node (its lease's TTL).
    lease_ttl: int = 10


@dataclass(frozen=True)
class Program:
    """A program name usable in host labels and how its index becomes a port.

    ``index == "instance"``: the label's index is an instance number (1 to
    ``max_instance``) passed to the service in the ``X-Hoody-Instance`` header; the
    port is ``port``.  ``index == "port"``: the index is the container port itself.
    """

    name: str
    index: str = "instance"
    port: int | None = None
    kind: str = "generic"
    max_instance: int = 999
    #: This program's client IP mode, overriding the node's (``[client_ip] mode``); None: the node's.
    client_ip: str | None = None
    #: The kind's method and path sets as this program sets them (``exec_paths``,
    #: ``read_methods``...; see :data:`KIND_OPTIONS`), as sorted (key, values) pairs;
    #: empty: the kind's defaults.
    kind_options: tuple[tuple[str, tuple[str, ...]], ...] = ()


DEFAULT_PROGRAMS = {
    "terminal": Program("terminal", "instance", 76, "terminal"),
    "display": Program("display", "instance", 3998, "display"),
    "sqlite": Program("sqlite", "instance", 5, "sqlite"),
    "http": Program("http", "port", None, "http"),
}


def default_data_dir() -> str:
    """Where state lives when nothing says otherwise.

    ``$HOODYPROXY_DATA_DIR``; else ``/var/lib/hoodyproxy`` for root; else
    ``$XDG_DATA_HOME/hoodyproxy`` (``~/.local/share/hoodyproxy``).
    """
    env = os.environ.get("HOODYPROXY_DATA_DIR")
    if env:
        return env
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/hoodyproxy"
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(xdg, "hoodyproxy")


@dataclass(frozen=True)
class Settings:
    """Everything a node needs to start, validated."""

    node: str = "node-local"
    zone: str = "containers.localhost"
    data_dir: str = field(default_factory=default_data_dir)
    https: tuple[ListenAddress, ...] = (ListenAddress("::", 8443),)
    http: tuple[ListenAddress, ...] = (ListenAddress("::", 8080),)
    admin: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 8081),)
    tls_certificate: str | None = None
    tls_key: str | None = None
    admin_token: str | None = None
    audit_path: str | None = None
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    pool_idle_timeout: float = 60.0
    pool_max_idle: int = 256
    client_idle_timeout: float = 75.0
    websocket_handshake_timeout: float = 10.0
    websocket_idle_timeout: float = 3600.0
    #: Seconds from the first byte of a request (or of a TLS handshake, or of an HTTP/2
    #: or HTTP/3 header block) to the end of its head: past it, 408 and close.
    request_head_timeout: float = 30.0
    #: Rate limiting (``[ratelimit]``; see hoodyproxy.limits and docs/ratelimit.rst).
    ratelimit: RateLimitSettings = DEFAULT_RATELIMIT
    programs: Mapping[str, Program] = field(default_factory=lambda: MappingProxyType(dict(DEFAULT_PROGRAMS)))
    demo: bool = False
    workers: int = 1
    acme_directory: str | None = None
    acme_email: str | None = None
    acme_challenge: str = "http-01"
    acme_ca_bundle: str | None = None
    acme_verify_cname: bool = False
    client_ip_mode: str = "auto"
    client_ip_mark: int = 0x4870
    client_ip_table: int = 4870
    http2_enabled: bool = True
    http2_max_concurrent_streams: int = 128
    http2_max_header_list_size: int = 65536
    http2_stream_window: int = 262144
    http2_max_resets: int = 200
    http3_enabled: bool = True
    #: The UDP port clients are told about in Alt-Svc (0: the HTTPS port itself).
    http3_advertised_port: int = 0
    http3_max_concurrent_streams: int = 128
    #: QUIC address validation: "auto" (Retry while handshakes in progress exceed
    #: ``http3_retry_threshold``), "always" or "never".
    http3_retry: str = "auto"
    http3_retry_threshold: int = 64
    #: Taps (``[tap]``; see docs/observe.rst): whether a tap may ask for credentials
    #: unredacted, and how many may run at once.
    tap_allow_unredacted: bool = False
    tap_max_taps: int = 16
    #: Events held for a tap client that is not reading before events are dropped.
    tap_queue_events: int = 1000
    #: The Docker (or Podman) provider (``[docker]``; see docs/docker.rst): keeps the live
    #: map in step with the containers labelled ``<label_prefix>project``.
    docker_enabled: bool = False
    #: The Engine API's UNIX socket path (or ``tcp://host:port``, a read-only socket proxy);
    #: "": ``$DOCKER_HOST`` when it is ``unix://...``, else ``/var/run/docker.sock``
    #: (resolved when the provider starts).
    docker_socket: str = ""
    #: The network whose address the gateway uses (a container's label overrides it);
    #: "": the one network the gateway can reach.
    docker_network: str = ""
    docker_label_prefix: str = "hoody."
    #: Draining (``[drain]``; see hoodyproxy.drain): the longest a stopping process waits
    #: for its connections to end before it cuts them ...
    drain_timeout: float = 60.0
    #: ... and how long WebSockets are given before they are closed with 1001.
    drain_websocket_grace: float = 30.0
    #: ``[store] backend``: "sqlite" (this node alone) or "etcd" (shared; ``etcd``).
    store_backend: str = "sqlite"
    etcd: EtcdSettings = EtcdSettings()
    #: The bearer token ``GET /metrics`` on the admin listener asks for (None: none asked).
    metrics_token: str | None = None
    #: Whether request metrics carry a ``container`` label (``[metrics]``): off, because a
    #: node serves thousands of containers and each would multiply the series.
    metrics_container_labels: bool = False

    @property
    def suffix(self) -> str:
        """The DNS suffix every route of this node ends with: ``<node>.<zone>``."""
        return f"{self.node}.{self.zone}"

    @property
    def https_port(self) -> int:
        """The public HTTPS port (used in redirects)."""
        return self.https[0].port

    def alt_svc_for(self, https_port: int) -> bytes | None:
        """The ``Alt-Svc`` value advertising HTTP/3 beside ``https_port`` (the port actually
        bound), or None when HTTP/3 is off."""
        if not self.http3_enabled:
            return None
        return b'h3=":%d"; ma=86400' % (self.http3_advertised_port or https_port)

    @property
    def audit_file(self) -> str:
        return self.audit_path or os.path.join(self.data_dir, "audit.log")


# --- parsing -------------------------------------------------------------------------

def _listen(key: str, value: Any, default_interface: str) -> tuple[ListenAddress, ...]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(key, "needs at least one address")
    out = []
    for item in values:
        if isinstance(item, int) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str):
            raise ConfigError(key, "must be a port or an 'address:port' string")
        interface, port_text = default_interface, item
        if item.startswith("["):
            m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)", item)
            if not m:
                raise ConfigError(key, f"cannot read {item!r} as '[v6-address]:port'")
            interface, port_text = m.group(1), m.group(2)
        elif ":" in item:
            interface, _, port_text = item.rpartition(":")
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ConfigError(key, f"port must be 0 to 65535 in {item!r}")
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            raise ConfigError(key, f"{interface!r} is not an IP address") from None
        out.append(ListenAddress(interface, int(port_text)))
    return tuple(out)


def _number(key: str, value: Any, *, integer: bool = False, minimum: float = 0.0,
            exclusive: bool = True) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(key, "must be " + ("an integer" if integer else "a number"))
    if not math.isfinite(value):
        raise ConfigError(key, "must be a finite number")
    if value < minimum or (exclusive and value == minimum):
        raise ConfigError(key, f"must be {'greater than' if exclusive else 'at least'} {minimum:g}")
    return value


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, "must be a string")
    return value


def _token(key: str, value: Any) -> str | None:
    """A bearer token (at least 16 characters), or None when empty or unset."""
    if not value:
        return None
    value = _string(key, value)
    if len(value) < 16:
        raise ConfigError(key, "must be at least 16 characters")
    return value


def _dns_name(key: str, value: Any) -> str:
    value = _string(key, value).lower().rstrip(".")
    labels = value.split(".")
    if not value or not all(DNS_LABEL.match(label) for label in labels):
        raise ConfigError(key, f"{value!r} is not a DNS name")
    return value


def _program(name: str, table: Any) -> Program:
    key = f"[programs.{name}]"
    if not PROGRAM_NAME.match(name):
        raise ConfigError(key, "a program name is a lowercase letter then up to 11 letters or digits")
    if not isinstance(table, dict):
        raise ConfigError(key, "must be a table")
    base = DEFAULT_PROGRAMS.get(name, Program(name))
    kind = table.get("kind", base.kind)
    allowed_options = KIND_OPTIONS.get(kind, {}) if isinstance(kind, str) else {}
    unknown = set(table) - {"index", "port", "kind", "max_instance", "client_ip"} - set(allowed_options)
    if unknown:
        first = sorted(unknown)[0]
        owners = [k for k, opts in KIND_OPTIONS.items() if first in opts]
        raise ConfigError(f"{key} {first}",
                          f"only a program of kind {' or '.join(owners)} has it" if owners else "unknown key")
    index = table.get("index", base.index)
    if index not in INDEX_KINDS:
        raise ConfigError(f"{key} index", f"must be one of {', '.join(INDEX_KINDS)}")
    if kind not in SERVICE_KINDS:
        raise ConfigError(f"{key} kind", f"must be one of {', '.join(SERVICE_KINDS)}")
    port = table.get("port", base.port if index == "instance" else None)
    if index == "instance":
        if port is None:
            raise ConfigError(f"{key} port", "is required when index is 'instance'")
        _number(f"{key} port", port, integer=True, minimum=1, exclusive=False)
        if port > 65535:
            raise ConfigError(f"{key} port", "must be 1 to 65535")
    elif port is not None:
        raise ConfigError(f"{key} port", "must not be set when index is 'port' (the index is the port)")
    max_instance = _number(f"{key} max_instance", table.get("max_instance", base.max_instance),
                           integer=True, minimum=1, exclusive=False)
    if max_instance > 99999:
        raise ConfigError(f"{key} max_instance", "must be at most 99999 (five digits in a host label)")
    client_ip = table.get("client_ip", base.client_ip)
    if client_ip is not None and client_ip not in CLIENT_IP_MODES:
        raise ConfigError(f"{key} client_ip", f"must be one of {', '.join(CLIENT_IP_MODES)}")
    options = []
    for option, what in sorted(allowed_options.items()):
        if option in table:
            options.append((option, _option_values(f"{key} {option}", table[option], what)))
    return Program(name, index, port, kind, max_instance, client_ip, tuple(options))


def _option_values(key: str, value: Any, what: str) -> tuple[str, ...]:
    """A kind's method or path set from the config: a list of upper-case method names, or of
    absolute paths (matched as prefixes at segment boundaries)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f"must be a list of {what}")
    pattern, example = (_METHOD, "GET") if what == "methods" else (_OPTION_PATH, "/exec")
    for item in value:
        if not pattern.match(item):
            raise ConfigError(key, f"{item!r} is not a {what[:-1]} (like {example!r})")
        if what == "paths" and ("//" in item or any(seg in (".", "..") for seg in item.split("/"))):
            raise ConfigError(key, f"{item!r} is not a plain path (no empty, '.' or '..' segments)")
    return tuple(dict.fromkeys(value))


_SCHEMA: dict[str, set[str]] = {
    "node": {"name", "zone", "data_dir", "workers"},
    "listen": {"https", "http", "admin"},
    "tls": {"certificate", "key"},
    "admin": {"token", "metrics_token"},
    "audit": {"path"},
    "upstream": {"connect_timeout", "response_timeout", "pool_idle_timeout", "pool_max_idle"},
    "client": {"idle_timeout"},
    "websocket": {"handshake_timeout", "idle_timeout"},
    "limits": {"request_head_timeout"},
    "ratelimit": {"enabled", "per_address_rate", "per_address_burst", "failed_auth_rate", "failed_auth_burst",
                  "failed_auth_user_rate", "failed_auth_user_burst", "table_size", "ipv6_prefix", "dry_run",
                  "shared", "shared_sync_ms"},
    "programs": set(),
    "demo": {"enabled"},
    "acme": {"directory", "email", "challenge", "ca_bundle", "verify_cname"},
    "client_ip": {"mode", "mark", "table"},
    "http2": {"enabled", "max_concurrent_streams", "max_header_list_size", "stream_window", "max_resets"},
    "http3": {"enabled", "advertised_port", "max_concurrent_streams", "retry", "retry_threshold"},
    "tap": {"allow_unredacted", "max_taps", "queue_events"},
    "docker": {"enabled", "socket", "network", "label_prefix"},
    "drain": {"timeout", "websocket_grace"},
    "store": {"backend"},
    "metrics": {"container_labels"},
}
#: Sections that hold a table of their own (``[store.etcd]``), and that table's keys.
_SUBTABLES: dict[str, dict[str, set[str]]] = {
    "store": {"etcd": {"endpoints", "prefix", "username", "password", "ca_file", "cert_file", "key_file",
                       "dial_timeout", "request_timeout", "lease_ttl"}},
}
#: A Docker network name (what ``docker network create`` accepts).
DOCKER_NETWORK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}\Z")
#: A label prefix: the start of a label key in Docker's recommended reverse-DNS style.
LABEL_PREFIX = re.compile(r"[a-z0-9][a-z0-9._/-]{0,99}\Z")


def settings_from_mapping(doc: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Settings:
    """Validate a parsed TOML document (plus ``"section.key"`` overrides) into Settings."""
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in doc.items()}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, name = dotted.partition(".")
        doc.setdefault(section, {})[name] = value
    for section, table in doc.items():
        if section not in _SCHEMA:
            raise ConfigError(f"[{section}]", "unknown section")
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}]", "must be a table")
        if section != "programs":
            for name in table:
                subtable = _SUBTABLES.get(section, {}).get(name)
                if subtable is not None:
                    if not isinstance(table[name], dict):
                        raise ConfigError(f"[{section}.{name}]", "must be a table")
                    for sub in table[name]:
                        if sub not in subtable:
                            raise ConfigError(f"[{section}.{name}] {sub}", "unknown key")
                elif name not in _SCHEMA[section]:
                    raise ConfigError(f"[{section}] {name}", "unknown key")

    def get(section: str, name: str, default: Any) -> Any:
        return doc.get(section, {}).get(name, default)

    d = Settings()
    kw: dict[str, Any] = {}
    kw["node"] = _dns_name("[node] name", get("node", "name", d.node))
    if "." in kw["node"]:
        raise ConfigError("[node] name", "must be a single DNS label")
    kw["zone"] = _dns_name("[node] zone", get("node", "zone", d.zone))
    kw["workers"] = _number("[node] workers", get("node", "workers", d.workers), integer=True, minimum=1,
                            exclusive=False)
    if kw["workers"] > 64:
        raise ConfigError("[node] workers", "must be at most 64")
    kw["data_dir"] = os.path.abspath(os.path.expanduser(_string("[node] data_dir", get("node", "data_dir", d.data_dir))))
    kw["https"] = _listen("[listen] https", get("listen", "https", [str(a) for a in d.https]), "::")
    kw["http"] = _listen("[listen] http", get("listen", "http", [str(a) for a in d.http]), "::")
    kw["admin"] = _listen("[listen] admin", get("listen", "admin", [str(a) for a in d.admin]), "127.0.0.1")
    cert = get("tls", "certificate", None) or None
    key = get("tls", "key", None) or None
    if cert is not None:
        cert = _string("[tls] certificate", cert)
        if not os.path.isfile(cert):
            raise ConfigError("[tls] certificate", f"no such file: {cert}")
    if key is not None:
        key = _string("[tls] key", key)
        if not os.path.isfile(key):
            raise ConfigError("[tls] key", f"no such file: {key}")
    if (cert is None) != (key is None):
        raise ConfigError("[tls] key" if key is None else "[tls] certificate", "certificate and key go together")
    kw["tls_certificate"], kw["tls_key"] = cert, key
    kw["admin_token"] = _token("[admin] token", get("admin", "token", None))
    kw["metrics_token"] = _token("[admin] metrics_token", get("admin", "metrics_token", None))
    container_labels = get("metrics", "container_labels", d.metrics_container_labels)
    if not isinstance(container_labels, bool):
        raise ConfigError("[metrics] container_labels", "must be true or false")
    kw["metrics_container_labels"] = container_labels
    audit = get("audit", "path", None) or None
    kw["audit_path"] = None if audit is None else _string("[audit] path", audit)
    for section, name, attr, integer in (
        ("upstream", "connect_timeout", "connect_timeout", False),
        ("upstream", "response_timeout", "response_timeout", False),
        ("upstream", "pool_idle_timeout", "pool_idle_timeout", False),
        ("upstream", "pool_max_idle", "pool_max_idle", True),
        ("client", "idle_timeout", "client_idle_timeout", False),
        ("websocket", "handshake_timeout", "websocket_handshake_timeout", False),
        ("websocket", "idle_timeout", "websocket_idle_timeout", False),
        ("limits", "request_head_timeout", "request_head_timeout", False),
    ):
        kw[attr] = _number(f"[{section}] {name}", get(section, name, getattr(d, attr)), integer=integer)
    programs = dict(DEFAULT_PROGRAMS)
    for name, table in doc.get("programs", {}).items():
        programs[name] = _program(name, table)
    kw["programs"] = MappingProxyType(programs)
    demo = get("demo", "enabled", False)
    if not isinstance(demo, bool):
        raise ConfigError("[demo] enabled", "must be true or false")
    kw["demo"] = demo
    directory = get("acme", "directory", None) or None
    if directory is not None:
        directory = _string("[acme] directory", directory)
        if not directory.startswith(("https://", "http://")):
            raise ConfigError("[acme] directory", "must be an http(s) URL of an ACME directory")
    kw["acme_directory"] = directory
    email = get("acme", "email", None) or None
    if email is not None and ("@" not in _string("[acme] email", email) or any(c in email for c in " \r\n<>")):
        raise ConfigError("[acme] email", "must be an e-mail address")
    kw["acme_email"] = email
    challenge = get("acme", "challenge", d.acme_challenge)
    if challenge not in ("http-01", "tls-alpn-01"):
        raise ConfigError("[acme] challenge", "must be http-01 or tls-alpn-01")
    kw["acme_challenge"] = challenge
    bundle = get("acme", "ca_bundle", None) or None
    if bundle is not None and not os.path.isfile(_string("[acme] ca_bundle", bundle)):
        raise ConfigError("[acme] ca_bundle", f"no such file: {bundle}")
    kw["acme_ca_bundle"] = bundle
    verify = get("acme", "verify_cname", False)
    if not isinstance(verify, bool):
        raise ConfigError("[acme] verify_cname", "must be true or false")
    kw["acme_verify_cname"] = verify
    mode = get("client_ip", "mode", d.client_ip_mode)
    if mode not in CLIENT_IP_MODES:
        raise ConfigError("[client_ip] mode", f"must be one of {', '.join(CLIENT_IP_MODES)}")
    kw["client_ip_mode"] = mode
    mark = _number("[client_ip] mark", get("client_ip", "mark", d.client_ip_mark), integer=True, minimum=1,
                   exclusive=False)
    if mark > 0xFFFFFFFF:
        raise ConfigError("[client_ip] mark", "must be at most 0xffffffff (a 32-bit packet mark)")
    kw["client_ip_mark"] = mark
    table_id = _number("[client_ip] table", get("client_ip", "table", d.client_ip_table), integer=True,
                       minimum=1, exclusive=False)
    if table_id > 0xFFFFFFFF or table_id in RESERVED_TABLES:
        raise ConfigError("[client_ip] table", "must be 1 to 4294967295 and not 253, 254 or 255 "
                                               "(the kernel's default, main and local tables)")
    kw["client_ip_table"] = table_id
    for section in ("http2", "http3"):
        enabled = get(section, "enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(f"[{section}] enabled", "must be true or false")
        kw[f"{section}_enabled"] = enabled
    for section, name, low, high in (
        ("http2", "max_concurrent_streams", 1, 10000),
        ("http2", "max_header_list_size", 1024, 1 << 24),
        ("http2", "stream_window", 65535, (1 << 31) - 1),
        ("http2", "max_resets", 1, 1 << 20),
        ("http3", "max_concurrent_streams", 1, 10000),
        ("http3", "retry_threshold", 0, 1 << 20),
    ):
        key = f"[{section}] {name}"
        value = _number(key, get(section, name, getattr(d, f"{section}_{name}")), integer=True,
                        minimum=low, exclusive=False)
        if value > high:
            raise ConfigError(key, f"must be {low} to {high}")
        kw[f"{section}_{name}"] = value
    advertised = _number("[http3] advertised_port", get("http3", "advertised_port", d.http3_advertised_port),
                         integer=True, minimum=0, exclusive=False)
    if advertised > 65535:
        raise ConfigError("[http3] advertised_port", "must be 0 (the HTTPS port) to 65535")
    kw["http3_advertised_port"] = advertised
    retry = get("http3", "retry", d.http3_retry)
    if retry not in ("auto", "always", "never"):
        raise ConfigError("[http3] retry", "must be auto, always or never")
    kw["http3_retry"] = retry
    unredacted = get("tap", "allow_unredacted", d.tap_allow_unredacted)
    if not isinstance(unredacted, bool):
        raise ConfigError("[tap] allow_unredacted", "must be true or false")
    kw["tap_allow_unredacted"] = unredacted
    max_taps = _number("[tap] max_taps", get("tap", "max_taps", d.tap_max_taps), integer=True, minimum=1,
                       exclusive=False)
    if max_taps > 1000:
        raise ConfigError("[tap] max_taps", "must be 1 to 1000")
    kw["tap_max_taps"] = max_taps
    queue = _number("[tap] queue_events", get("tap", "queue_events", d.tap_queue_events), integer=True,
                    minimum=1, exclusive=False)
    if queue > 1_000_000:
        raise ConfigError("[tap] queue_events", "must be 1 to 1000000")
    kw["tap_queue_events"] = queue
    kw.update(_docker_settings(get, d))
    kw["drain_timeout"] = _number("[drain] timeout", get("drain", "timeout", d.drain_timeout))
    kw["drain_websocket_grace"] = _number("[drain] websocket_grace",
                                          get("drain", "websocket_grace", d.drain_websocket_grace),
                                          exclusive=False)
    if kw["drain_websocket_grace"] > kw["drain_timeout"]:
        raise ConfigError("[drain] websocket_grace", "must be at most [drain] timeout (the drain ends "
                                                     "at the timeout, WebSockets or not)")
    backend = get("store", "backend", d.store_backend)
    if backend not in STORE_BACKENDS:
        raise ConfigError("[store] backend", f"must be one of {', '.join(STORE_BACKENDS)}")
    kw["store_backend"] = backend
    kw["etcd"] = _etcd(get("store", "etcd", {}), required=backend == "etcd")
    try:
        kw["ratelimit"] = RateLimitSettings.from_mapping(doc.get("ratelimit", {}))
    except InvalidRateLimit as e:
        raise ConfigError(f"[ratelimit] {e.field}" if e.field else "[ratelimit]", e.problem) from None
    return Settings(**kw)


def tcp_address(address: str) -> tuple[str, int] | None:
    """``"tcp://127.0.0.1:2375"`` -> ``("127.0.0.1", 2375)``; None for anything else."""
    if not address.startswith("tcp://"):
        return None
    host, sep, port = address[len("tcp://"):].rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _docker_settings(get, d: Settings) -> dict[str, Any]:
    """The ``[docker]`` keys, validated."""
    kw: dict[str, Any] = {}
    enabled = get("docker", "enabled", d.docker_enabled)
    if not isinstance(enabled, bool):
        raise ConfigError("[docker] enabled", "must be true or false")
    kw["docker_enabled"] = enabled
    socket_path = _string("[docker] socket", get("docker", "socket", d.docker_socket))
    if socket_path.startswith("unix://"):
        socket_path = socket_path[len("unix://"):]
    elif socket_path.startswith("tcp://"):
        if tcp_address(socket_path) is None:
            raise ConfigError("[docker] socket", "a socket proxy is tcp://host:port")
    elif "://" in socket_path:
        raise ConfigError("[docker] socket", "must be a UNIX socket (a path or unix:///path), or tcp://host:port "
                                             "for a read-only socket proxy")
    if socket_path and not socket_path.startswith("tcp://") and not os.path.isabs(socket_path):
        raise ConfigError("[docker] socket", "must be an absolute path")
    kw["docker_socket"] = socket_path
    network = _string("[docker] network", get("docker", "network", d.docker_network))
    if network and not DOCKER_NETWORK.match(network):
        raise ConfigError("[docker] network", f"{network!r} is not a Docker network name")
    kw["docker_network"] = network
    prefix = _string("[docker] label_prefix", get("docker", "label_prefix", d.docker_label_prefix))
    if not LABEL_PREFIX.match(prefix):
        raise ConfigError("[docker] label_prefix", "must be lowercase letters, digits, '.', '-', '_' or '/' "
                                                   "(like 'hoody.' or 'com.example.hoody.')")
    kw["docker_label_prefix"] = prefix
    return kw


def _etcd(table: Mapping[str, Any], required: bool) -> EtcdSettings:
    """``[store.etcd]`` validated (files must exist only when the backend is etcd)."""
    d = EtcdSettings()
    key = "[store.etcd]"
    endpoints = table.get("endpoints", list(d.endpoints))
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not isinstance(endpoints, list) or not endpoints:
        raise ConfigError(f"{key} endpoints", "must be a list of client URLs (http://host:2379)")
    for url in endpoints:
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^/\s]+/?", url):
            raise ConfigError(f"{key} endpoints", "each is a client URL like http://10.0.0.1:2379 (no path)")
    prefix = _string(f"{key} prefix", table.get("prefix", d.prefix)).rstrip("/")
    if not prefix.startswith("/") or "//" in prefix or any(c.isspace() for c in prefix):
        raise ConfigError(f"{key} prefix", "must be an absolute key path like /hoody/v1")
    strings: dict[str, str | None] = {}
    for name in ("username", "password", "ca_file", "cert_file", "key_file"):
        value = table.get(name) or None
        strings[name] = None if value is None else _string(f"{key} {name}", value)
    if (strings["username"] is None) != (strings["password"] is None):
        raise ConfigError(f"{key} password" if strings["password"] is None else f"{key} username",
                          "username and password go together")
    if (strings["cert_file"] is None) != (strings["key_file"] is None):
        raise ConfigError(f"{key} key_file" if strings["key_file"] is None else f"{key} cert_file",
                          "cert_file and key_file go together")
    if required:
        for name in ("ca_file", "cert_file", "key_file"):
            if strings[name] is not None and not os.path.isfile(strings[name]):
                raise ConfigError(f"{key} {name}", f"no such file: {strings[name]}")
    dial = _number(f"{key} dial_timeout", table.get("dial_timeout", d.dial_timeout))
    request = _number(f"{key} request_timeout", table.get("request_timeout", d.request_timeout))
    ttl = _number(f"{key} lease_ttl", table.get("lease_ttl", d.lease_ttl), integer=True, minimum=2,
                  exclusive=False)
    if ttl > 3600:
        raise ConfigError(f"{key} lease_ttl", "must be 2 to 3600 seconds")
    return EtcdSettings(tuple(u.rstrip("/") for u in endpoints), prefix, strings["username"],
                        strings["password"], strings["ca_file"], strings["cert_file"], strings["key_file"],
                        dial, request, ttl)


def settings_to_mapping(settings: Settings) -> dict[str, Any]:
    """The TOML-shaped mapping that ``settings_from_mapping`` turns back into ``settings``."""
    s = settings
    doc: dict[str, Any] = {
        "node": {"name": s.node, "zone": s.zone, "data_dir": s.data_dir, "workers": s.workers},
        "listen": {"https": [str(a) for a in s.https], "http": [str(a) for a in s.http],
                   "admin": [str(a) for a in s.admin]},
        "upstream": {"connect_timeout": s.connect_timeout, "response_timeout": s.response_timeout,
                     "pool_idle_timeout": s.pool_idle_timeout, "pool_max_idle": s.pool_max_idle},
        "client": {"idle_timeout": s.client_idle_timeout},
        "websocket": {"handshake_timeout": s.websocket_handshake_timeout,
                      "idle_timeout": s.websocket_idle_timeout},
        "limits": {"request_head_timeout": s.request_head_timeout},
        "ratelimit": s.ratelimit.to_mapping(),
        "programs": {name: {"index": p.index, "kind": p.kind, "max_instance": p.max_instance,
                            **({"port": p.port} if p.port is not None else {}),
                            **({"client_ip": p.client_ip} if p.client_ip is not None else {}),
                            **{option: list(values) for option, values in p.kind_options}}
                     for name, p in s.programs.items()},
        "demo": {"enabled": s.demo},
        "acme": {"directory": s.acme_directory or "", "email": s.acme_email or "",
                 "challenge": s.acme_challenge, "ca_bundle": s.acme_ca_bundle or "",
                 "verify_cname": s.acme_verify_cname},
        "client_ip": {"mode": s.client_ip_mode, "mark": s.client_ip_mark, "table": s.client_ip_table},
        "http2": {"enabled": s.http2_enabled, "max_concurrent_streams": s.http2_max_concurrent_streams,
                  "max_header_list_size": s.http2_max_header_list_size,
                  "stream_window": s.http2_stream_window, "max_resets": s.http2_max_resets},
        "http3": {"enabled": s.http3_enabled, "advertised_port": s.http3_advertised_port,
                  "max_concurrent_streams": s.http3_max_concurrent_streams, "retry": s.http3_retry,
                  "retry_threshold": s.http3_retry_threshold},
        "tap": {"allow_unredacted": s.tap_allow_unredacted, "max_taps": s.tap_max_taps,
                "queue_events": s.tap_queue_events},
        "docker": {"enabled": s.docker_enabled, "socket": s.docker_socket, "network": s.docker_network,
                   "label_prefix": s.docker_label_prefix},
        "drain": {"timeout": s.drain_timeout, "websocket_grace": s.drain_websocket_grace},
        "store": {"backend": s.store_backend,
                  "etcd": {"endpoints": list(s.etcd.endpoints), "prefix": s.etcd.prefix,
                           "dial_timeout": s.etcd.dial_timeout, "request_timeout": s.etcd.request_timeout,
                           "lease_ttl": s.etcd.lease_ttl,
                           **{name: getattr(s.etcd, name)
                              for name in ("username", "password", "ca_file", "cert_file", "key_file")
                              if getattr(s.etcd, name) is not None}}},
        "metrics": {"container_labels": s.metrics_container_labels},
    }
    if s.tls_certificate:
        doc["tls"] = {"certificate": s.tls_certificate, "key": s.tls_key}
    if s.admin_token:
        doc.setdefault("admin", {})["token"] = s.admin_token
    if s.metrics_token:
        doc.setdefault("admin", {})["metrics_token"] = s.metrics_token
    if s.audit_path:
        doc["audit"] = {"path": s.audit_path}
    return doc


def client_ip_modes(settings: Settings) -> set[str]:
    """Every client IP mode the node's config names (the node's and the programs' overrides)."""
    return {settings.client_ip_mode} | {p.client_ip for p in settings.programs.values() if p.client_ip}


def resolve_client_ip(settings: Settings, transparent: bool) -> Settings:
    """``settings`` with every ``auto`` client IP mode made concrete.

    ``auto`` becomes ``transparent`` when the node can be transparent (``transparent``
    True: it has CAP_NET_ADMIN and its netfilter rules are in place), else ``headers``.
    """
    auto = "transparent" if transparent else "headers"
    programs = {name: replace(p, client_ip=auto) if p.client_ip == "auto" else p
                for name, p in settings.programs.items()}
    return replace(settings, programs=MappingProxyType(programs),
                   client_ip_mode=auto if settings.client_ip_mode == "auto" else settings.client_ip_mode)


def load_settings(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read ``path`` (TOML) if given, apply ``overrides`` and validate."""
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", f"{path} is not valid TOML: {e}") from None
    return settings_from_mapping(doc, overrides)
