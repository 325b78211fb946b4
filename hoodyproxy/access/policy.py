"""Step 3 of the request path: what a request offers, which groups it satisfies, the decision.

:meth:`Policy.authorize` finds the effective permission set (container over project),
reads the request's credentials (``Authorization``, the ``hoody_token`` cookie, the
``hoody_token`` query parameter), runs every group's check (a raising plugin is logged
and counts as no match), classifies the request into a capability and level, and hands
the facts to the pure :func:`hoodyproxy.access.decision.decide`.  It also says which
credentials the gateway consumed, so they are removed before forwarding.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger

from hoodyproxy.access.ambiguity import refusal, strictest_of
from hoodyproxy.access.capabilities import classify, level_orders
from hoodyproxy.access.credentials import Credentials
from hoodyproxy.access.decision import NO_SET, Decision, decide, refused
from hoodyproxy.access.model import PermissionSet, challenge_kinds

log = Logger()
TOKEN_NAME = b"hoody_token"


@dataclass(frozen=True, slots=True)
class Consumed:
    """How to forward a request whose credentials the gateway used."""

    uri: bytes                   # the request target without the hoody_token parameter
    drop_authorization: bool     # the Authorization header was for the gateway
    cookie: bytes | None         # the Cookie header without hoody_token (None: unchanged)


def strip_query_token(uri: bytes, *, any_case: bool = False) -> tuple[bytes, bytes | None]:
    """(uri without any hoody_token parameter, the first token's value or None).

    ``any_case`` also removes the parameter spelled in another case (``Hoody_Token``),
    which the gateway does not take as a credential but the audit line does not keep.
    """
    path, sep, query = uri.partition(b"?")
    if not sep or (b"%" not in query and TOKEN_NAME not in query.lower()):
        return uri, None  # (no parameter can decode to the name: the query as it is)
    return _strip_query_token_by_parts(path, query, any_case)


def _strip_query_token_by_parts(path: bytes, query: bytes, any_case: bool) -> tuple[bytes, bytes | None]:
    """:func:`strip_query_token` of ``path?query``, parameter by parameter (any query)."""
    kept, token = [], None
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        decoded = unquote_to_bytes(name.replace(b"+", b" "))
        if decoded == TOKEN_NAME or (any_case and decoded.lower() == TOKEN_NAME):
            if token is None:
                token = unquote_to_bytes(value.replace(b"+", b" "))
            continue
        kept.append(part)
    return (path + b"?" + b"&".join(kept)) if kept else path, token


def _strip_cookie_token(cookies: list[bytes]) -> tuple[bytes | None, bytes | None]:
    """(Cookie header value without hoody_token, the token) or (None, None) if absent."""
    token, kept, found = None, [], False
    for header in cookies:
        for part in header.split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name == TOKEN_NAME:
                found = True
                if token is None:
                    token = value.strip(b'"')
                continue
            if part.strip():
                kept.append(part.strip())
    if not found:
        return None, None
    return b"; ".join(kept), token


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_credentials(client_ip: str, uri: bytes, headers) -> tuple[Credentials, Consumed]:
    """The credentials a request offers, and the request as forwarded without them."""
    bearer = basic = None
    auth = headers.getRawHeaders(b"authorization")
    if auth:
        scheme, _, value = auth[0].strip().partition(b" ")
        scheme = scheme.lower()
        if scheme == b"bearer" and value.strip():
            bearer = _text(value.strip())
        elif scheme == b"basic":
            try:
                user, sep, password = base64.b64decode(value.strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                sep = b""
            if sep:
                user_text, password_text = _text(user), _text(password)
                if user_text is not None and password_text is not None:
                    basic = (user_text, password_text)
    cookie_value, cookie_token = _strip_cookie_token(headers.getRawHeaders(b"cookie") or [])
    new_uri, query_token = strip_query_token(uri)
    if bearer is None:
        bearer = _text(cookie_token) if cookie_token else _text(query_token) if query_token else None
    return (Credentials(client_ip, bearer or None, basic),
            Consumed(new_uri, bool(auth), cookie_value))


def _failed(pset: PermissionSet, matched: set[str], credentials: Credentials, registry: Mapping[str, Any]) -> bool:
    """True if the request offered a credential of a kind some group of ``pset`` checks
    (a bearer token, a Basic password) and no such group accepted it."""
    offered = {"bearer"} if credentials.bearer is not None else set()
    if credentials.basic is not None:
        offered.add("basic")
    checked = False
    for name, stored in pset.groups.items():
        provider = registry.get(str(stored.get("type")))
        if getattr(provider, "challenge", None) in offered:
            if name in matched:
                return False
            checked = True
    return checked


class Policy:
    """Decides on requests against the permission store, with the group types given."""

    def __init__(self, store, registry: Mapping[str, Any], kinds: Mapping[str, Any], realm: str = "hoodyproxy") -> None:
        self.store = store
        self.registry = registry
        self.kinds = kinds
        self.levels = level_orders(kinds)
        self.realm = realm

    def effective(self, project: str, container: str) -> PermissionSet | None:
        return self.store.effective(project, container)

    def authorize(self, pset: PermissionSet, credentials: Credentials, kind: Any, method: bytes, path: bytes,
                  websocket: bool, *, target: bytes | None = None, has_body: bool = False,
                  header_names: Any = ()) -> Decision | defer.Deferred:
        """The decision for a request under ``pset`` (a Deferred when a group check is asynchronous).

        ``kind`` is a kind's name or provider; ``target`` the path and query as the
        container receives them (default ``path``); ``has_body`` and ``header_names`` let a
        grant below the kind's strictest refuse an ambiguous request (400, see
        :mod:`hoodyproxy.access.ambiguity`).
        """
        if pset is None:
            return NO_SET
        if isinstance(kind, str):
            kind = self.kinds.get(kind) or kind
        capability, level = classify(kind, method, path, websocket, self.kinds)
        matched: set[str] = set()
        pending: list[defer.Deferred] = []
        for name, stored in pset.groups.items():
            provider = self.registry.get(str(stored.get("type")))
            if provider is None:
                continue
            try:
                result = provider.check(stored, credentials)
            except Exception:
                log.failure("permission group {name} ({type}) raised; counted as no match",
                            name=name, type=stored.get("type"))
                continue
            if isinstance(result, defer.Deferred):
                pending.append(result.addCallbacks(
                    lambda ok, name=name: matched.add(name) if ok is True else None,
                    lambda failure, name=name, t=stored.get("type"): log.failure(
                        "permission group {name} ({type}) failed; counted as no match", failure,
                        name=name, type=t)))
            elif result is True:
                matched.add(name)

        def finish(_=None) -> Decision:
            kinds = challenge_kinds(pset, self.registry)

            def decide_for(needs: tuple[str, str | None]) -> Decision:
                return decide(pset, matched, needs[0], needs[1], websocket=websocket,
                              credentials_offered=credentials.offered, challenge_kinds=kinds,
                              realm=self.realm, levels=self.levels)
            decision = decide_for((capability, level))
            if credentials.offered and _failed(pset, matched, credentials, self.registry):
                decision = dataclasses.replace(decision, auth_failed=True)
            strictest = strictest_of(kind)
            if not decision.allowed or strictest is None or (capability, level) == strictest:
                return decision
            if decide_for(strictest).allowed:
                return decision  # the grant covers whatever the request might mean
            why = refusal(kind, method, path if target is None else target, websocket, has_body,
                          header_names, (capability, level))
            return decision if why is None else refused(why)
        if pending:
            return defer.DeferredList(pending, consumeErrors=True).addCallback(finish)
        return finish()
