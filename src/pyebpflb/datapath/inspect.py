"""Reading a datapath's counters and tables: typed results only."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from typing import Any

from pyebpflb import maps
from pyebpflb._bpf import LoadedObject, MapType
from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb.datapath.apply import Executor
from pyebpflb.datapath.results import (
    ConntrackTable,
    DatapathStats,
    Flow,
    MapInfo,
    ServiceStats,
    Traffic,
)
from pyebpflb.datapath.state import State, all_keys
from pyebpflb.errors import NotFound
from pyebpflb.events import EventStats
from pyebpflb.layout import DROP_REASONS, CtKind
from pyebpflb.model import WITH_PORTS, Service, endpoint_text, protocol_name


def _not_installed(what: str, datapath: str) -> NotFound:
    return NotFound(errno.ENOENT, f"{what} is not installed in datapath {datapath!r}")


_FIN_EITHER = lib.PYEBPFLB_CT_FIN_CLIENT | lib.PYEBPFLB_CT_FIN_BACKEND


class Inspector:
    def __init__(self, obj: LoadedObject, state: State, name: str, pin_dir: str) -> None:
        self._obj = obj
        self._state = state
        self._name = name
        self._pin_dir = pin_dir

    def _traffic(self, map_name: str, key: int) -> Traffic:
        return Traffic(*maps.counter_sum(self._obj.map(map_name).lookup(maps.u32(key))))

    def service_stats(self, service: Service) -> ServiceStats:
        installed = self._state.snapshot.services.get(service.key)
        if installed is None:
            raise _not_installed(f"service {service.label}", self._name)
        total = self._traffic(maps.SVC_STATS, installed.id)
        members = list(zip(installed.service.backends, installed.backend_ids, strict=True))
        backends = {backend: self._traffic(maps.BE_STATS, i) for backend, i in members}
        replies = {
            backend: self._traffic(maps.BE_STATS, i | maps.COUNTER_REPLY) for backend, i in members
        }
        removed = {}
        for key, value in self._obj.map(maps.BE_GONE).lookup_batch():
            if int(value.service_id) == installed.id:
                backend_id = int(key)
                removed[maps.backend_from(value)] = self._traffic(maps.BE_STATS, backend_id)
        return ServiceStats(
            installed.service,
            total.packets,
            total.bytes,
            backends,
            replies=self._traffic(maps.SVC_STATS, installed.id | maps.COUNTER_REPLY),
            backend_replies=replies,
            removed_backends=removed,
        )

    def policy_stats(self, name: str) -> list[Traffic]:
        policy = self._state.policy
        if name not in policy.policies:
            raise _not_installed(f"policy {name!r}", self._name)
        refs = sorted((r for r in policy.refs if r.policy == name), key=lambda r: r.index)
        return [self._traffic(maps.RULE_STATS, r.id) for r in refs]

    def drops(self) -> dict[str, Traffic]:
        return {reason: self._traffic(maps.DROPS, code) for code, reason in DROP_REASONS.items()}

    def event_stats(self) -> EventStats:
        per_cpu = self._obj.map(maps.EVENT_STATS).lookup(maps.u32(0)) or []
        return EventStats(
            sent=sum(int(v.sent) for v in per_cpu),
            lost=sum(int(v.lost) for v in per_cpu),
            rate_limited=sum(int(v.rate_limited) for v in per_cpu),
        )

    def stats(self) -> DatapathStats:
        return DatapathStats(
            services=[self.service_stats(i.service) for i in self._state.snapshot.in_order()],
            policies={name: self.policy_stats(name) for name in self._state.policy.policies},
            drops=self.drops(),
            events=self.event_stats(),
            conntrack=self.conntrack_stats(),
        )

    def conntrack_stats(self) -> list[ConntrackTable]:
        result = []
        counters = self._obj.map(maps.CT_STATS)
        for index, (name, table) in enumerate(zip(_CT_TABLE_NAMES, maps.CT_TABLES, strict=True)):
            per_cpu = counters.lookup(maps.u32(index)) or []
            bpf_map = self._obj.map(table)

            def total(field: str, per_cpu: list[Any] = per_cpu) -> int:
                return sum(int(getattr(value, field)) for value in per_cpu)

            result.append(
                ConntrackTable(
                    table=name,
                    map=table,
                    entries=len(all_keys(bpf_map)),
                    max_entries=bpf_map.max_entries,
                    created=total("created"),
                    confirmed=total("confirmed"),
                    orphaned=total("orphaned"),
                    healed=total("healed"),
                    collected=total("collected"),
                )
            )
        return result

    def collect_garbage(self, config: Any) -> int:
        """Delete the dead entries of every conntrack table (the datapath's own rule:
        an expired flow, both halves; a reply half without its live flow); how many."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        names: dict[int, str] = {}  # not the snapshot's: this may run on another thread
        gone = 0
        referenced: set[int] = set()
        for index, table in enumerate(maps.CT_TABLES):
            bpf_map = self._obj.map(table)
            entries = [
                (key, entry, _flow(key, entry, config, names, now))
                for key, entry in bpf_map.lookup_batch()
            ]
            live = set(id(flow) for flow in _live(entries))
            dead = [(key, entry) for key, entry, flow in entries if id(flow) not in live]
            deleted = 0
            for key, entry in dead:
                deleted += _delete_if_unchanged(bpf_map, key, entry)
            if deleted:
                self._count_collected(index, deleted)
            gone += deleted
            referenced.update(
                int(entry.backend_id)
                for key, entry, flow in entries
                if id(flow) in live and int(key.dir) == lib.PYEBPFLB_CT_SERVICE
            )
        self._forget_gone_backends(referenced)
        return gone + self._collect_snat(config, now)

    def _collect_snat(self, config: Any, now: int) -> int:
        """SNAT mappings idle past their lifetime (a half that saw a FIN or RST: the
        closing timeout), both halves: a half goes only when it and its partner are
        idle (one-way traffic refreshes one half only)."""
        bpf_map = self._obj.map(maps.SNAT)
        entries = {maps.raw(k): maps.typed("struct pyebpflb_snat_entry", v)
                   for k, v in bpf_map.lookup_batch()}  # fmt: skip
        if not entries:
            return 0
        lifetime = {
            socket.IPPROTO_TCP: int(config.snat_tcp_ns) or int(config.ct_tcp_established_ns),
            socket.IPPROTO_UDP: int(config.snat_udp_ns) or int(config.ct_udp_ns),
        }
        closing = int(config.ct_tcp_closing_ns)

        def idle(entry: Any, proto: int) -> bool:
            limit = lifetime.get(proto, lifetime[socket.IPPROTO_TCP])
            if proto == socket.IPPROTO_TCP and int(entry.flags) & lib.PYEBPFLB_SNAT_CLOSING:
                limit = closing
            return now - int(entry.last_seen_ns) > limit

        deleted = 0
        for raw_key, entry in entries.items():
            key = maps.typed("struct pyebpflb_ct_key", raw_key)
            proto = int(key.proto)
            if not idle(entry, proto):
                continue
            partner = entries.get(maps.snat_partner(key, entry))
            if partner is not None and not idle(partner, proto):
                continue
            deleted += _delete_if_unchanged(bpf_map, raw_key, entry)
        return deleted

    def _forget_gone_backends(self, referenced: set[int]) -> None:
        """Backends that left their service, once no live flow names them: their
        record and counters go."""
        gone_map, counters = self._obj.map(maps.BE_GONE), self._obj.map(maps.BE_STATS)
        for key in all_keys(gone_map):
            backend_id = int(key)
            if backend_id in referenced:
                continue
            for counter_key in maps.counter_keys(backend_id):
                with contextlib.suppress(KeyError):
                    counters.delete(counter_key)
            with contextlib.suppress(KeyError):
                gone_map.delete(key)

    def _count_collected(self, index: int, deleted: int) -> None:
        counters = self._obj.map(maps.CT_STATS)
        per_cpu = counters.lookup(maps.u32(index))
        per_cpu[0].collected = int(per_cpu[0].collected) + deleted
        counters.update(maps.u32(index), per_cpu)

    def map_infos(self) -> list[MapInfo]:
        result = []
        for name, bpf_map in sorted(self._obj.maps.items()):
            if bpf_map.type in (MapType.ARRAY, MapType.PERCPU_ARRAY):
                entries: int | None = bpf_map.max_entries
            elif bpf_map.type == MapType.RINGBUF:
                entries = None
            else:
                entries = len(all_keys(bpf_map))
            pin = os.path.join(self._pin_dir, name)
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

    def flows(
        self,
        config: Any,
        tables: tuple[str, ...] = (*maps.CT_TABLES, maps.POL_CT),
        *,
        live_only: bool = True,
    ) -> list[Flow]:
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        names = self._state.snapshot.names()
        entries = [item for table in tables for item in self._obj.map(table).lookup_batch()]
        flows = [(key, entry, _flow(key, entry, config, names, now)) for key, entry in entries]
        if not live_only:
            return [flow for _, _, flow in flows]
        return _live(flows)

    def flush_conntrack(self) -> int:
        executor = Executor(self._obj)
        gone = 0
        for name in (*maps.CT_TABLES, maps.POL_CT, maps.FRAGS, maps.FRAG_NAT):
            keys = all_keys(self._obj.map(name))
            executor.delete(name, keys, strict=False)
            gone += len(keys) if name not in (maps.FRAGS, maps.FRAG_NAT) else 0
        return gone


_CT_TABLE_NAMES = ("tcp", "tcp_syn", "udp")  # in maps.CT_TABLES order


def _live(flows: list[tuple[Any, Any, Flow]]) -> list[Flow]:
    """The live entries: a flow half before it expires, a reply half while the flow
    half it points back to is live and sends the flow to its backend (lib/ct.h)."""
    live_services = {
        _tuple(key.saddr, key.daddr, key.sport, key.dport, key): _end(
            entry.nat_addr, entry.nat_port
        )
        for key, entry, flow in flows
        if flow.kind == CtKind.SERVICE.label and flow.expires_in
    }
    result = []
    for key, entry, flow in flows:
        if flow.kind == CtKind.REPLY.label:
            owner = _tuple(_client_of(key, entry), entry.nat_addr, key.dport, entry.nat_port, key)
            if live_services.get(owner) != _end(key.saddr, key.sport):
                continue
        elif not flow.expires_in:
            continue
        result.append(flow)
    return result


def _client_of(key: Any, entry: Any) -> Any:
    """A reply half's client: its destination, or for a hairpin flow its source."""
    return key.saddr if int(entry.flags) & lib.PYEBPFLB_CT_HAIRPIN else key.daddr


def _end(addr: Any, port: Any) -> tuple[bytes, int]:
    return bytes(ffi.buffer(addr.bytes, 16)), int(port)


def _tuple(saddr: Any, daddr: Any, sport: Any, dport: Any, key: Any) -> tuple[object, ...]:
    return (*_end(saddr, sport), *_end(daddr, dport), int(key.proto), int(key.family))


def _flow(key: Any, entry: Any, config: Any, names: dict[int, str], now: int) -> Flow:
    try:
        kind = CtKind(int(key.dir)).label
    except ValueError:
        kind = str(int(key.dir))
    family, proto = int(key.family), int(key.proto)

    def at(union: Any, port: int) -> str:
        address = maps.addr_from(union, family)
        return endpoint_text(address, maps.port_from(port) if proto in WITH_PORTS else None)

    flags = int(entry.flags)
    closing = bool(flags & lib.PYEBPFLB_CT_CLOSING)
    answered = bool(flags & lib.PYEBPFLB_CT_SEEN_REPLY)
    expires_in = None
    if kind != CtKind.REPLY.label:
        if proto != 6:
            life = int(config.ct_udp_ns)
        elif closing:
            life = int(config.ct_tcp_closing_ns)
        elif not answered:
            life = int(config.ct_tcp_syn_ns)
        else:
            life = int(config.ct_tcp_established_ns)
        expires_in = max(0.0, (int(entry.last_seen_ns) + life - now) / 1e9)
    balanced = kind in (CtKind.SERVICE.label, CtKind.REPLY.label)
    return Flow(
        kind=kind,
        protocol=protocol_name(proto),
        source=at(key.saddr, int(key.sport)),
        destination=at(key.daddr, int(key.dport)),
        backend=at(entry.nat_addr, int(entry.nat_port)) if kind == CtKind.SERVICE.label else None,
        service=names.get(int(entry.service_id)) if balanced else None,
        age=max(0.0, (now - int(entry.created_ns)) / 1e9),
        expires_in=expires_in,
        closing=closing,
        answered=answered,
        created_ns=int(entry.created_ns),
        half_closed=not closing and bool(flags & _FIN_EITHER),
    )


def _delete_if_unchanged(bpf_map: Any, key: Any, entry: Any) -> int:
    """Delete a dead entry read before, unless a packet revived (or replaced) it since:
    1 when deleted."""
    now_there = bpf_map.lookup(key)
    if now_there is None or int(now_there.last_seen_ns) != int(entry.last_seen_ns):
        return 0
    try:
        bpf_map.delete(key)
    except KeyError:
        return 0
    return 1
