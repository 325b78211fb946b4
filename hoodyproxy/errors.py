"""What can go wrong in a request: each error knows its status code and its JSON body.

Errors are raised anywhere on the request path and turned into a response once, at the
edge (:func:`hoodyproxy.frontend.http1` writes them).  Messages never echo client input
unescaped and never name internal addresses or ports.
"""

from __future__ import annotations

import json


class GatewayError(Exception):
    """A request that cannot be served; ``status``, ``code`` and ``message`` make the response."""

    status = 500
    code = "internal_error"
    message = "internal error"

    def __init__(self, message: str | None = None, *, reason: str | None = None,
                 headers: dict[bytes, bytes] | None = None) -> None:
        if message is not None:
            self.message = message
        #: a short reason for the audit line (may say more than the client is told)
        self.reason = reason or self.code
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self) -> bytes:
        """The JSON body sent to the client."""
        return json.dumps({"error": self.code, "message": self.message}).encode() + b"\n"


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"
    message = "the request is malformed"


class MissingHost(BadRequest):
    code = "missing_host"
    message = "the request has no Host"


class NotFound(GatewayError):
    status = 404
    code = "not_found"
    message = "no such service"


class UnknownHost(NotFound):
    code = "unknown_host"
    message = "this gateway serves no such host"


class WrongNode(NotFound):
    code = "wrong_node"
    message = "the host belongs to another node"


class BadLabel(NotFound):
    code = "bad_route"
    message = "the host label is not <project>-<container>-<program>-<index>"


class UnknownProgram(NotFound):
    code = "unknown_program"
    message = "no such program"


class IndexOutOfRange(NotFound):
    code = "index_out_of_range"
    message = "the index is out of range for this program"


class MisdirectedRequest(GatewayError):
    status = 421
    code = "misdirected_request"
    message = "this connection cannot serve this host; open a new connection for it"


class ContainerUnavailable(GatewayError):
    status = 503
    code = "container_unavailable"
    #: The same for an absent, a stopped and another project's container (no oracle).
    message = "the service is not available"

    def __init__(self, message: str | None = None, *, reason: str | None = None,
                 retry_after: int = 5) -> None:
        super().__init__(message, reason=reason,
                         headers={b"Retry-After": str(retry_after).encode()})


class BadGateway(GatewayError):
    status = 502
    code = "bad_gateway"
    message = "the container's service did not answer"


class GatewayTimeout(GatewayError):
    status = 504
    code = "gateway_timeout"
    message = "the container's service did not answer in time"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"
    message = "the request body is too large"


class AccessDenied(GatewayError):
    """A permission decision said no: 401 (with challenges) or 403; the body never says why."""

    def __init__(self, decision) -> None:
        self.status = decision.status
        self.code = "unauthorized" if decision.status == 401 else "forbidden"
        self._body = decision.body()
        headers = {}
        if decision.challenges:
            headers[b"WWW-Authenticate"] = [c.encode() for c in decision.challenges]
        super().__init__("access denied", reason=decision.reason, headers=headers)

    def body(self) -> bytes:
        return self._body
