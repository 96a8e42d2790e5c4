"""The load balancer in the kernel: load or adopt it, attach it, program it
(services and policies), watch it (flow events, counters, explain).

A :class:`Datapath` owns one loaded ``lb`` object: its maps are pinned under
``pin_root/name/`` (``pin_root/name/netns-<inode>/`` outside the initial
network namespace, so datapaths of one name in different namespaces stay
apart) and found again by a later ``Datapath`` of the same name, through the
pins or, where the bpffs is not shared (``ip netns exec`` mounts a new one),
through the programs attached to this namespace's interfaces.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
import warnings
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, overload

import attrs

from pyebpflb import _html, maglev, maps, objects, plan
from pyebpflb import events as events_mod
from pyebpflb import policy as policy_mod
from pyebpflb._bpf import Map, MapType, Object, Program, TcLink, fs, tc
from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb._bpf.netns import current_id, entered, is_initial
from pyebpflb.errors import BpfError, NotFound, PyEbpfLbError
from pyebpflb.events import EventStats, FlowEvent
from pyebpflb.model import Address, Backend, Policy, Protocol, Service

logger = logging.getLogger("pyebpflb")

DEFAULT_PIN_ROOT = "/sys/fs/bpf/pyebpflb"
LB_HANDLE = 0xEB1B
LB_PRIORITY = 1
LAYOUT_VERSION = 3  # 2: weights, states and session affinity; 3: network policy
NAME_MAX = len(ffi.new("struct pyebpflb_lb_config *").name) - 1

DROP_REASONS = events_mod.DROP_REASONS

# Which constructor argument sizes which map, for the error of a full map.
_CAPACITY = {
    "lb_services": "max_services",
    "lb_svc_stats": "max_services",
    "lb_svc_names": "max_services",
    "lb_backends": "max_backends",
    "lb_be_stats": "max_backends",
    "lb_slots": "max_backends",
    "lb_maglev": "max_services",
    "lb_pol_rules": "max_policy_rules",
    "lb_rule_stats": "max_policy_rules",
    "lb_pol_names": "max_policies",
    "lb_pol_cidrs": "max_policy_entries",
    "lb_pol_ports": "max_policy_entries",
}


@attrs.frozen
class ConntrackTimeouts:
    """How long an idle flow keeps its backend, in seconds."""

    tcp_syn: float = 60.0
    tcp_established: float = 21600.0
    tcp_closing: float = 10.0
    udp: float = 60.0

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(ConntrackTimeouts):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(
                    f"conntrack timeout {field.name} must be > 0 seconds, got {value!r}"
                )


@attrs.frozen
class Traffic:
    packets: int
    bytes: int


@attrs.frozen
class ServiceStats:
    """Packets and bytes sent to a service, in total and per backend."""

    service: Service
    packets: int
    bytes: int
    backends: dict[Backend, Traffic]

    def _repr_html_(self) -> str:
        rows = [(str(b), t.packets, t.bytes) for b, t in self.backends.items()]
        caption = f"{self.service.label}: {self.packets} packets, {self.bytes} bytes"
        return _html.table(["backend", "packets", "bytes"], rows, caption)


@attrs.frozen
class DatapathStats:
    """Every counter of a datapath, summed over CPUs."""

    services: list[ServiceStats]
    policies: dict[str, list[Traffic]]  # policy name -> per rule, in rule order
    drops: dict[str, Traffic]  # by reason
    events: EventStats

    def _repr_html_(self) -> str:
        rows: list[tuple[object, ...]] = []
        for st in self.services:
            rows.append((st.service.name or st.service.label, "service", st.packets, st.bytes))
            for backend, traffic in st.backends.items():
                rows.append(("", f"-> {backend}", traffic.packets, traffic.bytes))
        for name, rules in self.policies.items():
            for index, traffic in enumerate(rules):
                rows.append((name, f"rule {index}", traffic.packets, traffic.bytes))
        for reason, traffic in self.drops.items():
            rows.append(("drops", reason, traffic.packets, traffic.bytes))
        caption = (
            f"events sent {self.events.sent}, lost {self.events.lost}, "
            f"rate-limited {self.events.rate_limited}"
        )
        return _html.table(["what", "", "packets", "bytes"], rows, caption)


@attrs.frozen
class Explanation:
    """What the datapath does with one packet (:meth:`Datapath.explain`).

    ``verdict``: "forwarded" (translated to ``backend`` of ``service``),
    "passed" (not for a service, let through), "refused" (a service without
    backends: reset or ICMP unreachable), "dropped" (``drop_reason``).
    ``policy_verdict`` is None when no policy applies to the direction;
    ``rule`` None with a verdict means the direction's default decided.
    """

    source: str
    destination: str
    protocol: str
    direction: str
    verdict: str
    service: Service | None
    backend: Backend | None
    policy_verdict: str | None
    policy: str | None
    rule: int | None
    policy_default: bool
    drop_reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "protocol": self.protocol,
            "direction": self.direction,
            "verdict": self.verdict,
            "service": self.service.name or self.service.label if self.service else None,
            "backend": str(self.backend) if self.backend else None,
            "policy_verdict": self.policy_verdict,
            "policy": self.policy,
            "rule": self.rule,
            "policy_default": self.policy_default,
            "drop_reason": self.drop_reason,
        }


@attrs.frozen
class MapInfo:
    """One map of a datapath: ``entries`` in use (None for a ring buffer)."""

    name: str
    type: str
    entries: int | None
    max_entries: int
    pin: str | None


@attrs.frozen
class Hook:
    """A program of the datapath attached to an interface."""

    interface: str
    hook: str  # "tc ingress" / "tc egress"
    program: str
    program_id: int


@attrs.frozen
class Flow:
    """A conntrack entry, as a person reads it.

    ``kind``: "service" (a balanced flow: ``source`` -> ``destination`` is the
    client's packet to the VIP, ``backend`` where it goes), "reply" (the reverse
    entry of a balanced flow), "policy-in"/"policy-out" (answers policy lets
    through on ingress/egress). ``expires_in`` is None for entries that do not
    expire on their own (reply entries live as long as their flow).
    """

    kind: str
    protocol: str
    source: str
    destination: str
    backend: str | None
    service: str | None
    age: float
    expires_in: float | None
    closing: bool
    answered: bool

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Attachment:
    """The datapath on one interface: ingress balances, egress reverse-translates."""

    iface: str
    ingress: TcLink
    egress: TcLink


def _check_capacity(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


class Datapath:
    """Service load balancing in the kernel, as one object.

    ``persist=False`` (the default): closing detaches the programs and
    removes the pins. ``persist=True``: closing leaves everything running, and
    a later ``Datapath`` of the same name adopts it without a dropped packet.
    ``netns`` names a network namespace (``ip netns`` name or path) to work in
    from outside it. ``create=False`` only adopts, keeping the datapath's
    settings (timeouts, events): without an existing datapath of that name it
    raises :class:`~pyebpflb.errors.NotFound`.
    ``events`` chooses the flow events the kernel sends ("trace", "drop",
    "policy"), ``event_rate`` how many a second each CPU may send.
    ``max_policy_conntrack`` sizes the table of flows policy lets answers
    through for, apart from the balanced flows' (``max_conntrack``).
    """

    def __init__(
        self,
        name: str = "default",
        *,
        persist: bool = False,
        pin_root: str | os.PathLike[str] = DEFAULT_PIN_ROOT,
        netns: str | None = None,
        max_services: int = 65536,
        max_backends: int = 262144,
        max_conntrack: int = 262144,
        max_backends_per_service: int = 1024,
        max_affinity: int = 65536,
        maglev_table_size: int = maglev.DEFAULT_TABLE_SIZE,
        ct_timeouts: ConntrackTimeouts = ConntrackTimeouts(),
        max_policies: int = 4096,
        max_policy_rules: int = 65536,
        max_policy_entries: int = 1 << 20,
        max_policy_conntrack: int = 65536,
        events: Iterable[str] | None = ("trace", "drop", "policy"),
        event_rate: int = 10_000,
        create: bool = True,
    ) -> None:
        if not isinstance(name, str) or not name or "/" in name or len(name.encode()) > NAME_MAX:
            raise ValueError(
                f"datapath name must be 1 to {NAME_MAX} bytes without '/', got {name!r}"
            )
        self.name = name
        self.persist = persist
        self.netns = netns
        self.max_services = _check_capacity("max_services", max_services, 1, 1 << 24)
        self.max_backends = _check_capacity("max_backends", max_backends, 1, 1 << 24)
        self.max_conntrack = _check_capacity("max_conntrack", max_conntrack, 16, 1 << 26)
        self.max_backends_per_service = _check_capacity(
            "max_backends_per_service", max_backends_per_service, 1, 65535
        )
        self.max_affinity = _check_capacity("max_affinity", max_affinity, 16, 1 << 26)
        self.max_policies = _check_capacity("max_policies", max_policies, 1, 1 << 20)
        self.max_policy_rules = _check_capacity("max_policy_rules", max_policy_rules, 1, 1 << 24)
        self.max_policy_entries = _check_capacity(
            "max_policy_entries", max_policy_entries, 16, 1 << 26
        )
        self.max_policy_conntrack = _check_capacity(
            "max_policy_conntrack", max_policy_conntrack, 16, 1 << 26
        )
        self.maglev_table_size = maglev.check_table_size(maglev_table_size)
        self.events = events_mod.to_types(events if events is not None else ())
        self.event_rate = _check_capacity("event_rate", event_rate, 0, 1 << 30)
        if not isinstance(ct_timeouts, ConntrackTimeouts):
            raise ValueError(f"ct_timeouts must be a ConntrackTimeouts, got {ct_timeouts!r}")
        self.ct_timeouts = ct_timeouts
        self.pin_root = os.fspath(pin_root)
        self.create = create
        with entered(netns):
            self.pin_dir = self._pin_dir(self.pin_root)
            self._object, adopted = self._load()
        self._closed = False
        self.adopted = adopted
        try:
            self._write_config()
            self._reload()
        except BaseException:
            self._object.close()
            self._closed = True
            raise

    # -- loading and adopting -------------------------------------------------
    def _pin_dir(self, pin_root: str) -> str:
        base = os.path.join(pin_root, self.name)
        return base if is_initial() else os.path.join(base, f"netns-{current_id()}")

    def _load(self) -> tuple[Object, bool]:
        existing = self._find_attached_maps() or self._find_pinned_maps()
        if not existing and not self.create:
            where = f" in network namespace {self.netns!r}" if self.netns else ""
            raise NotFound(
                errno.ENOENT,
                f"no datapath {self.name!r}{where}: none of its programs is attached here and "
                f"nothing is pinned under {self.pin_dir}",
            )
        obj = objects.open_object("lb")
        try:
            sizes = {
                "lb_services": self.max_services,
                "lb_svc_stats": self.max_services,
                "lb_svc_names": self.max_services,
                "lb_backends": self.max_backends,
                "lb_be_stats": self.max_backends,
                "lb_slots": 2 * self.max_backends,  # two generations
                "lb_ct": self.max_conntrack,
                "lb_affinity": self.max_affinity,
                "lb_maglev": self.max_services,
                "lb_pol_names": self.max_policies,
                "lb_pol_rules": self.max_policy_rules,
                "lb_rule_stats": self.max_policy_rules,
                # Both generations of the lookup entries, during a change.
                "lb_pol_cidrs": self.max_policy_entries,
                "lb_pol_ports": self.max_policy_entries,
                "lb_pol_ct": self.max_policy_conntrack,
            }
            for map_name, size in sizes.items():
                if map_name in existing and existing[map_name].max_entries != size:
                    logger.warning(
                        "pyebpflb: datapath %s keeps %s at %d entries (asked for %d)",
                        self.name,
                        map_name,
                        existing[map_name].max_entries,
                        size,
                    )
                    size = existing[map_name].max_entries
                obj.set_max_entries(map_name, size)
            for map_name, adopted in existing.items():
                obj.reuse_map(map_name, adopted)
            obj.load()
        except BaseException:
            obj.close()
            raise
        finally:
            for adopted in existing.values():
                adopted.close()
        self._pin_maps(obj)
        return obj, bool(existing)

    def _pin_maps(self, obj: Object) -> None:
        fs.ensure_bpffs(os.path.dirname(self.pin_dir))
        os.makedirs(self.pin_dir, mode=0o700, exist_ok=True)
        for map_name, bpf_map in obj.maps.items():
            path = os.path.join(self.pin_dir, map_name)
            if not os.path.exists(path):
                bpf_map.pin(path)

    def _find_pinned_maps(self) -> dict[str, Map]:
        if fs.fs_type(self.pin_dir) != "bpf" or not os.path.isdir(self.pin_dir):
            return {}
        found = {}
        for entry in os.listdir(self.pin_dir):
            path = os.path.join(self.pin_dir, entry)
            if entry.startswith("lb_") and not os.path.isdir(path):
                found[entry] = Map.from_pinned(path)
        if found and not self._is_ours(found):
            _closed_all(found)
            raise PyEbpfLbError(
                f"the pins in {self.pin_dir} are not datapath {self.name!r}'s (another pyebpflb "
                "version's?); remove that folder or destroy() that datapath with its version"
            )
        return found

    def _find_attached_maps(self) -> dict[str, Map]:
        """The maps of our programs attached in this netns (works without a shared bpffs).

        The ingress program uses lb_config, which lists the ids of all maps.
        """
        for _, iface in socket.if_nameindex():
            prog_id = tc.query(iface, "ingress", handle=LB_HANDLE, priority=LB_PRIORITY)
            if prog_id is None:
                continue
            used = _maps_of_program(prog_id)
            config = self._config_if_ours(used)
            _closed_all(used)
            if config is not None:
                return _maps_by_id(int(i) for i in config.map_ids if i)
        return {}

    def _is_ours(self, found: dict[str, Map]) -> bool:
        return self._config_if_ours(found) is not None

    def _config_if_ours(self, found: dict[str, Map]) -> Any:
        """The config of ``found`` (maps by name) if it is this datapath's: it names it."""
        config_map = found.get("lb_config")
        if config_map is None or config_map.value_size != ffi.sizeof("struct pyebpflb_lb_config"):
            return None
        config = ffi.from_buffer("struct pyebpflb_lb_config *", config_map[bytes(4)])
        return config if ffi.string(config.name).decode() == self.name else None

    def _write_config(self) -> None:
        config_map = self._object.map("lb_config")
        config = config_map[0]
        if self.adopted and int(config.layout_version) not in (0, LAYOUT_VERSION):
            raise PyEbpfLbError(
                f"datapath {self.name!r} was made by another pyebpflb version "
                f"(layout {config.layout_version}, this is {LAYOUT_VERSION}); destroy it first"
            )
        config.layout_version = LAYOUT_VERSION
        config.name = self.name.encode()
        seconds = 1_000_000_000
        if self.adopted and not self.create:
            # Opened as it is (a tool looking at a datapath): keep its settings.
            self.ct_timeouts = ConntrackTimeouts(
                tcp_syn=int(config.ct_tcp_syn_ns) / seconds,
                tcp_established=int(config.ct_tcp_established_ns) / seconds,
                tcp_closing=int(config.ct_tcp_closing_ns) / seconds,
                udp=int(config.ct_udp_ns) / seconds,
            )
            self.events = frozenset(
                name for name, bit in events_mod.TYPE_BITS.items() if int(config.event_mask) & bit
            )
            self.event_rate = int(config.event_rate)
        config.ct_tcp_syn_ns = int(self.ct_timeouts.tcp_syn * seconds)
        config.ct_tcp_established_ns = int(self.ct_timeouts.tcp_established * seconds)
        config.ct_tcp_closing_ns = int(self.ct_timeouts.tcp_closing * seconds)
        config.ct_udp_ns = int(self.ct_timeouts.udp * seconds)
        config.next_service_id = max(int(config.next_service_id), 1)
        config.next_backend_id = max(int(config.next_backend_id), 1)
        config.next_rule_id = max(int(config.next_rule_id), 1)
        config.next_policy_id = max(int(config.next_policy_id), 1)
        stored = int(config.maglev_table_size)
        if self.adopted and stored and stored != self.maglev_table_size:
            # The installed tables have the size they were built with.
            logger.warning(
                "pyebpflb: datapath %s keeps Maglev tables of %d slots (asked for %d)",
                self.name,
                stored,
                self.maglev_table_size,
            )
            self.maglev_table_size = stored
        config.maglev_table_size = self.maglev_table_size
        config.event_mask = sum(events_mod.TYPE_BITS[t] for t in self.events)
        config.event_rate = self.event_rate
        ids = [m.id for m in self._object.maps.values()]
        config.map_ids[0 : len(ids)] = ids
        config_map[0] = config

    def _reload(self) -> None:
        """Read what the kernel holds (and which change it is at) into our copy."""
        self._changes = int(self._object.map("lb_config")[0].changes)
        self._snapshot = maps.read_snapshot(self._object)
        self._policy = maps.read_policy_state(self._object)

    def _fresh(self) -> Any:
        """Plan and read against the kernel's state: another Datapath object (another
        process, the command line) may have changed it since we read it. Returns the
        config it read."""
        self._live()
        config = self._object.map("lb_config")[0]
        if int(config.changes) != self._changes:
            self._reload()
        return config

    def _update_config(self, **fields: int) -> None:
        config_map = self._object.map("lb_config")
        config = config_map[0]
        for name, value in fields.items():
            setattr(config, name, value)
        config_map[0] = config

    # -- attaching --------------------------------------------------------------
    def attach(self, iface: str) -> Attachment:
        """Balance services arriving on ``iface`` and translate replies leaving it.

        Idempotent; attaching again after an upgrade swaps the programs in
        place without dropping traffic.
        """
        self._live()
        with entered(self.netns):
            current = {
                direction: tc.query(iface, direction, handle=LB_HANDLE, priority=LB_PRIORITY)
                for direction in ("ingress", "egress")
            }
            for direction, prog_id in current.items():
                if prog_id is not None and not self._owns_program(prog_id):
                    raise PyEbpfLbError(
                        f"{iface} {direction} already runs another pyebpflb datapath "
                        f"(program id {prog_id}); destroy that one or use another interface"
                    )
            links: dict[str, TcLink] = {}
            try:
                for direction in ("ingress", "egress"):
                    links[direction] = TcLink.attach(
                        self._object.program(f"lb_{direction}"),
                        iface,
                        direction,
                        handle=LB_HANDLE,
                        priority=LB_PRIORITY,
                    )
            except BaseException:
                # Leave the interface as it was: detach only what was not there before.
                for direction, link in links.items():
                    if current[direction] is None:
                        link.detach()
                raise
        return Attachment(iface, links["ingress"], links["egress"])

    def detach(self, iface: str) -> None:
        """Stop balancing on ``iface`` (also when another process attached it)."""
        self._live()
        with entered(self.netns):
            self._detach_iface(iface)

    def _detach_iface(self, iface: str) -> None:
        ifindex = socket.if_nametoindex(iface)
        for direction in ("ingress", "egress"):
            current = tc.query(ifindex, direction, handle=LB_HANDLE, priority=LB_PRIORITY)
            if current is not None and self._owns_program(current):
                TcLink(
                    ifindex,
                    tc.Direction(direction),
                    LB_HANDLE,
                    LB_PRIORITY,
                    current,
                    created_qdisc=True,
                ).detach()

    def _owns_program(self, prog_id: int) -> bool:
        """Does the program use our conntrack map (both of our programs do)?"""
        found = _maps_of_program(prog_id)
        try:
            return "lb_ct" in found and found["lb_ct"].id == self._object.map("lb_ct").id
        finally:
            _closed_all(found)

    @property
    def interfaces(self) -> list[str]:
        """Interfaces of the namespace that run this datapath."""
        self._live()
        with entered(self.netns):
            return [
                iface
                for _, iface in socket.if_nameindex()
                if (prog := tc.query(iface, "ingress", handle=LB_HANDLE, priority=LB_PRIORITY))
                and self._owns_program(prog)
            ]

    # -- programming ------------------------------------------------------------------
    def sync(self, services: Iterable[Service], policies: Iterable[Policy] | None = None) -> None:
        """Make the kernel hold exactly ``services`` (and ``policies``, unless None:
        then the installed policies stay); all or nothing."""
        self._fresh()
        wanted = list(services)
        seen: dict[tuple[Address, int, Protocol], Service] = {}
        for service in wanted:
            self._check(service)
            if service.key in seen:
                raise ValueError(
                    f"services {seen[service.key].label} and {service.label} have the same "
                    "vip, port and protocol"
                )
            seen[service.key] = service
        removals = [key for key in self._snapshot.services if key not in seen]
        change = plan.diff(self._snapshot, wanted, removals, self.maglev_table_size)
        self._apply(change, None if policies is None else list(policies))

    def upsert(self, service: Service) -> None:
        """Install ``service`` or replace the one with its vip, port and protocol."""
        self._check(service)
        self._fresh()
        self._apply(plan.diff(self._snapshot, [service], [], self.maglev_table_size))

    def remove(self, service: Service) -> bool:
        """Remove the service with ``service``'s vip, port and protocol; False if none."""
        if not isinstance(service, Service):
            raise ValueError(f"remove takes a Service, got {service!r}")
        self._fresh()
        change = plan.diff(self._snapshot, [], [service.key], self.maglev_table_size)
        self._apply(change)
        return not change.empty

    def upsert_policy(self, policy: Policy) -> None:
        """Install ``policy`` or replace the one of its name."""
        self._fresh()
        if not isinstance(policy, Policy):
            raise ValueError(f"expected a Policy, got {policy!r}")
        current = [p for _, p in self._policy.policies.values()]
        if policy in current:
            return
        names = [p.name for p in current]
        if policy.name in names:
            current[names.index(policy.name)] = policy
        else:
            current.append(policy)
        self._apply(plan.diff(self._snapshot, [], [], self.maglev_table_size), current)

    def remove_policy(self, policy: Policy | str) -> bool:
        """Remove the policy of ``policy``'s name (or the name given); False if none."""
        self._fresh()
        name = policy.name if isinstance(policy, Policy) else policy
        if not isinstance(name, str):
            raise ValueError(f"remove_policy takes a Policy or a policy name, got {policy!r}")
        if name not in self._policy.policies:
            return False
        kept = [p for n, (_, p) in self._policy.policies.items() if n != name]
        self._apply(plan.diff(self._snapshot, [], [], self.maglev_table_size), kept)
        return True

    def _check(self, service: Service) -> None:
        self._live()
        if not isinstance(service, Service):
            raise ValueError(f"expected a Service, got {service!r}")
        if len(service.backends) > self.max_backends_per_service:
            raise ValueError(
                f"service {service.label} has {len(service.backends)} backends; this datapath "
                f"allows {self.max_backends_per_service} per service (max_backends_per_service)"
            )

    def _apply(self, change: plan.Plan, policies: list[Policy] | None = None) -> None:
        """Apply ``change`` and, with ``policies``, make them the installed policies. The
        policies are compiled again whenever the services they name change."""
        installed = [p for _, p in self._policy.policies.values()]
        # Rules naming services are compiled with the services' ids: a change that
        # adds, removes or renames services compiles the policies again.
        names_rules = any(r.service is not None for p in installed for r in p.rules)
        retarget = names_rules and any(
            (old := self._snapshot.services.get(key)) is None
            or new is None
            or old.service.name != new.service.name
            for key, new in change.changes.items()
        )
        known = self._next_ids
        policies_plan = None
        if policies is not None or retarget:
            wanted = installed if policies is None else policies
            wanted = policy_mod.check_policies(wanted, self._service_ids(change))
            if len(wanted) > self.max_policies:
                raise ValueError(
                    f"{len(wanted)} policies; this datapath holds at most {self.max_policies} "
                    "(max_policies)"
                )
            if wanted != installed or retarget:
                policies_plan = plan.diff_policies(
                    self._policy,
                    wanted,
                    self._service_ids(change),
                    known["next_rule_id"],
                    known["next_policy_id"],
                )
                change = plan.with_policies(change, policies_plan)
        if change.empty:
            return
        ids_now = {
            "next_service_id": change.next_service_id,
            "next_backend_id": change.next_backend_id,
            "changes": self._changes + 1,
        }
        if policies_plan is not None:
            ids_now["next_rule_id"] = policies_plan.next_rule_id
            ids_now["next_policy_id"] = policies_plan.next_policy_id
            if policies_plan.state.active:
                ids_now["policy_active"] = 1
        if any(known.get(k) != v for k, v in ids_now.items()):
            # Ids are reserved before use and never handed out twice, even
            # when the change fails: conntrack entries may still name old ids.
            # The change count moves too (also on failure: an undo is a change).
            self._update_config(**ids_now)
            self._changes = ids_now["changes"]
            self._snapshot = attrs.evolve(
                self._snapshot,
                next_service_id=change.next_service_id,
                next_backend_id=change.next_backend_id,
            )
        plan.apply(self._object, change, _CAPACITY)
        self._snapshot = plan.commit(self._snapshot, change)
        if policies_plan is not None:
            self._policy = policies_plan.state
            if not policies_plan.state.active:
                self._update_config(policy_active=0)

    @property
    def _next_ids(self) -> dict[str, int]:
        config = self._object.map("lb_config")[0]
        return {
            "next_service_id": self._snapshot.next_service_id,
            "next_backend_id": self._snapshot.next_backend_id,
            "next_rule_id": max(int(config.next_rule_id), 1),
            "next_policy_id": max(int(config.next_policy_id), 1),
            "policy_active": int(config.policy_active),
            "changes": int(config.changes),
        }

    def _service_ids(self, change: plan.Plan) -> dict[str, list[int]]:
        """Service name -> ids of the services of that name, once ``change`` is in."""
        changes = change.changes
        result: dict[str, list[int]] = {}
        for key, installed in self._snapshot.services.items():
            if key not in changes:
                result.setdefault(installed.service.name, []).append(installed.id)
        for entry in changes.values():
            if entry is not None:
                result.setdefault(entry.service.name, []).append(entry.id)
        for ids in result.values():
            ids.sort()
        return result

    # -- reading back --------------------------------------------------------------------
    @property
    def services(self) -> list[Service]:
        """The services the kernel holds, read from its maps, in the order installed."""
        self._live()
        snapshot = maps.read_snapshot(self._object)
        return [i.service for i in sorted(snapshot.services.values(), key=lambda i: i.id)]

    @property
    def policies(self) -> list[Policy]:
        """The policies the kernel holds, read from its maps, in the order installed."""
        self._live()
        state = maps.read_policy_state(self._object)
        return [p for _, p in state.policies.values()]

    def policy_stats(self, policy: Policy | str) -> list[Traffic]:
        """Packets and bytes each rule of the policy (by name) matched, in rule order."""
        self._fresh()
        return self._policy_stats(policy.name if isinstance(policy, Policy) else policy)

    def _policy_stats(self, name: str) -> list[Traffic]:
        if name not in self._policy.policies:
            raise KeyError(f"policy {name!r} is not installed in datapath {self.name!r}")
        counters = self._object.map("lb_rule_stats")
        refs = sorted((r for r in self._policy.refs if r.policy == name), key=lambda r: r.index)
        return [Traffic(*_sum(counters.lookup(maps.u32(r.id)))) for r in refs]

    def _service_stats(self, service: Service) -> ServiceStats:
        installed = self._snapshot.services.get(service.key)
        if installed is None:
            raise KeyError(f"service {service.label} is not installed in datapath {self.name!r}")
        svc = _sum(self._object.map("lb_svc_stats").lookup(maps.u32(installed.id)))
        be_stats = self._object.map("lb_be_stats")
        backends = {
            backend: Traffic(*_sum(be_stats.lookup(maps.u32(backend_id))))
            for backend, backend_id in zip(
                installed.service.backends, installed.backend_ids, strict=True
            )
        }
        return ServiceStats(installed.service, svc[0], svc[1], backends)

    @overload
    def stats(self, service: Service) -> ServiceStats: ...

    @overload
    def stats(self, service: None = None) -> DatapathStats: ...

    def stats(self, service: Service | None = None) -> ServiceStats | DatapathStats:
        """Packets and bytes sent to ``service`` and to each of its backends; without a
        service, every counter of the datapath (:class:`DatapathStats`)."""
        self._fresh()
        if service is not None:
            return self._service_stats(service)
        return DatapathStats(
            services=[
                self._service_stats(i.service)
                for i in sorted(self._snapshot.services.values(), key=lambda i: i.id)
            ],
            policies={name: self._policy_stats(name) for name in self._policy.policies},
            drops=self.drops(),
            events=self.event_stats(),
        )

    def event_stats(self) -> EventStats:
        """Flow events the kernel sent, lost (ring full) and held back (rate limit)."""
        self._live()
        per_cpu = self._object.map("lb_event_stats").lookup(maps.u32(0)) or []
        return EventStats(
            sent=sum(int(v.sent) for v in per_cpu),
            lost=sum(int(v.lost) for v in per_cpu),
            rate_limited=sum(int(v.rate_limited) for v in per_cpu),
        )

    # -- inspecting ------------------------------------------------------------------------
    def maps(self) -> list[MapInfo]:
        """Every map: type, entries in use and at most, pin path."""
        self._live()
        result = []
        for name, bpf_map in sorted(self._object.maps.items()):
            if bpf_map.type in (MapType.ARRAY, MapType.PERCPU_ARRAY):
                entries: int | None = bpf_map.max_entries
            elif bpf_map.type == MapType.RINGBUF:
                entries = None
            else:
                entries = len(maps.all_keys(bpf_map))
            pin = os.path.join(self.pin_dir, name)
            result.append(
                MapInfo(
                    name,
                    MapType(bpf_map.type).name.lower(),
                    entries,
                    bpf_map.max_entries,
                    pin if os.path.exists(pin) else None,
                )
            )
        return result

    def hooks(self) -> list[Hook]:
        """Where this datapath's programs are attached in its network namespace."""
        self._live()
        found = []
        with entered(self.netns):
            for _, iface in socket.if_nameindex():
                for direction in ("ingress", "egress"):
                    prog_id = tc.query(iface, direction, handle=LB_HANDLE, priority=LB_PRIORITY)
                    if prog_id is not None and self._owns_program(prog_id):
                        found.append(Hook(iface, f"tc {direction}", f"lb_{direction}", prog_id))
        return found

    def flows(self) -> list[Flow]:
        """The conntrack entries, decoded: balanced flows, their replies, and the flows
        policy lets answers through for."""
        config = self._fresh()
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        names = self._snapshot.names()
        kinds = {
            int(lib.PYEBPFLB_CT_SERVICE): "service",
            int(lib.PYEBPFLB_CT_REPLY): "reply",
            int(lib.PYEBPFLB_CT_POLICY_IN): "policy-in",
            int(lib.PYEBPFLB_CT_POLICY_OUT): "policy-out",
        }
        result = []
        entries = [
            *self._object.map("lb_ct").lookup_batch(),
            *self._object.map("lb_pol_ct").lookup_batch(),
        ]
        for key, entry in entries:
            kind = kinds.get(int(key.dir), str(int(key.dir)))
            family = int(key.family)
            proto = int(key.proto)

            def at(union: Any, port: int, family: int = family, proto: int = proto) -> str:
                host = _host(maps.addr_from(union, family))
                return f"{host}:{socket.ntohs(port)}" if proto in (6, 17) else host

            flags = int(entry.flags)
            closing = bool(flags & lib.PYEBPFLB_CT_CLOSING)
            answered = bool(flags & lib.PYEBPFLB_CT_SEEN_REPLY)
            expires_in = None
            if kind != "reply":
                if proto != 6:
                    life = int(config.ct_udp_ns)
                elif closing:
                    life = int(config.ct_tcp_closing_ns)
                elif not answered:
                    life = int(config.ct_tcp_syn_ns)
                else:
                    life = int(config.ct_tcp_established_ns)
                expires_in = max(0.0, (int(entry.last_seen_ns) + life - now) / 1e9)
            result.append(
                Flow(
                    kind=kind,
                    protocol=events_mod.PROTOCOLS.get(proto, str(proto)),
                    source=at(key.saddr, int(key.sport)),
                    destination=at(key.daddr, int(key.dport)),
                    backend=at(entry.nat_addr, int(entry.nat_port)) if kind == "service" else None,
                    service=names.get(int(entry.service_id))
                    if kind in ("service", "reply")
                    else None,
                    age=max(0.0, (now - int(entry.created_ns)) / 1e9),
                    expires_in=expires_in,
                    closing=closing,
                    answered=answered,
                )
            )
        return result

    # -- flow events -------------------------------------------------------------------
    def _names(self) -> tuple[dict[int, str], dict[int, str], dict[int, tuple[str, int]]]:
        snapshot = maps.read_snapshot(self._object)
        state = maps.read_policy_state(self._object)
        services = snapshot.names()
        backends = {
            backend_id: str(backend)
            for i in snapshot.services.values()
            for backend, backend_id in zip(i.service.backends, i.backend_ids, strict=True)
        }
        rules = {r.id: (r.policy, r.index) for r in state.refs}
        return services, backends, rules

    def open_monitor(
        self,
        types: Iterable[str] | str | None = None,
        *,
        service: str | None = None,
        address: str | Address | None = None,
        queue_size: int = 65536,
    ) -> events_mod.Monitor:
        """A :class:`~pyebpflb.events.Monitor` on this datapath's events (close it)."""
        self._live()
        return events_mod.Monitor(
            self._object.map("lb_events"),
            events_mod.Names(self._names, self.netns),
            reader_map=self._object.map("lb_event_reader"),
            types=types,
            service=service,
            address=address,
            queue_size=queue_size,
        )

    def monitor(
        self,
        types: Iterable[str] | str | None = None,
        timeout: float | None = None,
        *,
        service: str | None = None,
        address: str | Address | None = None,
    ) -> Iterator[FlowEvent]:
        """Flow events as they happen, for ``timeout`` seconds (None: until the loop
        stops), filtered by type ("trace", "drop", "policy"), service name and address.
        One monitor per datapath at a time (a ring buffer has one reader)."""
        monitor = self.open_monitor(types, service=service, address=address)
        try:
            yield from monitor.events(timeout)
        finally:
            monitor.close()

    async def amonitor(
        self,
        types: Iterable[str] | str | None = None,
        timeout: float | None = None,
        *,
        service: str | None = None,
        address: str | Address | None = None,
    ) -> AsyncIterator[FlowEvent]:
        """:meth:`monitor` for asyncio: waits on the ring buffer's fd in the event loop."""
        monitor = self.open_monitor(types, service=service, address=address)
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(monitor.fileno(), ready.set)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                monitor.ring.consume()
                while monitor.queue:
                    yield monitor.queue.popleft()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                monitor.renew_if_due()
                ready.clear()
                try:
                    # Wake at least every second to renew the reader's presence.
                    await asyncio.wait_for(ready.wait(), 1.0 if left is None else min(left, 1.0))
                except TimeoutError:
                    continue
        finally:
            loop.remove_reader(monitor.fileno())
            monitor.close()

    # -- explain -------------------------------------------------------------------------
    def explain(
        self,
        src: str,
        dst: str,
        protocol: str = "tcp",
        *,
        direction: str = "ingress",
    ) -> Explanation:
        """What the datapath does with a packet ``src`` -> ``dst`` ("IP[:PORT]", IPv6 as
        "[IP]:PORT"): the programs run on a synthetic first packet (a TCP SYN or a UDP
        datagram) through BPF_PROG_TEST_RUN, deciding as for real traffic (existing
        conntrack entries included) but writing nothing: no flow, counter or event."""
        self._fresh()
        source, sport = _endpoint(src, "src", default_port=40000)
        target, dport = _endpoint(dst, "dst", default_port=None)
        if source.version != target.version:
            raise ValueError(f"src {src!r} and dst {dst!r} are of different IP versions")
        if protocol not in ("tcp", "udp"):
            raise ValueError(f"protocol must be 'tcp' or 'udp', got {protocol!r}")
        if direction not in ("ingress", "egress"):
            raise ValueError(f"direction must be 'ingress' or 'egress', got {direction!r}")
        frame = _frame(source, sport, target, dport, protocol)
        ctx = bytearray(_CTX_SIZE)
        struct.pack_into("=I", ctx, _CTX_MARK, _EXPLAIN_MARK)
        result = self._object.program(f"lb_{direction}").test_run(frame, ctx=bytes(ctx))
        service_id, backend_id, rule_id, policy_code, drop_code = struct.unpack_from(
            "=5I", result.ctx, _CTX_CB
        )
        installed = next((i for i in self._snapshot.services.values() if i.id == service_id), None)
        backend = None
        if installed is not None and backend_id in installed.backend_ids:
            backend = installed.service.backends[installed.backend_ids.index(backend_id)]
        policy_name, rule_index = None, None
        ref = next((r for r in self._policy.refs if r.id == rule_id), None) if rule_id else None
        if ref is not None:
            policy_name, rule_index = ref.policy, ref.index
        drop_reason = DROP_REASONS.get(drop_code) if drop_code else None
        if drop_reason == "no backend":
            verdict = "refused"
        elif drop_reason is not None or result.retval == _TC_ACT_SHOT:
            verdict = "dropped"
        elif installed is not None:
            verdict = "forwarded"
        else:
            verdict = "passed"
        policy_verdict = None
        if policy_code:
            action = (policy_code & 0x0F) - 1
            policy_verdict = "denied" if action == lib.PYEBPFLB_POLICY_DENY else "allowed"
        return Explanation(
            source=f"{_host(source)}:{sport}",
            destination=f"{_host(target)}:{dport}",
            protocol=protocol,
            direction=direction,
            verdict=verdict,
            service=installed.service if installed is not None else None,
            backend=backend,
            policy_verdict=policy_verdict,
            policy=policy_name,
            rule=rule_index,
            policy_default=bool(policy_code & 0x10),
            drop_reason=drop_reason,
        )

    def drops(self) -> dict[str, Traffic]:
        """Packets the datapath dropped or refused, by reason."""
        self._live()
        drops = self._object.map("lb_drops")
        return {
            reason: Traffic(*_sum(drops.lookup(maps.u32(i)))) for i, reason in DROP_REASONS.items()
        }

    def conntrack(self) -> list[Any]:
        """The raw conntrack entries (key, entry) of translated flows."""
        self._live()
        return self._object.map("lb_ct").lookup_batch()

    def flush_conntrack(self) -> int:
        """Forget every tracked flow (and the ports of fragmented datagrams): the next
        packet of each picks a backend anew, and meets policy as a new flow.
        Returns how many conntrack entries went (balanced flows' and policy's)."""
        self._live()
        gone = 0
        for name in ("lb_ct", "lb_pol_ct", "lb_frags"):
            keys = maps.all_keys(self._object.map(name))
            plan._run(self._object, plan.Delete(name, keys), strict=False)
            gone += len(keys) if name != "lb_frags" else 0
        return gone

    # -- lifetime ----------------------------------------------------------------------------
    def _live(self) -> None:
        if self._closed:
            raise PyEbpfLbError(f"datapath {self.name!r} is closed")

    def close(self) -> None:
        """Release this object; without ``persist`` also detach and unpin (see :meth:`destroy`)."""
        if self._closed:
            return
        if not self.persist:
            self.destroy()
            return
        self._object.close()
        self._closed = True

    def destroy(self) -> None:
        """Detach from every interface of the namespace and remove the pins and maps."""
        if self._closed:
            return
        with entered(self.netns):
            for _, iface in socket.if_nameindex():
                try:
                    self._detach_iface(iface)
                except BpfError:
                    logger.warning("pyebpflb: could not detach from %s", iface, exc_info=True)
        for map_name in self._object.maps:
            path = os.path.join(self.pin_dir, map_name)
            if os.path.exists(path):
                self._object.map(map_name).unpin(path)
        # Remove the now empty folders up to and including pin_root.
        folder = self.pin_dir
        while folder.startswith(self.pin_root):
            try:
                os.rmdir(folder)
            except OSError:  # not empty: another datapath's pins live there
                break
            folder = os.path.dirname(folder)
        self._object.close()
        self._closed = True

    def __enter__(self) -> Datapath:
        return self

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(
                f"unclosed {self!r}: call close() or use `with`", ResourceWarning, stacklevel=2
            )

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _repr_html_(self) -> str:
        if self._closed:
            return _html.table([], [], f"datapath {self.name!r} (closed)")
        rows = [
            (
                s.name,
                f"{_host(s.vip)}:{s.port}/{s.protocol.value}",
                s.scheduler.value,
                ", ".join(str(b) for b in s.backends) or "(none)",
            )
            for s in self.services
        ]
        where = ", ".join(h.interface for h in self.hooks() if h.hook == "tc ingress")
        caption = f"datapath {self.name!r} on {where or 'no interface'}"
        return _html.table(["service", "frontend", "scheduler", "backends"], rows, caption)

    def flows_dataframe(
        self, events: Iterable[FlowEvent] | None = None, *, timeout: float = 1.0
    ) -> Any:
        """Flow events as a pandas DataFrame, one row each (Hubble's fields as columns):
        ``events`` given, or those that come within ``timeout`` seconds. Needs pandas."""
        try:
            import pandas
        except ImportError:
            raise ImportError(
                "flows_dataframe needs pandas (pip install pandas); "
                "Datapath.monitor() gives the same events without it"
            ) from None
        chosen = list(events) if events is not None else list(self.monitor(timeout=timeout))
        columns = [field.name for field in attrs.fields(FlowEvent)]
        frame = pandas.DataFrame([e.to_dict() for e in chosen], columns=columns)
        frame["time"] = pandas.to_datetime(frame["time"])
        return frame

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._snapshot.services)} services"
        where = f" netns={self.netns!r}" if self.netns else ""
        return f"<Datapath {self.name!r}{where} {state}>"


def _maps_of_program(prog_id: int) -> dict[str, Map]:
    try:
        with Program.from_id(prog_id) as program:
            return _maps_by_id(program.map_ids())
    except BpfError:
        return {}


def _maps_by_id(ids: Iterable[int]) -> dict[str, Map]:
    found: dict[str, Map] = {}
    try:
        for map_id in ids:
            bpf_map = Map.from_id(map_id)
            found[bpf_map.name] = bpf_map
    except BpfError:
        return _closed_all(found)
    return found


def _closed_all(found: dict[str, Map]) -> dict[str, Map]:
    for bpf_map in found.values():
        bpf_map.close()
    return {}


def _sum(per_cpu: list[Any] | None) -> tuple[int, int]:
    if not per_cpu:
        return 0, 0
    return sum(int(v.packets) for v in per_cpu), sum(int(v.bytes) for v in per_cpu)


# The start of a struct __sk_buff, as BPF_PROG_TEST_RUN takes it: mark at 8, cb[5] at 48.
_CTX_SIZE, _CTX_MARK, _CTX_CB = 68, 8, 48
_EXPLAIN_MARK = 0xEB1BE791  # EXPLAIN_MARK in lb.bpf.c
_TC_ACT_SHOT = 2


def _host(address: Address) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


def _endpoint(text: str, what: str, default_port: int | None) -> tuple[Address, int]:
    """("10.0.0.1:80" | "10.0.0.1" | "[fd00::1]:80" | "fd00::1") -> (address, port)."""
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    address: Address | None
    try:
        address = ipaddress.ip_address(host)
        number = int(port) if port is not None else default_port
    except ValueError:
        address, number = None, None
    if address is None or number is None or not 1 <= number <= 65535:
        need = "IP[:PORT]" if default_port is not None else "IP:PORT"
        raise ValueError(f"{what} must be {need} (IPv6 as [IP]:PORT), got {text!r}")
    return address, number


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _frame(source: Address, sport: int, target: Address, dport: int, protocol: str) -> bytes:
    """An Ethernet frame with a TCP SYN or a UDP datagram, checksums right."""
    if protocol == "tcp":
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
        number = 6
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + 7, 0) + b"explain"
        number = 17
    if source.version == 4:
        pseudo = source.packed + target.packed + struct.pack("!BBH", 0, number, len(l4))
    else:
        pseudo = source.packed + target.packed + struct.pack("!I3xB", len(l4), number)
    check = _checksum(pseudo + l4)
    at = 16 if protocol == "tcp" else 6
    l4 = l4[:at] + struct.pack("!H", check) + l4[at + 2 :]
    if source.version == 4:
        header = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(l4),
            1,
            0,
            64,
            number,
            0,
            source.packed,
            target.packed,
        )
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        ethertype = 0x0800
    else:
        header = struct.pack(
            "!IHBB16s16s", 6 << 28, len(l4), number, 64, source.packed, target.packed
        )
        ethertype = 0x86DD
    ether = bytes.fromhex("020000000002020000000001") + struct.pack("!H", ethertype)
    return ether + header + l4
