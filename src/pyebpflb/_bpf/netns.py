"""Running code inside another network namespace, one thread at a time.

A network namespace is a per-thread property: ``setns(CLONE_NEWNET)`` moves
only the calling thread, and sockets (netlink included) keep the namespace
they were created in. So an attach into a namespace is: enter on this thread,
do the netlink work, come back. No subprocess and no ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb.errors import from_errno

NETNS_RUN_DIR = "/run/netns"


def netns_path(name_or_path: str) -> str:
    """A name as made by ``ip netns add`` (or a path to a netns file) -> path."""
    if "/" in name_or_path:
        return name_or_path
    return os.path.join(NETNS_RUN_DIR, name_or_path)


def _setns(fd: int, what: str) -> None:
    if lib.setns(fd, lib.CLONE_NEWNET) != 0:
        raise from_errno(ffi.errno, f"enter network namespace {what}")


@contextlib.contextmanager
def entered(netns: str | None) -> Iterator[None]:
    """Run the block with this thread in ``netns`` (``None``: stay where we are)."""
    if netns is None:
        yield
        return
    path = netns_path(netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ValueError(f"no network namespace {netns!r} (looked for {path})") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, netns)
        try:
            yield
        finally:
            _setns(home, "of this thread before entering " + netns)
    finally:
        os.close(target)
        os.close(home)


def current_id() -> int:
    """Identity (inode) of this thread's network namespace."""
    return os.stat("/proc/thread-self/ns/net").st_ino


# Linux >= 6.9 gives the initial network namespace this fixed inode (PROC_NET_INIT_INO).
_INIT_NET_INODE = 0xEFFFFFF9


def is_initial() -> bool:
    """Is this thread in the network namespace of PID 1 (the host's, or a container's)?"""
    try:
        return os.stat("/proc/1/ns/net").st_ino == current_id()
    except OSError:
        # Hardened /proc hides PID 1's namespaces even from root; newer
        # kernels still tell the initial namespace by its fixed inode.
        return current_id() == _INIT_NET_INODE
