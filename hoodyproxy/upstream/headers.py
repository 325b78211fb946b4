"""Header rewriting between client and container (pure): hop-by-hop out, forwarding in.

RFC 9110 section 7.6.1: ``Connection`` and every header it names, ``Keep-Alive``,
``Proxy-Connection``, ``TE``, ``Transfer-Encoding`` and ``Upgrade`` belong to one hop and
are never forwarded (an Upgrade the gateway relays is re-added by the gateway).  The
forwarding headers are always the gateway's own: whatever the client sent in their place
is dropped, so a client cannot claim another address -- in any spelling: names are
compared with ``_`` and ``-`` alike (CGI and WSGI servers merge ``X_Forwarded_For`` with
``X-Forwarded-For``), and every header some framework reads a client address from
(``True-Client-IP``, ``CF-Connecting-IP``...) is dropped too.
"""

from __future__ import annotations

from itertools import compress
from operator import not_
from typing import Iterable

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding",
    b"upgrade", b"trailer", b"proxy-authenticate", b"proxy-authorization",
})

#: Request headers the gateway always sets itself (the client's are dropped).
GATEWAY_OWNED = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
    b"forwarded", b"x-real-ip", b"x-hoody-instance", b"content-length", b"expect", b"host",
})

#: Request headers some server or framework reads the client's address from: a client's
#: are dropped (the gateway's own forwarding headers are the only truth).
CLIENT_ADDRESS_HEADERS = frozenset({
    b"true-client-ip", b"x-client-ip", b"x-cluster-client-ip", b"cf-connecting-ip",
    b"fastly-client-ip", b"x-original-forwarded-for", b"x-forwarded", b"forwarded-for",
    b"x-originating-ip", b"x-remote-ip", b"x-remote-addr", b"client-ip", b"x-proxyuser-ip",
    b"x-envoy-external-address", b"x-true-client-ip", b"x-original-client-ip", b"x-real-client-ip",
    b"x-appengine-user-ip", b"x-azure-clientip", b"x-azure-socketip", b"akamai-client-ip",
    b"x-proxy-client-ip", b"wl-proxy-client-ip", b"x-forwarded-server", b"x-client-address",
})

#: Every request header name the gateway never forwards as the client sent it.
_DROPPED = HOP_BY_HOP | GATEWAY_OWNED | CLIENT_ADDRESS_HEADERS

_NONE: frozenset[bytes] = frozenset()

#: The hop-by-hop names but Connection (a response with only that one takes a short way).
_HOP_BUT_CONNECTION = HOP_BY_HOP - {b"connection"}

INSTANCE_HEADER = b"X-Hoody-Instance"


def header_key(name: bytes) -> bytes:
    """A header name as servers that read ``_`` as ``-`` compare it: lower case, ``-``."""
    name = name.lower()
    return name.replace(b"_", b"-") if b"_" in name else name


def named_by(value: bytes) -> frozenset[bytes]:
    """The field names one Connection value lists, as :func:`header_key` compares them
    (kept for the values in use: nginx and browsers send ``keep-alive`` every time)."""
    named = _named.get(value)
    if named is None:
        named = frozenset(header_key(t.strip()) for t in value.split(b",") if t.strip())
        if len(_named) >= NAMED_CACHE_SIZE:
            _named.clear()
        _named[value] = named
    return named


_named: dict[bytes, frozenset[bytes]] = {}
#: Connection values whose names are kept; then the cache restarts.
NAMED_CACHE_SIZE = 256


def connection_tokens(headers: Iterable[tuple[bytes, bytes]],
                      lnames: list[bytes] | None = None) -> set[bytes] | frozenset[bytes]:
    """The lowercase tokens of every Connection header (``lnames``: the names of a list
    ``headers`` in lower case, one for one, if the caller has them)."""
    if lnames is not None:
        count = lnames.count(b"connection")
        if count == 0:
            return _NONE
        if count == 1:
            return named_by(headers[lnames.index(b"connection")][1])
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens |= named_by(value)
    return tokens


def wants_websocket(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True if the request asks to upgrade to WebSocket (``Connection: upgrade`` + ``Upgrade: websocket``)."""
    headers = list(headers)
    if b"upgrade" not in connection_tokens(headers):
        return False
    return any(name.lower() == b"upgrade"
               and any(p.strip().split(b"/", 1)[0].strip().lower() == b"websocket" for p in value.split(b","))
               for name, value in headers)


def forwarded_for(client_ip: str) -> bytes:
    """The ``for=`` value of RFC 7239 for an address (IPv6 quoted and bracketed)."""
    if ":" in client_ip:
        return b'"[' + client_ip.encode() + b']"'
    return client_ip.encode()


_forwarding_blocks: dict[tuple[str, bytes, bytes], bytes] = {}
#: Forwarding blocks kept (one per client address and host in use); then the cache restarts.
FORWARDING_CACHE_SIZE = 4096


def forwarding_block(client_ip: str, host: bytes, proto: bytes) -> bytes:
    """The gateway's forwarding headers for a client, host and scheme, built once per
    (client, host, scheme) while they are in use: a client's requests repeat them."""
    key = (client_ip, host, proto)
    block = _forwarding_blocks.get(key)
    if block is None:
        ip = client_ip.encode()
        block = b"".join((b"X-Forwarded-For: ", ip, b"\r\nX-Forwarded-Proto: ", proto,
                          b"\r\nX-Forwarded-Host: ", host, b"\r\nX-Real-IP: ", ip,
                          b"\r\nForwarded: for=", forwarded_for(client_ip), b";host=\"", host.replace(b'"', b""),
                          b"\";proto=", proto, b"\r\n"))
        if len(_forwarding_blocks) >= FORWARDING_CACHE_SIZE:
            _forwarding_blocks.clear()
        _forwarding_blocks[key] = block
    return block


def build_request_head(method: bytes, uri: bytes, headers: Iterable[tuple[bytes, bytes]], *,
                       host: bytes, client_ip: str, proto: bytes = b"https",
                       body_length: int | None, upgrade: bool = False,
                       instance: int | None = None, drop: frozenset[bytes] = frozenset(),
                       lnames: list[bytes] | None = None) -> bytes:
    """The HTTP/1.1 request head the gateway sends to a container.

    ``body_length`` None means the body length is unknown and is sent chunked; 0 means no body.
    ``drop`` names further (lowercase) headers to remove, such as consumed credentials.
    ``lnames``: the names of ``headers`` in lower case, one for one, when the caller has
    them (a list of another length is not used).
    """
    if type(headers) is not list:
        headers = list(headers)
    if lnames is None or len(lnames) != len(headers):
        lnames = [name.lower() for name, _ in headers]
    out = [method, b" ", uri, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    kept = _kept(headers, lnames, connection_tokens(headers, lnames), drop)
    if kept:
        out += (b"\r\n".join(map(b": ".join, kept)), b"\r\n")
    out.append(forwarding_block(client_ip, host, proto))
    if instance is not None:
        out += (INSTANCE_HEADER, b": %d\r\n" % instance)
    if upgrade:
        out.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
    if body_length is None:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif body_length or method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"):
        out.append(b"Content-Length: %d\r\n" % body_length)
    out.append(b"\r\n")
    return b"".join(out)


def _kept(headers: list[tuple[bytes, bytes]], lnames: list[bytes], named: frozenset[bytes] | set[bytes],
          drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """The fields :func:`build_request_head` forwards: every field but those whose name (with
    ``_`` read as ``-``) is the gateway's, hop-by-hop, named by a Connection field or in
    ``drop``; past a few fields by C iterators rather than a pass in Python over each."""
    keys = lnames if b"_" not in b"".join(lnames) else [key.replace(b"_", b"-") for key in lnames]
    dropped = _DROPPED
    if named and not named.isdisjoint(keys):
        dropped = dropped | named
    if drop and not drop.isdisjoint(keys):
        dropped = dropped | drop
    if len(keys) <= 4:  # (a few fields: a loop costs less than setting up the iterators)
        kept = []
        for pair, key in zip(headers, keys):
            if key not in dropped:
                kept.append(pair)
        return kept
    return list(compress(headers, map(not_, map(dropped.__contains__, keys))))


def response_headers(headers: list[tuple[bytes, bytes]], *, upgrade: bool = False,
                     lnames: list[bytes] | None = None) -> list[tuple[bytes, bytes]]:
    """The container's response headers as the client gets them: hop-by-hop removed.

    For a 101 to a WebSocket upgrade, ``Connection`` and ``Upgrade`` are the point of
    the response and are kept (re-written canonically).  ``lnames``, the names in lower
    case when the caller has them already, saves a pass.
    """
    # One pass for the names (lower-cased once), one to filter; no hop-by-hop field at all
    # (a container that sends no Connection) returns the list as it came.
    if lnames is None or len(lnames) != len(headers):
        lnames = [name.lower() for name, _ in headers]
    if HOP_BY_HOP.isdisjoint(lnames):
        out = list(headers) if upgrade else headers
    elif not upgrade and lnames.count(b"connection") == 1 and _HOP_BUT_CONNECTION.isdisjoint(lnames):
        # The usual hop-by-hop field: one ``Connection: keep-alive`` (nginx's), naming no
        # field present.  Cut out by its index (C loops; the general pass below agrees).
        i = lnames.index(b"connection")
        if named_by(headers[i][1]).isdisjoint(lnames):
            return headers[:i] + headers[i + 1:]
        return _without_hop_by_hop(headers, lnames)
    else:
        out = _without_hop_by_hop(headers, lnames)
    if upgrade:
        out += [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    return out


def _without_hop_by_hop(headers: list[tuple[bytes, bytes]], lnames: list[bytes]) -> list[tuple[bytes, bytes]]:
    """``headers`` without the hop-by-hop fields and those a Connection names (any field list)."""
    named: set[bytes] = set()
    for (name, value), lname in zip(headers, lnames):
        if lname == b"connection":
            named |= named_by(value)
        elif lname == b"transfer-encoding":
            # Transfer-Encoding overrides Content-Length (RFC 9112 6.3); the gateway re-frames.
            named.add(b"content-length")
    return [pair for pair, lname in zip(headers, lnames) if lname not in HOP_BY_HOP and lname not in named]
