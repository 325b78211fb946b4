"""The ``token`` group: ``Authorization: Bearer <value>`` carries a static secret token.

``{"type": "token", "value": "..."}`` is stored as ``{"type": "token", "value_sha256":
"<hex>"}``: tokens are meant to be long and random, so a fast digest is as good as a
slow hash, and a check costs one SHA-256 and a constant-time compare.  A short or
low-variety token is stored all the same, with advice (:meth:`TokenGroup.advise`): its
digest is then as guessable as the token itself.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from zope.interface import implementer

from hoodyproxy.access.groups import (REDACTED, InvalidPermissions, check_fields, check_string,
                                      one_of)
from hoodyproxy.access.groups._secrets import same_text, sha256_hex
from hoodyproxy.interfaces import IGroupType

#: Below these a token is stored with advice (see :meth:`TokenGroup.advise`), not refused.
MIN_LENGTH = 16
MIN_DISTINCT = 8
ONE_CLASS_MIN_LENGTH = 32
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
        # Any non-empty token is stored (the platform's own examples use short ones);
        # a guessable one gets advice from advise(), not a refusal.
        value = check_string(spec["value"], f"{field}.value", max_length=4096)
        if not _TOKEN.match(value):
            raise InvalidPermissions(f"{field}.value",
                                     "may hold only letters, digits and -._~+/ (then =)")
        return {"type": self.name, "value_sha256": sha256_hex(value)}

    def advise(self, spec: Mapping[str, Any], field: str) -> list[tuple[str, str]]:
        """Why a token ``parse`` accepted may be guessable: ``[(field, message)]``, or [].

        Short (under 16 characters), few distinct characters (under 8), or one class
        only (all digits, all lower-case or all upper-case letters) in under 32
        characters.  The message gives lengths and counts, never the token.
        """
        value = spec.get("value")
        if not isinstance(value, str) or not value:
            return []
        problems = []
        if len(value) < MIN_LENGTH:
            problems.append(f"is {len(value)} characters (under {MIN_LENGTH})")
        distinct = len(set(value))
        if distinct < MIN_DISTINCT:
            problems.append(f"has {distinct} distinct character{'' if distinct == 1 else 's'} "
                            f"(under {MIN_DISTINCT})")
        if len(value) < ONE_CLASS_MIN_LENGTH and (value.isdigit() or value.islower() and value.isalpha()
                                                  or value.isupper() and value.isalpha()):
            problems.append(f"is only digits or only letters of one case in under "
                            f"{ONE_CLASS_MIN_LENGTH} characters")
        if not problems:
            return []
        return [(f"{field}.value", "stored, but the token " + " and ".join(problems)
                 + ": it may be guessed; use a random one of 32 characters or more "
                   "(e.g. openssl rand -hex 32)")]

    def redact(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        return {"type": self.name, "value": REDACTED}

    def check(self, stored: Mapping[str, Any], credentials: Any) -> bool:
        if credentials.bearer is None:
            return False
        return same_text(sha256_hex(credentials.bearer), stored["value_sha256"])
