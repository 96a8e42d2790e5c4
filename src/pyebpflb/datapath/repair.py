"""Finishing a change its writer left open (killed, or stopped by a failure it could
not undo).

A change writes invisible entries first (backends, slots, Maglev tables, names,
and every service entry into the services map packets do not read), flips the
map packets read with one write of ``lb_config``, then brings the other map level
and deletes what nothing points at any more (apply.py). lb_config carries
``PYEBPFLB_CHANGE_OPEN`` from the first write to the last. Whatever step a writer
died at, packets see the old services or the new ones, each whole: before the
flip the old map is untouched, after it the new one is complete.

The next writer, holding the writer lock, finds the mark and makes the state
whole again from what packets read: the other services map becomes a copy of
the one in force, and whatever the services in force do not reach goes
(backends that are no member of their service's generation, and the names,
slots, Maglev tables and counters of services that are not there). So a change
killed before its flip is undone, one killed after it is finished.
"""

from __future__ import annotations

import logging
import sys

from pyebpflb import maps
from pyebpflb._bpf import LoadedObject, Map
from pyebpflb._bpf._libbpf import lib
from pyebpflb.datapath.state import all_keys
from pyebpflb.model import Frontend

logger = logging.getLogger("pyebpflb")


def is_open(obj: LoadedObject) -> bool:
    return bool(int(obj.map(maps.CONFIG)[0].service_map) & lib.PYEBPFLB_CHANGE_OPEN)


def repair(obj: LoadedObject, name: str) -> int:
    """Make the state whole after a change left open; returns the entries removed."""
    config_map = obj.map(maps.CONFIG)
    config = config_map[0]
    in_force = int(config.service_map) & lib.PYEBPFLB_SERVICE_MAP_ALT
    active = obj.map(maps.SERVICES_ALT if in_force else maps.SERVICES)
    other = obj.map(maps.SERVICES if in_force else maps.SERVICES_ALT)
    services = _raw_entries(active)
    _level(other, services)
    live: dict[int, int] = {}  # service id -> generation of its entry
    maglev_services = set()
    for _, value in services:
        entry = maps.typed("struct pyebpflb_service", value)
        live[int(entry.id)] = int(entry.gen)
        if int(entry.flags) & lib.PYEBPFLB_SERVICE_MAGLEV:
            maglev_services.add(int(entry.id))
    removed = _sweep(obj, live, maglev_services)
    vips_from(obj, active)
    config = config_map[0]
    config.service_map = in_force
    config_map[0] = config
    logger.warning(
        "pyebpflb: datapath %s: finished a change its writer left open (%d unreachable "
        "entries removed)",
        name,
        removed,
    )
    return removed


def vips_from(obj: LoadedObject, services: Map) -> None:
    """lb_vips as the services map ``services`` says (a dead writer may have stopped
    between its flip and the addresses' write; an upgrade starts it)."""
    counts: dict[bytes, int] = {}
    for key, value in services.lookup_batch():
        if maps.kind_from(maps.typed("struct pyebpflb_service", value)) is not Frontend.CLUSTER_IP:
            continue  # only ClusterIPs refuse their other ports
        entry = maps.typed("struct pyebpflb_service_key", key)
        vip = maps.vip_key(maps.addr_from(entry.vip, int(entry.family)))
        counts[vip] = counts.get(vip, 0) + 1
    vips = obj.map(maps.VIPS)
    for key in [maps.raw(k) for k, _ in vips.lookup_batch()]:
        if key not in counts:
            vips.delete(key)
    if counts:
        vips.update_batch(list(counts), [maps.u32(n) for n in counts.values()])


def _raw_entries(bpf_map: Map) -> list[tuple[bytes, bytes]]:
    return [(maps.raw(k), maps.raw(v)) for k, v in bpf_map.lookup_batch()]


def _level(other: Map, services: list[tuple[bytes, bytes]]) -> None:
    """Make ``other`` hold exactly ``services``."""
    wanted = dict(services)
    for key in [maps.raw(k) for k in all_keys(other)]:
        if key not in wanted:
            other.delete(key)
    if services:
        other.update_batch([k for k, _ in services], [v for _, v in services])


def _sweep(obj: LoadedObject, live: dict[int, int], maglev_services: set[int]) -> int:
    """Delete what the services in force do not reach; returns how many entries went."""
    removed = 0
    backends, gone = obj.map(maps.BACKENDS), obj.map(maps.BE_GONE)
    be_stats = obj.map(maps.BE_STATS)
    for key, value in backends.lookup_batch():
        backend = maps.typed("struct pyebpflb_backend", maps.raw(value))
        gen = live.get(int(backend.service_id))
        if gen is not None and int(backend.gens) & (1 << gen):
            continue
        raw_key = maps.raw(key)
        if be_stats.lookup(raw_key) is not None:  # it served: its counters stay readable
            backend.usable, backend.gens = 0, 0
            gone[raw_key] = backend
        backends.delete(raw_key)
        removed += 1
    for map_name in (maps.SVC_NAMES, maps.SLOTS, maps.SVC_STATS):
        bpf_map = obj.map(map_name)
        for key in [maps.raw(k) for k in all_keys(bpf_map)]:
            # Each key begins with the service id (a counter's with its reply bit).
            if int.from_bytes(key[:4], sys.byteorder) & ~maps.COUNTER_REPLY not in live:
                bpf_map.delete(key)
                removed += 1
    outer = obj.map(maps.MAGLEV)
    shift = int(lib.PYEBPFLB_MAGLEV_GEN_SHIFT)
    for key in [maps.raw(k) for k in all_keys(outer)]:
        number = int.from_bytes(key, sys.byteorder)
        service_id, gen = number & ((1 << shift) - 1), number >> shift
        if service_id not in maglev_services or live.get(service_id) != gen:
            outer.delete(key)
            removed += 1
    return removed
