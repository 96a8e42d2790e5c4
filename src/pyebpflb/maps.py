"""The load balancer's maps: their names, and codecs between the model and them.

Every layout comes from ``csrc/include/pyebpflb/lb.h`` through cffi; this
module only knows which model value goes into which field, and in which byte
order. Pure: it builds bytes and reads cdata, never a map (reading the kernel is
``pyebpflb.datapath.state``'s job). What a sync writes by the hundred thousand
(service keys and entries, slots, backends, names) is packed into ``bytes`` by
:mod:`pyebpflb.packing`, with no cffi call per entry.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import sys
from collections.abc import Sequence
from typing import Any

from pyebpflb import policy
from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb.layout import FAMILY_TAG, POLICY_GEN_SHIFT, SLOT_GEN_SHIFT
from pyebpflb.model import (
    Action,
    Address,
    Backend,
    BackendState,
    Direction,
    Forwarding,
    Frontend,
    Network,
    Policy,
    Protocol,
    Rule,
    RuleProtocol,
    Scheduler,
    Service,
    TrafficPolicy,
)
from pyebpflb.packing import LayoutMismatch, Packer
from pyebpflb.packing import u32 as u32
from pyebpflb.packing import u32s as u32s

# The maps of the lb object (each defined in csrc/bpf/lib/ beside its concern): a
# map's name in C, its pin file and the name Python opens it by are this one word.
CONFIG = "lb_config"
SERVICES = "lb_services"  # the services packets read: this map or SERVICES_ALT (lb_config)
SERVICES_ALT = "lb_services_alt"
SVC_NAMES = "lb_svc_names"
SVC_STATS = "lb_svc_stats"
BACKENDS = "lb_backends"
BE_STATS = "lb_be_stats"
BE_GONE = "lb_be_gone"  # backends that left, until their last flow ends (user space)
SLOTS = "lb_slots"
MAGLEV = "lb_maglev"
CT = "lb_ct"  # TCP flows the backend answered
CT_SYN = "lb_ct_syn"  # TCP flows it has not answered (yet)
CT_UDP = "lb_ct_udp"  # UDP flows
CT_TABLES = (CT, CT_SYN, CT_UDP)  # every balanced flow is in one of them
CT_STATS = "lb_ct_stats"  # per table, in CT_TABLES order
AFFINITY = "lb_affinity"
DROPS = "lb_drops"
POLICY = "lb_policy"
POL_NAMES = "lb_pol_names"
POL_RULES = "lb_pol_rules"
RULE_STATS = "lb_rule_stats"
POL_CIDRS = "lb_pol_cidrs"
POL_PORTS = "lb_pol_ports"
POL_SUBJECTS = "lb_pol_subjects"  # endpoint CIDR -> the rule set of the policies for it
POL_ADDRS = "lb_pol_addrs"  # the same for subjects of one address (hash)
POL_MEMBERS = "lb_pol_members"  # (policy id, index) -> a subject of the policy (user space)
POL_CT = "lb_pol_ct"
FRAGS = "lb_frags"
FRAG_NAT = "lb_frag_nat"
EVENTS = "lb_events"
EVENT_STATS = "lb_event_stats"
EVENT_READER = "lb_event_reader"
NODE = "lb_node"  # the node the datapath serves: netns cookie, addresses, name
BE_NODES = "lb_be_nodes"  # backend id -> its node name (user space)
NODEPORT = "lb_nodeport"  # the addresses NodePorts are served on
SNAT = "lb_snat"  # SNAT mappings of external flows to remote backends, both ways
SRC_RANGES = "lb_src_ranges"  # (load-balancer frontend, CIDR): loadBalancerSourceRanges
FRONTENDS = "lb_frontends"  # frontend id -> the ClusterIP entry it belongs to (user space)
VIPS = "lb_vips"  # every service address -> its number of services
SOCK_REVNAT = "lb_sock_revnat"  # translated sockets -> the service address they asked for
MAGLEV_TABLE = "lb_maglev_table"  # the inner maps of lb_maglev


# lib/counters.h: a counter's replies are kept under its id with this bit set.
COUNTER_REPLY = 1 << 31


def raw(value: Any) -> bytes:
    """A key or value as the kernel holds it: typed maps decode a __u32 as an int and
    a struct as cdata, untyped ones give bytes."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, int):
        return value.to_bytes(4, sys.byteorder)
    return bytes(ffi.buffer(value))


def typed(ctype: str, value: Any) -> Any:
    """``value`` (a key or value of a map) as ``ctype``: maps without their BTF types
    (reused from another build, or opened by id) give bytes."""
    if isinstance(value, bytes | bytearray):
        return ffi.from_buffer(f"{ctype} *", bytearray(value))[0]
    return value


def counter_keys(counter_id: int) -> tuple[Any, Any]:
    """The keys of a service's or backend's counters: forward, then replies."""
    return u32(counter_id), u32(counter_id | COUNTER_REPLY)


def addr_bytes(address: Address) -> bytes:
    """16 bytes as in ``union pyebpflb_addr``: IPv4 first, then zeros."""
    return address.packed.ljust(16, b"\x00")


def addr_from(union: Any, family: int) -> Address:
    """The address in a ``union pyebpflb_addr`` of ``family`` (enum pyebpflb_family)."""
    raw = bytes(ffi.buffer(union.bytes, 16))
    if family == lib.PYEBPFLB_IPV4:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)


def counter_sum(per_cpu: list[Any] | None) -> tuple[int, int]:
    """(packets, bytes) of a per-CPU ``struct pyebpflb_counter_value``, summed."""
    if not per_cpu:
        return 0, 0
    return sum(int(v.packets) for v in per_cpu), sum(int(v.bytes) for v in per_cpu)


def port_be(port: int) -> int:
    return socket.htons(port)


def port_from(value: int) -> int:
    return socket.ntohs(value)


_SERVICE_KEY = Packer("struct pyebpflb_service_key", "vip", "port", "proto", "family")
_SERVICE = Packer(
    "struct pyebpflb_service", "id", "count", "gen", "flags", "kind", "affinity_timeout_s"
)
_SLOT_KEY = Packer("struct pyebpflb_slot_key", "service_id", "slot")
if _SLOT_KEY.pack(1, 2) != u32(1) + u32(2):  # slot_entries joins the two halves
    raise LayoutMismatch("struct pyebpflb_slot_key is no longer two adjacent __u32")
_SLOT = Packer("struct pyebpflb_slot", "backend_id", "alias_id", "threshold")
_BACKEND = Packer(
    "struct pyebpflb_backend",
    "addr",
    "port",
    "family",
    "state",
    "service_id",
    "weight",
    "position",
    "usable",
    "gens",
    "remote",
)
_NAME = Packer("struct pyebpflb_service_name", "name")
_MAGLEV_FLAG = {Scheduler.MAGLEV: int(lib.PYEBPFLB_SERVICE_MAGLEV)}
# (key size, value size) of the entries packed below, by map.
PACKED_SIZES = {
    SERVICES: (_SERVICE_KEY.size, _SERVICE.size),
    SVC_NAMES: (4, _NAME.size),
    BACKENDS: (4, _BACKEND.size),
    SLOTS: (_SLOT_KEY.size, _SLOT.size),
}


def service_key(service: Service) -> bytes:
    return _SERVICE_KEY.pack(
        service.vip.packed,
        socket.htons(service.port),
        service.protocol.number,
        FAMILY_TAG[service.vip.version],
    )


_LOCAL_ONLY = int(lib.PYEBPFLB_SERVICE_LOCAL_ONLY)
_SOURCE_RANGES = int(lib.PYEBPFLB_SERVICE_SOURCE_RANGES)
_DSR = int(lib.PYEBPFLB_SERVICE_DSR)
KIND_TAG = {
    Frontend.CLUSTER_IP: int(lib.PYEBPFLB_KIND_CLUSTER_IP),
    Frontend.NODE_PORT: int(lib.PYEBPFLB_KIND_NODE_PORT),
    Frontend.EXTERNAL_IP: int(lib.PYEBPFLB_KIND_EXTERNAL_IP),
    Frontend.LOAD_BALANCER: int(lib.PYEBPFLB_KIND_LOAD_BALANCER),
}
KIND_OF = {tag: kind for kind, tag in KIND_TAG.items()}


def service_entry(service_id: int, count: int, gen: int, service: Service) -> bytes:
    kind = service.kind
    if kind is Frontend.CLUSTER_IP:
        flags = _LOCAL_ONLY if service.internal_traffic_policy is TrafficPolicy.LOCAL else 0
    else:
        flags = _LOCAL_ONLY if service.external_traffic_policy is TrafficPolicy.LOCAL else 0
        if service.source_ranges:
            flags |= _SOURCE_RANGES
        if service.forwarding is Forwarding.DSR:
            flags |= _DSR
    return _SERVICE.pack(
        service_id,
        count,
        gen,
        _MAGLEV_FLAG.get(service.scheduler, 0) | flags,
        KIND_TAG[kind],
        service.affinity_timeout or 0,
    )


def traffic_policy_from(entry: Any) -> TrafficPolicy:
    """The traffic policy a ``struct pyebpflb_service`` follows: internalTrafficPolicy
    for a ClusterIP entry, externalTrafficPolicy for an external one."""
    return TrafficPolicy.LOCAL if int(entry.flags) & _LOCAL_ONLY else TrafficPolicy.CLUSTER


def forwarding_from(entry: Any) -> Forwarding:
    return Forwarding.DSR if int(entry.flags) & _DSR else Forwarding.SNAT


def kind_from(entry: Any) -> Frontend:
    return KIND_OF.get(int(entry.kind), Frontend.CLUSTER_IP)


_FRONTEND = Packer("struct pyebpflb_frontend", "origin", "health_check_port")


def frontend_value(origin: tuple[Address, int, Protocol], health_check_port: int | None) -> bytes:
    """A ``struct pyebpflb_frontend``: the ClusterIP entry a frontend was made with."""
    vip, port, protocol = origin
    key = ffi.new("struct pyebpflb_service_key *")
    key.vip.bytes = vip.packed.ljust(16, b"\0")
    key.port = socket.htons(port)
    key.proto = protocol.number
    key.family = FAMILY_TAG[vip.version]
    return _FRONTEND.pack(ffi.buffer(key)[:], health_check_port or 0)


def origin_from(value: Any) -> tuple[Address, int, Protocol]:
    key = value.origin
    return (
        addr_from(key.vip, key.family),
        port_from(key.port),
        Protocol.from_number(int(key.proto)),
    )


def snat_partner(key: Any, entry: Any) -> bytes:
    """The key of the other half of a SNAT mapping (``struct pyebpflb_ct_key`` and
    ``struct pyebpflb_snat_entry`` of one half): OUT (client -> backend) <-> IN
    (backend -> node)."""
    partner = ffi.new("struct pyebpflb_ct_key *")
    partner.proto, partner.family = key.proto, key.family
    if int(key.dir) == lib.PYEBPFLB_SNAT_OUT:
        partner.saddr, partner.sport = key.daddr, key.dport
        partner.daddr, partner.dport = entry.addr, entry.port
        partner.dir = lib.PYEBPFLB_SNAT_IN
    else:
        partner.saddr, partner.sport = entry.addr, entry.port
        partner.daddr, partner.dport = key.saddr, key.sport
        partner.dir = lib.PYEBPFLB_SNAT_OUT
    return bytes(ffi.buffer(partner))


_SRC_RANGE_FIXED = int(lib.PYEBPFLB_SRC_RANGE_FIXED_BITS)


def src_range_key(service_id: int, network: Network) -> Any:
    """The lb_src_ranges key of a load-balancer frontend's source range."""
    key = ffi.new("struct pyebpflb_src_range_key *")
    key.prefixlen = _SRC_RANGE_FIXED + network.prefixlen
    key.service_id = service_id
    key.family = FAMILY_TAG[network.version]
    key.addr.bytes = network.network_address.packed.ljust(16, b"\0")
    return key[0]


def network_from(key: Any) -> Network:
    address = addr_from(key.addr, int(key.family))
    return ipaddress.ip_network(f"{address}/{int(key.prefixlen) - _SRC_RANGE_FIXED}")


def scheduler_from(entry: Any) -> Scheduler:
    """The scheduler of a ``struct pyebpflb_service``."""
    return Scheduler.MAGLEV if int(entry.flags) & lib.PYEBPFLB_SERVICE_MAGLEV else Scheduler.RANDOM


def slot_key(service_id: int, gen: int, slot: int) -> bytes:
    return _SLOT_KEY.pack(service_id, (gen << SLOT_GEN_SHIFT) | slot)


STATE_TAG = {
    BackendState.ACTIVE: lib.PYEBPFLB_BACKEND_ACTIVE,
    BackendState.TERMINATING: lib.PYEBPFLB_BACKEND_TERMINATING,
    BackendState.MAINTENANCE: lib.PYEBPFLB_BACKEND_MAINTENANCE,
}
STATE_OF = {tag: state for state, tag in STATE_TAG.items()}


_ACTIVE = BackendState.ACTIVE
_ACTIVE_TAG = STATE_TAG[_ACTIVE]


def backend_value(
    backend: Backend,
    service_id: int,
    position: int,
    usable: bool,
    gens: int,
    node: str | None = None,
) -> bytes:
    """A ``struct pyebpflb_backend``; ``gens``: 1 << gen for each generation of its
    service's entry it is a member of (a change makes it both, or the new one's);
    ``node``: the datapath's, to mark a backend on another node remote."""
    state = backend.state
    where = backend.node
    return _BACKEND.pack(
        backend.address.packed,
        socket.htons(backend.port),
        FAMILY_TAG[backend.address.version],
        # Most backends are active: an identity test spares the enum's slow hash.
        _ACTIVE_TAG if state is _ACTIVE else STATE_TAG[state],
        service_id,
        backend.weight,
        position,
        usable,
        gens,
        where is not None and node is not None and where != node,
    )


def backend_values(
    service: Service, service_id: int, usable_at: list[int], gens: int, node: str | None = None
) -> bytes:
    """The values of all of ``service``'s backends, packed end to end in their order."""
    in_use = set(usable_at)
    return b"".join(
        [
            backend_value(backend, service_id, position, position in in_use, gens, node)
            for position, backend in enumerate(service.backends)
        ]
    )


def maglev_key(service_id: int, gen: int) -> bytes:
    """The lb_maglev key of a service's table for its entry's generation ``gen``."""
    return u32(service_id | gen << lib.PYEBPFLB_MAGLEV_GEN_SHIFT)


def slot_entries(
    service_id: int, gen: int, table: Sequence[tuple[int, int, int]], ids: list[int]
) -> tuple[bytes, bytes]:
    """Keys and values of the slots of ``table`` (alias indexes into ``ids``), packed."""
    service = u32(service_id)  # a slot key: the service id, then the slot number
    keys = b"".join([service + slot for slot in _slot_numbers(gen, len(table))])
    value = _SLOT.pack
    values = b"".join([value(ids[own], ids[alias], threshold) for own, alias, threshold in table])
    return keys, values


@functools.lru_cache(maxsize=512)
def _slot_numbers(gen: int, count: int) -> tuple[bytes, ...]:
    """The packed slot numbers 1..count of generation ``gen``."""
    return tuple(u32((gen << SLOT_GEN_SHIFT) | index) for index in range(1, count + 1))


def backend_from(value: Any, node: str | None = None) -> Backend:
    return Backend(
        addr_from(value.addr, value.family),
        port_from(value.port),
        weight=int(value.weight),
        state=STATE_OF[int(value.state)],
        node=node,
    )


_NODE_NAME = Packer("struct pyebpflb_node_name", "name")
_VIP_KEY = Packer("struct pyebpflb_vip_key", "vip", "family")


def node_name_value(name: str) -> bytes:
    """A ``struct pyebpflb_node_name`` (lb_be_nodes' value)."""
    return _NODE_NAME.pack(name.encode())


_VIP_TAIL = {family: bytes([tag, 0, 0, 0]) for family, tag in FAMILY_TAG.items()}


def vip_key(address: Address) -> bytes:
    """The lb_vips key of a service address (joined by hand: a sync of 100,000
    services writes 100,000 of them, and a Packer call each costs a third of it)."""
    return address.packed.ljust(16, b"\0") + _VIP_TAIL[address.version]


if vip_key(ipaddress.IPv4Address("10.0.0.1")) != _VIP_KEY.pack(
    ipaddress.IPv4Address("10.0.0.1").packed, FAMILY_TAG[4]
):
    raise LayoutMismatch("struct pyebpflb_vip_key is no longer 16 address bytes and a family tag")


def slot_value(backend_id: int, alias_id: int, threshold: int) -> bytes:
    return _SLOT.pack(backend_id, alias_id, threshold)


def name_value(name: str) -> bytes:
    return _NAME.pack(name.encode())


# -- network policy ----------------------------------------------------------------------

POLICY_DIR_TAG = {
    Direction.INGRESS: lib.PYEBPFLB_POLICY_INGRESS,
    Direction.EGRESS: lib.PYEBPFLB_POLICY_EGRESS,
}
POLICY_DIR_OF = {tag: d for d, tag in POLICY_DIR_TAG.items()}
ACTION_TAG = {Action.ALLOW: lib.PYEBPFLB_POLICY_ALLOW, Action.DENY: lib.PYEBPFLB_POLICY_DENY}
ACTION_OF = {tag: action for action, tag in ACTION_TAG.items()}
RULE_PROTO_TAG = {
    RuleProtocol.ANY: 0,
    RuleProtocol.TCP: lib.PYEBPFLB_POLICY_TCP,
    RuleProtocol.UDP: lib.PYEBPFLB_POLICY_UDP,
    RuleProtocol.ICMP: lib.PYEBPFLB_POLICY_ICMP,
    RuleProtocol.SCTP: lib.PYEBPFLB_POLICY_SCTP,
}
RULE_PROTO_OF = {tag: proto for proto, tag in RULE_PROTO_TAG.items()}
_CIDR_FIXED = int(lib.PYEBPFLB_POLICY_CIDR_FIXED_BITS)
_PORT_FIXED = int(lib.PYEBPFLB_POLICY_PORT_FIXED_BITS)


def _policy_flags(
    on: bool,
    deny: bool,
    service_rules: bool = False,
    subjects: bool = False,
    sctp_pieces: bool = True,
    everyone: bool = False,
) -> int:
    return (
        (lib.PYEBPFLB_POLICY_ON if on else 0)
        | (lib.PYEBPFLB_POLICY_SCTP_PIECES if on and sctp_pieces else 0)
        | (lib.PYEBPFLB_POLICY_DEFAULT_DENY if deny else 0)
        | (lib.PYEBPFLB_POLICY_SERVICE_RULES if service_rules else 0)
        | (lib.PYEBPFLB_POLICY_SUBJECTS if subjects else 0)
        | (lib.PYEBPFLB_POLICY_EVERYONE if everyone else 0)
    )


def policy_head(gen: int, compiled: policy.Compiled, sctp_pieces: bool = True) -> Any:
    """The head of generation ``gen``; ``sctp_pieces=False`` for a generation compiled
    before layout 9, whose classes match SCTP as any other protocol."""
    return ffi.new(
        "struct pyebpflb_policy_head *",
        {
            "gen": gen,
            "ingress": _policy_flags(
                compiled.ingress_on,
                compiled.ingress_deny,
                compiled.ingress_service_rules,
                compiled.has_subjects(Direction.INGRESS),
                sctp_pieces,
                Direction.INGRESS in compiled.everyone_directions,
            ),
            "egress": _policy_flags(
                compiled.egress_on,
                compiled.egress_deny,
                subjects=compiled.has_subjects(Direction.EGRESS),
                sctp_pieces=sctp_pieces,
                everyone=Direction.EGRESS in compiled.everyone_directions,
            ),
        },
    )


def policy_subject_key(entry: policy.SubjectEntry, gen: int) -> Any:
    """The key of a subject entry: in lb_pol_addrs (prefixlen 0) when the subject
    is one address, else in lb_pol_subjects (see :func:`subject_map`)."""
    key = ffi.new("struct pyebpflb_policy_subject_key *")
    one_address = entry.network.prefixlen == entry.network.max_prefixlen
    key.prefixlen = 0 if one_address else _CIDR_FIXED + entry.network.prefixlen
    key.gen = gen << POLICY_GEN_SHIFT
    key.dir = POLICY_DIR_TAG[entry.direction]
    key.family = FAMILY_TAG[entry.family]
    ffi.memmove(key.addr.bytes, addr_bytes(entry.network.network_address), 16)
    return key


def subject_map(key: Any) -> str:
    """The map a subject key is in: a one-address subject's (prefixlen 0) in the hash
    lb_pol_addrs, a CIDR's (and one address's written by layout 8) in the trie."""
    return POL_ADDRS if int(key.prefixlen) == 0 else POL_SUBJECTS


def policy_subject(entry: policy.SubjectEntry) -> Any:
    return ffi.new(
        "struct pyebpflb_policy_subject *",
        {"scope": entry.scope, "flags": _policy_flags(True, entry.deny, sctp_pieces=False)},
    )


def policy_member_key(policy_id: int, index: int) -> Any:
    return ffi.new("struct pyebpflb_policy_member_key *", {"policy_id": policy_id, "index": index})


def policy_member(subject: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Any:
    value = ffi.new("struct pyebpflb_policy_member *")
    ffi.memmove(value.addr.bytes, addr_bytes(subject.network_address), 16)
    value.family = FAMILY_TAG[subject.version]
    value.prefixlen = subject.prefixlen
    return value


def member_from(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network((addr_from(value.addr, value.family), int(value.prefixlen)))


def policy_cidr_key(entry: policy.CidrEntry, gen: int) -> Any:
    key = ffi.new("struct pyebpflb_policy_cidr_key *")
    key.prefixlen = _CIDR_FIXED + entry.network.prefixlen
    key.scope = (gen << POLICY_GEN_SHIFT) | entry.scope
    key.dir = POLICY_DIR_TAG[entry.direction]
    key.family = FAMILY_TAG[entry.family]
    ffi.memmove(key.addr.bytes, addr_bytes(entry.network.network_address), 16)
    return key


def policy_class(entry: policy.CidrEntry) -> Any:
    value = ffi.new("struct pyebpflb_policy_class *")
    value.class_id = entry.class_id
    value.spilled = int(entry.spilled)
    for slot, piece in zip(value.pieces, entry.pieces, strict=False):
        slot.port_low, slot.port_high = piece.low, piece.high
        slot.proto = piece.proto
        slot.action = ACTION_TAG[piece.action]
        slot.prefixlen = piece.cidr_prefixlen
        slot.rule_id = piece.rule_id
    return value


def policy_port_key(entry: policy.PortEntry) -> Any:
    return ffi.new(
        "struct pyebpflb_policy_port_key *",
        {
            "prefixlen": _PORT_FIXED + entry.port_prefixlen,
            "class_id": entry.class_id,
            "proto": entry.proto,
            "port": port_be(entry.port),
        },
    )


def policy_verdict(entry: policy.PortEntry) -> Any:
    return ffi.new(
        "struct pyebpflb_policy_verdict *",
        {
            "rule_id": entry.rule_id,
            "action": ACTION_TAG[entry.action],
            "prefixlen": entry.cidr_prefixlen,
        },
    )


def policy_rule(ref: policy.RuleRef, policy_id: int) -> Any:
    rule = ref.rule
    value = ffi.new("struct pyebpflb_policy_rule *")
    if rule.cidr is not None:
        ffi.memmove(value.addr.bytes, addr_bytes(rule.cidr.network_address), 16)
        value.family = FAMILY_TAG[rule.cidr.version]
        value.prefixlen = rule.cidr.prefixlen
    value.action = ACTION_TAG[rule.action]
    value.proto = RULE_PROTO_TAG[rule.protocol]
    if rule.ports is not None:
        value.port_low, value.port_high = rule.ports
    value.policy_id = policy_id
    value.index = ref.index
    if rule.service is not None:
        encoded = rule.service.encode()
        ffi.memmove(value.service, encoded, len(encoded))
    if rule.origin is not None:
        encoded = rule.origin.encode()
        ffi.memmove(value.origin, encoded, len(encoded))
    return value


def rule_from(value: Any) -> Rule:
    cidr = None
    if int(value.family):
        address = addr_from(value.addr, value.family)
        cidr = ipaddress.ip_network((address, int(value.prefixlen)))
    service = ffi.string(value.service).decode() or None
    ports = (int(value.port_low), int(value.port_high)) if int(value.port_low) else None
    return Rule(
        ACTION_OF[int(value.action)],
        cidr,
        protocol=RULE_PROTO_OF[int(value.proto)],
        ports=ports,
        service=service,
        origin=ffi.string(value.origin).decode() or None,
    )


def policy_info(item: Policy) -> Any:
    value = ffi.new("struct pyebpflb_policy_info *")
    encoded = item.name.encode()
    ffi.memmove(value.name, encoded, len(encoded))
    value.dir = POLICY_DIR_TAG[item.direction]
    value.default_deny = int(item.default is Action.DENY)
    value.rules = len(item.rules)
    return value
