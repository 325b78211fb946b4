"""The permission decision: may this request pass, and how (pure: no reactor, no I/O).

Inputs are facts the gateway already has: the effective permission set, the names of
the groups whose credentials the request satisfies (checked elsewhere, possibly
asynchronously), the capability and level the request needs (from its service kind),
and whether it offered credentials at all.  The rules:

- no set: the request passes (the unguessable URL is the credential);
- the request passes if one matched group grants the capability at the needed level
  (``true`` grants every level, ``false`` none, a level grants itself and those below);
  a level-less capability needs ``true``;
- a WebSocket whose best grant is the lowest level of its capability (``read``,
  ``view``, ``query``) passes read-only;
- otherwise the set's default decides: ``allow`` passes; ``deny`` is a 401 with
  ``WWW-Authenticate`` challenges when no credentials were offered and a
  credential-based group exists, else a 403.

``reason`` is for the audit line only; what the client sees (:meth:`Decision.body`)
never says which group came close.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AbstractSet, Any, Mapping

from hoodyproxy.access.capabilities import LEVELS, UNCLASSIFIED
from hoodyproxy.access.model import PermissionSet

#: Challenge kinds in the order their headers are sent, with their scheme names.
_CHALLENGE_SCHEMES = (("basic", "Basic"), ("bearer", "Bearer"))

_BODIES = {
    400: {"error": "ambiguous_request",
          "message": "the request could mean more than this credential allows; send it plainly"},
    401: {"error": "unauthorized", "message": "credentials are required"},
    403: {"error": "forbidden", "message": "access denied"},
}


@dataclass(frozen=True, slots=True)
class Decision:
    """What the gateway does with a request.

    ``status`` is 200 when ``allowed``, else 401 or 403; ``group`` the group that allowed
    it (None when no set exists or the default allowed it); ``read_only`` asks that a
    WebSocket be forwarded read-only; ``challenges`` are the ``WWW-Authenticate`` values
    of a 401, in order; ``reason`` is for the audit line.
    """

    allowed: bool
    status: int
    group: str | None
    read_only: bool
    challenges: tuple[str, ...]
    reason: str
    #: Credentials were offered for a kind of group the set has, and none of those groups
    #: matched: a failed authentication (counted by the rate limiter, never in the body).
    auth_failed: bool = False

    def body(self) -> bytes:
        """The JSON body of a denial (the same for every denial with this status)."""
        return json.dumps(_BODIES.get(self.status, _BODIES[403])).encode() + b"\n"

    def audit(self) -> dict[str, Any]:
        """The decision's fields for the audit record."""
        return {"allowed": self.allowed, "group": self.group, "read_only": self.read_only,
                "reason": self.reason}


NO_SET = Decision(True, 200, None, False, (), "no permissions set")
DEFAULT_ALLOW = Decision(True, 200, None, False, (), "default allow")


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenges_for(challenge_kinds: AbstractSet[str], realm: str = "hoodyproxy") -> tuple[str, ...]:
    """The ``WWW-Authenticate`` values for ``challenge_kinds`` (Basic before Bearer; others ignored)."""
    return tuple(f"{scheme} realm={_quoted(realm)}"
                 for kind, scheme in _CHALLENGE_SCHEMES if kind in challenge_kinds)


def _rank(grant: Any, order: tuple[str, ...] | None) -> int:
    """How much ``grant`` allows: -1 nothing, i up to level ``order[i]``, len(order) everything."""
    if grant is True:
        return len(order) if order else 0
    if order and isinstance(grant, str) and grant in order:
        return order.index(grant)
    return -1


def _needed(level: str | None, order: tuple[str, ...] | None) -> int:
    """The rank a grant needs: a level-less capability (or an unknown level) needs ``true``."""
    if not order:
        return 0
    if isinstance(level, str) and level in order:
        return order.index(level)
    return len(order)  # no level, or one we do not know: only ``true`` is enough


def decide(pset: PermissionSet | None, matched_groups: AbstractSet[str], capability: str,
           level: str | None, *, websocket: bool, credentials_offered: bool,
           challenge_kinds: AbstractSet[str], realm: str = "hoodyproxy",
           levels: Mapping[str, tuple[str, ...]] = LEVELS) -> Decision:
    """Decide on a request; never raises for any input.

    ``matched_groups`` are the names of the groups (of ``pset``) whose credentials the
    request satisfies; names the set does not define are ignored.  ``challenge_kinds``
    is the ``challenge`` of every credential-based group in the set.
    """
    if pset is None:
        return NO_SET
    if not isinstance(capability, str):
        capability = UNCLASSIFIED
    order = levels.get(capability) or None
    needed = _needed(level, order)
    best_group, best_rank, best_grant = None, -1, None
    considered = []
    for name in sorted(g for g in matched_groups if isinstance(g, str) and g in pset.groups):
        considered.append(name)
        grant = pset.permissions.get(name, {}).get(capability)
        rank = _rank(grant, order)
        if rank > best_rank:
            best_group, best_rank, best_grant = name, rank, grant
    if best_group is not None and best_rank >= needed:
        read_only = bool(websocket and order and best_grant is not True and best_grant == order[0])
        return Decision(True, 200, best_group, read_only, (),
                        f"allowed by group {best_group}" + (" (read-only)" if read_only else ""))
    if pset.default == "allow":
        return DEFAULT_ALLOW
    need = capability if level is None else f"{capability}:{level}"
    if considered:
        reason = f"default deny: groups {', '.join(considered)} do not grant {need}"
    else:
        reason = f"default deny: no group matched ({need} needed)"
    challenges = () if credentials_offered else challenges_for(challenge_kinds, realm)
    if challenges:
        return Decision(False, 401, None, False, challenges, reason + "; credentials required")
    return Decision(False, 403, None, False, (), reason)


def refused(reason: str) -> Decision:
    """A request allowed only at a lower level than it might mean: 400 (see
    :mod:`hoodyproxy.access.ambiguity`); ``reason`` says what made it ambiguous."""
    return Decision(False, 400, None, False, (), "ambiguous request refused: " + reason)
