"""Every datapath on the host, found without loading one, and a teardown that works
on what is left of one (an incomplete or another version's datapath too).

A datapath lives in two places: its programs, attached to interfaces of one
network namespace, and its pins, under ``pin_root/name/`` (``netns-<inode>/``
for a namespace other than the host's). :func:`datapaths` looks in both, in the
host's namespace and in every named one (``ip netns``), and reports the pins
whose namespace is gone (orphans). :func:`destroy` removes what it finds of one
datapath: only filters whose ``lb_config`` names it and only the ``lb_*`` pins
under its own folder, never anything pyebpflb did not make.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterable, Iterator

import attrs

from pyebpflb import maps, objects
from pyebpflb._bpf import Map, ffi, fs
from pyebpflb._bpf.netns import NETNS_RUN_DIR, current_id, entered
from pyebpflb.datapath import adopt, lock, migrate, sockets
from pyebpflb.datapath.hooks import datapath_of_program, filters, remove
from pyebpflb.errors import BpfError, PyEbpfLbError
from pyebpflb.model import Direction

_NETNS_DIR = re.compile(r"^netns-(\d+)$")


@attrs.frozen
class DatapathInfo:
    """One datapath as found: where it runs and where its state lives."""

    name: str
    netns: str | None  # the `ip netns` name; None: the host's namespace
    netns_id: int | None  # inode of the namespace; None: it is gone
    interfaces: tuple[str, ...]  # attached to (ingress), in this namespace
    pin_dir: str | None  # its pins' folder, when it has one
    pins: tuple[str, ...]  # the map names pinned there
    layout: int | None  # lb_config's layout version, when it could be read
    writer: int | None  # pid holding the writer lock now
    missing_pins: tuple[str, ...] = ()  # maps of a pinned datapath without a pin
    cgroups: tuple[str, ...] = ()  # its socket programs' cgroups ("/": every process)

    @property
    def orphan(self) -> bool:
        """Pins whose network namespace is gone: nothing can attach them again."""
        return self.netns_id is None

    @property
    def state(self) -> str:
        """Where the state lives, in words."""
        if self.pins and (self.interfaces or self.cgroups):
            return "pins and attached programs"
        if self.pins:
            return "pins only (attached nowhere)"
        return "held by attached programs only (no pins)"

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "netns": self.netns,
            "netns_id": self.netns_id,
            "interfaces": list(self.interfaces),
            "pin_dir": self.pin_dir,
            "pins": list(self.pins),
            "layout": self.layout,
            "writer": self.writer,
            "orphan": self.orphan,
            "state": self.state,
            "missing_pins": list(self.missing_pins),
            "cgroups": list(self.cgroups),
        }


def _namespaces() -> Iterator[tuple[str | None, int]]:
    """(name, inode) of the host's namespace and each named one, each once."""
    seen = set()
    home = current_id()
    seen.add(home)
    yield None, home
    names = sorted(os.listdir(NETNS_RUN_DIR)) if os.path.isdir(NETNS_RUN_DIR) else []
    for name in names:
        try:
            inode = os.stat(os.path.join(NETNS_RUN_DIR, name)).st_ino
        except OSError:
            continue
        if inode not in seen:
            seen.add(inode)
            yield name, inode


def _attached() -> dict[str, list[str]]:
    """Datapath name -> interfaces (ingress) in the current namespace."""
    found: dict[str, list[str]] = {}
    for f in filters([Direction.INGRESS]):
        name = datapath_of_program(f.prog_id)
        if name is not None:
            found.setdefault(name, []).append(f.iface)
    return found


def _pins(pin_base: str) -> Iterator[tuple[str, int | None, str]]:
    """(datapath name, namespace inode or None for the host's, folder) of each pin folder."""
    if fs.fs_type(pin_base) != "bpf" or not os.path.isdir(pin_base):
        return
    for name in sorted(os.listdir(pin_base)):
        folder = os.path.join(pin_base, name)
        if not os.path.isdir(folder):
            continue
        entries = os.listdir(folder)
        if any(e.startswith("lb_") for e in entries):
            yield name, None, folder
        for entry in sorted(entries):
            named = _NETNS_DIR.match(entry)
            if named and os.path.isdir(os.path.join(folder, entry)):
                yield name, int(named.group(1)), os.path.join(folder, entry)


def _layout(folder: str | None, name: str) -> int | None:
    if folder is None:
        return None
    with (
        contextlib.suppress(BpfError, OSError),
        Map.from_pinned(os.path.join(folder, maps.CONFIG)) as config,
    ):
        value = adopt.config_if_named({maps.CONFIG: config}, name)
        return None if value is None else int(value.layout_version)
    return None


@functools.cache
def _this_version_maps() -> tuple[str, ...]:
    with objects.open_object("lb") as opened:
        return tuple(opened.map_names())


def datapaths(pin_root: str) -> list[DatapathInfo]:
    """Every datapath on the host: attached in a namespace, pinned under ``pin_root``,
    or both; orphans (pins of a namespace that is gone) included."""
    pin_base = fs.lasting(pin_root)
    pinned: dict[tuple[str, int | None], str] = {}
    for name, netns_id, folder in _pins(pin_base):
        pinned[(name, netns_id)] = folder
    host = current_id()
    found = []
    for netns, inode in _namespaces():
        with entered(netns):
            attached = _attached()
        key_id = None if inode == host else inode
        names = set(attached) | {n for n, i in pinned if i == key_id}
        for name in sorted(names):
            own = pinned.pop((name, key_id)) if (name, key_id) in pinned else None
            found.append(info(name, netns, inode, attached.get(name, []), own))
    for (name, _), folder in sorted(pinned.items()):  # their namespace is gone
        found.append(info(name, None, None, [], folder))
    return found


def info(
    name: str,
    netns: str | None,
    inode: int | None,
    interfaces: list[str],
    folder: str | None,
    expected: Iterable[str] = (),
) -> DatapathInfo:
    """One datapath's :class:`DatapathInfo`; ``expected``: the maps it has, to tell the
    pins that are missing."""
    pins = tuple(_pin_names(folder)) if folder else ()
    layout = _layout(folder, name) if folder else None
    if not expected and layout == migrate.LAYOUT_VERSION:
        expected = _this_version_maps()
    writer = lock.holder(lock.path_for(name, inode)) if inode is not None else None
    return DatapathInfo(
        name=name,
        netns=netns,
        netns_id=inode,
        interfaces=tuple(sorted(interfaces)),
        pin_dir=folder,
        pins=pins,
        layout=layout,
        writer=writer,
        missing_pins=tuple(sorted(set(expected) - set(pins))) if pins else (),
        cgroups=tuple(sockets.cgroups(folder)) if folder else (),
    )


@attrs.frozen
class Destroyed:
    """What :func:`destroy` removed."""

    interfaces: tuple[str, ...]
    pins: tuple[str, ...]
    cgroups: tuple[str, ...] = ()  # its socket programs were detached from


def destroy(name: str, pin_root: str, netns: str | None = None) -> Destroyed:
    """Remove datapath ``name`` of ``netns`` (None: this namespace) as far as it is
    found, without loading it: its filters, its pins, its lock file. Works on an
    incomplete datapath and on one of another layout. :class:`NotFound` if nothing
    of it is there."""
    with entered(netns):
        inode = current_id()
        ours = [f for f in filters() if datapath_of_program(f.prog_id) == name]
        base = fs.lasting(pin_root)
        pin_dir = adopt.pin_dir_for(base, name)
        pins = _pin_names(pin_dir) if fs.fs_type(pin_dir) == "bpf" else []
        if not ours and not pins:
            raise adopt.missing(name, netns, pin_dir)
        config = os.path.join(pin_dir, maps.CONFIG)
        if pins and maps.CONFIG in pins and _layout(pin_dir, name) is None:
            _refuse_foreign(name, config)
        for f in ours:
            remove(f)
    cgroups = sockets.remove_links(pin_dir) if pins else []
    if pins:
        _unpin(pin_dir, pins, base)
    for path in (lock.path_for(name, inode), lock.reader_path_for(name, inode)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return Destroyed(tuple(sorted({f.iface for f in ours})), tuple(pins), tuple(cgroups))


def prune(pin_root: str) -> list[DatapathInfo]:
    """Remove the pins of every orphan (a datapath whose network namespace is gone:
    nothing can attach it again) and return what went."""
    gone = [d for d in datapaths(pin_root) if d.orphan and d.pin_dir]
    base = fs.lasting(pin_root)
    for found in gone:
        assert found.pin_dir is not None
        sockets.remove_links(found.pin_dir)
        _unpin(found.pin_dir, found.pins, base)
    return gone


def _pin_names(folder: str) -> list[str]:
    """The names of the map pins in ``folder`` (none if it is not there)."""
    if not os.path.isdir(folder):
        return []
    return sorted(e for e in os.listdir(folder) if e.startswith("lb_"))


def _unpin(folder: str, pins: Iterable[str], base: str) -> None:
    """Remove the pins ``pins`` of ``folder``, then the folders left empty up to ``base``."""
    for entry in pins:
        os.unlink(os.path.join(folder, entry))
    remove_empty(folder, base)


def remove_empty(folder: str, base: str) -> None:
    """Remove ``folder`` and its parents up to ``base`` while they are empty."""
    while folder.startswith(base):
        try:
            os.rmdir(folder)
        except OSError:  # another datapath's pins (or namespace folders) live there
            return
        folder = os.path.dirname(folder)


def _refuse_foreign(name: str, config: str) -> None:
    """A config pin of this layout that names another datapath: not ours, left alone."""
    try:
        with Map.from_pinned(config) as found:
            size = found.value_size
    except (BpfError, OSError):
        return
    if size == ffi.sizeof("struct pyebpflb_lb_config"):
        raise PyEbpfLbError(
            f"cannot destroy datapath {name!r}: {config} belongs to another datapath; "
            "nothing was removed"
        )
