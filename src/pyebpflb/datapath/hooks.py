"""Where a datapath's programs run: tc filters at one fixed handle and priority on
the interfaces of its network namespace. Every question about them (attached
here? whose? which interfaces?) goes through one iterator, :func:`filters`."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterable, Iterator

import attrs

from pyebpflb import maps
from pyebpflb._bpf import Map, Program, TcLink, tc
from pyebpflb._bpf._libbpf import ffi
from pyebpflb._bpf.netns import entered
from pyebpflb.errors import BpfError, NotFound, PyEbpfLbError
from pyebpflb.model import Direction

logger = logging.getLogger("pyebpflb")

LB_HANDLE = 0xEB1B
LB_PRIORITY = 1
DIRECTIONS = (Direction.INGRESS, Direction.EGRESS)


@attrs.frozen
class Filter:
    """One of our filters: program ``prog_id`` on ``iface``'s ``direction``."""

    iface: str
    ifindex: int
    direction: Direction
    prog_id: int


def filters(
    directions: Iterable[Direction] = DIRECTIONS, iface: str | None = None
) -> Iterator[Filter]:
    """Our filters (any datapath's) on the interfaces of the current namespace."""
    chosen = [(socket.if_nametoindex(iface), iface)] if iface else socket.if_nameindex()
    for ifindex, name in chosen:
        for direction in directions:
            prog_id = tc.query(ifindex, direction, handle=LB_HANDLE, priority=LB_PRIORITY)
            if prog_id is not None:
                yield Filter(name, ifindex, direction, prog_id)


def maps_of_program(prog_id: int) -> dict[str, Map]:
    """The maps a program uses, by name (empty when it is gone); close them."""
    try:
        with Program.from_id(prog_id) as program:
            return maps_by_id(program.map_ids())
    except BpfError:
        return {}


def maps_by_id(ids: Iterable[int], *, skip_gone: bool = False) -> dict[str, Map]:
    """The maps of ``ids`` by name. One that is gone empties the result, or with
    ``skip_gone`` is left out (for a caller that names what is missing)."""
    found: dict[str, Map] = {}
    for map_id in ids:
        try:
            bpf_map = Map.from_id(map_id)
        except BpfError:
            if skip_gone:
                continue
            return close_all(found)
        found[bpf_map.name] = bpf_map
    return found


def datapath_of_program(prog_id: int) -> str | None:
    """The name of the pyebpflb datapath program ``prog_id`` belongs to (its lb_config's)."""
    found = maps_of_program(prog_id)
    try:
        config = found.get(maps.CONFIG)
        if config is None:
            return None
        raw = config[0]
        value = (
            ffi.cast("struct pyebpflb_lb_config *", ffi.from_buffer(raw))
            if isinstance(raw, bytes)
            else raw
        )
        return bytes(ffi.string(value.name)).decode(errors="replace") or None
    except BpfError:
        return None
    finally:
        close_all(found)


def remove(found: Filter) -> None:
    """Take one of our filters off its interface (and the clsact qdisc, once empty)."""
    TcLink(
        found.ifindex, found.direction, LB_HANDLE, LB_PRIORITY, found.prog_id, created_qdisc=True
    ).detach()


def close_all(found: dict[str, Map]) -> dict[str, Map]:
    for bpf_map in found.values():
        bpf_map.close()
    return {}


class Hooks:
    """Attaching, detaching and finding one datapath's programs (by its conntrack
    map: both of its programs use it, and no other datapath's do)."""

    def __init__(self, netns: str | None, programs: dict[Direction, Program], ct: Map) -> None:
        self.netns = netns
        self._programs = programs
        self._ct = ct

    def owns(self, prog_id: int) -> bool:
        found = maps_of_program(prog_id)
        try:
            return maps.CT in found and found[maps.CT].id == self._ct.id
        finally:
            close_all(found)

    def ours(self, directions: Iterable[Direction] = DIRECTIONS) -> list[Filter]:
        """This datapath's filters in its namespace."""
        with entered(self.netns):
            return [f for f in filters(directions) if self.owns(f.prog_id)]

    def attach(self, iface: str) -> dict[Direction, TcLink]:
        """Attach both programs to ``iface``; idempotent, and it swaps a new build in place."""
        with entered(self.netns):
            current = {f.direction: f for f in filters(iface=iface)}
            for found in current.values():
                if not self.owns(found.prog_id):
                    other = datapath_of_program(found.prog_id)
                    named = f" {other!r}" if other else ""
                    raise PyEbpfLbError(
                        f"{iface} {found.direction.value} already runs another pyebpflb "
                        f"datapath{named} (program id {found.prog_id}); detach or destroy that "
                        "one, or use another interface"
                    )
            links: dict[Direction, TcLink] = {}
            try:
                for direction, program in self._programs.items():
                    links[direction] = TcLink.attach(
                        program, iface, direction, handle=LB_HANDLE, priority=LB_PRIORITY
                    )
            except BaseException:
                # Leave the interface as it was: detach only what was not there before.
                for direction, link in links.items():
                    if direction not in current:
                        link.detach()
                raise
        return links

    def detach(self, iface: str | None = None) -> None:
        """Remove our filters from ``iface`` (None: from every interface). Naming an
        interface this datapath is not attached to raises :class:`NotFound`."""
        with entered(self.netns):
            ours = [f for f in filters(iface=iface) if self.owns(f.prog_id)]
            if iface is not None and not ours:
                attached = sorted({f.iface for f in filters() if self.owns(f.prog_id)})
                raise NotFound(
                    errno.ENOENT,
                    f"detach from {iface}",
                    "this datapath is not attached there; it runs on "
                    + (", ".join(attached) if attached else "no interface"),
                )
            for f in ours:
                try:
                    remove(f)
                except BpfError:
                    if iface is not None:
                        raise
                    logger.warning("pyebpflb: could not detach from %s", f.iface, exc_info=True)
