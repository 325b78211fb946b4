"""Experiments for ``bench/ws_idle_quick.py --patch NAME``: what an idle WebSocket would
cost if code outside the tunnel let go of more.  Measurement only; nothing here is used by
the gateway, and each patch wraps the code as it stands (it may stop applying when that
code changes).

``exchange-drops-request``
    After the 101, the exchange forgets the request, its head and its body buffers (it
    keeps the audit record and ``done``, which the tunnel's end needs).
``tls-protocol-is-tunnel``
    At take-over, Twisted's TLS protocol delivers to a two-method object calling the
    tunnel instead of to the HTTP/1.1 connection (``hoodyproxy.frontend.h1``), so that
    the connection object (and, with the patch above, the request) can be collected.

Both were measured here (34.4 -> 29 KiB per idle WebSocket) and are now what the gateway
does (``Exchange.upstream_upgraded``, ``H1Connection.attach_tunnel``); applying them again
changes nothing.  They stay as the pattern for the next experiment.
"""

from __future__ import annotations


def exchange_drops_request() -> None:
    from hoodyproxy.upstream.exchange import Exchange
    original = Exchange.upstream_upgraded

    def upstream_upgraded(self, leftover):
        original(self, leftover)
        self.request = None
        self.head = None
        self.pending = []
        self.replay = None
        self.body_producer = None
    Exchange.upstream_upgraded = upstream_upgraded


class _TunnelSide:
    __slots__ = ("dataReceived", "connectionLost")

    def __init__(self, tunnel) -> None:
        self.dataReceived = tunnel.client_data
        self.connectionLost = tunnel.client_lost


def tls_protocol_is_tunnel() -> None:
    from hoodyproxy.frontend.h1request import H1Request
    original = H1Request.attach_tunnel

    def attach_tunnel(self, tunnel):
        connection = self.connection
        original(self, tunnel)
        transport = connection.transport
        if hasattr(transport, "wrappedProtocol"):
            transport.wrappedProtocol = _TunnelSide(tunnel)
    H1Request.attach_tunnel = attach_tunnel


PATCHES = {"exchange-drops-request": exchange_drops_request, "tls-protocol-is-tunnel": tls_protocol_is_tunnel}


def apply(names) -> None:
    for name in names:
        PATCHES[name]()
