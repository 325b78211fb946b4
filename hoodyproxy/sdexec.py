"""``python -m hoodyproxy.sdexec PROGRAM [ARG...]``: exec PROGRAM as socket activation would.

Socket activation names the process its descriptors are for: ``LISTEN_PID`` must be the
PID of the process that reads ``LISTEN_FDS``, which its parent cannot know before it
forks.  This sets ``LISTEN_PID`` to its own PID and execs PROGRAM in its place (exec keeps
the PID), the way systemd sets it between fork and exec.  The binary upgrade
(:mod:`hoodyproxy.upgrade`) starts the next generation through it; the descriptors
(3, 4, ...) and ``LISTEN_FDS``/``LISTEN_FDNAMES`` come from the caller.  A PROGRAM
ending in ``.py`` is run with this interpreter.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> None:
    if not argv:
        sys.stderr.write("usage: python -m hoodyproxy.sdexec PROGRAM [ARG...]\n")
        raise SystemExit(2)
    os.environ["LISTEN_PID"] = str(os.getpid())
    program = argv[0]
    if program.endswith(".py"):
        os.execv(sys.executable, [sys.executable, *argv])
    os.execvp(program, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
