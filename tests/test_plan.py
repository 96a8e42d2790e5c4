"""The planner, pure: what a change writes, in which phase, and what undoes it."""

from __future__ import annotations

from typing import Any

import pyebpflb as lb
from pyebpflb import maps, plan
from pyebpflb._bpf._libbpf import ffi
from pyebpflb.snapshot import EMPTY, Snapshot

BACKENDS = [lb.Backend(f"10.0.1.{i}", 8080) for i in (1, 2, 3)]
WEB = lb.Service("10.96.0.10", 80, name="default/web", backends=BACKENDS)


def steps(phase: list[plan.Step]) -> dict[str, tuple[str, int]]:
    """map -> (write/delete, how many) of one phase's steps."""
    found: dict[str, tuple[str, int]] = {}
    for step in phase:
        if isinstance(step, plan.Write):
            found[step.map] = ("write", step.count)
        elif isinstance(step, plan.Delete):
            found[step.map] = ("delete", step.count)
        else:
            found[type(step).__name__] = ("table", 1)
    return found


def applied(snapshot: Snapshot, *services: lb.Service) -> Snapshot:
    return plan.commit(snapshot, plan.diff(snapshot, services, []))


def test_a_new_service_is_prepared_then_published_and_undone_service_first() -> None:
    change = plan.diff(EMPTY, [WEB], [])
    assert steps(change.prepare) == {
        maps.SVC_NAMES: ("write", 1),
        maps.BACKENDS: ("write", 3),
        maps.SLOTS: ("write", 3),
    }
    assert steps(change.publish) == {maps.SERVICES: ("write", 1)}
    first_undo = change.undo[0]
    assert isinstance(first_undo, plan.Delete) and first_undo.map == maps.SERVICES
    assert steps(change.undo[1:]) == {
        maps.SVC_NAMES: ("delete", 1),
        maps.BACKENDS: ("delete", 3),
        maps.SLOTS: ("delete", 3),
    }
    assert change.cleanup == []
    installed = change.changes[WEB.key]
    assert installed is not None
    assert (installed.id, installed.backend_ids, installed.count) == (1, (1, 2, 3), 3)
    assert (change.next_service_id, change.next_backend_id) == (2, 4)
    written = next(s for s in change.publish if isinstance(s, plan.Write))
    assert written.count == 1 and written.packed is not None
    service = ffi.from_buffer("struct pyebpflb_service *", written.packed.values)
    assert (service.id, service.count, service.gen) == (1, 3, 0)


def test_the_installed_state_again_plans_nothing() -> None:
    snapshot = applied(EMPTY, WEB)
    assert plan.diff(snapshot, [WEB], []).empty


def test_a_rename_writes_only_the_name() -> None:
    snapshot = applied(EMPTY, WEB)
    change = plan.diff(
        snapshot, [lb.Service("10.96.0.10", 80, name="default/www", backends=BACKENDS)], []
    )
    assert steps(change.prepare) == {maps.SVC_NAMES: ("write", 1)}
    assert change.publish == [] and steps(change.undo) == {maps.SVC_NAMES: ("write", 1)}


def test_a_backend_that_stays_keeps_its_id_and_the_generation_flips() -> None:
    snapshot = applied(EMPTY, WEB)
    smaller = WEB.with_backends(BACKENDS[1:])
    change = plan.diff(snapshot, [smaller], [])
    installed = change.changes[WEB.key]
    assert installed is not None
    assert (installed.backend_ids, installed.gen, installed.count) == ((2, 3), 1, 2)
    # The leaving backend goes once the change is in, and is remembered in lb_be_gone
    # (its counters stay until its last flow ends); gen 0's slots stay until a later
    # change reuses the generation.
    assert steps(change.cleanup) == {maps.BACKENDS: ("delete", 1), maps.BE_GONE: ("write", 1)}
    # Every backend is written again with the generations it belongs to: the two
    # that stay as members of both, the one that leaves of the old one only.
    assert steps(change.prepare) == {maps.BACKENDS: ("write", 3), maps.SLOTS: ("write", 2)}
    undo: dict[str, Any] = steps(change.undo)
    assert undo[maps.SERVICES] == ("write", 1)  # the old entry comes back whole


def test_a_removal_unpublishes_first_and_cleans_up_after() -> None:
    snapshot = applied(EMPTY, WEB)
    change = plan.diff(snapshot, [], [WEB.key])
    assert steps(change.publish) == {maps.SERVICES: ("delete", 1)}
    assert steps(change.undo) == {maps.SERVICES: ("write", 1)}
    assert steps(change.cleanup) == {
        maps.SLOTS: ("delete", 3),
        maps.BACKENDS: ("delete", 3),
        maps.BE_GONE: ("write", 3),  # counters kept until their flows end
        maps.SVC_STATS: ("delete", 2),
        maps.SVC_NAMES: ("delete", 1),
    }
    assert plan.commit(snapshot, change).services == {}


def test_a_maglev_service_builds_its_table_before_it_is_published() -> None:
    service = lb.Service("10.96.0.11", 80, backends=BACKENDS, scheduler="maglev")
    change = plan.diff(EMPTY, [service], [], maglev_size=251)
    (table,) = [s for s in change.prepare if isinstance(s, plan.Table)]
    assert len(table.backend_ids) == 251 and set(table.backend_ids) == {1, 2, 3}
    assert any(isinstance(s, plan.PublishTable) and s.table is table for s in change.publish)
    assert any(isinstance(s, plan.RestoreTable) and s.table is table for s in change.undo)
