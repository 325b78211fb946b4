"""systemd's readiness protocol (sd_notify): one datagram to ``$NOTIFY_SOCKET``.

A unit of ``Type=notify`` is started when the service says ``READY=1``, not when its
process exists: here, once every port is bound and the node serves.  The protocol is
one ``AF_UNIX`` datagram of ``KEY=value`` lines to the socket named in
``NOTIFY_SOCKET`` (a leading ``@`` is Linux's abstract namespace), so it is written here
rather than taken from a library: the pure-Python one (``sdnotify``) has had no release
since 2017, and ``systemd-python``/``cysystemd`` are C extensions that need libsystemd's
headers to build, for ten lines of socket code.  Without ``NOTIFY_SOCKET`` (not under
systemd) nothing is sent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["notify"]


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``, ``"MAINPID=..."``...) to the
    service manager; False when there is none (or it cannot be reached)."""
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode("utf-8"))
    except OSError:
        return False
    return True
