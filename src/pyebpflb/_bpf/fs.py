"""Where BPF objects are pinned and cgroups live: bpffs and cgroup2 mounts.

Pins need a bpffs. Many machines mount one at /sys/fs/bpf at boot; a fresh
container or ``ip netns exec`` (which remounts /sys) may not. These helpers
find the mount that covers a path and mount one where none does.
"""

from __future__ import annotations

import os

from pyebpflb._bpf._call import c_string, check
from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb.errors import from_errno

BPFFS_ROOT = "/sys/fs/bpf"


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of the current mount namespace, in mount order."""
    result = []
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3:
                # /proc/self/mounts escapes blanks as octal (\040).
                point = fields[1].encode().decode("unicode_escape")
                result.append((point, fields[2]))
    return result


def fs_type(path: str) -> str | None:
    """Filesystem type of the innermost mount covering ``path``."""
    path = os.path.realpath(path) if os.path.exists(path) else os.path.abspath(path)
    best: tuple[int, str] | None = None
    for point, kind in _mounts():
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), kind)
    return best[1] if best else None


def mount(source: str, target: str, kind: str) -> None:
    os.makedirs(target, exist_ok=True)
    ret = lib.mount(c_string(source), c_string(target), c_string(kind), 0, ffi.NULL)
    if ret != 0:
        raise from_errno(ffi.errno, f"mount {kind} at {target}")


def ensure_bpffs(path: str = BPFFS_ROOT) -> None:
    """Make sure ``path`` lies on a bpffs, mounting one at /sys/fs/bpf if needed."""
    if fs_type(path) == "bpf":
        return
    if fs_type(BPFFS_ROOT) != "bpf":
        mount("bpf", BPFFS_ROOT, "bpf")
    if fs_type(path) != "bpf":
        raise ValueError(
            f"pin path {path!r} is not on a bpffs; use a path under {BPFFS_ROOT} "
            "or mount a bpffs covering it"
        )


def cgroup2_root() -> str:
    """The cgroup v2 mount point, mounting one under /run if there is none."""
    for point, kind in _mounts():
        if kind == "cgroup2":
            return point
    target = "/run/pyebpflb/cgroup2"
    mount("cgroup2", target, "cgroup2")
    return target


def object_id(fd: int) -> int:
    """The kernel id of a BPF map, program or link fd."""
    # bpf_map_info, bpf_prog_info and bpf_link_info all begin with (type, id);
    # the kernel fills only as much of the info as the length asks for.
    head = ffi.new("__u32[2]")
    size = ffi.new("__u32 *", ffi.sizeof(head))
    check(lib.bpf_obj_get_info_by_fd(fd, head, size), f"read the id of fd {fd}")
    return int(head[1])


def pin(fd: int, path: str | os.PathLike[str], what: str) -> None:
    """Pin ``fd`` at ``path`` on a bpffs, mounting /sys/fs/bpf first if needed."""
    target = os.fspath(path)
    ensure_bpffs(os.path.dirname(target) or ".")
    check(lib.bpf_obj_pin(fd, c_string(target)), f"pin {what} at {target}")


def unpin(fd: int, path: str | os.PathLike[str], what: str) -> None:
    """Remove the pin at ``path`` if it is ``fd``'s object; refuse to remove another's."""
    target = os.fspath(path)
    pinned = check(lib.bpf_obj_get(c_string(target)), f"open pin {target}")
    try:
        pinned_id, own_id = object_id(pinned), object_id(fd)
    finally:
        os.close(pinned)
    if pinned_id != own_id:
        raise ValueError(
            f"the pin {target} holds object id {pinned_id}, not {what} (id {own_id}); left in place"
        )
    os.unlink(target)
