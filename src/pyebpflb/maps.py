"""Codecs between the model and the load balancer's maps.

Every layout comes from ``csrc/include/pyebpflb/lb.h`` through cffi; this
module only knows which model value goes into which field, and in which byte
order. It reads whole maps into a :class:`Snapshot` of installed services.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import attrs

from pyebpflb import policy
from pyebpflb._bpf import Map, Object, ffi
from pyebpflb._bpf._libbpf import lib
from pyebpflb.errors import BpfError
from pyebpflb.model import (
    Action,
    Address,
    Backend,
    BackendState,
    Direction,
    Policy,
    Protocol,
    Rule,
    RuleProtocol,
    Scheduler,
    Service,
)

SLOT_GEN_SHIFT = int(lib.PYEBPFLB_SLOT_GEN_SHIFT)
FAMILY_TAG = {4: lib.PYEBPFLB_IPV4, 6: lib.PYEBPFLB_IPV6}


def all_keys(bpf_map: Map) -> list[Any]:
    """Every key of ``bpf_map``: in batches where the kernel has them for its type,
    else one system call a key."""
    try:
        return [key for key, _ in bpf_map.lookup_batch()]
    except BpfError:
        return list(bpf_map.keys())


def u32(value: int) -> Any:
    """A ``__u32`` key or value: the ids of services and backends, slot indexes."""
    return ffi.new("__u32 *", value)


def addr_bytes(address: Address) -> bytes:
    """16 bytes as in ``union pyebpflb_addr``: IPv4 first, then zeros."""
    return address.packed.ljust(16, b"\x00")


def addr_from(union: Any, family: int) -> Address:
    raw = bytes(ffi.buffer(union.bytes, 16))
    if family == lib.PYEBPFLB_IPV4:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)


def port_be(port: int) -> int:
    return socket.htons(port)


def port_from(value: int) -> int:
    return socket.ntohs(value)


def service_key(service: Service) -> Any:
    key = ffi.new("struct pyebpflb_service_key *")
    ffi.memmove(key.vip.bytes, addr_bytes(service.vip), 16)
    key.port = port_be(service.port)
    key.proto = service.protocol.number
    key.family = FAMILY_TAG[service.vip.version]
    return key


def service_entry(service_id: int, count: int, gen: int, service: Service) -> Any:
    maglev = service.scheduler is Scheduler.MAGLEV
    return ffi.new(
        "struct pyebpflb_service *",
        {
            "id": service_id,
            "count": count,
            "gen": gen,
            "flags": lib.PYEBPFLB_SERVICE_MAGLEV if maglev else 0,
            "affinity_timeout_s": service.affinity_timeout or 0,
        },
    )


def slot_key(service_id: int, gen: int, slot: int) -> Any:
    return ffi.new(
        "struct pyebpflb_slot_key *",
        {"service_id": service_id, "slot": (gen << SLOT_GEN_SHIFT) | slot},
    )


STATE_TAG = {
    BackendState.ACTIVE: lib.PYEBPFLB_BACKEND_ACTIVE,
    BackendState.TERMINATING: lib.PYEBPFLB_BACKEND_TERMINATING,
    BackendState.MAINTENANCE: lib.PYEBPFLB_BACKEND_MAINTENANCE,
}
STATE_OF = {tag: state for state, tag in STATE_TAG.items()}


def backend_value(backend: Backend, service_id: int, position: int, usable: bool) -> Any:
    value = ffi.new("struct pyebpflb_backend *")
    ffi.memmove(value.addr.bytes, addr_bytes(backend.address), 16)
    value.port = port_be(backend.port)
    value.family = FAMILY_TAG[backend.family]
    value.state = STATE_TAG[backend.state]
    value.service_id = service_id
    value.weight = backend.weight
    value.position = position
    value.usable = int(usable)
    return value


def backend_from(value: Any) -> Backend:
    return Backend(
        addr_from(value.addr, value.family),
        port_from(value.port),
        weight=int(value.weight),
        state=STATE_OF[int(value.state)],
    )


def slot_value(backend_id: int, alias_id: int, threshold: int) -> Any:
    return ffi.new(
        "struct pyebpflb_slot *",
        {"backend_id": backend_id, "alias_id": alias_id, "threshold": threshold},
    )


def name_value(name: str) -> Any:
    value = ffi.new("struct pyebpflb_service_name *")
    encoded = name.encode()
    ffi.memmove(value.name, encoded, len(encoded))
    return value


@attrs.frozen
class Installed:
    """A service as the kernel holds it: the model plus its ids."""

    service: Service
    id: int
    gen: int
    backend_ids: tuple[int, ...]  # in the order of service.backends
    count: int  # slots of the current generation (usable backends)
    slots: frozenset[int]  # every slot key (gen << 31 | index) present, both generations


@attrs.frozen
class Snapshot:
    services: dict[tuple[Address, int, Protocol], Installed]
    next_service_id: int
    next_backend_id: int

    def names(self) -> dict[int, str]:
        """Service id -> its name (its VIP:port/protocol when it has none)."""
        return {i.id: i.service.name or i.service.label for i in self.services.values()}


def read_snapshot(obj: Object) -> Snapshot:
    """Everything installed, read from the maps in a few batch calls."""
    config = obj.map("lb_config")[0]
    names = {int(k): ffi.string(v.name).decode() for k, v in obj.map("lb_svc_names").lookup_batch()}
    members: dict[int, list[tuple[int, int, Any]]] = {}
    for key, value in obj.map("lb_backends").lookup_batch():
        members.setdefault(int(value.service_id), []).append((int(value.position), int(key), value))
    slots: dict[int, set[int]] = {}
    for key, _ in obj.map("lb_slots").lookup_batch():
        slots.setdefault(int(key.service_id), set()).add(int(key.slot))
    services = {}
    for key, entry in obj.map("lb_services").lookup_batch():
        own = sorted(members.get(int(entry.id), []), key=lambda member: member[0])
        service = Service(
            vip=addr_from(key.vip, key.family),
            port=port_from(key.port),
            protocol=Protocol.from_number(int(key.proto)),
            name=names.get(int(entry.id), ""),
            backends=[backend_from(value) for _, _, value in own],
            affinity_timeout=int(entry.affinity_timeout_s) or None,
            scheduler=(
                Scheduler.MAGLEV
                if int(entry.flags) & lib.PYEBPFLB_SERVICE_MAGLEV
                else Scheduler.RANDOM
            ),
        )
        services[service.key] = Installed(
            service,
            int(entry.id),
            int(entry.gen),
            tuple(backend_id for _, backend_id, _ in own),
            int(entry.count),
            frozenset(slots.get(int(entry.id), set())),
        )
    return Snapshot(
        services=services,
        next_service_id=max(int(config.next_service_id), 1),
        next_backend_id=max(int(config.next_backend_id), 1),
    )


# -- network policy ----------------------------------------------------------------------

POLICY_GEN_SHIFT = int(lib.PYEBPFLB_POLICY_GEN_SHIFT)
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
}
RULE_PROTO_OF = {tag: proto for proto, tag in RULE_PROTO_TAG.items()}
_CIDR_FIXED = int(lib.PYEBPFLB_POLICY_CIDR_FIXED_BITS)
_PORT_FIXED = int(lib.PYEBPFLB_POLICY_PORT_FIXED_BITS)

# The pure-Python compiler numbers protocols as the kernel does.
assert (
    policy.TCP,
    policy.UDP,
    policy.ICMP,
    policy.OTHER,
    policy.TCP_NOPORT,
    policy.UDP_NOPORT,
) == (
    lib.PYEBPFLB_POLICY_TCP,
    lib.PYEBPFLB_POLICY_UDP,
    lib.PYEBPFLB_POLICY_ICMP,
    lib.PYEBPFLB_POLICY_OTHER,
    lib.PYEBPFLB_POLICY_TCP_NOPORT,
    lib.PYEBPFLB_POLICY_UDP_NOPORT,
)
assert policy.INLINE == lib.PYEBPFLB_POLICY_INLINE


def policy_head(gen: int, compiled: policy.Compiled) -> Any:
    def flags(on: bool, deny: bool, service_rules: bool = False) -> int:
        return (
            (lib.PYEBPFLB_POLICY_ON if on else 0)
            | (lib.PYEBPFLB_POLICY_DEFAULT_DENY if deny else 0)
            | (lib.PYEBPFLB_POLICY_SERVICE_RULES if service_rules else 0)
        )

    return ffi.new(
        "struct pyebpflb_policy_head *",
        {
            "gen": gen,
            "ingress": flags(
                compiled.ingress_on, compiled.ingress_deny, compiled.ingress_service_rules
            ),
            "egress": flags(compiled.egress_on, compiled.egress_deny),
        },
    )


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
    )


def policy_info(item: Policy) -> Any:
    value = ffi.new("struct pyebpflb_policy_info *")
    encoded = item.name.encode()
    ffi.memmove(value.name, encoded, len(encoded))
    value.dir = POLICY_DIR_TAG[item.direction]
    value.default_deny = int(item.default is Action.DENY)
    value.rules = len(item.rules)
    return value


@attrs.frozen
class PolicyState:
    """The policies the kernel holds, and what a change must replace."""

    gen: int  # the generation lb_policy points at (meaningless while `active` is False)
    active: bool  # lb_policy holds a head
    policies: dict[str, tuple[int, Policy]]  # name -> (policy id, policy), in install order
    refs: tuple[policy.RuleRef, ...]
    keys: dict[int, tuple[list[Any], list[Any]]]  # gen -> (cidr keys, port keys) present


def read_policy_state(obj: Object) -> PolicyState:
    head_map = obj.map("lb_policy")
    head = head_map.lookup(u32(0))
    infos = {int(k): v for k, v in obj.map("lb_pol_names").lookup_batch()}
    rules: dict[int, list[tuple[int, int, Rule]]] = {}
    for key, value in obj.map("lb_pol_rules").lookup_batch():
        rules.setdefault(int(value.policy_id), []).append(
            (int(value.index), int(key), rule_from(value))
        )
    policies: dict[str, tuple[int, Policy]] = {}
    refs: list[policy.RuleRef] = []
    for policy_id in sorted(infos):
        info = infos[policy_id]
        name = ffi.string(info.name).decode()
        own = sorted(rules.get(policy_id, []), key=lambda r: r[0])
        policies[name] = (
            policy_id,
            Policy(
                name,
                [rule for _, _, rule in own],
                default=Action.DENY if int(info.default_deny) else Action.ALLOW,
                direction=POLICY_DIR_OF[int(info.dir)],
            ),
        )
        refs.extend(policy.RuleRef(rule_id, name, index, rule) for index, rule_id, rule in own)
    keys: dict[int, tuple[list[Any], list[Any]]] = {0: ([], []), 1: ([], [])}
    for key in all_keys(obj.map("lb_pol_cidrs")):
        keys[int(key.scope) >> POLICY_GEN_SHIFT][0].append(key)
    for key in all_keys(obj.map("lb_pol_ports")):
        keys[int(key.class_id) >> POLICY_GEN_SHIFT][1].append(key)
    return PolicyState(
        gen=int(head.gen) if head is not None else 0,
        active=head is not None,
        policies=policies,
        refs=tuple(refs),
        keys=keys,
    )
