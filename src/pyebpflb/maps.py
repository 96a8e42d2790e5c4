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

from pyebpflb._bpf import Object, ffi
from pyebpflb._bpf._libbpf import lib
from pyebpflb.model import Address, Backend, BackendState, Protocol, Scheduler, Service

SLOT_GEN_SHIFT = int(lib.PYEBPFLB_SLOT_GEN_SHIFT)
FAMILY_TAG = {4: lib.PYEBPFLB_IPV4, 6: lib.PYEBPFLB_IPV6}


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
