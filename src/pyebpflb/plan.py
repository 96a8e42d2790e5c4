"""Turning a wanted set of services into ordered map writes (policies:
:mod:`pyebpflb.policy_plan`, with the same steps).

Pure: a plan says what to write and in which order, never how; the datapath's
executor (``pyebpflb.datapath.apply``) carries it out. A change is planned
against a :class:`~pyebpflb.snapshot.Snapshot` of what is installed, in four
phases, so that no packet meets a half-written service:

1. ``prepare``: writes packets cannot see yet: new backends, names, the slots
   and Maglev table of the generation the service entry does not point at, and
   each backend marked with the generations it is a member of (counters are
   created by the datapath with a service's or backend's first flow).
2. ``publish``: the service entries themselves, each replaced whole: removals
   first (freeing room), then new and changed. The executor writes them into
   the services map packets do not read and then flips which one they read,
   so every service of a change changes at once (``datapath/repair.py``).
3. on failure, ``undo`` restores every published entry and removes what
   ``prepare`` created, so the previous services stay fully in force.
4. ``cleanup``: after success, what nothing points at any more, counters
   included.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from pyebpflb import maglev, maps
from pyebpflb.alias import alias_table
from pyebpflb.layout import SLOT_GEN_SHIFT
from pyebpflb.model import Address, Backend, Frontend, Scheduler, Service
from pyebpflb.snapshot import Installed, Key, Snapshot

if TYPE_CHECKING:
    from pyebpflb.policy_plan import PolicyPlan


@attrs.define(eq=False)
class Packed:
    """Entries laid out as one batch system call takes them: keys end to end in
    ``keys``, values end to end in ``values``. A bulk change (a sync from empty)
    appends each entry's packed bytes here instead of making a pair of objects
    per entry, and its undo deletes the same buffer of keys."""

    key_size: int
    value_size: int
    keys: bytearray = attrs.Factory(bytearray)
    values: bytearray = attrs.Factory(bytearray)

    def __len__(self) -> int:
        return len(self.keys) // self.key_size


@attrs.define
class Write:
    map: str
    items: list[tuple[Any, Any]] = attrs.Factory(list)
    packed: Packed | None = None  # more entries, already packed

    @property
    def count(self) -> int:
        return len(self.items) + (len(self.packed) if self.packed is not None else 0)


@attrs.define
class Delete:
    map: str
    keys: list[Any] = attrs.Factory(list)
    missing_ok: bool = False  # keys that may be gone already are no failure
    packed: Packed | None = None  # more keys, already packed (its values unused)

    @property
    def count(self) -> int:
        return len(self.keys) + (len(self.packed) if self.packed is not None else 0)


@attrs.define
class Table:
    """A Maglev table built whole in a new inner map during prepare (no packet
    reads it yet), then swapped in for its service with one update during
    publish. Undo puts the previous table (or none) back."""

    service_id: int
    backend_ids: list[int]  # per slot; 0 where no backend
    gen: int = 0  # the generation of the service entry that will point at it


@attrs.define
class PublishTable:
    table: Table


@attrs.define
class RestoreTable:
    table: Table


Step = Write | Delete | Table | PublishTable | RestoreTable


@attrs.define
class Plan:
    prepare: list[Step]
    publish: list[Step]
    undo: list[Step]
    cleanup: list[Step]
    changes: dict[Key, Installed | None]
    next_service_id: int
    next_backend_id: int
    changed: int
    removal_steps: int = 0  # publish starts with this many steps of removals
    unpublish_steps: int = 0  # undo starts with this many steps removing new services
    policy: PolicyPlan | None = None

    @property
    def empty(self) -> bool:
        return self.changed == 0


class Steps:
    """Writes and deletes grouped by map, in first-use order of the maps."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, str], Step] = {}

    def writes(self, map_name: str) -> list[tuple[Any, Any]]:
        """The (key, value) list of the map's Write step, to append to."""
        step = self._steps.get(("w", map_name))
        if step is None:
            step = self._steps[("w", map_name)] = Write(map_name)
        assert isinstance(step, Write)
        return step.items

    def deletes(self, map_name: str, *, missing_ok: bool = False) -> list[Any]:
        """The key list of the map's Delete step, to append to."""
        step = self._steps.get(("d", map_name))
        if step is None:
            step = self._steps[("d", map_name)] = Delete(map_name, missing_ok=missing_ok)
        assert isinstance(step, Delete)
        return step.keys

    def write(self, map_name: str, key: Any, value: Any) -> None:
        self.writes(map_name).append((key, value))

    def delete(self, map_name: str, key: Any, *, missing_ok: bool = False) -> None:
        self.deletes(map_name, missing_ok=missing_ok).append(key)

    def write_packed(self, map_name: str, packed: Packed) -> None:
        """``packed`` becomes the map's packed entries (its Write step's)."""
        self.writes(map_name)
        step = self._steps[("w", map_name)]
        assert isinstance(step, Write) and step.packed in (None, packed)
        step.packed = packed

    def delete_packed(self, map_name: str, packed: Packed) -> None:
        """The keys of ``packed`` become the map's packed deletes."""
        self.deletes(map_name)
        step = self._steps[("d", map_name)]
        assert isinstance(step, Delete) and step.packed in (None, packed)
        step.packed = packed

    def add(self, step: Step) -> None:
        self._steps[(type(step).__name__, str(id(step)))] = step

    def list(self) -> list[Step]:
        return list(self._steps.values())


def diff(
    snapshot: Snapshot,
    upserts: Iterable[Service],
    removals: Iterable[Key],
    maglev_size: int = maglev.DEFAULT_TABLE_SIZE,
    *,
    distinct: bool = False,
    node: str | None = None,
    origins: Mapping[Key, Key] | None = None,
) -> Plan:
    """The plan that makes ``upserts`` installed and ``removals`` gone. ``distinct``:
    no two upserts share a key and none is removed (a sync checked it), so the
    planner looks for each only in the snapshot, not among its own changes.
    ``node``: the datapath's node, whose backends internalTrafficPolicy Local
    services send to. ``origins``: entry key -> the key of the ClusterIP entry of
    the Service it is a frontend of (:meth:`Service.frontends`)."""
    planner = _Planner(snapshot, maglev_size, node)
    origin_of = (origins or {}).get
    for key in removals:
        planner.remove(key)
    if distinct:
        installed = snapshot.services
        for service in upserts:
            old = installed.get(service.key) if installed else None
            planner.upsert(service, old, origin_of(service.key))
    else:
        for service in upserts:
            planner.upsert(service, planner.installed(service.key), origin_of(service.key))
    return planner.plan()


class _Planner:
    """Collects the steps of one change, service by service."""

    def __init__(self, snapshot: Snapshot, maglev_size: int, node: str | None = None) -> None:
        self.snapshot = snapshot
        self.maglev_size = maglev_size
        self.node = node
        self.prepare, self.publish_removals, self.publish_tables = Steps(), Steps(), Steps()
        self.publish, self.undo_first, self.undo, self.cleanup = (
            Steps(),
            Steps(),
            Steps(),
            Steps(),
        )
        # What this plan changes, over the snapshot (None: removed). Not a copy of
        # the snapshot: one upsert among 100,000 services stays O(1).
        self.changes: dict[Key, Installed | None] = {}
        # The packed entries of services new to the datapath (see _add).
        self._new: tuple[Packed, Packed, Packed, Packed] | None = None
        self.service_ids = itertools.count(snapshot.next_service_id)
        self.backend_ids = itertools.count(snapshot.next_backend_id)
        self.changed = 0

    def installed(self, key: Key) -> Installed | None:
        if key in self.changes:
            return self.changes[key]
        services = self.snapshot.services
        return services.get(key) if services else None

    def remove(self, key: Key) -> None:
        old = self.installed(key)
        if old is None:
            return
        self.changes[key] = None
        self.changed += 1
        key_value = maps.service_key(old.service)
        self.publish_removals.delete(maps.SERVICES, key_value)
        self.undo.write(
            maps.SERVICES, key_value, maps.service_entry(old.id, old.count, old.gen, old.service)
        )
        for slot in old.slots:
            self.cleanup.delete(maps.SLOTS, maps.slot_key(old.id, *_split(slot)))
        for position, (backend, backend_id) in enumerate(
            zip(old.service.backends, old.backend_ids, strict=True)
        ):
            self.cleanup.delete(maps.BACKENDS, maps.u32(backend_id))
            if backend.node is not None:
                self.cleanup.delete(maps.BE_NODES, maps.u32(backend_id), missing_ok=True)
            gone = maps.backend_value(backend, old.id, position, False, 0)
            self.cleanup.write(maps.BE_GONE, maps.u32(backend_id), gone)
        for key in maps.counter_keys(old.id):
            self.cleanup.delete(maps.SVC_STATS, key)
        self.cleanup.delete(maps.SVC_NAMES, maps.u32(old.id))
        if old.origin is not None:
            self.cleanup.delete(maps.FRONTENDS, maps.u32(old.id), missing_ok=True)
        for network in old.service.source_ranges:
            self.cleanup.delete(maps.SRC_RANGES, maps.src_range_key(old.id, network))
        if old.service.scheduler is Scheduler.MAGLEV:
            self.cleanup.delete(maps.MAGLEV, maps.maglev_key(old.id, old.gen), missing_ok=True)

    def upsert(self, service: Service, old: Installed | None, origin: Key | None = None) -> None:
        """Plan ``service`` in place of ``old``, what its key holds now; ``origin``:
        the ClusterIP entry it is a frontend of."""
        if old is not None and old.service == service and old.origin == origin:
            return
        self.changed += 1
        if old is not None and _only_renamed(old.service, service) and old.origin == origin:
            # Only the name changed: packets never read it.
            self.prepare.write(maps.SVC_NAMES, maps.u32(old.id), maps.name_value(service.name))
            self.undo.write(maps.SVC_NAMES, maps.u32(old.id), maps.name_value(old.service.name))
            self.changes[service.key] = attrs.evolve(old, service=service)
            return
        service_key = maps.service_key(service)
        if old is None:
            self._add(service, service_key, origin)
            return
        service_id, gen = old.id, 1 - old.gen
        self._frontend(service_id, service, origin, old)
        if old.service.name != service.name:
            id_key = maps.u32(service_id)
            self.prepare.write(maps.SVC_NAMES, id_key, maps.name_value(service.name))
            self.undo.write(maps.SVC_NAMES, id_key, maps.name_value(old.service.name))
        self.undo.write(
            maps.SERVICES,
            service_key,
            maps.service_entry(old.id, old.count, old.gen, old.service),
        )
        usable_at = service.usable_positions(self.node)
        ids = self._backends(service, service_id, old, usable_at, gen)
        count, slots = self._slots(service, service_id, gen, ids, old, usable_at)
        self._maglev(service, service_id, ids, old, usable_at, gen)
        self.publish.write(
            maps.SERVICES, service_key, maps.service_entry(service_id, count, gen, service)
        )
        self.changes[service.key] = Installed(
            service, service_id, gen, tuple(ids), count, frozenset(slots), origin
        )

    def _start_new(self) -> tuple[Packed, Packed, Packed, Packed]:
        """Packed buffers for new services' names, backends, slots and entries: the
        first three written in prepare, the entries in publish; undo deletes the
        same keys (entries first)."""
        found = []
        for map_name in (maps.SVC_NAMES, maps.BACKENDS, maps.SLOTS, maps.SERVICES):
            packed = Packed(*maps.PACKED_SIZES[map_name])
            if map_name == maps.SERVICES:
                self.publish.write_packed(map_name, packed)
                self.undo_first.delete_packed(map_name, packed)
            else:
                self.prepare.write_packed(map_name, packed)
                self.undo.delete_packed(map_name, packed)
            found.append(packed)
        names, backends, slots, services = found
        self._new = (names, backends, slots, services)
        return self._new

    def _frontend(
        self, service_id: int, service: Service, origin: Key | None, old: Installed | None
    ) -> None:
        """What a frontend needs beside its entry: the ClusterIP entry it belongs to
        (lb_frontends, read back only) and a load-balancer IP's source ranges
        (written before the entry that turns them on; those it no longer has go
        once the change is in)."""
        id_key = maps.u32(service_id)
        was_origin = old.origin if old is not None else None
        was_port = old.service.health_check_node_port if old is not None else None
        if (origin, service.health_check_node_port) != (was_origin, was_port):
            if origin is not None:
                value = maps.frontend_value(origin, service.health_check_node_port)
                self.prepare.write(maps.FRONTENDS, id_key, value)
            else:
                self.cleanup.delete(maps.FRONTENDS, id_key, missing_ok=True)
            if was_origin is not None:
                self.undo.write(maps.FRONTENDS, id_key, maps.frontend_value(was_origin, was_port))
            elif origin is not None:
                self.undo.delete(maps.FRONTENDS, id_key, missing_ok=True)
        before = set(old.service.source_ranges) if old is not None else set()
        for network in service.source_ranges:
            if network not in before:
                range_key = maps.src_range_key(service_id, network)
                self.prepare.write(maps.SRC_RANGES, range_key, maps.u32(1))
                self.undo.delete(maps.SRC_RANGES, range_key, missing_ok=True)
        for network in before - set(service.source_ranges):
            self.cleanup.delete(maps.SRC_RANGES, maps.src_range_key(service_id, network))

    def _add(self, service: Service, service_key: bytes, origin: Key | None = None) -> None:
        """A service not installed before: everything about it is new, so nothing
        is compared and each entry is packed straight into the bulk buffers. The
        path of a sync from empty, 100,000 services at a time."""
        names, backends, slots, services = self._new or self._start_new()
        service_id = next(self.service_ids)
        if origin is not None or service.source_ranges:
            self._frontend(service_id, service, origin, None)
        names.keys += maps.u32(service_id)
        names.values += maps.name_value(service.name)
        usable_at = service.usable_positions(self.node)
        ids = [next(self.backend_ids) for _ in service.backends]
        if ids:
            backends.keys += maps.u32s(ids)
            backends.values += maps.backend_values(service, service_id, usable_at, 1, self.node)
            for backend, backend_id in zip(service.backends, ids, strict=True):
                if backend.node is not None:
                    self._node_of(backend_id, backend, None)
        table = alias_table([service.backends[i].weight for i in usable_at])
        if table:
            keys, values = maps.slot_entries(service_id, 0, table, [ids[i] for i in usable_at])
            slots.keys += keys
            slots.values += values
        self._maglev(service, service_id, ids, None, usable_at, 0)
        services.keys += service_key
        services.values += maps.service_entry(service_id, len(table), 0, service)
        self.changes[service.key] = Installed(
            service,
            service_id,
            0,
            tuple(ids),
            len(table),
            frozenset(range(1, len(table) + 1)),
            origin,
        )

    def _backends(
        self, service: Service, service_id: int, old: Installed, usable_at: list[int], gen: int
    ) -> list[int]:
        """The backends' ids, writing each with the generations it is a member of.

        Every backend is in lb_backends (its flows go on, whatever its state);
        one that stays keeps its id. Each is written again, as a member of both
        the old and the new generation of the entry (``gens``); one that is new,
        of the new only; one that leaves, of the old only (then deleted once the
        change is in). So the members of each generation are known whatever
        step a change stopped at, and a reader sees the old set or the new one.
        Only `usable` is read by packets (session affinity returns only to a
        usable backend). Positions, not addresses, index the new set: hashing an
        ipaddress object is slow, and a sync of 10,000 services would do it
        200,000 times.
        """
        known: dict[tuple[Address, int], tuple[int, Backend, int]] = {
            backend.endpoint: (backend_id, backend, position)
            for position, (backend, backend_id) in enumerate(
                zip(old.service.backends, old.backend_ids, strict=True)
            )
        }
        usable_before = {
            old.service.backends[i].endpoint for i in old.service.usable_positions(self.node)
        }
        in_use_now = set(usable_at)
        both, new_only, old_only = 1 << old.gen | 1 << gen, 1 << gen, 1 << old.gen
        ids: list[int] = []
        for position, backend in enumerate(service.backends):
            in_use = position in in_use_now
            known_entry = known.pop(backend.endpoint, None) if known else None
            if known_entry is None:
                backend_id = next(self.backend_ids)
                backend_key = maps.u32(backend_id)
                value = maps.backend_value(
                    backend, service_id, position, in_use, new_only, self.node
                )
                self.prepare.write(maps.BACKENDS, backend_key, value)
                self.undo.delete(maps.BACKENDS, backend_key)
                if backend.node is not None:
                    self._node_of(backend_id, backend, None)
            else:
                backend_id, was, was_at = known_entry
                was_in_use = backend.endpoint in usable_before
                backend_key = maps.u32(backend_id)
                value = maps.backend_value(backend, service_id, position, in_use, both, self.node)
                self.prepare.write(maps.BACKENDS, backend_key, value)
                before = maps.backend_value(was, service_id, was_at, was_in_use, both, self.node)
                self.undo.write(maps.BACKENDS, backend_key, before)
                if backend.node != was.node:
                    self._node_of(backend_id, backend, was)
            ids.append(backend_id)
        for backend_id, was, was_at in known.values():  # left the service
            backend_key = maps.u32(backend_id)
            was_in_use = was.endpoint in usable_before
            member = maps.backend_value(was, service_id, was_at, was_in_use, old_only, self.node)
            self.prepare.write(maps.BACKENDS, backend_key, member)
            self.cleanup.delete(maps.BACKENDS, backend_key)
            if was.node is not None:
                self.cleanup.delete(maps.BE_NODES, backend_key, missing_ok=True)
            # Its counters stay readable until its last flow ends (the collector).
            gone = maps.backend_value(was, service_id, was_at, False, 0)
            self.cleanup.write(maps.BE_GONE, backend_key, gone)
        return ids

    def _node_of(self, backend_id: int, backend: Backend, was: Backend | None) -> None:
        """lb_be_nodes says which node ``backend`` runs on (read back only: the slots
        already hold what internalTrafficPolicy Local chose)."""
        key = maps.u32(backend_id)
        if backend.node is not None:
            self.prepare.write(maps.BE_NODES, key, maps.node_name_value(backend.node))
        else:
            self.cleanup.delete(maps.BE_NODES, key, missing_ok=True)
        if was is not None and was.node is not None:
            self.undo.write(maps.BE_NODES, key, maps.node_name_value(was.node))
        elif backend.node is not None:
            self.undo.delete(maps.BE_NODES, key, missing_ok=True)

    def _slots(
        self,
        service: Service,
        service_id: int,
        gen: int,
        ids: list[int],
        old: Installed | None,
        usable_at: list[int],
    ) -> tuple[int, set[int]]:
        """The slots of generation ``gen`` (new flows choose among the usable backends,
        by weight): how many, and every slot present once the change is in."""
        table = alias_table([service.backends[i].weight for i in usable_at])
        before = old.slots if old is not None else frozenset()
        slots = set(before)
        writes = self.prepare.writes(maps.SLOTS) if table else []
        for index, (own, alias, threshold) in enumerate(table, start=1):
            slot = (gen << SLOT_GEN_SHIFT) | index
            slot_key = maps.slot_key(service_id, gen, index)
            writes.append(
                (slot_key, maps.slot_value(ids[usable_at[own]], ids[usable_at[alias]], threshold))
            )
            if slot not in before:
                self.undo.delete(maps.SLOTS, slot_key)
            slots.add(slot)
        # Leftovers of this generation from an older, larger set: past the new
        # count, no packet reads them; they go once the change is in.
        for slot in sorted(before):
            slot_gen, index = _split(slot)
            if slot_gen == gen and index > len(table):
                self.cleanup.delete(maps.SLOTS, maps.slot_key(service_id, gen, index))
                slots.discard(slot)
        return len(table), slots

    def _maglev(
        self,
        service: Service,
        service_id: int,
        ids: list[int],
        old: Installed | None,
        usable_at: list[int],
        gen: int,
    ) -> None:
        """A Maglev service's table, built under the generation ``gen`` of its new entry
        (packets of the old entry go on reading the old table, then it goes)."""
        if old is not None and old.service.scheduler is Scheduler.MAGLEV:
            self.cleanup.delete(maps.MAGLEV, maps.maglev_key(service_id, old.gen), missing_ok=True)
        if service.scheduler is Scheduler.MAGLEV:
            usable = [service.backends[i] for i in usable_at]
            slots_of = (
                maglev.build(usable, self.maglev_size, [b.weight for b in usable]) if usable else []
            )
            built = Table(
                service_id,
                [ids[usable_at[i]] if i >= 0 else 0 for i in slots_of] or [0] * self.maglev_size,
                gen,
            )
            self.prepare.add(built)
            self.publish_tables.add(PublishTable(built))
            self.undo.add(RestoreTable(built))

    def plan(self) -> Plan:
        removal_steps = self.publish_removals.list()
        unpublish = self.undo_first.list()
        return Plan(
            removal_steps=len(removal_steps),
            unpublish_steps=len(unpublish),
            prepare=self.prepare.list(),
            publish=removal_steps + self.publish_tables.list() + self.publish.list(),
            undo=unpublish + self.undo.list(),
            cleanup=self.cleanup.list(),
            changes=self.changes,
            next_service_id=next(self.service_ids),
            next_backend_id=next(self.backend_ids),
            changed=self.changed,
        )


def _only_renamed(old: Service, new: Service) -> bool:
    return attrs.evolve(old, name=new.name) == new


def commit(snapshot: Snapshot, plan: Plan) -> Snapshot:
    """The snapshot after ``plan`` was applied. Updates ``snapshot``'s dict in place:
    it is the datapath's own, and copying 100,000 entries per upsert would cost ms."""
    removed = [key for key, entry in plan.changes.items() if entry is None]
    vips = snapshot.vips
    for key, entry in plan.changes.items():
        # Only ClusterIPs refuse their other ports (an external IP may be a node's).
        held = snapshot.services.get(key)
        was = held is not None and held.service.kind is Frontend.CLUSTER_IP
        now = entry is not None and entry.service.kind is Frontend.CLUSTER_IP
        if was != now:
            vips[key[0]] = vips.get(key[0], 0) + (1 if now else -1)
            if not vips[key[0]]:
                del vips[key[0]]
    # update() takes each key's hash from the plan's dict instead of hashing again.
    snapshot.services.update(plan.changes)  # type: ignore[arg-type]
    for key in removed:
        del snapshot.services[key]
    return attrs.evolve(
        snapshot, next_service_id=plan.next_service_id, next_backend_id=plan.next_backend_id
    )


def _split(slot: int) -> tuple[int, int]:
    """(generation, index) of a slot number."""
    return slot >> SLOT_GEN_SHIFT, slot & ((1 << SLOT_GEN_SHIFT) - 1)


__all__ = ["Delete", "Packed", "Plan", "Step", "Table", "Write", "commit", "diff"]
