"""The diagnostic log twistd writes (``--logfile``), opened by the node so SIGUSR1 can reopen it.

twistd opens its ``--logfile`` itself, rotates it at 1 MB (``file.1``, ``file.2``...) and
on SIGUSR1, all of which fights logrotate.  Given an ``ILogObserver`` component on the
application, twistd logs through that instead: :func:`diagnostic_log` opens the same file
twistd would, never rotated by size, and :meth:`DiagnosticLog.reopen` opens it again by
name after logrotate moved it away.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.logger import textFileLogObserver
from twisted.python.logfile import LogFile


class DiagnosticLog:
    """A log file and the observer writing twistd's log events to it."""

    def __init__(self, path: str) -> None:
        self.file = LogFile.fromFullPath(path, rotateLength=None)
        self.path = self.file.path
        self.observer = textFileLogObserver(self.file)

    def reopen(self) -> None:
        """Write the next lines to the file opened again by its name."""
        self.file.reopen()


def diagnostic_log(twistd_options: Mapping[str, Any] | None) -> DiagnosticLog | None:
    """The log file twistd's options name, opened; None when twistd logs elsewhere
    (stdout, syslog, a ``--logger`` of the operator's).

    The file twistd would choose: ``--logfile``, or ``twistd.log`` for a daemon with
    none; ``-`` and ``--nodaemon`` without one are stdout.
    """
    if twistd_options is None or twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    path = twistd_options.get("logfile") or ""
    if path == "-" or (not path and twistd_options.get("nodaemon")):
        return None
    return DiagnosticLog(path or "twistd.log")
