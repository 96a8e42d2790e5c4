"""Per-interface packet and byte counters: the first program through the whole path.

Loads the shipped ``counter`` object, attaches it to the tc ingress and egress
of interfaces (in this or another network namespace), and reads the per-CPU
counters back, summed. ``make demo`` runs it on a veth pair.

Interface indexes are unique only within a network namespace, and the counter
map is keyed by index, so each namespace gets its own loaded object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from pyebpflb import objects
from pyebpflb._bpf import LoadedObject, RingBuffer, TcLink, netns
from pyebpflb._bpf._libbpf import lib
from pyebpflb._bpf.netlink import ifindex_of

# Filters of the counter sit at their own handle and a later priority than the
# load balancer's, so both can share an interface.
COUNTER_HANDLE = 0xEB1C
COUNTER_PRIORITY = 100

_HOOKS = {"ingress": lib.PYEBPFLB_HOOK_TC_INGRESS, "egress": lib.PYEBPFLB_HOOK_TC_EGRESS}


@attrs.frozen
class Count:
    packets: int
    bytes: int


class InterfaceCounter:
    """Counts what crosses the interfaces it is attached to.

    ``events=True`` also emits one ring buffer record per packet (see
    :meth:`ring_buffer`); leave it off for anything but small tests.
    """

    def __init__(self, *, events: bool = False) -> None:
        self._events = events
        self._objects: dict[str | None, LoadedObject] = {}
        self._links: dict[tuple[str | None, str], list[TcLink]] = {}

    def _object(self, netns_name: str | None) -> LoadedObject:
        obj = self._objects.get(netns_name)
        if obj is None:
            obj = objects.open_object("counter").load()
            obj.map("counter_config")[0] = {"emit_events": int(self._events)}
            self._objects[netns_name] = obj
        return obj

    def attach(self, iface: str, *, netns_name: str | None = None) -> None:
        """Count ingress and egress of ``iface`` (idempotent)."""
        obj = self._object(netns_name)
        with netns.entered(netns_name):
            links = [
                TcLink.attach(
                    obj.program(f"count_tc_{direction}"),
                    iface,
                    direction,
                    handle=COUNTER_HANDLE,
                    priority=COUNTER_PRIORITY,
                )
                for direction in _HOOKS
            ]
        self._links[(netns_name, iface)] = links

    def detach(self, iface: str, *, netns_name: str | None = None) -> None:
        links = self._links.pop((netns_name, iface), [])
        with netns.entered(netns_name):
            for link in links:
                link.detach()

    def counts(self, iface: str, *, netns_name: str | None = None) -> dict[str, Count]:
        """{"ingress": Count, "egress": Count} of ``iface``, summed over CPUs."""
        with netns.entered(netns_name):
            ifindex = ifindex_of(iface)
        counters = self._object(netns_name).map("iface_counters")
        result = {}
        for direction, hook in _HOOKS.items():
            per_cpu = counters.lookup({"ifindex": ifindex, "hook": hook}) or []
            result[direction] = Count(
                packets=sum(v.packets for v in per_cpu), bytes=sum(v.bytes for v in per_cpu)
            )
        return result

    def ring_buffer(
        self, callback: Callable[[Any], object], *, netns_name: str | None = None
    ) -> RingBuffer:
        """A consumer of the per-packet events (``struct pyebpflb_counter_event``)."""
        return RingBuffer(
            self._object(netns_name).map("counter_events"),
            callback,
            event_type="struct pyebpflb_counter_event",
        )

    def close(self) -> None:
        for netns_name, iface in list(self._links):
            self.detach(iface, netns_name=netns_name)
        for obj in self._objects.values():
            obj.close()
        self._objects = {}

    def __enter__(self) -> InterfaceCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
