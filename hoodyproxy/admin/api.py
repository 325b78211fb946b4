"""The admin REST API (a twisted.web Resource): containers, permission sets, rate limits, aliases and domains.

Every request needs ``Authorization: Bearer <admin token>``, but the health paths
(:data:`HEALTH_PATHS`: ``/healthz``, ``/livez``, ``/readyz``) and ``GET /metrics``
(:mod:`hoodyproxy.admin.metrics`, which has a token of its own).  A 2xx answer means the
change is committed to disk, or, with the shared store (``[store] backend = "etcd"``),
committed by etcd; when etcd cannot commit, 503 ``store_unavailable`` and nothing
changed.  Errors are a status and a short JSON body naming what was
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
import re
from dataclasses import replace
from typing import Any, Iterable
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from hoodyproxy.access.model import InvalidPermissions, advise, parse_permission_set, to_json
from hoodyproxy.aliases import (AliasExists, DomainExists, InvalidAlias, NoSuchAlias, alias_url, check_alias,
                                check_target, target_advice)
from hoodyproxy.admin.taps import STREAMING
from hoodyproxy.config import ConfigError
from hoodyproxy.directory import InvalidContainer, container_from_json
from hoodyproxy.directory._model import CONTAINER_ID
from hoodyproxy.frontend.http1 import REASONS, SERVER, early_answer_site, http_date, take_site_request_line
from hoodyproxy.limits import InvalidRateLimit, merge_rate_limits, parse_rate_limits
from hoodyproxy.reload import NoConfigFile
from hoodyproxy.store import StoreUnavailable

log = Logger()
MAX_BODY = 1024 * 1024
#: A refused request's body, announced at most this long, is read and dropped before the
#: answer (the connection stays usable); a longer one is never read.
DRAIN_BODY = 2 * MAX_BODY
#: Paths answered without a token: health (the process answers), liveness (the same),
#: readiness (200 once started, 503 while starting or draining).
HEALTH_PATHS = (b"/healthz", b"/api/v1/health", b"/livez", b"/readyz")
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


def _store_unavailable(e: StoreUnavailable) -> ApiError:
    return ApiError(503, "store_unavailable", str(e), {b"Retry-After": b"1"})


def _after(call, then, errors=lambda e: None):
    """``then(call())``, at once, or when ``call()`` answers a Deferred (a shared store's
    write), when it fires.  An exception ``errors(e)`` translates is raised as that
    ApiError, from ``call`` or from its Deferred."""
    def translate(e: BaseException) -> BaseException:
        if isinstance(e, StoreUnavailable):
            return _store_unavailable(e)
        translated = errors(e) if isinstance(e, Exception) else None
        return translated if translated is not None else e
    try:
        result = call()
    except Exception as e:
        translated = translate(e)
        if translated is e:
            raise
        raise translated from None
    if not isinstance(result, defer.Deferred):
        return then(result)

    def failed(failure):
        translated = translate(failure.value)
        if translated is failure.value:
            return failure
        raise translated
    return result.addCallbacks(then, failed)


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
    state to the domain reads.  ``shared`` (with the etcd store) lets the container and
    alias lists take ``?node=<name>`` or ``?node=*``: what the shared store holds of other
    nodes (published containers, aliases).  ``rate_limits`` is a
    :class:`hoodyproxy.limits.store.RateLimitStore` (without one the rate-limit endpoints
    answer 404).  ``readiness()`` answers ``(ready, why)`` for ``GET /readyz`` (None:
    always ready); ``reload()`` reads the config again for ``POST /api/v1/reload`` (a
    :meth:`hoodyproxy.service.NodeService.reload`; None: 404).
    """

    isLeaf = True

    def __init__(self, directory, token: str, *, permissions=None, registry=None, aliases=None,
                 base_url_for=None, certificate_status=None, rate_limits=None, taps=None,
                 readiness=None, reload=None, shared=None,
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
        self.readiness = readiness
        self.reload = reload
        #: The shared store's view of every node (hoodyproxy.store.mirror.SharedState), or
        #: None: then ``?node=`` lists are refused.
        self.shared = shared
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
                status, body = self._health(request.path)
            elif request.path == METRICS_PATH and self.metrics is not None:
                return self.metrics.render(self, request)
            else:
                self._authenticate(request)
                answer = self._dispatch(request)
                if isinstance(answer, defer.Deferred):
                    # A write through the shared store: answered when etcd has committed.
                    answer.addCallbacks(lambda result: self._answer_later(request, *result),
                                        lambda failure: self._fail_later(request, failure))
                    return NOT_DONE_YET
                status, body = answer
                if body is STREAMING:
                    return NOT_DONE_YET
        except ApiError as e:
            return self.error_response(request, e)
        except StoreUnavailable as e:
            return self.error_response(request, _store_unavailable(e))
        except Exception:
            log.failure("admin API request failed")
            status, body = 500, {"error": "internal_error", "message": "internal error"}
        return self._response(request, status, body)

    def _health(self, path: bytes) -> tuple[int, Any]:
        """``/readyz``: 200 when the node is ready, else 503 saying why (``starting``,
        ``draining``); the others: 200 whenever the process answers at all."""
        if path == b"/readyz" and self.readiness is not None:
            ready, why = self.readiness()
            if not ready:
                return 503, {"status": why}
        return 200, {"status": "ok"}

    def _answer_later(self, request, status: int, body: Any) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.write(self._response(request, status, body))
        request.finish()

    def _fail_later(self, request, failure) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        error = failure.value
        if isinstance(error, StoreUnavailable):
            error = _store_unavailable(error)
        if isinstance(error, ApiError):
            body = self.error_response(request, error)
        else:
            log.failure("admin API request failed", failure)
            body = self._response(request, 500, {"error": "internal_error", "message": "internal error"})
        request.write(body)
        request.finish()

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
        if parts[2:] == ["reload"] and self.reload is not None:
            return self._reload(request)
        raise ApiError(404, "not_found", "no such endpoint")

    def _reload(self, request) -> tuple[int, Any]:
        """``POST /api/v1/reload``: read the config file again, as SIGHUP does."""
        self._allow(request, b"POST")
        try:
            plan = self.reload()
        except NoConfigFile as e:
            raise ApiError(409, "no_config", str(e)) from None
        except ConfigError as e:
            raise ApiError(422, "invalid_config", str(e), field=e.key) from None
        return 200, plan.to_json()

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
        node = self._node_query(query)
        if node is not None:
            listed = []
            for owner, _, value in self.shared.view("containers", None if node == "*" else node):
                entry = json.loads(value)
                if project is None or entry.get("project") == project:
                    listed.append({**entry, "node": owner})
            return 200, {"containers": listed}
        return 200, {"containers": [c.to_json() for c in self.directory.list(project)]}

    def _node_query(self, query: dict) -> str | None:
        """``?node=`` of a list: a node name or ``*``, read from the shared store's view."""
        node = query.get("node", [None])[0]
        if node is None:
            return None
        if self.shared is None:
            raise ApiError(422, "invalid", "node: only a node on the shared store ([store] backend = \"etcd\") "
                                           "lists other nodes", field="node")
        if node != "*" and not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", node):
            raise ApiError(422, "invalid", "node: must be a node name or *", field="node")
        return node

    def _container(self, request, container_id: str) -> tuple[int, Any]:
        self._allow(request, b"GET", b"PUT", b"DELETE")
        if not CONTAINER_ID.match(container_id):
            raise ApiError(404, "not_found", "container ids are 24 lowercase hexadecimal digits")
        if request.method == b"GET":
            container = self.directory.lookup(container_id)
            if container is None:
                raise ApiError(404, "not_found", "no such container")
            return 200, container.to_json()
        force = self._force(request)
        if request.method == b"DELETE":
            if not force:
                self._refuse_if_provided(container_id)
            if not self.directory.delete(container_id):
                raise ApiError(404, "not_found", "no such container")
            return 204, None
        try:
            container = container_from_json(container_id, _json_body(request))
        except InvalidContainer as e:
            raise ApiError(422, "invalid", str(e), field=e.field) from None
        container = replace(container, source="admin")
        existed = self.directory.lookup(container_id) is not None
        if force:
            # The entry becomes the admin's: the provider leaves it alone from now on.
            self.directory.put(container)
        elif not self.directory.put_owned(container):
            raise self._conflict(self.directory.lookup(container_id))
        return (200 if existed else 201), container.to_json()

    @staticmethod
    def _force(request) -> bool:
        """``?force=true``: write over an entry a provider owns (``false``, the default: 409)."""
        query = parse_qs(request.uri.partition(b"?")[2].decode("latin-1"), keep_blank_values=True)
        value = query.get("force", ["false"])[-1]
        if value not in ("true", "false"):
            raise ApiError(422, "invalid", "force: must be true or false", field="force")
        return value == "true"

    def _refuse_if_provided(self, container_id: str) -> None:
        """409 if a provider (not the admin API) owns the entry."""
        current = self.directory.lookup(container_id)
        if current is not None and current.source != "admin":
            raise self._conflict(current)

    @staticmethod
    def _conflict(current) -> ApiError:
        source = current.source if current is not None else "another"
        return ApiError(409, "conflict", f"this container is managed by the {source} provider, which "
                                         f"would undo the change; ?force=true makes it the admin's",
                        field="source")

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
            def deleted(existed: bool) -> tuple[int, Any]:
                if not existed:
                    raise ApiError(404, "not_found", f"no permission set for this {scope}")
                return 204, None
            return _after(lambda: store.delete(scope, set_id), deleted)
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

        def written(result: tuple[Any, bool]) -> tuple[int, Any]:
            pset, created = result
            advice = advise(body, registry)
            for field, message in advice:
                # The field and the advice only: a message never holds the secret itself.
                log.warn("admin API: permission set of {scope} {id}: {field}: {advice}",
                         scope=scope, id=set_id, field=field, advice=message)
            return (201 if created else 200), _with_warnings(to_json(pset, registry), advice)

        if request.method == b"PUT":
            pset = parse()
            return _after(lambda: store.put(pset), lambda replaced: written((pset, not replaced)))
        # A PATCH with no set yet creates one (merged into empty): the platform sends
        # its whole set as a PATCH whether or not the node has one.
        return _after(lambda: store.merge(scope, set_id, parse), written)

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
                return _after(lambda: self.aliases.delete(alias.alias), self._gone("no such alias"))
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
        return _after(lambda: self.aliases.detach(domain, alias.alias), self._gone("no such domain on this alias"))

    @staticmethod
    def _gone(missing: str):
        """What a DELETE answers: 204, or 404 ``missing`` when there was nothing to delete."""
        def answer(existed: bool) -> tuple[int, Any]:
            if not existed:
                raise ApiError(404, "not_found", missing)
            return 204, None
        return answer

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
        node = self._node_query(query)
        if node is not None:
            from hoodyproxy.store.keys import alias_from_value
            listed = []
            for owner, name, value in self.shared.view("aliases", None if node == "*" else node):
                entry, domains = alias_from_value(name, value)
                if container_id is None or entry.container_id == container_id:
                    listed.append({"alias": name, "node": owner, "container_id": entry.container_id,
                                   "program": entry.program, "index": entry.index,
                                   "url": f"https://{name}.{owner}.{self.aliases.zone}/", "domains": sorted(domains)})
            return 200, {"aliases": listed}
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
        def exists(e: Exception) -> ApiError | None:
            if isinstance(e, AliasExists):
                return ApiError(409, "conflict", "alias: already exists on this node", field="alias")
            return None

        def created(entry) -> tuple[int, Any]:
            advice = target_advice(container, self.aliases.programs[program], index)
            return 201, _with_warnings(self._alias_json(entry), advice)
        return _after(lambda: self.aliases.create(alias, container_id, program, index), created, exists)

    def _domain_attach(self, request, alias: str) -> tuple[int, Any]:
        body = _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(422, "invalid", "body: must be a JSON object", field="body")
        unknown = sorted(set(body) - {"domain"})
        if unknown:
            raise ApiError(422, "invalid", f"{unknown[0]}: unknown field", field=unknown[0])
        if "domain" not in body:
            raise ApiError(422, "invalid", "domain: is required", field="domain")
        def refused(e: Exception) -> ApiError | None:
            if isinstance(e, InvalidAlias):
                return ApiError(422, "invalid", str(e), field=e.field)
            if isinstance(e, NoSuchAlias):
                return ApiError(404, "not_found", "no such alias")
            if isinstance(e, DomainExists):
                where = "this alias" if e.alias == alias else f"alias {e.alias}"
                return ApiError(409, "conflict", f"domain: already attached to {where}", field="domain")
            return None
        return _after(lambda: self.aliases.attach(alias, body["domain"]),
                      lambda domain: (201, self._domain_json(domain, alias, with_status=False)), refused)


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
