"""Reading what the kernel holds: services, policies, and which change it is at.

A :class:`State` is a datapath's copy of its maps. Several writers may share
a datapath (a controller and the command line): each change moves a counter
in ``lb_config``, and a copy whose count differs is read again before it is
planned against or reported.
"""

from __future__ import annotations

from typing import Any

from pyebpflb import maps
from pyebpflb._bpf import Map, ffi
from pyebpflb._bpf._libbpf import lib
from pyebpflb._bpf.object import LoadedObject
from pyebpflb.errors import BpfError
from pyebpflb.layout import POLICY_GEN_SHIFT
from pyebpflb.model import Action, Policy, Protocol, Service, TrafficPolicy
from pyebpflb.policy import RuleRef
from pyebpflb.snapshot import Installed, PolicyState, Snapshot


def all_keys(bpf_map: Map) -> list[Any]:
    """Every key of ``bpf_map``: in batches where the kernel has them for its type,
    else one system call a key."""
    try:
        return [key for key, _ in bpf_map.lookup_batch()]
    except BpfError:
        return list(bpf_map.keys())


def read_snapshot(obj: LoadedObject) -> Snapshot:
    """Every installed service, read from the maps in a few batch calls."""
    config = obj.map(maps.CONFIG)[0]
    in_force = int(config.service_map) & lib.PYEBPFLB_SERVICE_MAP_ALT
    # The services packets read; a change under way writes the other map.
    entries = obj.map(maps.SERVICES_ALT if in_force else maps.SERVICES).lookup_batch()
    names = {int(k): ffi.string(v.name).decode() for k, v in obj.map(maps.SVC_NAMES).lookup_batch()}
    members: dict[int, list[tuple[int, int, Any]]] = {}
    for key, value in obj.map(maps.BACKENDS).lookup_batch():
        members.setdefault(int(value.service_id), []).append((int(value.position), int(key), value))
    nodes = {int(k): ffi.string(v.name).decode() for k, v in obj.map(maps.BE_NODES).lookup_batch()}
    slots: dict[int, set[int]] = {}
    for key, _ in obj.map(maps.SLOTS).lookup_batch():
        slots.setdefault(int(key.service_id), set()).add(int(key.slot))
    frontends = {int(k): v for k, v in obj.map(maps.FRONTENDS).lookup_batch()}
    ranges: dict[int, list[Any]] = {}
    for key in all_keys(obj.map(maps.SRC_RANGES)):
        key = maps.typed("struct pyebpflb_src_range_key", key)
        ranges.setdefault(int(key.service_id), []).append(maps.network_from(key))
    services = {}
    for key, entry in entries:
        # The members of the generation the entry points at (a change under way,
        # or one cut short, leaves backends of the other generation only).
        gen_bit = 1 << int(entry.gen)
        own = sorted(
            (m for m in members.get(int(entry.id), []) if int(m[2].gens) & gen_bit),
            key=lambda member: member[0],
        )
        kind = maps.kind_from(entry)
        policy = maps.traffic_policy_from(entry)
        frontend = frontends.get(int(entry.id))
        external: dict[str, Any] = {
            "external_traffic_policy": policy,
            "forwarding": maps.forwarding_from(entry),
            "source_ranges": ranges.get(int(entry.id), ()),
            "health_check_node_port": (
                int(frontend.health_check_port) or None if frontend is not None else None
            ),
        }
        service = Service(
            vip=maps.addr_from(key.vip, key.family),
            port=maps.port_from(key.port),
            protocol=Protocol.from_number(int(key.proto)),
            name=names.get(int(entry.id), ""),
            backends=[maps.backend_from(value, nodes.get(i)) for _, i, value in own],
            affinity_timeout=int(entry.affinity_timeout_s) or None,
            scheduler=maps.scheduler_from(entry),
            internal_traffic_policy=TrafficPolicy.CLUSTER if kind.external else policy,
            kind=kind,
            **(external if kind.external else {}),
        )
        services[service.key] = Installed(
            service,
            int(entry.id),
            int(entry.gen),
            tuple(backend_id for _, backend_id, _ in own),
            int(entry.count),
            frozenset(slots.get(int(entry.id), set())),
            maps.origin_from(frontend) if frontend is not None else None,
        )
    return Snapshot(
        services=services,
        next_service_id=max(int(config.next_service_id), 1),
        next_backend_id=max(int(config.next_backend_id), 1),
    )


def read_policy_state(obj: LoadedObject) -> PolicyState:
    """The installed policies and the lookup entries of both generations."""
    head = obj.map(maps.POLICY).lookup(maps.u32(0))
    infos = {int(k): v for k, v in obj.map(maps.POL_NAMES).lookup_batch()}
    rules: dict[int, list[tuple[int, int, Any]]] = {}
    for key, value in obj.map(maps.POL_RULES).lookup_batch():
        rules.setdefault(int(value.policy_id), []).append(
            (int(value.index), int(key), maps.rule_from(value))
        )
    members: dict[int, list[tuple[int, Any]]] = {}
    for key, value in obj.map(maps.POL_MEMBERS).lookup_batch():
        members.setdefault(int(key.policy_id), []).append((int(key.index), maps.member_from(value)))
    policies: dict[str, tuple[int, Policy]] = {}
    refs: list[RuleRef] = []
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
                direction=maps.POLICY_DIR_OF[int(info.dir)],
                subjects=[subject for _, subject in sorted(members.get(policy_id, []))],
            ),
        )
        refs.extend(RuleRef(rule_id, name, index, rule) for index, rule_id, rule in own)
    keys: dict[int, tuple[list[Any], list[Any]]] = {0: ([], []), 1: ([], [])}
    for key in all_keys(obj.map(maps.POL_CIDRS)):
        keys[int(key.scope) >> POLICY_GEN_SHIFT][0].append(key)
    for key in all_keys(obj.map(maps.POL_PORTS)):
        keys[int(key.class_id) >> POLICY_GEN_SHIFT][1].append(key)
    subject_keys: dict[int, list[Any]] = {0: [], 1: []}
    for name in (maps.POL_ADDRS, maps.POL_SUBJECTS):
        for key in all_keys(obj.map(name)):
            subject_keys[int(key.gen) >> POLICY_GEN_SHIFT].append(key)
    return PolicyState(
        gen=int(head.gen) if head is not None else 0,
        active=head is not None,
        policies=policies,
        refs=tuple(refs),
        keys=keys,
        subject_keys=subject_keys,
        sctp_pieces=head is None
        or bool((int(head.ingress) | int(head.egress)) & lib.PYEBPFLB_POLICY_SCTP_PIECES),
    )


class State:
    """A datapath's copy of its services and policies, and the change it was read at."""

    def __init__(self, obj: LoadedObject) -> None:
        self._obj = obj
        self.changes = 0
        self.snapshot: Snapshot
        self.policy: PolicyState
        self.reload()

    def config(self) -> Any:
        """``lb_config`` as the kernel holds it now."""
        return self._obj.map(maps.CONFIG)[0]

    def update_config(self, **fields: int) -> None:
        config_map = self._obj.map(maps.CONFIG)
        config = config_map[0]
        for name, value in fields.items():
            setattr(config, name, value)
        config_map[0] = config

    def reload(self) -> None:
        """Read what the kernel holds (and which change it is at)."""
        self.changes = int(self.config().changes)
        self.snapshot = read_snapshot(self._obj)
        self.policy = read_policy_state(self._obj)

    def fresh(self) -> Any:
        """Read again if another writer changed the datapath since; returns the config."""
        config = self.config()
        if int(config.changes) != self.changes:
            self.reload()
        return config


def event_names(
    obj: LoadedObject,
) -> tuple[dict[int, str], dict[int, str], dict[int, tuple[str, int, str | None]]]:
    """Service, backend and rule ids -> what a person reads, for flow events."""
    snapshot = read_snapshot(obj)
    services = snapshot.names()
    backends = {
        backend_id: str(backend)
        for i in snapshot.services.values()
        for backend, backend_id in zip(i.service.backends, i.backend_ids, strict=True)
    }
    rules = {r.id: (r.policy, r.index, r.rule.origin) for r in read_policy_state(obj).refs}
    return services, backends, rules
