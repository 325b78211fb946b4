"""The admin REST API (a twisted.web Resource): containers, permission sets, rate limits, aliases and domains.

Every request needs ``Authorization: Bearer <admin token>``, except the health checks and
``GET /metrics`` (:mod:`hoodyproxy.admin.metrics`, which has a token of its own).  A 2xx
answer means the change is committed to disk.  Errors are a status and a short JSON body naming what was
wrong; a traceback never reaches the client.

Served by :func:`admin_site`, a request is judged at the end of its head, before a byte
of its body is read: a bad token (401) or a body announced over :data:`MAX_BODY` (413)
is answered at once and the connection closes, unless the body announced is small
(:data:`DRAIN_BODY`), which is then read, dropped, and answered after; a body without a
length (chunked) is cut off at the limit with 413.  A body the API accepts is held in
memory, never in a temporary file.
"""

from __future__ import annotations

import hmac
import io
import json
from typing import Any, Iterable
from urllib.parse import parse_qs

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from hoodyproxy.access.model import InvalidPermissions, advise, parse_permission_set, to_json
from hoodyproxy.aliases import (AliasExists, DomainExists, InvalidAlias, NoSuchAlias, alias_url, check_alias,
                                check_target, target_advice)
from hoodyproxy.admin.taps import STREAMING
from hoodyproxy.directory import InvalidContainer, container_from_json
from hoodyproxy.directory._model import CONTAINER_ID
from hoodyproxy.frontend.http1 import REASONS, SERVER, early_answer_site, http_date, take_site_request_line
from hoodyproxy.limits import InvalidRateLimit, merge_rate_limits, parse_rate_limits

log = Logger()
MAX_BODY = 1024 * 1024
#: A refused request's body, announced at most this long, is read and dropped before the
#: answer (the connection stays usable); a longer one is never read.
DRAIN_BODY = 2 * MAX_BODY
#: Paths answered without a token.
HEALTH_PATHS = (b"/healthz", b"/api/v1/health")
#: Prometheus's path: its own token, or none (see hoodyproxy.admin.metrics).
METRICS_PATH = b"/metrics"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[bytes, bytes] | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.field = field


def _too_large() -> ApiError:
    return ApiError(413, "payload_too_large", "the body is larger than 1 MiB")


def _json_body(request) -> Any:
    raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(raw) > MAX_BODY:
        raise _too_large()
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "bad_json", "the body is not valid JSON") from None


def _with_warnings(answer: dict[str, Any], advice: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """``answer`` with ``"warnings": [{"field", "message"}, ...]`` if there is advice: what was
    stored as asked but is probably not what was meant (no key at all otherwise)."""
    warnings = [{"field": field, "message": message} for field, message in advice]
    if warnings:
        answer["warnings"] = warnings
    return answer


def _rate_limits_json(scope: str, set_id: str, project: str, limits) -> dict[str, Any]:
    """A rate-limit entry as the API shows it: where it applies, then the limits."""
    return {"scope": scope, "id": set_id, "project": project, **limits.to_json()}


def _default_registry() -> dict:
    """The shipped group types, if that package is installed; else none."""
    try:
        from hoodyproxy.access.groups import group_types
    except ImportError:
        log.warn("hoodyproxy.access.groups.group_types is not available: no group types")
        return {}
    return group_types()


class AdminAPI(Resource):
    """``/api/v1/...``: containers, permission sets, aliases and their custom domains.

    ``permissions`` is a :class:`hoodyproxy.access.store.PermissionStore` (without one the
    permission endpoints answer 404); ``registry`` maps group type names to IGroupType
    providers (default: the store's, else :func:`hoodyproxy.access.groups.group_types`).
    ``aliases`` is a :class:`hoodyproxy.aliases.AliasStore` (without one the alias
    endpoints answer 404); ``base_url_for(alias)`` is the alias's public URL (default
    ``https://<alias>.<node>.<zone>/``); ``certificate_status(domain)`` (optional, e.g.
    :meth:`hoodyproxy.tls.manager.CertificateManager.status`) adds a domain's certificate
    state to the domain reads.  ``rate_limits`` is a
    :class:`hoodyproxy.limits.store.RateLimitStore` (without one the rate-limit endpoints
    answer 404).
    """

    isLeaf = True

    def __init__(self, directory, token: str, *, permissions=None, registry=None, aliases=None,
                 base_url_for=None, certificate_status=None, rate_limits=None, taps=None,
                 metrics=None) -> None:
        super().__init__()
        self.directory = directory
        self.token = token.encode()
        self.permissions = permissions
        self._registry = registry
        self.aliases = aliases
        self.base_url_for = base_url_for
        self.certificate_status = certificate_status
        self.rate_limits = rate_limits
        #: The tap endpoints (hoodyproxy.admin.taps.TapEndpoints), or None (404).
        self.taps = taps
        #: ``GET /metrics`` (hoodyproxy.admin.metrics.MetricsEndpoint), or None (404).
        self.metrics = metrics

    @property
    def registry(self):
        if self._registry is None:
            store_registry = getattr(self.permissions, "registry", None)
            self._registry = store_registry if store_registry is not None else _default_registry()
        return self._registry

    def render(self, request) -> bytes:
        try:
            if request.path in HEALTH_PATHS:
                status, body = 200, {"status": "ok"}
            elif request.path == METRICS_PATH and self.metrics is not None:
                return self.metrics.render(self, request)
            else:
                self._authenticate(request)
                status, body = self._dispatch(request)
                if body is STREAMING:
                    return NOT_DONE_YET
        except ApiError as e:
            return self.error_response(request, e)
        except Exception:
            log.failure("admin API request failed")
            status, body = 500, {"error": "internal_error", "message": "internal error"}
        return self._response(request, status, body)

    def head_refusal(self, request, length: int | None) -> ApiError | None:
        """What the head alone earns, before a byte of the body is read: 401 for a bad
        token (a health path needs none; /metrics, its own), 413 for an announced body over
        MAX_BODY."""
        if request.path == METRICS_PATH and self.metrics is not None:
            refusal = self.metrics.refusal(request)
            if refusal is not None:
                return refusal
        elif request.path not in HEALTH_PATHS:
            try:
                self._authenticate(request)
            except ApiError as e:
                return e
        if length is not None and length > MAX_BODY:
            return _too_large()
        return None

    def error_response(self, request, e: ApiError) -> bytes:
        """Set ``request``'s status and headers for ``e``; returns the JSON body."""
        body = {"error": e.code, "message": e.message}
        if e.field is not None:
            body["field"] = e.field
        for name, value in e.headers.items():
            request.setHeader(name, value)
        return self._response(request, e.status, body)

    @staticmethod
    def _response(request, status: int, body: Any) -> bytes:
        request.setResponseCode(status, REASONS.get(status))
        request.setHeader(b"Server", SERVER)
        request.setHeader(b"Cache-Control", b"no-store")
        if status == 204:
            return b""
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(body).encode() + b"\n"

    def _authenticate(self, request) -> None:
        header = request.getHeader(b"authorization") or b""
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
            raise ApiError(401, "unauthorized", "a valid admin bearer token is required",
                           {b"WWW-Authenticate": b'Bearer realm="hoodyproxy-admin"'})

    def _dispatch(self, request) -> tuple[int, Any]:
        parts = request.path.decode("latin-1").strip("/").split("/")
        if parts[:2] != ["api", "v1"] or len(parts) < 3:
            raise ApiError(404, "not_found", "no such endpoint")
        if parts[2] == "containers":
            if len(parts) == 3:
                return self._containers(request)
            if len(parts) == 4:
                return self._container(request, parts[3])
        if parts[2] in ("containers", "projects") and len(parts) == 6 and parts[4:] == ["proxy", "permissions"]:
            return self._permissions(request, parts[2][:-1], parts[3])
        if parts[2] in ("containers", "projects") and len(parts) == 6 and parts[4:] == ["proxy", "rate-limits"]:
            return self._rate_limits(request, parts[2][:-1], parts[3])
        if parts[2:4] == ["proxy", "aliases"]:
            return self._alias_endpoints(request, parts[4:])
        if parts[2] == "taps" and self.taps is not None:
            return self.taps.dispatch(self, request, parts[3:])
        raise ApiError(404, "not_found", "no such endpoint")

    @staticmethod
    def _allow(request, *methods: bytes) -> None:
        if request.method not in methods:
            raise ApiError(405, "method_not_allowed", "method not allowed here",
                           {b"Allow": b", ".join(methods)})

    def _containers(self, request) -> tuple[int, Any]:
        self._allow(request, b"GET")
        query = parse_qs(request.uri.partition(b"?")[2].decode("latin-1"))
        project = query.get("project", [None])[0]
        if project is not None and not CONTAINER_ID.match(project):
            raise ApiError(422, "invalid", "project: must be 24 lowercase hexadecimal digits", field="project")
        return 200, {"containers": [c.to_json() for c in self.directory.list(project)]}

    def _container(self, request, container_id: str) -> tuple[int, Any]:
        self._allow(request, b"GET", b"PUT", b"DELETE")
        if not CONTAINER_ID.match(container_id):
            raise ApiError(404, "not_found", "container ids are 24 lowercase hexadecimal digits")
        if request.method == b"GET":
            container = self.directory.lookup(container_id)
            if container is None:
                raise ApiError(404, "not_found", "no such container")
            return 200, container.to_json()
        if request.method == b"DELETE":
            if not self.directory.delete(container_id):
                raise ApiError(404, "not_found", "no such container")
            return 204, None
        try:
            container = container_from_json(container_id, _json_body(request))
        except InvalidContainer as e:
            raise ApiError(422, "invalid", str(e), field=e.field) from None
        existed = self.directory.lookup(container_id) is not None
        self.directory.put(container)
        return (200 if existed else 201), container.to_json()

    # -- permission sets --------------------------------------------------------------

    def _permissions(self, request, scope: str, set_id: str) -> tuple[int, Any]:
        """``/api/v1/{containers,projects}/{id}/proxy/permissions``: PUT, PATCH, GET, DELETE."""
        self._allow(request, b"GET", b"PUT", b"PATCH", b"DELETE")
        if self.permissions is None:
            raise ApiError(404, "not_found", "permission sets are not kept on this node")
        if not CONTAINER_ID.match(set_id):
            raise ApiError(404, "not_found", f"{scope} ids are 24 lowercase hexadecimal digits")
        store = self.permissions
        if request.method == b"GET":
            store.refresh()
            pset = store.get(scope, set_id)
            if pset is None:
                raise ApiError(404, "not_found", f"no permission set for this {scope}")
            return 200, to_json(pset, self.registry)
        if request.method == b"DELETE":
            if not store.delete(scope, set_id):
                raise ApiError(404, "not_found", f"no permission set for this {scope}")
            return 204, None
        body = _json_body(request)
        container = self.directory.lookup(set_id) if scope == "container" else None
        known_project = container.project if container is not None else None
        registry = self.registry
        patch = request.method == b"PATCH"

        def parse(previous=None):
            try:
                return parse_permission_set(body, scope, set_id, registry, previous, patch,
                                            container_project=known_project)
            except InvalidPermissions as e:
                raise ApiError(422, "invalid", str(e), field=e.field) from None

        if request.method == b"PUT":
            pset = parse()
            created = not store.put(pset)
        else:
            # A PATCH with no set yet creates one (merged into empty): the platform sends
            # its whole set as a PATCH whether or not the node has one.
            pset, created = store.merge(scope, set_id, parse)
        advice = advise(body, registry)
        for field, message in advice:
            # The field and the advice only: a message never holds the secret itself.
            log.warn("admin API: permission set of {scope} {id}: {field}: {advice}",
                     scope=scope, id=set_id, field=field, advice=message)
        return (201 if created else 200), _with_warnings(to_json(pset, registry), advice)

    # -- rate limits ------------------------------------------------------------------

    def _rate_limits(self, request, scope: str, set_id: str) -> tuple[int, Any]:
        """``/api/v1/{containers,projects}/{id}/proxy/rate-limits``: PUT, PATCH, GET, DELETE."""
        self._allow(request, b"GET", b"PUT", b"PATCH", b"DELETE")
        store = self.rate_limits
        if store is None:
            raise ApiError(404, "not_found", "rate limits are not kept on this node")
        if not CONTAINER_ID.match(set_id):
            raise ApiError(404, "not_found", f"{scope} ids are 24 lowercase hexadecimal digits")
        if request.method == b"GET":
            store.refresh()
            limits = store.get(scope, set_id)
            if limits is None:
                raise ApiError(404, "not_found", f"no rate limits for this {scope}")
            return 200, _rate_limits_json(scope, set_id, store.project_of(scope, set_id), limits)
        if request.method == b"DELETE":
            if not store.delete(scope, set_id):
                raise ApiError(404, "not_found", f"no rate limits for this {scope}")
            return 204, None
        body = _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(422, "invalid", "rate_limits: must be a JSON object", field="rate_limits")
        limits_body = {k: v for k, v in body.items() if k not in ("scope", "id", "project")}
        project = self._rate_limits_project(scope, set_id, body, request.method == b"PATCH")
        try:
            if request.method == b"PUT":
                limits = parse_rate_limits(limits_body)
                created = store.put(scope, set_id, project, limits)
            else:
                # Merged inside the store's transaction: two PATCHes never lose one another.
                limits, created = store.change(scope, set_id, project,
                                               lambda previous: merge_rate_limits(previous, limits_body))
        except InvalidRateLimit as e:
            raise ApiError(422, "invalid", str(e), field=e.field or "rate_limits") from None
        return (201 if created else 200), _rate_limits_json(scope, set_id, project, limits)

    def _rate_limits_project(self, scope: str, set_id: str, body: dict, patch: bool) -> str:
        """The project a rate-limit entry is stored under; ``scope`` and ``id``, as ``GET``
        shows them, may be sent back but must be the URL's."""
        for key, value in (("scope", scope), ("id", set_id)):
            if key in body and body[key] != value:
                raise ApiError(422, "invalid", f"{key}: does not match the URL", field=key)
        given = body.get("project")
        if "project" in body and (not isinstance(given, str) or not CONTAINER_ID.match(given)):
            raise ApiError(422, "invalid", "project: must be 24 lowercase hexadecimal digits", field="project")
        if scope == "project":
            if given is not None and given != set_id:
                raise ApiError(422, "invalid", "project: does not match the URL", field="project")
            return set_id
        container = self.directory.lookup(set_id)
        if container is not None:
            if given is not None and given != container.project:
                raise ApiError(422, "invalid", "project: is not the container's project", field="project")
            return container.project
        if given is not None:
            return given
        return self.rate_limits.project_of(scope, set_id) if patch else ""

    # -- aliases and custom domains ---------------------------------------------------

    def _alias_endpoints(self, request, rest: list[str]) -> tuple[int, Any]:
        """``/api/v1/proxy/aliases[/{alias}[/domains[/{domain}]]]``."""
        if self.aliases is None:
            raise ApiError(404, "not_found", "aliases are not kept on this node")
        if not rest:
            self._allow(request, b"GET", b"POST")
            return self._alias_list(request) if request.method == b"GET" else self._alias_create(request)
        alias = self._known_alias(rest[0])
        if len(rest) == 1:
            self._allow(request, b"GET", b"DELETE")
            if request.method == b"DELETE":
                if not self.aliases.delete(alias.alias):
                    raise ApiError(404, "not_found", "no such alias")
                return 204, None
            return 200, self._alias_json(alias, with_domains=True)
        if rest[1] != "domains" or len(rest) > 3:
            raise ApiError(404, "not_found", "no such endpoint")
        if len(rest) == 2:
            self._allow(request, b"GET", b"POST")
            if request.method == b"GET":
                return 200, {"domains": [self._domain_json(d, alias.alias)
                                         for d in self.aliases.domains(alias.alias)]}
            return self._domain_attach(request, alias.alias)
        self._allow(request, b"GET", b"DELETE")
        domain = rest[2].lower().rstrip(".")
        if domain not in self.aliases.domains(alias.alias):
            raise ApiError(404, "not_found", "no such domain on this alias")
        if request.method == b"GET":
            return 200, self._domain_json(domain, alias.alias)
        if not self.aliases.detach(domain, alias.alias):
            raise ApiError(404, "not_found", "no such domain on this alias")
        return 204, None

    def _known_alias(self, name: str):
        alias = self.aliases.get(name)
        if alias is None:
            raise ApiError(404, "not_found", "no such alias")
        return alias

    def _alias_url(self, alias: str) -> str:
        if self.base_url_for is not None:
            return self.base_url_for(alias)
        return alias_url(alias, self.aliases.suffix)

    def _alias_json(self, alias, with_domains: bool = False) -> dict[str, Any]:
        out = {"alias": alias.alias, "container_id": alias.container_id, "program": alias.program,
               "index": alias.index, "url": self._alias_url(alias.alias)}
        if with_domains:
            out["domains"] = self.aliases.domains(alias.alias)
        return out

    def _domain_json(self, domain: str, alias: str, with_status: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"domain": domain, "alias": alias, "cname": self.aliases.hostname(alias)}
        if with_status and self.certificate_status is not None:
            status = self.certificate_status(domain)
            if status is not None:
                out["certificate"] = status
        return out

    def _alias_list(self, request) -> tuple[int, Any]:
        query = parse_qs(request.uri.partition(b"?")[2].decode("latin-1"))
        container_id = query.get("container_id", [None])[0]
        if container_id is not None and not CONTAINER_ID.match(container_id):
            raise ApiError(422, "invalid", "container_id: must be 24 lowercase hexadecimal digits",
                           field="container_id")
        return 200, {"aliases": [self._alias_json(a, with_domains=True)
                                 for a in self.aliases.list(container_id)]}

    def _alias_create(self, request) -> tuple[int, Any]:
        body = _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(422, "invalid", "body: must be a JSON object", field="body")
        fields = ("container_id", "alias", "program", "index")
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise ApiError(422, "invalid", f"{unknown[0]}: unknown field", field=unknown[0])
        for name in fields:
            if name not in body:
                raise ApiError(422, "invalid", f"{name}: is required", field=name)
        try:
            alias = check_alias(body["alias"], self.aliases.reserved)
            container_id, program, index = check_target(body["container_id"], body["program"], body["index"],
                                                        self.aliases.programs)
        except InvalidAlias as e:
            raise ApiError(422, "invalid", str(e), field=e.field) from None
        # An alias is created for a container the node knows (its project comes from the
        # live map at each request; a container removed later leaves the alias, which then
        # answers 503 like the container's own URL).
        container = self.directory.lookup(container_id)
        if container is None:
            raise ApiError(422, "invalid", "container_id: no such container in the live map",
                           field="container_id")
        try:
            created = self.aliases.create(alias, container_id, program, index)
        except AliasExists:
            raise ApiError(409, "conflict", "alias: already exists on this node", field="alias") from None
        advice = target_advice(container, self.aliases.programs[program], index)
        return 201, _with_warnings(self._alias_json(created), advice)

    def _domain_attach(self, request, alias: str) -> tuple[int, Any]:
        body = _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(422, "invalid", "body: must be a JSON object", field="body")
        unknown = sorted(set(body) - {"domain"})
        if unknown:
            raise ApiError(422, "invalid", f"{unknown[0]}: unknown field", field=unknown[0])
        if "domain" not in body:
            raise ApiError(422, "invalid", "domain: is required", field="domain")
        try:
            domain = self.aliases.attach(alias, body["domain"])
        except InvalidAlias as e:
            raise ApiError(422, "invalid", str(e), field=e.field) from None
        except NoSuchAlias:
            raise ApiError(404, "not_found", "no such alias") from None
        except DomainExists as e:
            where = "this alias" if e.alias == alias else f"alias {e.alias}"
            raise ApiError(409, "conflict", f"domain: already attached to {where}", field="domain") from None
        return 201, self._domain_json(domain, alias, with_status=False)


class AdminRequest(Request):
    """A request to the admin API, judged at the end of its head.

    A refusal the head alone decides (:meth:`AdminAPI.head_refusal`: a bad token, a body
    announced over MAX_BODY) never reads the body into anything.  If the body announced is
    at most :data:`DRAIN_BODY`, it is read and dropped and the answer follows it, on a
    connection that stays usable: many clients (twisted.web's Agent among them) send a
    whole body before they read.  A longer one, or one of unknown length, is answered at
    once and the connection closes (lingering, see
    :class:`~hoodyproxy.frontend.http1.EarlyAnswerChannel`).  An accepted body is kept in
    memory up to MAX_BODY (a chunked one past it is answered 413 at once, and the
    connection closes), where stock twisted.web spools anything over 100 kB to a
    temporary file.
    """

    _answered = False
    _refusal: ApiError | None = None
    _received = 0

    def gotLength(self, length: int | None) -> None:
        take_site_request_line(self)
        self.content = None
        refusal = self.channel.site.resource.head_refusal(self, length) if length != 0 else None
        if refusal is None:
            self.content = io.BytesIO()
        elif length is not None and length <= DRAIN_BODY:
            self._refusal = refusal  # answered when the body is in (and dropped)
        else:
            self._answer(refusal, early=True)

    def handleContentChunk(self, data: bytes) -> None:
        if self._answered or self._refusal is not None:
            return
        self._received += len(data)
        if self._received > MAX_BODY:
            self.content = None
            self._answer(_too_large(), early=True)
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._answered:
            return
        if self._refusal is not None:
            self._answer(self._refusal, early=False)
            return
        super().requestReceived(command, path, version)

    def _answer(self, error: ApiError, early: bool) -> None:
        """Answer ``error`` without the body; ``early``: before the body's end, so the
        connection closes after the answer."""
        self._answered = True
        body = self.site.resource.error_response(self, error)
        self.setHeader(b"Date", http_date())
        self.setHeader(b"Content-Length", b"%d" % len(body))
        if early:
            self.channel.persistent = False
            self.setHeader(b"Connection", b"close")
        self.write(body)
        self.finish()


def admin_site(api: AdminAPI, reactor, head_timeout: float | None = None) -> Site:
    """The admin port's factory: ``api`` behind :class:`AdminRequest`; ``head_timeout``
    bounds how long a request head may take (408)."""
    return early_answer_site(api, AdminRequest, reactor, head_timeout)
