"""Carrying out plans: the executor (writes in order, undo on failure, the hint of a
full map), and :class:`Programmer`, which plans and applies services and policies."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import attrs

from pyebpflb import maps, plan, policy_plan
from pyebpflb import policy as policy_mod
from pyebpflb._bpf import LoadedObject, Map, MapType, ffi
from pyebpflb._bpf._libbpf import lib
from pyebpflb._gc import gc_paused
from pyebpflb.datapath.limits import Limits, argument_for
from pyebpflb.datapath.state import State
from pyebpflb.errors import BpfError, MapFull
from pyebpflb.model import Address, Policy, Service, TrafficPolicy
from pyebpflb.snapshot import Key

logger = logging.getLogger("pyebpflb")

# A prepare phase writing at least this many entries writes its maps in parallel.
PARALLEL_ENTRIES = 20_000
WRITERS = 4
# A sync of at least OVERLAP_FROM services is planned CHUNK_SERVICES at a time, each
# chunk written while the next is planned.
OVERLAP_FROM = 20_000
CHUNK_SERVICES = 8_192


class Executor:
    """Applies plans to one loaded object."""

    def __init__(self, obj: LoadedObject) -> None:
        self._obj = obj
        # The inner maps built for Maglev tables, by the plan's Table step, and what
        # each replaced (for undo).
        self._inner: dict[int, Map] = {}
        self._previous: dict[int, int | None] = {}
        self._step: plan.Step | None = None  # the step running, or the one that failed
        self._services = self.service_map()  # the services map steps write (see apply_all)

    def apply(self, change: plan.Plan) -> None:
        """Apply ``change``; on any failure undo it and raise, leaving the old state in force."""
        self.apply_all(iter((change,)), overlap=False)

    def apply_all(self, changes: Iterator[plan.Plan], *, overlap: bool = True) -> list[plan.Plan]:
        """Apply the plans ``changes`` yields as one change and return them. With
        ``overlap``, a writer thread writes each plan while the next is planned (the
        iterator plans lazily: the kernel's part of a batch runs without the GIL). On
        any failure every plan applied so far is undone, newest first, and the error
        raised: the old state stays in force.

        The service entries of every plan go to the services map packets do not
        read; once all are written, one write of lb_config flips the map packets
        read, so every service of the change changes at once, then the other map
        is brought level. lb_config says a change is open from its first write to
        its last: a writer killed in between leaves that mark, and the next one
        finishes or undoes its work (:func:`repair`)."""
        applied: list[plan.Plan] = []
        self._step = None
        active = self.service_map()
        self._services = _other(active)  # where the entries of the change go
        self._mark(active | lib.PYEBPFLB_CHANGE_OPEN)
        flipped = False
        try:
            try:
                if overlap:
                    self._write_overlapped(changes, applied)
                else:
                    for change in changes:
                        applied.append(change)
                        self._forward(change, parallel=True)
                self._mark(_other(active) | lib.PYEBPFLB_CHANGE_OPEN)  # the flip
                flipped = True
            except BaseException as exc:
                for change in reversed(applied):
                    self._undo(change)
                self._mark(active)
                explained = self._explained(exc)
                if explained is exc:
                    raise
                raise explained from exc
            self._services = active  # the map packets read before: level with the other
            level = True
            for change in applied:
                level = self._mirror(change) and level
            for change in applied:
                self._cleanup(change)
            if level:
                self._mark(_other(active))
        finally:
            # The outer map holds the tables it points at; our fds can go.
            for inner in self._inner.values():
                inner.close()
            self._inner.clear()
            self._previous.clear()
            self._services = self.service_map() if flipped else active
        return applied

    def service_map(self) -> int:
        """Which services map packets read now (PYEBPFLB_SERVICE_MAP_ALT or 0)."""
        return int(self._obj.map(maps.CONFIG)[0].service_map) & int(lib.PYEBPFLB_SERVICE_MAP_ALT)

    def _mark(self, value: int) -> None:
        """Write lb_config's service_map: which map packets read, and the open mark.
        One aligned word of the array's value changes: packets read the old word or
        the new one."""
        config_map = self._obj.map(maps.CONFIG)
        config = config_map[0]
        config.service_map = value
        config_map[0] = config

    def _mirror(self, change: plan.Plan) -> bool:
        """Write ``change``'s service entries to the map packets no longer read."""
        try:
            for step in change.publish:
                if isinstance(step, plan.Write | plan.Delete) and step.map == maps.SERVICES:
                    self.run(step, strict=False)
        except BpfError:
            logger.warning("pyebpflb: levelling the services maps failed", exc_info=True)
            return False  # the mark stays: the next writer levels them
        return True

    def _write_overlapped(self, changes: Iterator[plan.Plan], applied: list[plan.Plan]) -> None:
        pending: Future[None] | None = None
        # Leaving the block waits for the write under way, also on failure, so that
        # undo never meets a write still running.
        with ThreadPoolExecutor(1, thread_name_prefix="pyebpflb-write") as writer:
            for change in changes:  # plans the next one while the writer writes
                if pending is not None:
                    pending.result()
                applied.append(change)
                pending = writer.submit(self._forward, change, parallel=False)
            if pending is not None:
                pending.result()

    def _forward(self, change: plan.Plan, *, parallel: bool) -> None:
        if parallel:
            self._prepare(change.prepare)
        else:
            for step in change.prepare:
                self._step = step
                self.run(step, strict=True)
        for step in change.publish:
            self._step = step
            self.run(step, strict=True)

    def _undo(self, change: plan.Plan) -> None:
        for undo in change.undo:
            try:
                self.run(undo, strict=False)
            except BpfError:  # pragma: no cover - the kernel refusing an undo
                logger.exception("pyebpflb: undoing a failed update also failed")

    def _cleanup(self, change: plan.Plan) -> None:
        for step in change.cleanup:
            try:
                self.run(step, strict=False)
            except BpfError:
                # The new state is in force; what is left over only takes room.
                logger.warning("pyebpflb: cleanup of %s failed", step, exc_info=True)

    def _explained(self, exc: BaseException) -> BaseException:
        """A full map's error names the constructor argument that sizes it."""
        step = self._step
        if isinstance(exc, MapFull) and isinstance(step, (plan.Write, plan.Delete)):
            return self._full(exc, step.map)
        return exc

    def _prepare(self, steps: list[plan.Step]) -> None:
        """Run the prepare steps: in order, or, for a large change, several maps at
        once (no packet reads them yet, so their order does not matter; the kernel
        work of a batch runs without the GIL). Raises the first failure once every
        step has finished, so that undo meets no write still running."""
        entries = sum(s.count for s in steps if isinstance(s, plan.Write))
        if entries < PARALLEL_ENTRIES or len(steps) < 2:
            for step in steps:
                self._step = step
                self.run(step, strict=True)
            return
        with ThreadPoolExecutor(min(WRITERS, len(steps))) as pool:
            futures = [(step, pool.submit(self.run, step, strict=True)) for step in steps]
        for step, future in futures:
            if future.exception() is not None:
                self._step = step
                future.result()

    def run(self, step: plan.Step, *, strict: bool) -> None:
        if isinstance(step, plan.Table):
            self._build_table(step)
        elif isinstance(step, plan.PublishTable):
            self._publish_table(step.table)
        elif isinstance(step, plan.RestoreTable):
            self._restore_table(step.table)
        elif isinstance(step, plan.Write):
            bpf_map = self._map(step.map)
            if step.items:
                keys, values = zip(*step.items, strict=True)
                bpf_map.update_batch(list(keys), list(values))
            if step.packed is not None and len(step.packed):
                _check_sizes(bpf_map, step.packed)
                bpf_map.update_batch_packed(
                    ffi.from_buffer(step.packed.keys),
                    ffi.from_buffer(step.packed.values),
                    len(step.packed),
                )
        else:
            self.delete(step.map, step.keys, strict=strict and not step.missing_ok)
            if step.packed is not None and len(step.packed):
                self._delete_packed(step.map, step.packed, strict=strict and not step.missing_ok)

    def delete(self, map_name: str, keys: list[object], *, strict: bool) -> None:
        """Delete ``keys``; with ``strict``, all must be there."""
        if not keys:
            return
        bpf_map = self._map(map_name)
        try:
            bpf_map.delete_batch(keys)
        except KeyError:
            if strict:
                raise
            _delete_each(bpf_map, keys)

    def _map(self, map_name: str) -> Map:
        """The map a step names; the services map is the one the change writes."""
        if map_name == maps.SERVICES and self._services & lib.PYEBPFLB_SERVICE_MAP_ALT:
            return self._obj.map(maps.SERVICES_ALT)
        return self._obj.map(map_name)

    def _delete_packed(self, map_name: str, packed: plan.Packed, *, strict: bool) -> None:
        bpf_map = self._map(map_name)
        _check_sizes(bpf_map, packed)
        try:
            bpf_map.delete_batch_packed(ffi.from_buffer(packed.keys), len(packed))
        except KeyError:
            if strict:
                raise
            size = packed.key_size
            _delete_each(
                bpf_map, [packed.keys[at : at + size] for at in range(0, len(packed.keys), size)]
            )

    def _build_table(self, table: plan.Table) -> None:
        size = len(table.backend_ids)
        inner = Map.create(
            MapType.ARRAY,
            key_size=4,
            value_size=4,
            max_entries=size,
            name=maps.MAGLEV_TABLE,
            flags=lib.BPF_F_INNER_MAP,
        )
        self._inner[id(table)] = inner
        inner.update_batch_packed(
            ffi.new("__u32[]", list(range(size))), ffi.new("__u32[]", table.backend_ids), size
        )

    def _publish_table(self, table: plan.Table) -> None:
        outer = self._obj.map(maps.MAGLEV)
        key = maps.maglev_key(table.service_id, table.gen)
        previous = outer.lookup(key)  # from user space, an inner map reads as its id
        self._previous[id(table)] = int.from_bytes(previous, sys.byteorder) if previous else None
        outer.update(key, self._inner[id(table)].fd.to_bytes(4, sys.byteorder))

    def _restore_table(self, table: plan.Table) -> None:
        if id(table) not in self._previous:
            return  # the failure came first: the service's table is as it was
        outer = self._obj.map(maps.MAGLEV)
        key = maps.maglev_key(table.service_id, table.gen)
        previous_id = self._previous[id(table)]
        if previous_id is None:
            with contextlib.suppress(KeyError):
                outer.delete(key)
            return
        with Map.from_id(previous_id) as previous:
            outer.update(key, previous.fd.to_bytes(4, sys.byteorder))

    def _full(self, exc: MapFull, map_name: str) -> MapFull:
        argument = argument_for(map_name)
        if argument is None:
            return exc
        size = self._obj.map(map_name).max_entries
        return MapFull(
            exc.errno or errno.E2BIG,
            f"{exc.operation} (map {map_name} holds at most {size} entries; raise "
            f"{argument}); nothing was changed",
        )


def _other(service_map: int) -> int:
    return service_map ^ int(lib.PYEBPFLB_SERVICE_MAP_ALT)


def _delete_each(bpf_map: Map, keys: list[Any]) -> None:
    """Some keys were gone already: delete the rest one by one."""
    for key in keys:
        with contextlib.suppress(KeyError):
            bpf_map.delete(key)


def _check_sizes(bpf_map: Map, packed: plan.Packed) -> None:
    if packed.key_size != bpf_map.key_size or (
        packed.values and packed.value_size != bpf_map.value_size
    ):
        raise ValueError(
            f"entries packed as {packed.key_size}-byte keys and {packed.value_size}-byte values "
            f"do not fit map {bpf_map.name} ({bpf_map.key_size} and {bpf_map.value_size})"
        )


class Programmer:
    """Services and policies in, ordered map writes out: plans against the state's
    copy, applies, and keeps the copy in step."""

    def __init__(
        self,
        obj: LoadedObject,
        state: State,
        limits: Limits,
        maglev_size: int,
        node: str | None = None,
    ) -> None:
        self._obj = obj
        self._state = state
        self._limits = limits
        self._maglev_size = maglev_size
        self._executor = Executor(obj)
        self.node = node  # the datapath's node: internalTrafficPolicy Local
        self._origins: dict[Key, Key] = {}  # of the change being planned (see expand)

    def check(self, service: object) -> Service:
        if not isinstance(service, Service):
            raise ValueError(f"expected a Service, got {service!r}")
        most = self._limits.max_backends_per_service
        if len(service.backends) > most:
            raise ValueError(
                f"service {service.label} has {len(service.backends)} backends; this datapath "
                f"allows {most} per service (max_backends_per_service)"
            )
        for what, policy in (
            ("internal_traffic_policy", service.internal_traffic_policy),
            ("external_traffic_policy", service.external_traffic_policy),
        ):
            if policy is TrafficPolicy.LOCAL and self.node is None:
                raise ValueError(
                    f"service {service.label} has {what} 'local', but this datapath knows "
                    "no node to tell local backends by: make it with "
                    "Datapath(..., node=Node('<node name>'))"
                )
        return service

    def expand(self, services: Iterable[Service]) -> tuple[list[Service], dict[Key, Key]]:
        """The datapath entries of ``services`` (checked), and for those of a Service
        with more than its ClusterIP, the key of that Service's ClusterIP entry."""
        entries: list[Service] = []
        origins: dict[Key, Key] = {}
        for service in services:
            self.check(service)
            parts = service.frontends()
            if len(parts) > 1:
                for part in parts:
                    origins[part.key] = service.key
            entries.extend(parts)
        return entries, origins

    def frontends_of(self, key: Key) -> list[Key]:
        """The installed entries made with the Service whose ClusterIP entry is ``key``
        (none unless that one has more than its ClusterIP)."""
        services = self._state.snapshot.services
        held = services.get(key)
        if held is None or held.origin is None:
            return []
        return [k for k, i in services.items() if i.origin == key and k != key]

    def sync(self, services: Iterable[Service], policies: list[Policy] | None) -> None:
        with gc_paused():
            self._sync(services, policies)

    def _sync(self, services: Iterable[Service], policies: list[Policy] | None) -> None:
        self._state.fresh()
        wanted, origins = self.expand(services)
        self._origins = origins
        seen: dict[Key, Service] = {}
        for service in wanted:
            # One hash of the key per service (an ipaddress hashes slowly).
            first = seen.setdefault(service.key, service)
            if first is not service:
                raise ValueError(
                    f"services {first.label} and {service.label} have the same "
                    "vip, port and protocol"
                )
        removals = [key for key in self._state.snapshot.services if key not in seen]
        if len(wanted) >= OVERLAP_FROM and self._no_policy_plan(policies):
            self._apply_in_chunks(wanted, removals)
        else:
            self.apply(self._diff(wanted, removals, distinct=True), policies)

    def _no_policy_plan(self, policies: list[Policy] | None) -> bool:
        """No policy changes and none names a service (whose ids a change would move):
        the services can be applied in chunks, each before the next is planned."""
        installed = self._state.policy.policies.values()
        return policies is None and not any(
            rule.service is not None for _, p in installed for rule in p.rules
        )

    def _apply_in_chunks(self, wanted: list[Service], removals: list[Key]) -> None:
        """A large sync as one change planned and written chunk by chunk, the kernel
        writing one chunk while Python plans the next (removals go with the first).
        Each chunk's ids are reserved before its writes."""
        state = self._state
        config = state.config()

        def chunks() -> Iterator[plan.Plan]:
            for start in range(0, len(wanted), CHUNK_SERVICES):
                change = plan.diff(
                    state.snapshot,
                    wanted[start : start + CHUNK_SERVICES],
                    removals if start == 0 else [],
                    self._maglev_size,
                    distinct=True,
                    node=self.node,
                    origins=self._origins,
                )
                if not change.empty:
                    self._reserve_ids(change, None, config)
                    yield change

        touched: set[Address] = set()
        for change in self._executor.apply_all(chunks()):
            state.snapshot = plan.commit(state.snapshot, change)
            touched.update(key[0] for key in change.changes)
        self._mark_vips(touched)

    def upsert(self, service: Service) -> None:
        self._state.fresh()
        entries, self._origins = self.expand([service])
        keep = {entry.key for entry in entries}
        stale = [key for key in self.frontends_of(service.key) if key not in keep]
        self.apply(self._diff(entries, stale))

    def remove(self, key: Key) -> bool:
        self._state.fresh()
        self._origins = {}
        change = self._diff([], [key, *self.frontends_of(key)])
        self.apply(change)
        return not change.empty

    def set_policies(self, policies: list[Policy]) -> None:
        self._origins = {}
        with gc_paused():
            self.apply(self._diff([], []), policies)

    def _diff(
        self, upserts: list[Service], removals: list[Key], *, distinct: bool = False
    ) -> plan.Plan:
        return plan.diff(
            self._state.snapshot,
            upserts,
            removals,
            self._maglev_size,
            distinct=distinct,
            node=self.node,
            origins=self._origins,
        )

    def apply(self, change: plan.Plan, policies: list[Policy] | None = None) -> None:
        """Apply ``change`` and, with ``policies``, make them the installed policies. The
        policies are compiled again whenever the services they name change."""
        config = self._state.config()
        policies_plan = self._policies_plan(change, policies, config)
        if policies_plan is not None:
            change = policy_plan.with_policies(change, policies_plan)
        if change.empty:
            return
        self._reserve_ids(change, policies_plan, config)
        state = self._state
        self._executor.apply(change)
        state.snapshot = plan.commit(state.snapshot, change)
        self._mark_vips({key[0] for key in change.changes})
        if policies_plan is not None:
            state.policy = policies_plan.state
            if not policies_plan.state.active:
                state.update_config(policy_active=0)

    def _mark_vips(self, touched: set[Address]) -> None:
        """lb_vips holds every service address, so that the ports none of its services
        has are refused: written once a change is in (an address a change adds is
        only refused on its other ports a moment later; one it removes, a moment
        longer than its services)."""
        if not touched:
            return
        vips = self._state.snapshot.vips
        bpf_map = self._obj.map(maps.VIPS)
        keys, values, gone = [], [], []
        for vip in touched:  # one hash of each address (an ipaddress hashes slowly)
            count = vips.get(vip)
            if count:
                keys.append(maps.vip_key(vip))
                values.append(maps.u32(count))
            else:
                gone.append(vip)
        bpf_map.update_batch(keys, values)
        for vip in gone:
            with contextlib.suppress(KeyError):
                bpf_map.delete(maps.vip_key(vip))

    def _policies_plan(
        self, change: plan.Plan, policies: list[Policy] | None, config: Any
    ) -> policy_plan.PolicyPlan | None:
        state = self._state
        installed = [p for _, p in state.policy.policies.values()]
        # Rules naming services are compiled with the services' ids: a change that
        # adds, removes or renames services compiles the policies again.
        index = state.policy.index
        names_rules = (
            index.names_services
            if index is not None
            else any(r.service is not None for p in installed for r in p.rules)
        )
        retarget = names_rules and any(
            (old := state.snapshot.services.get(key)) is None
            or new is None
            or old.service.name != new.service.name
            for key, new in change.changes.items()
        )
        if policies is None and not retarget:
            return None
        service_ids = self._service_ids(change)
        wanted = policy_mod.check_policies(installed if policies is None else policies, service_ids)
        if len(wanted) > self._limits.max_policies:
            raise ValueError(
                f"{len(wanted)} policies; this datapath holds at most "
                f"{self._limits.max_policies} (max_policies)"
            )
        if wanted == installed and not retarget:
            return None
        return policy_plan.diff_policies(
            state.policy,
            wanted,
            service_ids,
            max(int(config.next_rule_id), 1),
            max(int(config.next_policy_id), 1),
        )

    def _reserve_ids(
        self, change: plan.Plan, policies_plan: policy_plan.PolicyPlan | None, config: Any
    ) -> None:
        """Ids are reserved before use and never handed out twice, even when the change
        fails: conntrack entries may still name old ids. The change count moves too
        (also on failure: an undo is a change)."""
        state = self._state
        ids_now = {
            "next_service_id": change.next_service_id,
            "next_backend_id": change.next_backend_id,
            "changes": state.changes + 1,
        }
        if policies_plan is not None:
            ids_now["next_rule_id"] = policies_plan.next_rule_id
            ids_now["next_policy_id"] = policies_plan.next_policy_id
            if policies_plan.state.active:
                ids_now["policy_active"] = 1
        if any(int(getattr(config, k)) != v for k, v in ids_now.items()):
            state.update_config(**ids_now)
            state.changes = ids_now["changes"]
            state.snapshot = attrs.evolve(
                state.snapshot,
                next_service_id=change.next_service_id,
                next_backend_id=change.next_backend_id,
            )

    def _service_ids(self, change: plan.Plan) -> dict[str, list[int]]:
        """Service name -> ids of the services of that name, once ``change`` is in."""
        changes = change.changes
        result: dict[str, list[int]] = {}
        for key, installed in self._state.snapshot.services.items():
            if key not in changes:
                result.setdefault(installed.service.name, []).append(installed.id)
        for entry in changes.values():
            if entry is not None:
                result.setdefault(entry.service.name, []).append(entry.id)
        for ids in result.values():
            ids.sort()
        return result
