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


@contextlib.contextmanager
def held(path: str) -> Iterator[None]:
    """Hold the writer lock at ``path`` (waiting for another writer to finish)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person reading
        yield
    finally:
        os.close(fd)  # releases the lock
