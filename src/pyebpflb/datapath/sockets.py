"""Socket-level balancing: the cgroup programs of ``lb_sock.bpf.o`` (lib/sock.h)
on cgroup v2 directories, so that local processes reach services at ``connect()``.

The programs are loaded over the datapath's own maps (services, backends,
counters, policy, events: one state for both paths). Each attachment is a BPF
link pinned under the datapath's pin folder (``links/<cgroup path>/<program>``),
as Cilium pins its socket-LB links: it outlives the process that made it, a
later process finds it and swaps its own build in with one link update, and
removing the pin detaches it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import urllib.parse
from collections.abc import Sequence

from pyebpflb import maps, objects
from pyebpflb._bpf import LoadedObject, fs
from pyebpflb._bpf._call import check
from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb._bpf.cgroup import CgroupLink
from pyebpflb.errors import NotFound
from pyebpflb.model import Address, Node

PROGRAMS = (
    "lb_connect4",
    "lb_connect6",
    "lb_sendmsg4",
    "lb_sendmsg6",
    "lb_recvmsg4",
    "lb_recvmsg6",
    "lb_getpeername4",
    "lb_getpeername6",
)
# Translate unconnected UDP (sendto on a VIP); without them only connect() does.
UNCONNECTED_UDP = ("lb_sendmsg4", "lb_sendmsg6")
LINKS = "links"
SO_NETNS_COOKIE = 71


def netns_cookie() -> int:
    """The cookie of the current network namespace (what bpf_get_netns_cookie says)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        raw = probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int(struct.unpack("=Q", raw)[0])


def cgroup2_root() -> str:
    """Where cgroup v2 is mounted, mounting it under /run when no mount is there
    (``ip netns exec`` hides the host's with its own /sys), as Cilium mounts its own."""
    return fs.cgroup2_root()


def resolve(path: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(the directory, its cgroup name) of cgroup ``path``: None is the root of the
    hierarchy, "/name" (as /proc/<pid>/cgroup names it) or a directory of a cgroup
    v2 mount. The name is the same in every mount namespace, so the attachment is
    found again from under ``ip netns exec`` (where the hierarchy is mounted
    elsewhere)."""
    root = cgroup2_root()
    given = "/" if path is None else os.fspath(path)
    if given == "/":  # the root of the hierarchy: every process
        return root, "/"
    for mount in [*fs.cgroup2_mounts(), root]:
        chosen = os.path.realpath(given)
        if chosen == mount or chosen.startswith(mount.rstrip("/") + "/"):
            if not os.path.isdir(chosen):
                break
            return chosen, "/" + os.path.relpath(chosen, mount).removeprefix(".")
    inside = os.path.join(root, given.lstrip("/"))
    if given.startswith("/") and os.path.isdir(inside) and not os.path.exists(given):
        return os.path.realpath(inside), "/" + given.strip("/")
    raise ValueError(
        f"cgroup {given!r} is no cgroup v2 directory: give a directory under {root} or a "
        "cgroup name as /proc/<pid>/cgroup shows it ('/' is every process)"
    )


def links_dir(pin_dir: str) -> str:
    return os.path.join(pin_dir, LINKS)


def _folder(pin_dir: str, cgroup: str) -> str:
    return os.path.join(links_dir(pin_dir), urllib.parse.quote(cgroup, safe=""))


def cgroups(pin_dir: str) -> list[str]:
    """The cgroups the datapath's socket programs are attached to (by their pins),
    named as /proc/<pid>/cgroup names them ("/": every process)."""
    found = links_dir(pin_dir)
    if not os.path.isdir(found):
        return []
    return sorted(urllib.parse.unquote(entry) for entry in os.listdir(found))


def remove_links(pin_dir: str) -> list[str]:
    """Detach every socket program of the datapath (removing the links' pins)."""
    gone = cgroups(pin_dir)
    for cgroup in gone:
        _remove_folder(_folder(pin_dir, cgroup))
    with contextlib.suppress(OSError):
        os.rmdir(links_dir(pin_dir))
    return gone


def _unlink(pin: str) -> None:
    """Detach the pinned link now, then remove its pin. (The pin's removal alone
    frees the link only after an RCU grace period: the program would run on for a
    moment after the call returned.)"""
    fd = check(lib.bpf_obj_get(pin.encode()), f"open link {pin}")
    try:
        check(lib.bpf_link_detach(fd), f"detach {pin}")
    finally:
        os.close(fd)
    os.unlink(pin)


def _remove_folder(folder: str) -> None:
    for entry in os.listdir(folder):
        _unlink(os.path.join(folder, entry))
    os.rmdir(folder)


def write_node(obj: LoadedObject, node: Node | None, cookie: int) -> Node | None:
    """Write lb_node: this namespace's cookie, and ``node`` (None: keep the one
    written before). Returns the node in force. A datapath made for one node is
    not taken over for another: ValueError, nothing changed."""
    node_map = obj.map(maps.NODE)
    entry = node_map[0]
    stored = ffi.string(entry.name).decode()
    if node is not None and stored and stored != node.name:
        raise ValueError(
            f"this datapath serves node {stored!r}, not {node.name!r}: a datapath's node is "
            "set once (destroy it to make it for another node)"
        )
    if node is None and stored:
        found = [
            maps.addr_from(entry.v4, 4) if int.from_bytes(bytes(entry.v4.bytes), "big") else None,
            maps.addr_from(entry.v6, 6) if int.from_bytes(bytes(entry.v6.bytes), "big") else None,
        ]
        addresses = [a for a in found if a is not None]
        served = [
            maps.addr_from(key.vip, int(key.family))
            for key in (
                maps.typed("struct pyebpflb_vip_key", k)
                for k, _ in obj.map(maps.NODEPORT).lookup_batch()
            )
        ]
        node = Node(
            stored,
            addresses,
            zone=ffi.string(entry.zone).decode(),
            nodeport_addresses=[] if set(served) == set(addresses) else served,
        )
    value = ffi.new("struct pyebpflb_node *")
    value.netns_cookie = cookie
    if node is not None:
        value.name = node.name.encode()
        value.zone = node.zone.encode()
        for family, field in ((4, "v4"), (6, "v6")):
            address = node.address(family)
            if address is not None:
                ffi.memmove(getattr(value, field).bytes, address.packed, len(address.packed))
    if bytes(ffi.buffer(value)) != maps.raw(entry):
        node_map[0] = value[0]
    if node is not None:
        _write_nodeport_addresses(obj, node.serves_nodeports_on)
    return node


def _write_nodeport_addresses(obj: LoadedObject, addresses: Sequence[Address]) -> None:
    """lb_nodeport holds exactly ``addresses``: the new ones first, then the others go."""
    bpf_map = obj.map(maps.NODEPORT)
    wanted = {maps.vip_key(a) for a in addresses}
    held = {maps.raw(k) for k, _ in bpf_map.lookup_batch()}
    for key in wanted - held:
        bpf_map.update(key, maps.u32(1))
    for key in held - wanted:
        with contextlib.suppress(KeyError):
            bpf_map.delete(key)


class Sockets:
    """Attaching one datapath's socket programs to cgroups."""

    def __init__(self, obj: LoadedObject, pin_dir: str) -> None:
        self._obj = obj
        self._pin_dir = pin_dir
        self._loaded: LoadedObject | None = None

    def _programs(self) -> LoadedObject:
        """lb_sock loaded over every map of the datapath (once per process)."""
        if self._loaded is None or self._loaded.closed:
            opened = objects.open_object("lb_sock")
            with opened:
                for name in opened.map_names():
                    if name in self._obj.maps:  # not its own .rodata
                        opened.reuse_map(name, self._obj.map(name))
                self._loaded = opened.load()
        return self._loaded

    def attach(self, where: tuple[str, str], *, unconnected_udp: bool) -> list[str]:
        """Attach (or swap in place) the programs on cgroup ``where`` (directory, name);
        returns their names. All or nothing: links this call made are removed when a
        later one fails."""
        loaded = self._programs()
        cgroup, cgroup_name = where
        folder = _folder(self._pin_dir, cgroup_name)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        wanted = [p for p in PROGRAMS if unconnected_udp or p not in UNCONNECTED_UDP]
        made: list[str] = []
        try:
            for name in wanted:
                program = loaded.program(name)
                pin = os.path.join(folder, name)
                if os.path.exists(pin):
                    fd = check(lib.bpf_obj_get(pin.encode()), f"open link {pin}")
                    try:
                        check(lib.bpf_link_update(fd, program.fd, ffi.NULL), f"update {pin}")
                    finally:
                        os.close(fd)
                    continue
                link = CgroupLink.attach(program, cgroup)
                try:
                    check(lib.bpf_link__pin(link._link, pin.encode()), f"pin link {pin}")
                    made.append(pin)
                finally:
                    # The pin holds the link now: close our fd without detaching.
                    lib.bpf_link__disconnect(link._link)
                    link.detach()
        except BaseException:
            for pin in made:
                _unlink(pin)
            with contextlib.suppress(OSError):
                os.rmdir(folder)
            raise
        for name in PROGRAMS:
            pin = os.path.join(folder, name)
            if name not in wanted and os.path.exists(pin):
                _unlink(pin)
        return wanted

    def detach(self, where: tuple[str, str]) -> None:
        cgroup = where[1]
        folder = _folder(self._pin_dir, cgroup)
        if not os.path.isdir(folder):
            attached = cgroups(self._pin_dir)
            raise NotFound(
                errno.ENOENT,
                f"detach_cgroup {cgroup}",
                "this datapath's socket programs are not attached there; they are on "
                + (", ".join(attached) if attached else "no cgroup"),
            )
        _remove_folder(folder)
        with contextlib.suppress(OSError):
            os.rmdir(links_dir(self._pin_dir))

    def close(self) -> None:
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None


def reattach(obj: LoadedObject, pin_dir: str) -> None:
    """Swap ``obj``'s socket programs in on every cgroup the datapath is attached to,
    as they are (an upgrade: the old programs go, the attachments stay)."""
    found = cgroups(pin_dir)
    if not found:
        return
    swap = Sockets(obj, pin_dir)
    try:
        for cgroup in found:
            folder = _folder(pin_dir, cgroup)
            unconnected = os.path.exists(os.path.join(folder, UNCONNECTED_UDP[0]))
            swap.attach(resolve(cgroup), unconnected_udp=unconnected)
    finally:
        swap.close()


__all__ = [
    "Sockets",
    "cgroup2_root",
    "cgroups",
    "netns_cookie",
    "reattach",
    "remove_links",
    "resolve",
]
