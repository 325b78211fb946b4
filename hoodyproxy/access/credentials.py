"""What a request offers to prove who it is: the client's address and any credentials."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Credentials:
    """The facts group checkers look at.

    ``client_ip`` is the TCP peer (never a header).  ``bearer`` comes from
    ``Authorization: Bearer``, else the ``hoody_token`` cookie, else the ``hoody_token``
    query parameter.  ``basic`` is the (username, password) of ``Authorization: Basic``.
    """

    client_ip: str
    bearer: str | None = None
    basic: tuple[str, str] | None = None

    @property
    def offered(self) -> bool:
        """True if the request carries any credential (an address alone is not one)."""
        return self.bearer is not None or self.basic is not None
