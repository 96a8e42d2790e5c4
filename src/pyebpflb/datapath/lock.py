"""The writer lock of a datapath: one change at a time, across processes.

A change reads the installed state, plans against it and writes the difference;
two processes doing that at once would plan against the same state and one
would undo the other's work (or hand out the same ids). Each change therefore
holds an exclusive ``flock`` on a file named after the datapath and its network
namespace, and reads the state again once it has the lock. The lock dies with
its holder (the kernel drops a dead process's flocks), so a killed writer never
locks the others out. The file lives in ``/run/pyebpflb``, which every mount
namespace of the host shares (`ip netns exec` remounts only ``/sys``), unlike
the bpffs that holds the pins.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

LOCK_DIR = "/run/pyebpflb"


def path_for(name: str, netns_id: int) -> str:
    """The lock file of datapath ``name`` in the network namespace of inode ``netns_id``."""
    return os.path.join(LOCK_DIR, f"{name}@netns-{netns_id}.lock")


def _write_holder(fd: int) -> None:
    """Who holds the lock, for a person (or ``holder``) reading the file: the pid,
    at a fixed width so that it overwrites the last one without a truncate (a
    truncate of a tmpfs file was the largest cost of a one-service change)."""
    os.pwrite(fd, f"{os.getpid():<10}\n".encode(), 0)


def _read_holder(fd: int) -> int | None:
    written = os.pread(fd, 32, 0).split()
    return int(written[0]) if written and written[0].isdigit() else None


def _open(path: str) -> int:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def reader_path_for(name: str, netns_id: int) -> str:
    """The lock file of the one reader of datapath ``name``'s flow events."""
    return os.path.join(LOCK_DIR, f"{name}@netns-{netns_id}.events.lock")


def describe(pid: int) -> str:
    """``pid`` and its command line, for an error naming a holder."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            words = [w.decode(errors="replace") for w in cmdline.read().split(b"\0") if w]
    except OSError:
        return f"pid {pid}"
    shown = " ".join(os.path.basename(w) if i == 0 else w for i, w in enumerate(words))
    return f"pid {pid} ({shown[:120]})" if shown else f"pid {pid}"


class Lease:
    """An exclusive ``flock`` taken without waiting, held until :meth:`release` (or
    until its holder dies: the kernel drops a dead process's flocks)."""

    def __init__(self, path: str) -> None:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.holder: int | None = _read_holder(fd)
            os.close(fd)
            self._fd = -1
            return
        _write_holder(fd)
        self.holder = None
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def holder(path: str) -> int | None:
    """The pid holding the lock at ``path`` now, or None (free, or no such file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            found = _read_holder(fd)
            return -1 if found is None else found
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def held(path: str) -> Iterator[None]:
    """Hold the writer lock at ``path`` (waiting for another writer to finish)."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _write_holder(fd)
        yield
    finally:
        os.close(fd)  # releases the lock
