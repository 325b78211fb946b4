"""The ``ldap`` group: HTTP Basic credentials checked by an LDAP bind (ldap3, in a thread).

Spec (and stored form; :meth:`LDAPGroup.redact` hides ``bind_password``)::

    {"type": "ldap",
     "url": "ldaps://ldap.example:636",
     # either a DN template ...
     "user_dn": "uid={username},ou=people,dc=example,dc=org",
     # ... or a search, as bind_dn (or anonymously), for the one entry that matches
     "search_base": "ou=people,dc=example,dc=org",
     "search_filter": "(&(objectClass=person)(uid={username}))",
     "bind_dn": "cn=gateway,dc=example,dc=org", "bind_password": "...",
     "group_dn": "cn=staff,ou=groups,dc=example,dc=org",   # optional: must list the user
     "timeout": 5}

The username is escaped for where it goes (RFC 4514 in a DN, RFC 4515 in a filter):
an unescaped ``*`` or ``)`` would let a client pick whose password it is guessing.  An
empty password is refused before any bind (LDAP treats it as an anonymous bind, which
"succeeds").  Membership: the group entry's ``member`` or ``uniqueMember`` holds the
user's DN.  ldaps certificates are verified against the system CAs and the host name.
Successes are remembered for 30 s.
"""

from __future__ import annotations

import ssl
from typing import Any, Mapping
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.operation.search import parse_filter
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hoodyproxy.access.groups import (REDACTED, InvalidPermissions, _secrets, check_fields,
                                      check_number, check_string, check_url)
from hoodyproxy.access.groups.password import check_username
from hoodyproxy.interfaces import IGroupType

log = Logger()

CACHE_SECONDS = 30.0
CACHE_ENTRIES = 1024
DEFAULT_TIMEOUT = 5
MAX_TIMEOUT = 60
PLACEHOLDER = "{username}"


# -- parse -------------------------------------------------------------------------------

def _url(value: Any, field: str) -> str:
    parts = check_url(value, field, max_length=1024)
    if parts.scheme not in ("ldap", "ldaps"):
        raise InvalidPermissions(field, "must be ldap://host[:port] or ldaps://host[:port]")
    if parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidPermissions(field, "must be only scheme, host and port")
    return value


def _dn(value: Any, field: str) -> str:
    dn = check_string(value, field)
    try:
        parse_dn(dn)
    except Exception:  # ldap3's exceptions here cannot even be printed
        raise InvalidPermissions(field, "is not a valid DN") from None
    return dn


def _template(value: Any, field: str, kind: str) -> str:
    template = check_string(value, field)
    if PLACEHOLDER not in template:
        raise InvalidPermissions(field, f"must contain {PLACEHOLDER}")
    example = template.replace(PLACEHOLDER, "x")
    try:
        if kind == "dn":
            parse_dn(example)
        else:
            parse_filter(example, None, False, False, None, False)
    except Exception:
        raise InvalidPermissions(field, f"is not a valid {'DN' if kind == 'dn' else 'filter'} "
                                        f"with {PLACEHOLDER} in it") from None
    return template


# -- the bind, in a thread ---------------------------------------------------------------

class SearchBindRefused(LDAPException):
    """The gateway's own search account could not bind: a configuration problem."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "search bind refused"


def _server(stored: Mapping[str, Any]) -> ldap3.Server:
    parts = urlsplit(stored["url"])
    secure = parts.scheme == "ldaps"
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, sni=parts.hostname) if secure else None
    return ldap3.Server(parts.hostname, port=parts.port or (636 if secure else 389),
                        use_ssl=secure, tls=tls, get_info=ldap3.NONE,
                        connect_timeout=stored["timeout"])


def _connection(server: ldap3.Server, stored: Mapping[str, Any], user: str | None,
                password: str | None) -> ldap3.Connection:
    # auto_referrals=False: never carry the user's password to a server a referral names.
    return ldap3.Connection(server, user=user, password=password,
                            authentication=ldap3.SIMPLE if user else ldap3.ANONYMOUS,
                            receive_timeout=stored["timeout"], auto_referrals=False,
                            raise_exceptions=False, read_only=True)


def _entries(connection: ldap3.Connection, base: str, search_filter: str, scope: str,
             limit: int, timeout: float) -> list[str]:
    connection.search(base, search_filter, search_scope=scope,
                      attributes=[ldap3.NO_ATTRIBUTES], size_limit=limit,
                      time_limit=max(1, int(timeout)))
    return [r["dn"] for r in connection.response or () if r.get("type") == "searchResEntry"]


def authenticate(stored: Mapping[str, Any], username: str, password: str) -> bool:
    """True if ``username``/``password`` bind and the user is in ``group_dn`` if any.

    Blocking: run it in a thread.  Raises LDAPException when the server cannot be asked
    or refuses the search account.
    """
    server = _server(stored)
    timeout = stored["timeout"]
    opened: list[ldap3.Connection] = []
    try:
        lookup = None
        if "user_dn" in stored:
            user_dn = stored["user_dn"].replace(PLACEHOLDER, escape_rdn(username))
        else:
            lookup = _connection(server, stored, stored.get("bind_dn"), stored.get("bind_password"))
            opened.append(lookup)
            if not lookup.bind():
                raise SearchBindRefused(f"the search bind was refused: "
                                        f"{lookup.result.get('description')}")
            search_filter = stored["search_filter"].replace(PLACEHOLDER,
                                                            escape_filter_chars(username))
            found = _entries(lookup, stored["search_base"], search_filter, ldap3.SUBTREE, 2,
                             timeout)
            if len(found) != 1:
                return False  # no such user, or an ambiguous filter
            user_dn = found[0]
        user = _connection(server, stored, user_dn, password)
        opened.append(user)
        if not user.bind():
            return False
        if "group_dn" not in stored:
            return True
        dn = escape_filter_chars(user_dn)
        member = f"(|(member={dn})(uniqueMember={dn}))"
        # The gateway's own account may read groups the user cannot.
        reader = lookup if stored.get("bind_dn") else user
        return len(_entries(reader, stored["group_dn"], member, ldap3.BASE, 1, timeout)) == 1
    finally:
        for connection in opened:
            try:
                connection.unbind()
            except LDAPException:
                pass


# -- the group type ----------------------------------------------------------------------

@implementer(IGroupType)
class LDAPGroup:
    """Matches a request whose Basic credentials bind to the LDAP server (and, with
    ``group_dn``, whose user is a member of that group)."""

    name = "ldap"
    challenge = "basic"

    def __init__(self, reactor=None, clock=None):
        self._successes = _secrets.SuccessCache(CACHE_SECONDS, CACHE_ENTRIES,
                                                reactor=reactor, clock=clock)

    def parse(self, spec: Any, field: str) -> dict[str, Any]:
        spec = check_fields(spec, field, self.name, required=("url",),
                            optional=("user_dn", "search_base", "search_filter", "bind_dn",
                                      "bind_password", "group_dn", "timeout"))
        stored: dict[str, Any] = {"type": self.name, "url": _url(spec["url"], f"{field}.url")}
        if "user_dn" in spec:
            for key in ("search_base", "search_filter", "bind_dn", "bind_password"):
                if key in spec:
                    raise InvalidPermissions(f"{field}.{key}", "only with a search, not user_dn")
            stored["user_dn"] = _template(spec["user_dn"], f"{field}.user_dn", "dn")
        elif "search_base" in spec or "search_filter" in spec:
            for key in ("search_base", "search_filter"):
                if key not in spec:
                    raise InvalidPermissions(f"{field}.{key}", "is required with a search")
            stored["search_base"] = _dn(spec["search_base"], f"{field}.search_base")
            stored["search_filter"] = _template(spec["search_filter"],
                                                f"{field}.search_filter", "filter")
            if ("bind_dn" in spec) != ("bind_password" in spec):
                missing = "bind_password" if "bind_dn" in spec else "bind_dn"
                raise InvalidPermissions(f"{field}.{missing}",
                                         "bind_dn and bind_password go together")
            if "bind_dn" in spec:
                stored["bind_dn"] = _dn(spec["bind_dn"], f"{field}.bind_dn")
                stored["bind_password"] = check_string(spec["bind_password"],
                                                       f"{field}.bind_password")
                if stored["bind_password"] == REDACTED:
                    raise InvalidPermissions(f"{field}.bind_password", "is the redacted placeholder; "
                                             "send the real password, or use PATCH to keep the group")
        else:
            raise InvalidPermissions(f"{field}.user_dn", "needs user_dn, or search_base and "
                                                         "search_filter")
        if "group_dn" in spec:
            stored["group_dn"] = _dn(spec["group_dn"], f"{field}.group_dn")
        stored["timeout"] = check_number(spec.get("timeout", DEFAULT_TIMEOUT), f"{field}.timeout",
                                         minimum=0, maximum=MAX_TIMEOUT, exclusive_minimum=True)
        return stored

    def redact(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        shown = dict(stored)
        if "bind_password" in shown:
            shown["bind_password"] = REDACTED
        return shown

    def check(self, stored: Mapping[str, Any], credentials: Any) -> bool | Deferred[bool]:
        if credentials.basic is None:
            return False
        username, password = credentials.basic
        if not password:
            return False  # an empty password is an anonymous bind: never a success
        try:
            check_username(username, "username")
        except InvalidPermissions:
            return False
        key = self._successes.key(repr(sorted(stored.items())), username, password)
        d = self._successes.run(key, lambda: authenticate(stored, username, password))
        return d.addErrback(self._unreachable, stored["url"])

    @staticmethod
    def _unreachable(failure: Failure, url: str) -> bool:
        failure.trap(LDAPException)
        log.warn("LDAP {url} could not be asked: {error}", url=url,
                 error=failure.getErrorMessage())
        return False
