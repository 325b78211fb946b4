"""The one request path: route, locate, authorize, forward, audit.

Every frontend (HTTP/1.1 now; HTTP/2 and HTTP/3 later) calls :meth:`Gateway.begin` at
end of headers with a request that speaks
:class:`hoodyproxy.upstream.exchange.FrontendRequest`.  Nothing else calls these steps,
and nothing calls them in another order.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hoodyproxy import errors
from hoodyproxy.access.ambiguity import BODYLESS_METHODS
from hoodyproxy.access.capabilities import configured_kind
from hoodyproxy.access.model import challenge_kinds
from hoodyproxy.access.policy import read_credentials, strip_query_token
from hoodyproxy.config import Settings
from hoodyproxy.frontend.fields import Fields
from hoodyproxy.interfaces import IAuditSink, IContainerDirectory
from hoodyproxy.limits import ALLOWED, Limiters, TooManyRequests
from hoodyproxy.observe.audit import RouteRecord
from hoodyproxy.observe.metrics import RequestMetrics
from hoodyproxy.routing import Router, Target, split_host
from hoodyproxy.upstream.exchange import Exchange
from hoodyproxy.upstream.headers import build_request_head, wants_websocket
from hoodyproxy.upstream.proxy_protocol import ProxySource
from hoodyproxy.upstream.transparent import TransparentSource

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Methods known to be tokens, checked without the regular expression (most requests).
_COMMON_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"))
_URI_BAD = re.compile(rb"[\x00-\x20\x7f]")
ROUTE_CACHE_SIZE = 4096
log = Logger()


def _request_target(uri: bytes, host: bytes | None) -> tuple[bytes, bytes | None]:
    """Origin-form URI and effective Host; an absolute-form URI's authority wins (RFC 9112 3.2.2)."""
    if _URI_BAD.search(uri):
        raise errors.BadRequest("the request target is malformed", reason="bad uri")
    if uri.startswith(b"/") or uri == b"*":
        return uri, host
    lower = uri[:8].lower()
    if lower.startswith(b"http://") or lower.startswith(b"https://"):
        rest = uri.split(b"://", 1)[1]
        authority, slash, path = rest.partition(b"/")
        if b"@" in authority or not authority:
            raise errors.BadRequest("the request target is malformed", reason="bad absolute uri")
        return slash + path if slash else b"/", authority
    raise errors.BadRequest("the request target is malformed", reason="bad uri")


#: Clients whose transparent sources are kept (past it the table starts again).
_TRANSPARENT_SOURCES = 4096


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1"


def _jwt_subject(token: str) -> str | None:
    """The ``sub`` of a JWT whose signature a group has already verified (never parsed
    from a token that did not verify)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, TypeError):
        return None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) else None


def principal_of(pset, group: str | None, credentials) -> tuple | None:
    """Who a request is, for per-principal rate limits: the set, the group that allowed
    it, and the credential that matched it (a Basic or LDAP user, a JWT's ``sub``, a
    token's hash), or None when no credential group allowed it."""
    if group is None or credentials is None:
        return None
    stored = pset.groups.get(group) or {}
    kind = stored.get("type")
    if credentials.basic is not None and kind in ("password", "ldap"):
        identity = "user:" + credentials.basic[0]
    elif credentials.bearer is not None and kind == "jwt":
        identity = "sub:" + (_jwt_subject(credentials.bearer) or "")
    elif credentials.bearer is not None and kind == "token":
        identity = "token:" + hashlib.blake2b(credentials.bearer.encode(), digest_size=12).hexdigest()
    else:
        return None  # an address is not a principal: per_client limits it
    return (pset.scope, pset.container or pset.project, group, identity)


class Gateway:
    """Routes each request by its own Host to a container service and forwards it."""

    #: False when the host could set up transparent mode for IPv4 only (IPv6 disabled).
    transparent_ipv6 = True
    #: The ``Alt-Svc`` value HTTP/1.1 and HTTP/2 responses carry (set when HTTP/3 listens).
    alt_svc: bytes | None = None
    #: The running taps (hoodyproxy.observe.tap.TapHub), or None.
    taps = None

    def __init__(self, settings: Settings, directory: IContainerDirectory, pool, audit: IAuditSink,
                 clock, *, now: Callable[[], float] = time.time, policy=None, aliases=None,
                 rate_limits=None) -> None:
        self.policy = policy
        self.aliases = aliases
        #: Where per-project and per-container rate limits come from (``effective(project,
        #: container)``), or None; the node's own limits are in ``settings.ratelimit``.
        self.rate_limits = rate_limits
        self.limiters = Limiters(settings.ratelimit, clock=clock, workers=settings.workers)
        self._dry_run_said: dict[str, float] = {}
        self.directory = directory
        self.pool = pool
        self.audit = audit
        self.clock = clock
        #: The WebSocket tunnels open now (a draining node closes them with 1001).
        self.tunnels: set = set()
        self.now = now
        #: What the exchanges add up to (step 5 counts each one; see hoodyproxy.observe.metrics).
        self.metrics = RequestMetrics(directory, container_labels=settings.metrics_container_labels)
        self._take_settings(settings)

    def _take_settings(self, settings: Settings) -> None:
        self.settings = settings
        self.router = Router(settings.node, settings.zone, settings.programs)
        self._routes: dict[bytes, Target] = {}
        #: Host -> (Target, RouteRecord) for route labels (their cached Targets only).
        self._routed: dict[bytes, tuple[Target, RouteRecord]] = {}
        #: Host -> its hostname (split_host), for an HTTP/2 or HTTP/3 connection's check of
        #: its certificate on every request; hosts split_host refuses are not kept.
        self._hostnames: dict[bytes, str] = {}
        #: The audit record's "route" per Target, made (and its JSON text rendered) once.
        self._route_records: dict[Target, RouteRecord] = {}
        #: Each program's service kind with the program's method and path sets applied.
        kinds = self.policy.kinds if self.policy is not None else {}
        self.kinds = {name: configured_kind(p.kind, p.kind_options, kinds) if kinds else p.kind
                      for name, p in settings.programs.items()}
        self.configure_client_ip(settings)

    def reconfigure(self, settings: Settings) -> None:
        """Serve the very next request with ``settings`` (a config reload): programs,
        timeouts, the node's rate limits, client IP modes.  Requests in flight keep the
        values they started with."""
        self.limiters.reconfigure(settings.ratelimit)
        self._take_settings(settings)

    def configure_client_ip(self, settings: Settings) -> None:
        """Take the node's client IP mode and the programs' overrides from ``settings``.

        The node resolves ``auto`` at start (:func:`hoodyproxy.config.resolve_client_ip`);
        one left unresolved counts as ``headers``.  The forwarding headers are sent in
        every mode.
        """
        def concrete(mode: str) -> str:
            return "headers" if mode == "auto" else mode
        self.client_ip_mode = concrete(settings.client_ip_mode)
        self._program_client_ip = {name: concrete(p.client_ip) for name, p in settings.programs.items()
                                   if p.client_ip is not None}
        self._fallbacks_said: set[str] = set()
        #: (client address, container address) -> its TransparentSource: one object per
        #: client, so the pool's keys compare by identity (bounded, emptied when full).
        self._transparent_sources: dict[tuple[str, str], TransparentSource] = {}

    def _source(self, mode: str, request, address: str):
        """Whose upstream connection a request in ``mode`` takes (None: a shared one)."""
        client = request.client_ip
        if mode == "transparent":
            source = self._transparent_sources.get((client, address))
            if source is None:
                source = self._transparent_source(client, address)
                if source is not None:
                    if len(self._transparent_sources) >= _TRANSPARENT_SOURCES:
                        self._transparent_sources.clear()
                    self._transparent_sources[(client, address)] = source
            return source
        peer, local = getattr(request, "client", None), getattr(request, "host", None)
        return ProxySource(client, getattr(peer, "port", 0), getattr(local, "host", ""), getattr(local, "port", 0))

    def _transparent_source(self, client: str, address: str) -> TransparentSource | None:
        """The source of ``client``'s transparent connections to ``address``, or None
        (said once) where the two cannot be joined transparently."""
        if (":" in client) != (":" in address):
            self._fallback("an IPv%s client cannot reach an IPv%s container transparently"
                           % ((6, 4) if ":" in client else (4, 6)))
            return None
        if ":" in client and not self.transparent_ipv6:
            self._fallback("IPv6 is not transparent on this host")
            return None
        if _loopback(client) != _loopback(address):
            # A loopback source cannot leave the host; a service on loopback answers a
            # remote address through the host's own routes, never back to this socket.
            self._fallback("a loopback client and a networked container (or a networked client and "
                           "a container on loopback) cannot be joined transparently")
            return None
        return TransparentSource(client)

    def _fallback(self, why: str) -> None:
        if why not in self._fallbacks_said:
            self._fallbacks_said.add(why)
            log.warn("client IP: {why}; such requests give the container the client's address in "
                     "forwarding headers only (said once)", why=why)

    # -- 1. route -----------------------------------------------------------------------

    def route(self, host: bytes | None) -> Target:
        """Resolve a Host to a Target.

        Route labels are cached (the router is pure and the program table immutable);
        aliases and custom domains are not (they change through the admin API), and are
        only consulted for hosts that are not route labels.
        """
        target = self._routes.get(host) if host is not None else None
        if target is None:
            try:
                target = self.router.resolve_target(host)
            except (errors.UnknownHost, errors.BadLabel, errors.WrongNode):
                aliased = self._route_alias(host)
                if aliased is None:
                    raise
                return aliased
            if len(self._routes) >= ROUTE_CACHE_SIZE:
                self._routes.clear()
            self._routes[host] = target
        return target

    def _hostname(self, host: bytes | None) -> str:
        """``split_host(host)`` (raising what it raises), kept for the next request."""
        name = split_host(host)
        if len(self._hostnames) >= ROUTE_CACHE_SIZE:
            self._hostnames.clear()
        self._hostnames[host] = name
        return name

    def _route_and_record(self, host: bytes | None) -> tuple[Target, RouteRecord]:
        """The Target of ``host`` and its audit record's "route"; a route label's pair is
        kept (one lookup per request after the first), an alias's is not (see :meth:`route`)."""
        target = self.route(host)
        route = self._route_records.get(target)
        if route is None:
            if len(self._route_records) >= ROUTE_CACHE_SIZE:
                self._route_records.clear()
            route = self._route_records[target] = RouteRecord(target, self.metrics.container_labels)
        if host is not None and self._routes.get(host) is target:
            if len(self._routed) >= ROUTE_CACHE_SIZE:
                self._routed.clear()
            self._routed[host] = (target, route)
        return target, route

    def _route_alias(self, host: bytes | None) -> Target | None:
        """The Target of an alias (``my-api.<node>.<zone>``) or an attached custom domain."""
        if self.aliases is None:
            return None
        name = split_host(host)
        found = self.aliases.resolve_host(name)
        if found is None:
            return None
        container_id, program, index = found
        container = self.directory.lookup(container_id)
        if container is None:
            raise errors.ContainerUnavailable(reason="alias: container absent")
        # The project comes from the live map, so permissions apply as on the container's own URL.
        return Target(container.project, container_id, program, index, name)

    # -- the whole path ---------------------------------------------------------------

    def begin(self, request) -> None:
        """Start serving ``request`` (called at end of its headers)."""
        started = self.now()
        self.metrics.begun += 1
        uri = request.uri
        if b"?" in uri:
            # A token in the query string is a secret: out of the audit line on every path,
            # refusals included.
            uri = strip_query_token(uri, any_case=True)[0]
        record = {
            "time": started,
            "client": request.client_ip,
            "host": None,
            "route": None,
            "method": request.method.decode("latin-1"),
            "path": uri.decode("latin-1"),
            "http": request.http_version,
        }
        request.audit_record = record
        try:
            self._begin(request, record)
        except errors.GatewayError as error:
            request.send_error(error)
            record["status"] = error.status
            record["reason"] = error.reason
            if error.status == 429:
                record["ratelimited"] = error.verdict.limiter
            record["bytes_in"] = request.bytes_in
            record["bytes_out"] = request.sentLength
            self.emit_record(record)
            if self.taps is not None and self.taps.active:
                self._tap_refusal(request, record)

    def _tap_refusal(self, request, record: dict) -> None:
        """Show a request refused before it had an exchange to the taps that see its route."""
        route = record.get("route")
        if route is None:
            return  # not addressed to a container of this node
        try:
            pairs = getattr(request.requestHeaders, "pairs", None)
            if pairs is None:
                pairs = [(n, v) for n, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
            target = Target(route["project"], route["container"], route["program"], route["index"],
                            split_host(record["host"].encode("latin-1")) if record.get("host") else "")
            capture = self.taps.begin(request, target, request.method, request.uri, pairs,
                                      bool(getattr(request, "websocket", None)), record)
            if capture is not None:
                capture.finished(record)
        except Exception:
            log.failure("tap: a refused request could not be shown")

    def _begin(self, request, record: dict) -> None:
        # 0. limit: per client address, before any other work
        verdict = self.limiters.check_client(request.client_ip)
        if verdict is not ALLOWED:
            self._limited(verdict, record)
        problem = request.problem
        if problem is not None:
            raise problem  # malformed in a way only its frontend could see
        headers = request.requestHeaders
        if headers.__class__ is Fields:  # (every frontend's: its names in lower case, looked up in C)
            lnames = headers.lower_names()
            hosts = lnames.count(b"host")
            host_field = headers.pairs[lnames.index(b"host")][1] if hosts else None
        else:
            values = headers.getRawHeaders(b"host")
            hosts = len(values) if values is not None else 0
            host_field = values[0] if hosts else None
        if hosts > 1:
            raise errors.BadRequest("the request has more than one Host", reason="duplicate host")
        if request.method not in _COMMON_METHODS and not _TOKEN.match(request.method):
            raise errors.BadRequest("the request method is malformed", reason="bad method")
        uri, host = _request_target(request.uri, host_field)
        record["host"] = host.decode("latin-1") if host is not None else None
        covers = request.certificate_covers
        if covers is not None and not covers(self._hostnames.get(host) or self._hostname(host)):
            # A coalesced HTTP/2 or HTTP/3 connection: every request is routed by its own
            # authority, and one the connection's certificate does not cover goes elsewhere.
            raise errors.MisdirectedRequest(reason="certificate does not cover the authority")
        routed = self._routed.get(host)
        if routed is None:
            routed = self._route_and_record(host)
        target, route = routed
        record["route"] = route

        # 2. locate (absent, stopped or another project's: one answer, so that an outsider
        # holding an id cannot tell them apart; the audit line keeps the real reason)
        container = self.directory.lookup(target.container)
        if container is None:
            raise errors.ContainerUnavailable(reason="container absent")
        if container.project != target.project:
            raise errors.ContainerUnavailable(reason="container belongs to another project")
        if not container.running:
            raise errors.ContainerUnavailable(reason="container stopped")
        program = self.settings.programs.get(target.program)
        if program is None:  # an alias to a program a reload has removed since
            raise errors.UnknownHost(reason="alias: program no longer configured")
        port = container.port_override(target.program, target.index)
        if port is None:
            port = program.port if program.index == "instance" else target.index

        if headers.__class__ is Fields:  # (the fields in the order sent)
            raw = list(headers.pairs)
            # Their names in lower case, one for one with ``raw`` while it is that copy: any
            # change to ``raw`` below sets this to None (the head builder lowers them itself).
            has_upgrade = b"upgrade" in lnames
        else:
            raw = [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
            lnames = None
            has_upgrade = headers.hasHeader(b"upgrade")
        websocket = request.websocket
        if websocket is None:  # HTTP/1.1: an Upgrade in the headers
            upgrade = request.method == b"GET" and has_upgrade and wants_websocket(raw)
        else:  # HTTP/2 and HTTP/3: only an extended CONNECT is a WebSocket
            upgrade = bool(websocket)
        has_body = request.body_length != 0
        sent = raw  # (the fields as the client sent them, for a tap)
        if upgrade and has_body:
            # RFC 6455 handshakes carry none; a container would read the body as frames
            # sent before the filter that enforces read-only WebSockets sees any.
            raise errors.BadRequest("a WebSocket handshake carries no body", reason="upgrade with a body")

        # 3. authorize (the URL alone is the credential when no permission set applies)
        pset = self.policy.effective(target.project, target.container) if self.policy else None
        decision = credentials = None
        if pset is not None:
            credentials, consumed = read_credentials(request.client_ip, uri, headers)
            if credentials.offered:
                # A client over its failed-authentication budget is refused before its
                # credentials cost a password hash, an LDAP bind or a signature check.
                verdict = self.limiters.check_failed_auth(request.client_ip, self._username(credentials))
                if verdict is not ALLOWED:
                    self._limited(verdict, record)
            uri = consumed.uri  # (the audit line's path was stripped in begin)
            # Credentials meant for the gateway do not travel on to the container.
            if consumed.drop_authorization and challenge_kinds(pset, self.policy.registry):
                raw, lnames = [(n, v) for n, v in raw if n.lower() != b"authorization"], None
            if consumed.cookie is not None:
                raw, lnames = [(n, v) for n, v in raw if n.lower() != b"cookie"], None
                if consumed.cookie:
                    raw.append((b"Cookie", consumed.cookie))
            decision = self.policy.authorize(pset, credentials, self.kinds[target.program], request.method,
                                             uri.split(b"?", 1)[0], upgrade, target=uri, has_body=has_body,
                                             header_names=[name for name, _ in raw])

        if pset is None:
            self._limit_after((request.client_ip, target, None, None), None, record)  # 3b., no principal

        # 4. forward
        head = build_request_head(
            request.method, uri, raw,
            host=host, client_ip=request.client_ip, proto=request.proto,
            body_length=request.body_length, upgrade=upgrade,
            instance=target.index if program.index == "instance" else None, lnames=lnames)
        settings = self.settings
        mode = self._program_client_ip.get(target.program, self.client_ip_mode)
        source = None if mode == "headers" else self._source(mode, request, container.address)
        exchange = Exchange(
            request, self.pool, address=container.address, port=port, head=head,
            head_request=request.method == b"HEAD", upgrade=upgrade,
            timeout=settings.websocket_handshake_timeout if upgrade else settings.response_timeout,
            record=record, done=self.emit_record, clock=self.clock,
            tunnel_idle_timeout=settings.websocket_idle_timeout, source=source, tunnels=self.tunnels,
            # A body small servers do not read is the next request on the connection: such
            # a connection is never given to another request, this client's or another's.
            reusable=not (has_body and request.method in BODYLESS_METHODS))
        if upgrade:
            exchange.metrics = self.metrics  # (counts the WebSocket when it is established)
        request.exchange = exchange
        taps = self.taps
        if taps is not None and taps.active:
            exchange.capture = taps.begin(request, target, request.method, uri, sent, upgrade, record)
        context = (request.client_ip, target, pset, credentials)
        if decision is None:
            exchange.start()
        elif isinstance(decision, Deferred):
            # Body bytes wait in the exchange's bounded buffer meanwhile.
            decision.addCallback(self._decided, exchange, record, context)
            decision.addErrback(self._decision_failed, exchange, record)
        else:
            self._decided(decision, exchange, record, context)

    def _decided(self, decision, exchange: Exchange, record: dict, context: tuple) -> None:
        record["decision"] = decision.audit()
        client_ip, target, pset, credentials = context
        if decision.auth_failed:
            self.limiters.record_failed_auth(client_ip, self._username(credentials))
        if exchange.over:
            return
        if not decision.allowed:
            exchange.deny(errors.AccessDenied(decision))
            return
        try:
            self._limit_after(context, decision.group, record)  # 3b.
        except TooManyRequests as error:
            record["ratelimited"] = error.verdict.limiter
            exchange.deny(error)
            return
        exchange.read_only = decision.read_only
        exchange.start()

    # -- 0. and 3b. limit ---------------------------------------------------------------

    @staticmethod
    def _username(credentials) -> str | None:
        return credentials.basic[0] if credentials is not None and credentials.basic is not None else None

    def _limit_after(self, context: tuple, group: str | None, record: dict) -> None:
        """The limits of the project, the container, the program and the principal, once
        the request is allowed (raises TooManyRequests)."""
        client_ip, target, pset, credentials = context
        limits = self.rate_limits.effective(target.project, target.container) if self.rate_limits else None
        if limits is None or limits.empty:
            return
        principal = principal_of(pset, group, credentials) if limits.per_principal is not None else None
        verdict = self.limiters.check_after_decision(limits, client_ip, principal, target.project,
                                                     target.container, target.program, target.index)
        if verdict is not ALLOWED:
            self._limited(verdict, record)

    def _limited(self, verdict, record: dict) -> None:
        """A limit said no (raise TooManyRequests), or would have in a dry run (note it)."""
        if not verdict.allowed:
            raise TooManyRequests(verdict)
        record["ratelimited"] = verdict.limiter
        record["ratelimit_dry_run"] = True
        now = self.now()
        if now - self._dry_run_said.get(verdict.limiter, 0.0) >= 10.0:
            self._dry_run_said[verdict.limiter] = now
            log.info("rate limit {limiter} would have refused a request (dry run; said at most every 10 s)",
                     limiter=verdict.limiter)

    def _decision_failed(self, failure, exchange: Exchange, record: dict) -> None:
        log.failure("permission decision failed; request denied", failure)
        record["decision"] = {"allowed": False, "group": None, "read_only": False, "reason": "decision failed"}
        if not exchange.over:
            exchange.deny(errors.GatewayError("internal error", reason="decision failed"))

    # -- 5. audit -----------------------------------------------------------------------

    def emit_record(self, record: dict) -> None:
        """Complete (duration) and emit the audit record of one exchange, and count it."""
        elapsed = self.now() - record["time"]
        # (milliseconds to three places: int arithmetic, a third of round(x, 3)'s cost)
        record["duration_ms"] = int(elapsed * 1000000.0 + 0.5) / 1000.0
        self.audit.record(record)
        self.metrics.observe(record, elapsed)

    def emit_refusal(self, record: dict) -> None:
        """Emit the record of a request its frontend refused before :meth:`begin` (a
        malformed head): begun and over at once."""
        self.metrics.begun += 1
        self.emit_record(record)
