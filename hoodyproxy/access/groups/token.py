"""The ``token`` group: ``Authorization: Bearer <value>`` carries a static secret token.

``{"type": "token", "value": "..."}`` is stored as ``{"type": "token", "value_sha256":
"<hex>"}``: tokens are long and random, so a fast digest is as good as a slow hash, and
a check costs one SHA-256 and a constant-time compare.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from zope.interface import implementer

from hoodyproxy.access.groups import (REDACTED, InvalidPermissions, check_fields, check_string,
                                      one_of)
from hoodyproxy.access.groups._secrets import same_text, sha256_hex
from hoodyproxy.interfaces import IGroupType

MIN_LENGTH = 16
# RFC 6750 b64token: what can travel in an Authorization header, a cookie or a query.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}\Z")


@implementer(IGroupType)
class TokenGroup:
    """Matches a request whose bearer token is the group's token."""

    name = "token"
    challenge = "bearer"

    def parse(self, spec: Any, field: str) -> dict[str, Any]:
        spec = check_fields(spec, field, self.name, optional=("value", "value_sha256"))
        key = one_of(spec, field, ("value", "value_sha256"))
        if key == "value_sha256":
            digest = spec[key]
            if not isinstance(digest, str) or not _HEX_DIGEST.match(digest):
                raise InvalidPermissions(f"{field}.value_sha256",
                                         "must be 64 lower-case hex digits")
            return {"type": self.name, "value_sha256": digest}
        value = check_string(spec["value"], f"{field}.value", max_length=4096)
        if len(value) < MIN_LENGTH:
            raise InvalidPermissions(f"{field}.value", f"must be at least {MIN_LENGTH} characters")
        if not _TOKEN.match(value):
            raise InvalidPermissions(f"{field}.value",
                                     "may hold only letters, digits and -._~+/ (then =)")
        return {"type": self.name, "value_sha256": sha256_hex(value)}

    def redact(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        return {"type": self.name, "value": REDACTED}

    def check(self, stored: Mapping[str, Any], credentials: Any) -> bool:
        if credentials.bearer is None:
            return False
        return same_text(sha256_hex(credentials.bearer), stored["value_sha256"])
