"""How each layout version of the maps migrates from the one before.

A datapath's maps outlive the pyebpflb that made them. A newer pyebpflb
adopting a datapath of an older layout upgrades it in place, as Cilium's agent
restart does: the maps whose layout did not change are reused as they are
(services, backends, conntrack, affinity, counters: flows and counts go on), a
map whose layout changed is made anew and filled from the old one, maps the
new layout adds start empty, and the new programs replace the old ones on
every interface with tc's atomic replace. :data:`MIGRATIONS` says, for each
layout, what changed since the one before and how to carry the state over.

Each step runs in two halves around the swap of the programs: ``before`` fills
the new maps while the old programs still run (they never read the new maps),
``after`` moves what the new programs look for elsewhere, once no old program
runs. Both are idempotent, so an upgrade interrupted anywhere is finished by
the next adopter.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from pyebpflb import maps
from pyebpflb._bpf import LoadedObject, Map, ffi
from pyebpflb.errors import IncompatibleDatapath

# 2: weights, states, affinity; 3: network policy; 4: conntrack rework; 5: services
# changed all at once (two services maps), backends' generations, Maglev per generation;
# 6: socket-level balancing, the node, backends' nodes, service addresses; 7: north-south
# frontends (NodePort, external and load-balancer IPs), SNAT, source ranges; 8: policies
# with subjects (lb_pol_subjects, lb_pol_members); 9: one-address subjects in a hash
# (lb_pol_addrs), rules' origins
LAYOUT_VERSION = 9
OLDEST = 3  # the layout of the first release (v0.1.0, commit cfb391b)

# lb_config's size in each layout that is migrated from: later layouts only append.
CONFIG_SIZES = {3: 272, 4: 304, 5: 304, 6: 304, 7: 328, 8: 328, 9: 328}

Before = Callable[[Mapping[str, Map], LoadedObject], None]
After = Callable[[LoadedObject], None]


@attrs.frozen
class Migration:
    """What layout ``to`` changed since ``to - 1``, and how state is carried over."""

    to: int
    summary: str
    replaced: frozenset[str]  # maps made anew (their layout changed), filled by `before`
    added: frozenset[str]  # maps this layout adds; they start empty unless a step fills them
    before: Before  # old maps (the replaced ones, by name), new object: before the swap
    after: After  # new object: once the new programs run everywhere


def _config_3_to_4(old: Mapping[str, Map], new: LoadedObject) -> None:
    """lb_config grew the hairpin addresses at its end: the rest is copied as it is
    (ids, settings, the change counter). The hairpin addresses stay zero, which
    the settings read as "the defaults"."""
    raw = _raw(old[maps.CONFIG])
    config = ffi.new("struct pyebpflb_lb_config *")
    ffi.memmove(config, raw[: CONFIG_SIZES[3]], CONFIG_SIZES[3])
    config.layout_version = 4
    new.map(maps.CONFIG)[0] = config[0]


def _udp_entries(obj: LoadedObject) -> list[tuple[Any, Any]]:
    entries = [
        (maps.typed("struct pyebpflb_ct_key", k), maps.typed("struct pyebpflb_ct_entry", v))
        for k, v in obj.map(maps.CT).lookup_batch()
    ]
    return [(k, v) for k, v in entries if int(k.proto) == socket.IPPROTO_UDP]


def _udp_copy(_old: Mapping[str, Map], new: LoadedObject) -> None:
    """Layout 4 keeps UDP flows in lb_ct_udp, layout 3 kept them in lb_ct: copy them
    over while the old programs still read lb_ct (TCP stays: layout 4 looks in
    lb_ct first for TCP, whatever the flow's state)."""
    found = _udp_entries(new)
    if found:
        new.map(maps.CT_UDP).update_batch([k for k, _ in found], [v for _, v in found])


def _udp_move(new: LoadedObject) -> None:
    """Once only new programs run: copy again what changed meanwhile, then delete the
    UDP entries from lb_ct, where nothing looks for them any more."""
    found = _udp_entries(new)
    if not found:
        return
    udp = new.map(maps.CT_UDP)
    for key, value in found:
        have = udp.lookup(key)
        # Keep the newer of the two: the new programs may have refreshed it already.
        if have is None or int(have.last_seen_ns) < int(value.last_seen_ns):
            udp[key] = value
    ct = new.map(maps.CT)
    for key, _ in found:
        with contextlib.suppress(KeyError):  # expired and taken by the LRU meanwhile
            ct.delete(key)


def _services_twice(_old: Mapping[str, Map], new: LoadedObject) -> None:
    """Layout 5 keeps the services in two maps (a change writes the one packets do
    not read, then flips lb_config's service_map): the new one starts as a copy.
    Each backend is marked a member of its service entry's generation, and a
    Maglev table is found under (id | gen << 31): the tables of services at
    generation 1 get that key too (the old programs read the bare id)."""
    services = new.map(maps.SERVICES).lookup_batch()
    if services:
        new.map(maps.SERVICES_ALT).update_batch([k for k, _ in services], [v for _, v in services])
    generation = {}
    for _, value in services:
        entry = maps.typed("struct pyebpflb_service", value)
        generation[int(entry.id)] = int(entry.gen)
    backends = new.map(maps.BACKENDS)
    for key, value in backends.lookup_batch():
        backend = maps.typed("struct pyebpflb_backend", value)
        gen = generation.get(int(backend.service_id))
        if gen is not None and not int(backend.gens) & (1 << gen):
            backend.gens = 1 << gen
            backends[key] = backend
    for service_id in _maglev_at_gen_1(new, generation):
        outer = new.map(maps.MAGLEV)
        inner_id = outer.lookup(maps.u32(service_id))
        if inner_id is not None:
            with Map.from_id(int.from_bytes(maps.raw(inner_id), sys.byteorder)) as inner:
                outer[maps.maglev_key(service_id, 1)] = inner.fd.to_bytes(4, sys.byteorder)


def _maglev_at_gen_1(new: LoadedObject, generation: dict[int, int]) -> list[int]:
    outer = new.map(maps.MAGLEV)
    keys = outer.keys()  # a map: no batch lookup for maps of maps on every kernel
    bare = {int.from_bytes(maps.raw(k), sys.byteorder) for k in keys}
    return [i for i, gen in generation.items() if gen == 1 and i in bare]


def _bare_maglev_keys_gone(new: LoadedObject) -> None:
    """Once only new programs run: the tables of generation-1 services under their
    bare id (what layout 4's programs read) go."""
    generation = {}
    for _, value in new.map(maps.SERVICES).lookup_batch():
        entry = maps.typed("struct pyebpflb_service", value)
        generation[int(entry.id)] = int(entry.gen)
    outer = new.map(maps.MAGLEV)
    for service_id in _maglev_at_gen_1(new, generation):
        if outer.lookup(maps.maglev_key(service_id, 1)) is not None:
            with contextlib.suppress(KeyError):
                outer.delete(maps.u32(service_id))


def _vips_known(_old: Mapping[str, Map], new: LoadedObject) -> None:
    """Layout 6 refuses a service address's unallocated ports: lb_vips starts with
    every address the services have (the datapath's node is written by the
    adopter, as at every start)."""
    from pyebpflb.datapath import repair  # here: the package imports this one first

    repair.vips_from(new, new.map(maps.SERVICES))


def _config_6_to_7(old: Mapping[str, Map], new: LoadedObject) -> None:
    """lb_config grew SNAT's timeouts and ports at its end: the rest is copied as it is;
    the adopter writes the new fields, as at every start (zeros read as the defaults
    meanwhile)."""
    raw = _raw(old[maps.CONFIG])
    config = ffi.new("struct pyebpflb_lb_config *")
    ffi.memmove(config, raw[: CONFIG_SIZES[6]], CONFIG_SIZES[6])
    config.layout_version = 7
    new.map(maps.CONFIG)[0] = config[0]


def _remote_backends(_old: Mapping[str, Map], new: LoadedObject) -> None:
    """Layout 7 marks the backends on another node than the datapath's remote (external
    traffic reaches them by SNAT): from lb_be_nodes and lb_node, which layout 6 has."""
    own = ffi.string(new.map(maps.NODE)[0].name).decode()
    if not own:
        return
    backends = new.map(maps.BACKENDS)
    for key, value in new.map(maps.BE_NODES).lookup_batch():
        if ffi.string(value.name).decode() == own:
            continue
        entry = backends.lookup(key)
        if entry is not None and not int(entry.remote):
            entry.remote = 1
            backends.update(key, entry)


def _nothing(_new: LoadedObject) -> None:
    return None


def _no_state(_old: Mapping[str, Map], _new: LoadedObject) -> None:
    """Nothing to carry over: no policy of an older layout has subjects, and its lookup
    entries mean in layout 8 what they meant (scope 0: every endpoint's rules)."""
    return None


def _rules_gain_origin(old: Mapping[str, Map], new: LoadedObject) -> None:
    """lb_pol_rules grew each rule's origin at its end: the rules are copied as they
    are, with no origin ("": not said). Nothing moves for the subjects: layout 9's
    programs look in lb_pol_subjects whenever lb_pol_addrs has no entry, so layout 8's
    one-address entries there still decide; the next policy change writes them to
    lb_pol_addrs."""
    before = old[maps.POL_RULES]
    rules = new.map(maps.POL_RULES)
    for key, value in before.items():
        rule = ffi.new("struct pyebpflb_policy_rule *")
        ffi.memmove(rule, _bytes(value)[: before.value_size], before.value_size)
        rules[_bytes(key)] = rule[0]


def _both(*steps: Before) -> Before:
    def run(old: Mapping[str, Map], new: LoadedObject) -> None:
        for step in steps:
            step(old, new)

    return run


MIGRATIONS: dict[int, Migration] = {
    4: Migration(
        to=4,
        summary=(
            "conntrack in three tables (lb_ct, lb_ct_syn, lb_ct_udp) with their counters, "
            "fragments' NAT, removed backends' counters, per-CPU scratch; lb_config gains "
            "the hairpin addresses"
        ),
        replaced=frozenset({maps.CONFIG}),
        added=frozenset(
            {maps.CT_SYN, maps.CT_UDP, maps.CT_STATS, maps.FRAG_NAT, maps.BE_GONE, "lb_scratch"}
        ),
        before=_both(_config_3_to_4, _udp_copy),
        after=_udp_move,
    ),
    5: Migration(
        to=5,
        summary=(
            "the services twice (lb_services_alt), so that a change flips them all at once; "
            "backends marked with their service entry's generation; Maglev tables per "
            "generation"
        ),
        replaced=frozenset(),
        added=frozenset({maps.SERVICES_ALT}),
        before=_services_twice,
        after=_bare_maglev_keys_gone,
    ),
    6: Migration(
        to=6,
        summary=(
            "socket-level balancing (lb_sock_revnat), the datapath's node (lb_node), the "
            "backends' nodes (lb_be_nodes) and every service address (lb_vips: other ports "
            "refused); services gain internalTrafficPolicy Local"
        ),
        replaced=frozenset(),
        added=frozenset({maps.NODE, maps.BE_NODES, maps.VIPS, maps.SOCK_REVNAT}),
        before=_vips_known,
        after=_nothing,
    ),
    7: Migration(
        to=7,
        summary=(
            "north-south frontends (NodePort, external IPs, load-balancer IPs: lb_nodeport, "
            "lb_frontends), SNAT of external traffic to remote backends (lb_snat, backends "
            "marked remote), loadBalancerSourceRanges (lb_src_ranges); lb_config gains "
            "SNAT's timeouts and ports"
        ),
        replaced=frozenset({maps.CONFIG}),
        added=frozenset({maps.NODEPORT, maps.FRONTENDS, maps.SNAT, maps.SRC_RANGES}),
        before=_both(_config_6_to_7, _remote_backends),
        after=_nothing,
    ),
    8: Migration(
        to=8,
        summary=(
            "policies for some endpoints only (subjects): their rule sets by endpoint "
            "address (lb_pol_subjects) and each policy's subjects (lb_pol_members)"
        ),
        replaced=frozenset(),
        added=frozenset({maps.POL_SUBJECTS, maps.POL_MEMBERS}),
        before=_no_state,
        after=_nothing,
    ),
    9: Migration(
        to=9,
        summary=(
            "subjects of one address (a pod's) found by one hash lookup (lb_pol_addrs) "
            "before the trie of subject CIDRs; each rule keeps its origin (lb_pol_rules)"
        ),
        replaced=frozenset({maps.POL_RULES}),
        added=frozenset({maps.POL_ADDRS}),
        before=_rules_gain_origin,
        after=_nothing,
    ),
}


def path(name: str, layout: int) -> list[Migration]:
    """The steps from ``layout`` to this version's, in order; refused (changing
    nothing) for a layout newer than this version's or older than the first release."""
    if layout > LAYOUT_VERSION:
        raise IncompatibleDatapath(
            f"datapath {name!r} was made by a newer pyebpflb; nothing was changed: use that "
            "version (or a newer one) with it",
            [f"lb_config: layout {layout}, this pyebpflb knows layouts up to {LAYOUT_VERSION}"],
        )
    if layout < OLDEST:
        raise IncompatibleDatapath(
            f"datapath {name!r} is older than the first release and cannot be upgraded in "
            f"place; destroy it first (pyebpflb --datapath {name} destroy)",
            [f"lb_config: layout {layout}, upgrades start at layout {OLDEST}"],
        )
    return [MIGRATIONS[to] for to in range(layout + 1, LAYOUT_VERSION + 1)]


def _raw(config_map: Map) -> bytes:
    return _bytes(config_map[bytes(4)])


def _bytes(item: Any) -> bytes:
    """A key or value read from a map, as bytes (a struct of this version's or raw)."""
    return item if isinstance(item, bytes) else bytes(ffi.buffer(item))


def read_config(config_map: Map) -> Any:
    """lb_config's value as this version's struct, or None if the map is no pyebpflb
    config: an older layout's (a prefix of this one) padded with zeros, a newer
    one's cut to this size (its layout_version still tells what it is)."""
    if config_map.value_size < min(CONFIG_SIZES.values()):
        return None
    raw = _raw(config_map)
    size = ffi.sizeof("struct pyebpflb_lb_config")
    config = ffi.new("struct pyebpflb_lb_config *")
    ffi.memmove(config, raw[:size], min(size, len(raw)))
    layout = int(config.layout_version)
    if layout in CONFIG_SIZES and CONFIG_SIZES[layout] != config_map.value_size:
        return None  # a map of another size claiming a known layout: not ours
    return config
