"""One node per data directory: an exclusive lock on ``<data-dir>/lock`` for the node's lifetime.

Two nodes on one data directory would share its database, its certificates and its
admin token, and -- worse -- the netfilter rules each installs are tagged with the data
directory (:mod:`hoodyproxy.netfilter`), so the second one's stop would take away the
first one's rules.  So a node takes ``flock(LOCK_EX)`` on ``<data-dir>/lock`` before it
touches anything else there, writes its PID into the file, and keeps the descriptor open
until it exits: the kernel drops the lock when the process ends, however it ends, so a
node killed with SIGKILL never leaves a stale lock behind.  The file itself is never
removed (unlinking a lock file races with the next node opening it).

A second node finds the lock taken and stops with one line naming the first one's PID.
The one exception is the next generation of the same node in a binary upgrade
(:mod:`hoodyproxy.upgrade`): it inherits the descriptor -- the same open file, so the
same lock -- and the lock is held as long as either generation runs.
Worker processes (``--workers``) are not nodes: they never take the lock, and the
descriptor is not inherited (``O_CLOEXEC``, and twistd's ``spawnProcess`` closes every
descriptor it is not told to pass).
"""

from __future__ import annotations

import errno
import fcntl
import os

#: The lock file's name inside the data directory.
LOCK_NAME = "lock"


class DataDirInUse(Exception):
    """Another live process holds the data directory's lock; ``pid`` is what it wrote (or None)."""

    def __init__(self, data_dir: str, pid: int | None) -> None:
        self.data_dir = data_dir
        self.pid = pid
        who = f"PID {pid}" if pid is not None else "a process whose PID is not written yet"
        super().__init__(f"the data directory {data_dir} is in use by another hoodyproxy node ({who}); "
                         f"stop it first, or give this node a --data-dir of its own")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class DataDirLock:
    """The exclusive lock of one data directory (see the module docstring)."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, inherited: int | None = None) -> None:
        """Take the lock (creating the directory, mode 0700, if need be) and write our PID.

        Raises :class:`DataDirInUse` at once, without waiting, if another process holds it.
        ``inherited``: the lock file's descriptor as the generation before held it (a
        binary upgrade): the same open file, whose lock is ours already.
        """
        if self._fd is not None:
            return
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        if inherited is not None:
            try:
                same = os.path.samestat(os.fstat(inherited), os.stat(self.path))
            except OSError:
                same = False
            if not same:  # (another data directory's lock: not ours to hold)
                try:
                    os.close(inherited)
                except OSError:
                    pass
                inherited = None
        if inherited is not None:
            os.set_inheritable(inherited, False)
            fd = inherited
        else:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DataDirInUse(self.data_dir, pid) from None
            raise
        self._fd = fd
        self.write_pid()

    def write_pid(self) -> None:
        """Write this process's PID into the lock file.

        Called again after twistd has daemonized: the lock survives the fork (the child
        holds the same open file), but the PID written before it was the parent's.
        """
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def fileno(self) -> int | None:
        """The lock file's descriptor (handed to the next generation in a binary upgrade)."""
        return self._fd

    def release(self) -> None:
        """Give the lock up (closing the descriptor releases it); the file stays."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
