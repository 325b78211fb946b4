"""The signals a twistd-run node answers besides twistd's own: SIGHUP reloads, SIGUSR1 reopens.

``SIGHUP`` reads the config file again (:meth:`hoodyproxy.service.NodeService.reload`);
``SIGUSR1`` opens the audit log and the diagnostic log again by name
(:meth:`~hoodyproxy.service.NodeService.reopen_logs`), for logrotate without
``copytruncate``.  A handler only schedules the work on the reactor; the work, its log
line and its errors happen there.  Installed by the twistd service at start and put back
at stop; an in-process node (tests) installs none.
"""

from __future__ import annotations

import signal
from typing import Callable

from twisted.logger import Logger

log = Logger()


def handle_signals(node, reactor) -> Callable[[], None]:
    """Install the SIGHUP and SIGUSR1 handlers for ``node``; returns what puts the
    previous handlers back."""
    def reload() -> None:
        from hoodyproxy.reload import NoConfigFile
        try:
            node.reload()
        except NoConfigFile as e:
            log.warn("hoodyproxy reload (SIGHUP): {problem}", problem=str(e))
        except Exception:
            pass  # logged by reload, in one line

    handlers = {signal.SIGHUP: reload, signal.SIGUSR1: node.reopen_logs}
    previous = {signum: signal.signal(signum, lambda s, frame, work=work: reactor.callFromThread(work))
                for signum, work in handlers.items()}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return restore
