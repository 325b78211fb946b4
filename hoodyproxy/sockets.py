"""The node's listening sockets: where they come from, who owns them, how they are handed on.

Worker 0 (the twistd process) owns every listening socket for as long as it runs.  It
gets each kind -- ``https``, ``http``, ``admin`` (TCP) and ``http3`` (UDP) -- from the
first of these that has it:

1. descriptors handed in at start, the way systemd's socket activation hands them:
   descriptors 3, 4, ... with ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (for whom) and
   ``LISTEN_FDNAMES`` (what each one is: the kind names above, ``:``-separated).  That
   is how systemd passes a ``hoodyproxy.socket`` unit's sockets, and how a node passes
   its own to the next generation in a binary upgrade (:mod:`hoodyproxy.upgrade`);
2. bound here from ``[listen]`` (the HTTP/3 UDP socket on each HTTPS address).

A kind that is handed in is not bound from the config.

Every process serves a socket through a duplicate of its descriptor (Twisted's
``adoptStreamPort``; :func:`adopt_stream`), and worker 0 keeps the original: stopping a
port closes that duplicate only.  Workers 1..N-1 inherit the originals as descriptors
(``spawnProcess(childFDs=...)``) and adopt them the same way, so all processes accept
from one socket with one accept queue.  A worker that dies, however it dies, takes no
listener with it and resets no connection waiting in the queue: the next accept, in any
process, takes it.  (With ``SO_REUSEPORT``, which the workers used before, each process
had a socket and a queue of its own, and the connections queued on a dead worker's were
reset.)  The price is that the kernel no longer spreads connections evenly: the process
that calls ``accept`` first gets the connection, which favours the least busy one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

from twisted.internet.error import CannotListenError

from hoodyproxy.config import ListenAddress

__all__ = ["KINDS", "STREAM_KINDS", "ActivationError", "Listeners", "bind_stream", "bind_datagram",
           "address_of", "handed_in", "adopt_stream", "activation_environment"]

STREAM_KINDS = ("https", "http", "admin")
DATAGRAM_KINDS = ("http3",)
KINDS = STREAM_KINDS + DATAGRAM_KINDS
#: The first descriptor of socket activation (systemd's SD_LISTEN_FDS_START).
FIRST_FD = 3
#: The backlog of a socket bound here (the kernel caps it at net.core.somaxconn).
BACKLOG = 1024


class ActivationError(Exception):
    """Descriptors handed in that cannot be used; the message is the one line to show."""


class Listeners:
    """The listening sockets of one node, by kind (worker 0 owns them)."""

    def __init__(self) -> None:
        self.sockets: dict[str, list[socket.socket]] = {kind: [] for kind in KINDS}
        #: The kinds that were handed in (systemd or the previous generation).
        self.handed_in: set[str] = set()

    def add(self, kind: str, sock: socket.socket) -> None:
        self.sockets[kind].append(sock)

    def of(self, kind: str) -> list[socket.socket]:
        return self.sockets[kind]

    def named(self) -> list[tuple[str, socket.socket]]:
        """Every socket with its kind, in a stable order (the order they are handed on in)."""
        return [(kind, sock) for kind in KINDS for sock in self.sockets[kind]]

    def close(self, kinds=KINDS) -> None:
        """Close this process's descriptors of ``kinds`` (a socket another process holds
        stays open there)."""
        for kind in kinds:
            socks, self.sockets[kind] = self.sockets[kind], []
            for sock in socks:
                sock.close()


def _family(interface: str) -> int:
    return socket.AF_INET6 if ":" in interface else socket.AF_INET


def _bind(address: ListenAddress, kind: int, v6only: bool, backlog: int | None) -> socket.socket:
    from hoodyproxy.listening import _set_v6only
    sock = None
    try:
        sock = socket.socket(_family(address.interface), kind)
        if backlog is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _set_v6only(sock, v6only)
        sock.bind((address.interface, address.port))
        if backlog is not None:
            sock.listen(backlog)
    except OSError as e:
        if sock is not None:
            sock.close()
        raise CannotListenError(address.interface, address.port, e) from None
    sock.setblocking(False)
    return sock


def bind_stream(address: ListenAddress, *, v6only: bool = False, backlog: int = BACKLOG) -> socket.socket:
    """A non-blocking TCP socket listening on ``address``, as Twisted would bind it
    (``SO_REUSEADDR``, close-on-exec); ``::`` takes IPv4 too unless ``v6only``.

    Raises Twisted's ``CannotListenError``, which the node turns into one line.
    """
    return _bind(address, socket.SOCK_STREAM, v6only, backlog)


def bind_datagram(address: ListenAddress, *, v6only: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to ``address`` (HTTP/3); ``::`` takes IPv4 too
    unless ``v6only``.  Raises ``CannotListenError``."""
    return _bind(address, socket.SOCK_DGRAM, v6only, None)


def address_of(sock: socket.socket) -> ListenAddress:
    """Where ``sock`` is bound (the port the kernel chose for port 0)."""
    host, port = sock.getsockname()[:2]
    return ListenAddress(host, port)


def adopt_stream(reactor, sock: socket.socket, factory):
    """Serve ``factory`` on a duplicate of the listening ``sock`` (eager-sending connections).

    Stopping the returned port closes the duplicate and leaves ``sock`` listening: Twisted
    never calls ``shutdown()`` on an adopted socket, which would end it for every process.
    """
    from hoodyproxy.eagertcp import adopt_port
    return adopt_port(reactor, sock.fileno(), sock.family, factory)


def _check(kind: str, sock: socket.socket, fd: int) -> None:
    if kind not in KINDS:
        raise ActivationError(f"descriptor {fd} is named {kind!r}; the names are {', '.join(KINDS)} "
                              f"(FileDescriptorName= in the socket unit)")
    wanted = socket.SOCK_DGRAM if kind in DATAGRAM_KINDS else socket.SOCK_STREAM
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != wanted:
        raise ActivationError(f"descriptor {fd} ({kind}) is not an IP "
                              f"{'UDP' if wanted == socket.SOCK_DGRAM else 'TCP'} socket")
    if wanted == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ActivationError(f"descriptor {fd} ({kind}) is not listening")


def _inherited_descriptors(environ: MutableMapping[str, str] | None) -> list[int]:
    """The descriptors socket activation handed to this process (Twisted's ListenFDs)."""
    from twisted.python.systemd import ListenFDs
    if environ is not None:
        return ListenFDs.fromEnvironment(environ).inheritedDescriptors()
    # Importing twisted.internet.endpoints (twistd does, early) parses socket activation's
    # variables into the ListenFDs of its ``systemd:`` endpoints and deletes LISTEN_PID
    # and LISTEN_FDS from the environment: that parse is the one there is to read.
    from twisted.internet import endpoints
    parsed = getattr(getattr(endpoints, "_SystemdParser", None), "_sddaemon", None)
    if parsed is None:
        parsed = ListenFDs.fromEnvironment()
    return parsed.inheritedDescriptors()


def handed_in(environ: MutableMapping[str, str] | None = None) -> dict[str, list[socket.socket]]:
    """The sockets handed to this process by socket activation, by kind (empty when none).

    The ``LISTEN_*`` variables are removed from ``environ`` (the process's by default), so
    that no child process takes them for its own.  Raises :class:`ActivationError` for
    descriptors that are misnamed or not sockets of their kind.  (Descriptors without
    names, ``LISTEN_FDNAMES``, are not taken: Twisted's ListenFDs ignores them.)
    """
    descriptors = _inherited_descriptors(environ)
    if environ is None:
        environ = os.environ
    names = [n for n in environ.get("LISTEN_FDNAMES", "").split(":") if n]
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    out: dict[str, list[socket.socket]] = {}
    for fd, kind in zip(descriptors, names):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            raise ActivationError(f"descriptor {fd} ({kind}) is not a socket") from None
        _check(kind, sock, fd)
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        out.setdefault(kind, []).append(sock)
    return out


def activation_environment(named: list[tuple[str, int]], environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a process that gets ``named`` (kind, descriptor) as descriptors 3, 4,
    ... the way socket activation hands them (``LISTEN_PID`` is set by
    :mod:`hoodyproxy.sdexec`, which knows the process's PID)."""
    env = {k: v for k, v in environ.items() if not k.startswith("LISTEN_")}
    env["LISTEN_FDS"] = str(len(named))
    env["LISTEN_FDNAMES"] = ":".join(kind for kind, _ in named)
    return env
