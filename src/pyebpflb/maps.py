"""The load balancer's maps: their names, and codecs between the model and them.

Every layout comes from ``csrc/include/pyebpflb/lb.h`` through cffi; this
module only knows which model value goes into which field, and in which byte
order. Pure: it builds and reads cdata, never a map (reading the kernel is
``pyebpflb.datapath.state``'s job).
"""

from __future__ import annotations

import ipaddress
import socket
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
    Policy,
    Rule,
    RuleProtocol,
    Scheduler,
    Service,
)

# The maps of the lb object (csrc/bpf/lib/maps.h): a map's name in C, its pin file
# and the name Python opens it by are this one word.
CONFIG = "lb_config"
SERVICES = "lb_services"
SVC_NAMES = "lb_svc_names"
SVC_STATS = "lb_svc_stats"
BACKENDS = "lb_backends"
BE_STATS = "lb_be_stats"
SLOTS = "lb_slots"
MAGLEV = "lb_maglev"
CT = "lb_ct"
AFFINITY = "lb_affinity"
DROPS = "lb_drops"
POLICY = "lb_policy"
POL_NAMES = "lb_pol_names"
POL_RULES = "lb_pol_rules"
RULE_STATS = "lb_rule_stats"
POL_CIDRS = "lb_pol_cidrs"
POL_PORTS = "lb_pol_ports"
POL_CT = "lb_pol_ct"
FRAGS = "lb_frags"
EVENTS = "lb_events"
EVENT_STATS = "lb_event_stats"
EVENT_READER = "lb_event_reader"
MAGLEV_TABLE = "lb_maglev_table"  # the inner maps of lb_maglev


def u32(value: int) -> Any:
    """A ``__u32`` key or value: the ids of services and backends, slot indexes."""
    return ffi.new("__u32 *", value)


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


def scheduler_from(entry: Any) -> Scheduler:
    """The scheduler of a ``struct pyebpflb_service``."""
    return Scheduler.MAGLEV if int(entry.flags) & lib.PYEBPFLB_SERVICE_MAGLEV else Scheduler.RANDOM


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
}
RULE_PROTO_OF = {tag: proto for proto, tag in RULE_PROTO_TAG.items()}
_CIDR_FIXED = int(lib.PYEBPFLB_POLICY_CIDR_FIXED_BITS)
_PORT_FIXED = int(lib.PYEBPFLB_POLICY_PORT_FIXED_BITS)


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
