"""The ``password`` group: HTTP Basic with one username and password.

``{"type": "password", "username": "...", "password": "..."}`` is stored as
``{"type": "password", "username": "...", "password_hash": "scrypt$n$r$p$salt$hash"}``;
the clear password is never kept.  A check runs scrypt (tens of milliseconds) in a
thread; a success is remembered for a minute so a browser's repeated Basic headers do
not each cost one.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import Deferred
from zope.interface import implementer

from hoodyproxy.access.groups import (REDACTED, InvalidPermissions, _secrets, check_fields,
                                      check_string, one_of)
from hoodyproxy.interfaces import IGroupType

CACHE_SECONDS = 60.0
CACHE_ENTRIES = 1024


def check_username(value: Any, field: str) -> str:
    """A Basic-auth username: no colon (it ends the username) and no control characters."""
    username = check_string(value, field, max_length=256)
    if ":" in username or any(ord(c) < 0x20 or ord(c) == 0x7f for c in username):
        raise InvalidPermissions(field, "must not contain ':' or control characters")
    return username


@implementer(IGroupType)
class PasswordGroup:
    """Matches a request whose Basic credentials are the group's username and password.

    An unknown username is refused at once, without a scrypt: that a username exists can
    be timed, which is the price of not paying a scrypt per password group per request.
    """

    name = "password"
    challenge = "basic"

    def __init__(self, reactor=None, clock=None):
        self._successes = _secrets.SuccessCache(CACHE_SECONDS, CACHE_ENTRIES,
                                                reactor=reactor, clock=clock)

    def parse(self, spec: Any, field: str) -> dict[str, Any]:
        spec = check_fields(spec, field, self.name, required=("username",),
                            optional=("password", "password_hash"))
        username = check_username(spec["username"], f"{field}.username")
        key = one_of(spec, field, ("password", "password_hash"))
        if key == "password_hash":
            encoded = spec[key]
            try:
                _secrets.parse_password_hash(check_string(encoded, f"{field}.password_hash"))
            except ValueError as e:
                raise InvalidPermissions(f"{field}.password_hash", str(e)) from None
        else:
            password = check_string(spec["password"], f"{field}.password", max_length=1024)
            if password == REDACTED:
                # A GET shows this placeholder; PUTting it back must not become the password.
                raise InvalidPermissions(f"{field}.password", "is the redacted placeholder; "
                                         "send the real password, or use PATCH to keep the group")
            encoded = _secrets.hash_password(password)
        return {"type": self.name, "username": username, "password_hash": encoded}

    def redact(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        return {"type": self.name, "username": stored["username"], "password": REDACTED}

    def check(self, stored: Mapping[str, Any], credentials: Any) -> bool | Deferred[bool]:
        if credentials.basic is None:
            return False
        username, password = credentials.basic
        if not password or not _secrets.same_text(username, stored["username"]):
            return False
        encoded = stored["password_hash"]
        key = self._successes.key(stored["username"], encoded, password)
        return self._successes.run(key, lambda: _secrets.verify_password(password, encoded))
