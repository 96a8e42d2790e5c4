"""Turning a wanted set of services into ordered map writes, and applying them.

A change is planned against a :class:`~pyebpflb.maps.Snapshot` of what is
installed, in four phases, so that no packet meets a half-written service:

1. ``prepare``: writes packets cannot see yet: new backends, names, and the
   slots of the generation the service entry does not point at (counters are
   created by the datapath with a service's or backend's first flow).
2. ``publish``: the service entries themselves, each replaced whole in one
   atomic map update: removals first (freeing room), then new and changed.
3. on failure, ``undo`` restores every published entry and removes what
   ``prepare`` created, so the previous services stay fully in force.
4. ``cleanup``: after success, what nothing points at any more, counters
   included.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import sys
from collections.abc import Iterable
from typing import Any

import attrs

from pyebpflb import maglev, maps, policy
from pyebpflb._bpf import Map, MapType, Object, ffi
from pyebpflb._bpf._libbpf import lib
from pyebpflb.alias import alias_table
from pyebpflb.errors import BpfError, MapFull
from pyebpflb.model import Address, Backend, Policy, Protocol, Rule, Scheduler, Service

logger = logging.getLogger("pyebpflb")

Key = tuple[Address, int, Protocol]


@attrs.define
class Write:
    map: str
    items: list[tuple[Any, Any]] = attrs.Factory(list)


@attrs.define
class Delete:
    map: str
    keys: list[Any] = attrs.Factory(list)
    missing_ok: bool = False  # keys that may be gone already are no failure


@attrs.define
class Table:
    """A Maglev table built whole in a new inner map during prepare (no packet
    reads it yet), then swapped in for its service with one update during
    publish. Undo puts the previous table (or none) back."""

    service_id: int
    backend_ids: list[int]  # per slot; 0 where no backend
    inner: Map | None = None
    published: bool = False
    previous_id: int | None = None


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
    changes: dict[Key, maps.Installed | None]
    next_service_id: int
    next_backend_id: int
    changed: int
    removal_steps: int = 0  # publish starts with this many steps of removals
    unpublish_steps: int = 0  # undo starts with this many steps removing new services
    policy: PolicyPlan | None = None

    @property
    def empty(self) -> bool:
        return self.changed == 0


class _Steps:
    """Writes and deletes grouped by map, in first-use order of the maps."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, str], Step] = {}

    def write(self, map_name: str, key: Any, value: Any) -> None:
        step = self._steps.get(("w", map_name))
        if step is None:
            step = self._steps[("w", map_name)] = Write(map_name)
        assert isinstance(step, Write)
        step.items.append((key, value))

    def delete(self, map_name: str, key: Any, *, missing_ok: bool = False) -> None:
        step = self._steps.get(("d", map_name))
        if step is None:
            step = self._steps[("d", map_name)] = Delete(map_name, missing_ok=missing_ok)
        assert isinstance(step, Delete)
        step.keys.append(key)

    def add(self, step: Step) -> None:
        self._steps[(type(step).__name__, str(id(step)))] = step

    def list(self) -> list[Step]:
        return list(self._steps.values())


def diff(
    snapshot: maps.Snapshot,
    upserts: Iterable[Service],
    removals: Iterable[Key],
    maglev_size: int = maglev.DEFAULT_TABLE_SIZE,
) -> Plan:
    """The plan that makes ``upserts`` installed and ``removals`` gone."""
    prepare, publish_removals, publish_tables, publish = _Steps(), _Steps(), _Steps(), _Steps()
    undo_first, undo, cleanup = _Steps(), _Steps(), _Steps()
    # What this plan changes, over the snapshot (None: removed). Not a copy of
    # the snapshot: one upsert among 100,000 services stays O(1).
    changes: dict[Key, maps.Installed | None] = {}

    def installed(key: Key) -> maps.Installed | None:
        return changes[key] if key in changes else snapshot.services.get(key)

    service_ids = itertools.count(snapshot.next_service_id)
    backend_ids = itertools.count(snapshot.next_backend_id)
    changed = 0

    for key in removals:
        old = installed(key)
        if old is None:
            continue
        changes[key] = None
        changed += 1
        publish_removals.delete("lb_services", maps.service_key(old.service))
        undo.write(
            "lb_services",
            maps.service_key(old.service),
            maps.service_entry(old.id, old.count, old.gen, old.service),
        )
        for slot in old.slots:
            cleanup.delete("lb_slots", maps.slot_key(old.id, *_split(slot)))
        for backend_id in old.backend_ids:
            cleanup.delete("lb_backends", maps.u32(backend_id))
            cleanup.delete("lb_be_stats", maps.u32(backend_id))
        cleanup.delete("lb_svc_stats", maps.u32(old.id))
        cleanup.delete("lb_svc_names", maps.u32(old.id))
        if old.service.scheduler is Scheduler.MAGLEV:
            cleanup.delete("lb_maglev", maps.u32(old.id))

    for service in upserts:
        old = installed(service.key)
        if old is not None and old.service == service:
            continue
        changed += 1
        if (
            old is not None
            and old.service.backends == service.backends
            and old.service.affinity_timeout == service.affinity_timeout
            and old.service.scheduler == service.scheduler
        ):
            # Only the name changed: packets never read it.
            prepare.write("lb_svc_names", maps.u32(old.id), maps.name_value(service.name))
            undo.write("lb_svc_names", maps.u32(old.id), maps.name_value(old.service.name))
            changes[service.key] = attrs.evolve(old, service=service)
            continue

        # Each key is encoded once and shared by its write and its undo.
        known: dict[tuple[Address, int], tuple[int, Backend, int]] = {}
        service_key = maps.service_key(service)
        if old is None:
            service_id, gen = next(service_ids), 0
            id_key = maps.u32(service_id)
            prepare.write("lb_svc_names", id_key, maps.name_value(service.name))
            undo.delete("lb_svc_names", id_key)
            undo_first.delete("lb_services", service_key)
        else:
            service_id, gen = old.id, 1 - old.gen
            id_key = maps.u32(service_id)
            known = {
                backend.endpoint: (backend_id, backend, position)
                for position, (backend, backend_id) in enumerate(
                    zip(old.service.backends, old.backend_ids, strict=True)
                )
            }
            if old.service.name != service.name:
                prepare.write("lb_svc_names", id_key, maps.name_value(service.name))
                undo.write("lb_svc_names", id_key, maps.name_value(old.service.name))
            undo.write(
                "lb_services",
                service_key,
                maps.service_entry(old.id, old.count, old.gen, old.service),
            )

        # Every backend is in lb_backends (its flows go on, whatever its state);
        # one that stays keeps its id, and its value is rewritten only if its
        # weight, state, place or usability changed. Only `usable` is read by
        # packets (session affinity returns only to a usable backend).
        # Positions, not addresses, index the new set: hashing an ipaddress
        # object is slow, and a sync of 10,000 services would do it 200,000 times.
        usable_at = service.usable_positions()
        in_use_now = set(usable_at)
        usable_before = (
            {old.service.backends[i].endpoint for i in old.service.usable_positions()}
            if old is not None
            else set()
        )
        ids: list[int] = []
        for position, backend in enumerate(service.backends):
            in_use = position in in_use_now
            known_entry = known.get(backend.endpoint) if known else None
            if known_entry is not None:
                backend_id, was, was_at = known_entry
                was_in_use = backend.endpoint in usable_before
                if (was, was_at, was_in_use) != (backend, position, in_use):
                    backend_key = maps.u32(backend_id)
                    prepare.write(
                        "lb_backends",
                        backend_key,
                        maps.backend_value(backend, service_id, position, in_use),
                    )
                    undo.write(
                        "lb_backends",
                        backend_key,
                        maps.backend_value(was, service_id, was_at, was_in_use),
                    )
            else:
                backend_id = next(backend_ids)
                backend_key = maps.u32(backend_id)
                prepare.write(
                    "lb_backends",
                    backend_key,
                    maps.backend_value(backend, service_id, position, in_use),
                )
                undo.delete("lb_backends", backend_key)
            ids.append(backend_id)

        # New flows choose among the usable backends only, by weight.
        usable = [service.backends[i] for i in usable_at]
        table = alias_table([b.weight for b in usable])
        before = old.slots if old is not None else frozenset()
        slots = set(before)
        for index, (own, alias, threshold) in enumerate(table, start=1):
            slot = (gen << maps.SLOT_GEN_SHIFT) | index
            slot_key = maps.slot_key(service_id, gen, index)
            value = maps.slot_value(ids[usable_at[own]], ids[usable_at[alias]], threshold)
            prepare.write("lb_slots", slot_key, value)
            if slot not in before:
                undo.delete("lb_slots", slot_key)
            slots.add(slot)
        # Leftovers of this generation from an older, larger set: past the new
        # count, no packet reads them; they go once the change is in.
        for slot in sorted(slots):
            slot_gen, index = _split(slot)
            if slot_gen == gen and index > len(table):
                cleanup.delete("lb_slots", maps.slot_key(service_id, gen, index))
                slots.discard(slot)
        if service.scheduler is Scheduler.MAGLEV:
            weights = [b.weight for b in usable]
            slots_of = maglev.build(usable, maglev_size, weights) if usable else []
            built = Table(
                service_id,
                [ids[usable_at[i]] if i >= 0 else 0 for i in slots_of] or [0] * maglev_size,
            )
            prepare.add(built)
            publish_tables.add(PublishTable(built))
            undo.add(RestoreTable(built))
        elif old is not None and old.service.scheduler is Scheduler.MAGLEV:
            cleanup.delete("lb_maglev", maps.u32(service_id))
        publish.write(
            "lb_services", service_key, maps.service_entry(service_id, len(table), gen, service)
        )
        kept = set(ids)
        for backend_id, _, _ in known.values():
            if backend_id not in kept:
                cleanup.delete("lb_backends", maps.u32(backend_id))
                cleanup.delete("lb_be_stats", maps.u32(backend_id))
        changes[service.key] = maps.Installed(
            service, service_id, gen, tuple(ids), len(table), frozenset(slots)
        )

    removal_steps = publish_removals.list()
    unpublish = undo_first.list()
    return Plan(
        removal_steps=len(removal_steps),
        unpublish_steps=len(unpublish),
        prepare=prepare.list(),
        publish=removal_steps + publish_tables.list() + publish.list(),
        undo=unpublish + undo.list(),
        cleanup=cleanup.list(),
        changes=changes,
        next_service_id=next(service_ids),
        next_backend_id=next(backend_ids),
        changed=changed,
    )


@attrs.define
class PolicyPlan:
    """Replacing the installed policies: a whole new generation of lookup
    entries is written (prepare), lb_policy flips to it (publish), and the old
    generation goes (cleanup). Undo flips back and removes the new one."""

    prepare: list[Step]
    publish: list[Step]
    undo: list[Step]
    cleanup: list[Step]
    state: maps.PolicyState
    next_rule_id: int
    next_policy_id: int


def diff_policies(
    state: maps.PolicyState,
    wanted: list[Policy],
    service_ids: dict[str, list[int]],
    next_rule_id: int,
    next_policy_id: int,
) -> PolicyPlan:
    """The plan that makes ``wanted`` the installed policies (already checked).

    A rule keeps its id (and its counter) while its policy keeps it, wherever
    it moves in the list; a policy keeps its id while its name stays.
    """
    prepare, publish, undo_head, undo, cleanup = _Steps(), _Steps(), _Steps(), _Steps(), _Steps()
    rule_ids = itertools.count(next_rule_id)
    policy_ids = itertools.count(next_policy_id)

    old_ids: dict[tuple[str, Rule, int], policy.RuleRef] = {}
    seen: dict[tuple[str, Rule], int] = {}
    for ref in state.refs:
        nth = seen[(ref.policy, ref.rule)] = seen.get((ref.policy, ref.rule), -1) + 1
        old_ids[(ref.policy, ref.rule, nth)] = ref
    installed: dict[str, tuple[int, Policy]] = {}
    refs: list[policy.RuleRef] = []
    seen.clear()
    for item in wanted:
        old = state.policies.get(item.name)
        policy_id = old[0] if old is not None else next(policy_ids)
        installed[item.name] = (policy_id, item)
        info_key = maps.u32(policy_id)
        if old is None:
            prepare.write("lb_pol_names", info_key, maps.policy_info(item))
            undo.delete("lb_pol_names", info_key)
        elif old[1] != item:
            prepare.write("lb_pol_names", info_key, maps.policy_info(item))
            undo.write("lb_pol_names", info_key, maps.policy_info(old[1]))
        for index, rule in enumerate(item.rules):
            nth = seen[(item.name, rule)] = seen.get((item.name, rule), -1) + 1
            kept = old_ids.pop((item.name, rule, nth), None)
            ref = policy.RuleRef(kept.id if kept else next(rule_ids), item.name, index, rule)
            refs.append(ref)
            rule_key = maps.u32(ref.id)
            if kept is None:
                prepare.write("lb_pol_rules", rule_key, maps.policy_rule(ref, policy_id))
                undo.delete("lb_pol_rules", rule_key)
            elif kept.index != index:
                prepare.write("lb_pol_rules", rule_key, maps.policy_rule(ref, policy_id))
                undo.write("lb_pol_rules", rule_key, maps.policy_rule(kept, policy_id))
    for name, (policy_id, _) in state.policies.items():
        if name not in installed:
            cleanup.delete("lb_pol_names", maps.u32(policy_id))
    for gone in old_ids.values():
        cleanup.delete("lb_pol_rules", maps.u32(gone.id))
        cleanup.delete("lb_rule_stats", maps.u32(gone.id))

    # The generation packets do not read: first clear what a crashed change
    # may have left there, then write it whole.
    gen = 1 - state.gen if state.active else 0
    stale_cidrs, stale_ports = state.keys.get(gen, ([], []))
    for key in stale_cidrs:
        prepare.delete("lb_pol_cidrs", key, missing_ok=True)
    for key in stale_ports:
        prepare.delete("lb_pol_ports", key, missing_ok=True)
    compiled = policy.compile_policies(wanted, refs, service_ids, gen << maps.POLICY_GEN_SHIFT)
    cidr_keys, port_keys = [], []
    for entry in compiled.cidrs:
        key = maps.policy_cidr_key(entry, gen)
        cidr_keys.append(key)
        prepare.write("lb_pol_cidrs", key, maps.policy_class(entry))
    for port_entry in compiled.ports:
        key = maps.policy_port_key(port_entry)
        port_keys.append(key)
        prepare.write("lb_pol_ports", key, maps.policy_verdict(port_entry))
    for key in cidr_keys:
        undo.delete("lb_pol_cidrs", key)
    for key in port_keys:
        undo.delete("lb_pol_ports", key)

    # Undo flips the head back before it removes what the new head pointed at.
    head_key = maps.u32(0)
    if wanted:
        publish.write("lb_policy", head_key, maps.policy_head(gen, compiled))
    elif state.active:
        publish.delete("lb_policy", head_key)
    if state.active:
        old_head = maps.policy_head(state.gen, _flags_of(state))
        undo_head.write("lb_policy", head_key, old_head)
        old_cidrs, old_ports = state.keys.get(state.gen, ([], []))
        for key in old_cidrs:
            cleanup.delete("lb_pol_cidrs", key)
        for key in old_ports:
            cleanup.delete("lb_pol_ports", key)
    elif wanted:
        undo_head.delete("lb_policy", head_key)

    keys: dict[int, tuple[list[Any], list[Any]]] = {gen: (cidr_keys, port_keys), 1 - gen: ([], [])}
    return PolicyPlan(
        prepare=prepare.list(),
        publish=publish.list(),
        undo=undo_head.list() + undo.list(),
        cleanup=cleanup.list(),
        state=maps.PolicyState(
            gen=gen, active=bool(wanted), policies=installed, refs=tuple(refs), keys=keys
        ),
        next_rule_id=next(rule_ids),
        next_policy_id=next(policy_ids),
    )


def _flags_of(state: maps.PolicyState) -> policy.Compiled:
    """The head flags of the installed policies (no entries needed)."""
    return policy.compile_policies([p for _, p in state.policies.values()], [], {})


def with_policies(change: Plan, policies: PolicyPlan) -> Plan:
    """``change`` and ``policies`` as one all-or-nothing plan. The policy head flips
    after service removals and before new services are published: a new service is
    never reachable before the rules naming it are in force, nor a removed one after."""
    at, back = change.removal_steps, change.unpublish_steps
    return attrs.evolve(
        change,
        prepare=change.prepare + policies.prepare,
        publish=change.publish[:at] + policies.publish + change.publish[at:],
        undo=change.undo[:back] + policies.undo + change.undo[back:],
        cleanup=change.cleanup + policies.cleanup,
        changed=change.changed + 1,
        policy=policies,
    )


def commit(snapshot: maps.Snapshot, plan: Plan) -> maps.Snapshot:
    """The snapshot after ``plan`` was applied. Updates ``snapshot``'s dict in place:
    it is the datapath's own, and copying 100,000 entries per upsert would cost ms."""
    for key, entry in plan.changes.items():
        if entry is None:
            snapshot.services.pop(key, None)
        else:
            snapshot.services[key] = entry
    return attrs.evolve(
        snapshot, next_service_id=plan.next_service_id, next_backend_id=plan.next_backend_id
    )


def _split(slot: int) -> tuple[int, int]:
    """(generation, index) of a slot number."""
    return slot >> maps.SLOT_GEN_SHIFT, slot & ((1 << maps.SLOT_GEN_SHIFT) - 1)


def apply(obj: Object, plan: Plan, capacity_hint: dict[str, str]) -> None:
    """Apply ``plan``; on any failure undo it and raise, leaving the old state in force."""
    try:
        try:
            for step in plan.prepare + plan.publish:
                _run(obj, step, strict=True)
        except BaseException as exc:
            for step in plan.undo:
                try:
                    _run(obj, step, strict=False)
                except BpfError:  # pragma: no cover - the kernel refusing an undo
                    logger.exception("pyebpflb: undoing a failed update also failed")
            if isinstance(exc, MapFull):
                raise _explain_full(exc, obj, capacity_hint) from exc
            raise
        for step in plan.cleanup:
            try:
                _run(obj, step, strict=False)
            except BpfError:
                # The new state is in force; what is left over only takes room.
                logger.warning("pyebpflb: cleanup of %s failed", step, exc_info=True)
    finally:
        # The outer map holds the tables it points at; our fds can go.
        for step in plan.prepare:
            if isinstance(step, Table) and step.inner is not None:
                step.inner.close()


def _run(obj: Object, step: Step, *, strict: bool) -> None:
    if isinstance(step, Table):
        _build_table(step)
        return
    if isinstance(step, PublishTable):
        _publish_table(obj, step.table)
        return
    if isinstance(step, RestoreTable):
        _restore_table(obj, step.table)
        return
    bpf_map = obj.map(step.map)
    if isinstance(step, Write):
        if step.items:
            keys, values = zip(*step.items, strict=True)
            bpf_map.update_batch(list(keys), list(values))
        return
    if not step.keys:
        return
    try:
        bpf_map.delete_batch(step.keys)
    except KeyError:
        if strict and not step.missing_ok:
            raise
        # Some were gone already: delete the rest one by one.
        for key in step.keys:
            with contextlib.suppress(KeyError):
                bpf_map.delete(key)


def _build_table(table: Table) -> None:
    size = len(table.backend_ids)
    table.inner = Map.create(
        MapType.ARRAY,
        key_size=4,
        value_size=4,
        max_entries=size,
        name="lb_maglev_table",
        flags=lib.BPF_F_INNER_MAP,
    )
    table.inner.update_batch_packed(
        ffi.new("__u32[]", list(range(size))), ffi.new("__u32[]", table.backend_ids), size
    )


def _publish_table(obj: Object, table: Table) -> None:
    assert table.inner is not None
    outer = obj.map("lb_maglev")
    key = table.service_id.to_bytes(4, sys.byteorder)
    previous = outer.lookup(key)  # from user space, an inner map reads as its id
    table.previous_id = int.from_bytes(previous, sys.byteorder) if previous else None
    outer.update(key, table.inner.fd.to_bytes(4, sys.byteorder))
    table.published = True


def _restore_table(obj: Object, table: Table) -> None:
    if not table.published:
        return  # the failure came first: the service's table is as it was
    outer = obj.map("lb_maglev")
    key = table.service_id.to_bytes(4, sys.byteorder)
    if table.previous_id is None:
        with contextlib.suppress(KeyError):
            outer.delete(key)
        return
    with Map.from_id(table.previous_id) as previous:
        outer.update(key, previous.fd.to_bytes(4, sys.byteorder))


def _explain_full(exc: MapFull, obj: Object, capacity_hint: dict[str, str]) -> MapFull:
    operation = exc.operation
    for name, hint in capacity_hint.items():
        if name in operation:
            size = obj.map(name).max_entries
            return MapFull(
                exc.errno or errno.E2BIG,
                f"{operation} (map {name} holds at most {size} entries; raise {hint}); "
                "nothing was changed",
            )
    return exc


__all__ = ["Delete", "Plan", "Write", "apply", "diff"]
