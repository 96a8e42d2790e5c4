"""Where BPF objects are pinned and cgroups live: bpffs and cgroup2 mounts.

Pins need a bpffs. Many machines mount one at /sys/fs/bpf at boot; a fresh
container or ``ip netns exec`` (which remounts /sys) may not. These helpers
find the mount that covers a path and mount one where none does.

Pins must outlive the process that makes them. ``ip netns exec`` runs its
command in a mount namespace of its own with a fresh /sys: the host's
/sys/fs/bpf is hidden there, and a bpffs mounted in its place ends with the
command, taking its pins along. :func:`lasting` finds the host's instead,
through the root of the nearest ancestor in another mount namespace
(``/proc/<pid>/root``: the shell ``ip netns exec`` was run from), and
:func:`ensure_bpffs` mounts one there when it is missing, as Cilium mounts
/sys/fs/bpf at start.
"""

from __future__ import annotations

import os
import re
import subprocess

from pyebpflb._bpf._call import c_string, check
from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb.errors import from_errno

BPFFS_ROOT = "/sys/fs/bpf"


_THROUGH = re.compile(r"^/proc/(\d+)/root(/.*)?$")


def _mounts(pid: str = "self") -> list[tuple[str, str]]:
    """(mount point, filesystem type) of ``pid``'s mount namespace, in mount order."""
    result = []
    with open(f"/proc/{pid}/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3:
                # /proc/self/mounts escapes blanks as octal (\040).
                point = fields[1].encode().decode("unicode_escape")
                result.append((point, fields[2]))
    return result


def _split(path: str) -> tuple[str, str]:
    """(whose mount namespace, path in it) of ``path``: "/proc/<pid>/root/x" is <pid>'s /x."""
    through = _THROUGH.match(path)
    if through:
        return through.group(1), through.group(2) or "/"
    return "self", os.path.realpath(path) if os.path.exists(path) else os.path.abspath(path)


def fs_type(path: str) -> str | None:
    """Filesystem type of the innermost mount covering ``path`` (in another mount
    namespace for a path through ``/proc/<pid>/root``)."""
    pid, path = _split(path)
    best: tuple[int, str] | None = None
    for point, kind in _mounts(pid):
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), kind)
    return best[1] if best else None


def mount(source: str, target: str, kind: str) -> None:
    os.makedirs(target, exist_ok=True)
    ret = lib.mount(c_string(source), c_string(target), c_string(kind), 0, ffi.NULL)
    if ret != 0:
        raise from_errno(ffi.errno, f"mount {kind} at {target}")


def _mount_ns(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:  # gone, or hidden from us
        return None


def _parent(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            # pid (comm) state ppid ...: comm may hold blanks and parentheses.
            ppid = stat.read().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return None
    return ppid if ppid not in ("0", "1") else None


def outer_namespace() -> str | None:
    """The pid of the nearest ancestor in another mount namespace whose files we can
    reach (``ip netns exec``'s caller), or None: we are in the outermost we can see."""
    own = _mount_ns("self")
    pid = _parent(str(os.getpid()))
    while pid is not None:
        theirs = _mount_ns(pid)
        if theirs is not None and theirs != own and os.access(f"/proc/{pid}/root/", os.X_OK):
            return pid
        pid = _parent(pid)
    return None


def lasting(path: str) -> str:
    """Where pins under ``path`` outlive this process's mount namespace: ``path`` when
    it lies on a bpffs here (the host's, or a container's own), else the same path in
    the mount namespace ``ip netns exec`` was run from, through ``/proc/<pid>/root``."""
    if fs_type(path) == "bpf":
        return path
    outer = outer_namespace()
    return path if outer is None else f"/proc/{outer}/root{os.path.abspath(path)}"


def ensure_bpffs(path: str = BPFFS_ROOT) -> None:
    """Make sure ``path`` lies on a bpffs, mounting one at /sys/fs/bpf if needed (in
    the other mount namespace, for a path through ``/proc/<pid>/root``)."""
    if fs_type(path) == "bpf":
        return
    pid, _ = _split(path)
    root = BPFFS_ROOT if pid == "self" else f"/proc/{pid}/root{BPFFS_ROOT}"
    if fs_type(root) != "bpf":
        if pid == "self":
            mount("bpf", BPFFS_ROOT, "bpf")
        else:
            # setns(CLONE_NEWNS) needs a single-threaded process: let nsenter mount it.
            done = subprocess.run(
                [
                    "nsenter",
                    f"--mount=/proc/{pid}/ns/mnt",
                    "--",
                    "mount",
                    "-t",
                    "bpf",
                    "bpf",
                    BPFFS_ROOT,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise ValueError(
                    f"cannot mount a bpffs at {BPFFS_ROOT} in the mount namespace of pid "
                    f"{pid}: {done.stderr.strip()}"
                )
    if fs_type(path) != "bpf":
        raise ValueError(
            f"pin path {path!r} is not on a bpffs; use a path under {BPFFS_ROOT} "
            "or mount a bpffs covering it"
        )


def cgroup2_mounts() -> list[str]:
    """The cgroup v2 mount points of this mount namespace, in mount order."""
    return [point for point, kind in _mounts() if kind == "cgroup2"]


def cgroup2_root() -> str:
    """The cgroup v2 mount point, mounting one under /run if there is none."""
    found = cgroup2_mounts()
    if found:
        return found[0]
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
