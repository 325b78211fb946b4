"""Who may do what: permission sets, capability classification, the decision, the store.

The pure core (:mod:`~hoodyproxy.access.model`, :mod:`~hoodyproxy.access.capabilities`,
:mod:`~hoodyproxy.access.decision`) has no reactor and no I/O;
:mod:`~hoodyproxy.access.store` keeps sets in the node's database; group types (how a
request's credentials are checked) live in :mod:`hoodyproxy.access.groups`.
"""

from hoodyproxy.access.capabilities import LEVELS, ServiceKind, classify, service_kinds
from hoodyproxy.access.credentials import Credentials
from hoodyproxy.access.decision import Decision, decide
from hoodyproxy.access.model import (
    InvalidPermissions,
    PermissionSet,
    challenge_kinds,
    parse_permission_set,
    to_json,
    to_stored_json,
)
from hoodyproxy.access.store import PermissionStore

__all__ = [
    "LEVELS", "Credentials", "Decision", "InvalidPermissions", "PermissionSet", "PermissionStore",
    "ServiceKind", "challenge_kinds", "classify", "decide", "parse_permission_set", "service_kinds",
    "to_json", "to_stored_json",
]
