"""What a datapath holds, as plain values: the input of the planner.

Pure: a :class:`Snapshot` or :class:`PolicyState` is read from the kernel by
``pyebpflb.datapath.state`` and planned against by ``pyebpflb.plan``, but it is
only data, and tests build their own.
"""

from __future__ import annotations

from typing import Any

import attrs

from pyebpflb.model import Address, Frontend, Policy, Protocol, Service
from pyebpflb.policy import RuleRef

Key = tuple[Address, int, Protocol]


@attrs.frozen
class Installed:
    """A service as the kernel holds it: the model plus its ids."""

    service: Service
    id: int
    gen: int
    backend_ids: tuple[int, ...]  # in the order of service.backends
    count: int  # slots of the current generation (usable backends)
    slots: frozenset[int]  # every slot key (gen << 31 | index) present, both generations
    origin: Key | None = None  # the ClusterIP entry of the Service this is a frontend of


def _count_vips(snapshot: Snapshot) -> dict[Address, int]:
    counts: dict[Address, int] = {}
    for (vip, _, _), installed in snapshot.services.items():
        if installed.service.kind is Frontend.CLUSTER_IP:  # only ClusterIPs refuse other ports
            counts[vip] = counts.get(vip, 0) + 1
    return counts


@attrs.frozen
class Snapshot:
    services: dict[Key, Installed]
    next_service_id: int
    next_backend_id: int
    # Service address -> how many services it has (lb_vips: its other ports are refused).
    vips: dict[Address, int] = attrs.field(
        default=attrs.Factory(_count_vips, takes_self=True), eq=False, repr=False
    )

    def names(self) -> dict[int, str]:
        """Service id -> its name (its VIP:port/protocol when it has none)."""
        return {i.id: _name_of(i.service) for i in self.services.values()}

    def by_id(self, service_id: int) -> Installed | None:
        return next((i for i in self.services.values() if i.id == service_id), None)

    def in_order(self) -> list[Installed]:
        """The installed services in the order they were installed (by id)."""
        return sorted(self.services.values(), key=lambda i: i.id)


def _name_of(service: Service) -> str:
    """What events and metrics call an entry: its name (a frontend's with its kind)."""
    if not service.name:
        return service.label
    return f"{service.name} {service.kind.value}" if service.kind.external else service.name


EMPTY = Snapshot(services={}, next_service_id=1, next_backend_id=1)


@attrs.frozen
class PolicyState:
    """The policies the kernel holds, and what a change must replace."""

    gen: int  # the generation lb_policy points at (meaningless while `active` is False)
    active: bool  # lb_policy holds a head
    policies: dict[str, tuple[int, Policy]]  # name -> (policy id, policy), in install order
    refs: tuple[RuleRef, ...]
    keys: dict[int, tuple[list[Any], list[Any]]]  # gen -> (cidr keys, port keys) present
    subject_keys: dict[int, list[Any]] = attrs.field(factory=dict)  # gen -> subject keys
    # The generation in force has SCTP's own pieces (compiled by layout 9 or later).
    sctp_pieces: bool = True
    # What patching the active generation needs (pyebpflb.policy_plan.RulesetIndex):
    # known only to the process that compiled it; None when read back from the kernel.
    index: Any = attrs.field(default=None, eq=False, repr=False)

    def ref(self, rule_id: int) -> RuleRef | None:
        return next((r for r in self.refs if r.id == rule_id), None) if rule_id else None
