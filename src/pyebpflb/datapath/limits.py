"""How big a datapath's maps are: the constructor's size arguments, checked, and the
one table of which argument sizes which map (for sizing before load, and for the
error of a full map)."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from pyebpflb import maps


def _within(low: int, high: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(
                f"{attribute.name} must be an integer from {low} to {high}, got {value!r}"
            )

    return check


@attrs.frozen
class Limits:
    """The sizes a datapath is made with (a datapath adopted keeps its own)."""

    max_services: int = attrs.field(default=65536, validator=_within(1, 1 << 24))
    max_backends: int = attrs.field(default=262144, validator=_within(1, 1 << 24))
    max_conntrack: int = attrs.field(default=262144, validator=_within(16, 1 << 26))
    max_conntrack_syn: int = attrs.field(default=65536, validator=_within(16, 1 << 26))
    max_conntrack_udp: int = attrs.field(default=131072, validator=_within(16, 1 << 26))
    max_backends_per_service: int = attrs.field(default=1024, validator=_within(1, 65535))
    max_affinity: int = attrs.field(default=65536, validator=_within(16, 1 << 26))
    max_policies: int = attrs.field(default=4096, validator=_within(1, 1 << 20))
    max_policy_rules: int = attrs.field(default=65536, validator=_within(1, 1 << 24))
    max_policy_entries: int = attrs.field(default=1 << 20, validator=_within(16, 1 << 26))
    max_policy_conntrack: int = attrs.field(default=65536, validator=_within(16, 1 << 26))

    def sizes(self) -> dict[str, int]:
        """max_entries of every sized map."""
        return {
            name: getattr(self, argument) * factor for name, (argument, factor) in SIZED.items()
        }


# map -> (the argument that sizes it, entries per unit of it).
SIZED = {
    maps.SERVICES: ("max_services", 1),
    maps.SERVICES_ALT: ("max_services", 1),  # the services again, for a change at once
    maps.SVC_STATS: ("max_services", 2),  # both directions
    maps.SVC_NAMES: ("max_services", 1),
    maps.MAGLEV: ("max_services", 2),  # a table per generation, during a change
    maps.VIPS: ("max_services", 1),  # at most one address per service
    maps.BACKENDS: ("max_backends", 1),
    maps.BE_STATS: ("max_backends", 2),  # both directions
    maps.BE_GONE: ("max_backends", 1),
    maps.BE_NODES: ("max_backends", 1),
    maps.FRONTENDS: ("max_services", 1),
    maps.SNAT: ("max_conntrack", 1),  # two halves a flow, only external flows to remote backends
    maps.SLOTS: ("max_backends", 2),  # two generations
    maps.CT: ("max_conntrack", 1),
    maps.CT_SYN: ("max_conntrack_syn", 1),
    maps.CT_UDP: ("max_conntrack_udp", 1),
    maps.AFFINITY: ("max_affinity", 1),
    maps.POL_NAMES: ("max_policies", 1),
    maps.POL_RULES: ("max_policy_rules", 1),
    maps.RULE_STATS: ("max_policy_rules", 1),
    # Both generations of the lookup entries, during a change.
    maps.POL_CIDRS: ("max_policy_entries", 1),
    maps.POL_PORTS: ("max_policy_entries", 1),
    maps.POL_SUBJECTS: ("max_policy_entries", 1),
    maps.POL_ADDRS: ("max_policy_entries", 1),
    maps.POL_MEMBERS: ("max_policy_entries", 1),
    maps.POL_CT: ("max_policy_conntrack", 1),
}


def argument_for(map_name: str) -> str | None:
    """The constructor argument to raise when ``map_name`` is full."""
    sized = SIZED.get(map_name)
    return sized[0] if sized is not None else None
