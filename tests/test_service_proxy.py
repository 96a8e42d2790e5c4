"""pyebpflb.k8s.ServiceProxy: Services and EndpointSlices as a watch delivers them,
programmed into a real datapath in the sandbox and checked with real traffic."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import PIN_ROOT

import pyebpflb as lb
from pyebpflb import k8s
from pyebpflb.testing.sandbox import Sandbox

pytestmark = pytest.mark.kernel

VIP = "10.96.0.10"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(backends=3) as built:
        yield built


@pytest.fixture
def dp(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[lb.Datapath]:
    name = f"t{os.getpid()}-{request.node.name}"[:60]
    with lb.Datapath(name, netns=sandbox.lb.netns, pin_root=PIN_ROOT) as datapath:
        datapath.attach(sandbox.lb.iface)
        yield datapath


def service(cluster_ip: str = VIP) -> dict[str, Any]:
    """A Service as a list's items come: no kind."""
    return {
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80,
                                                     "targetPort": 8080}]},
    }  # fmt: skip


def endpointslice(sandbox: Sandbox, states: dict[int, dict[str, bool]]) -> dict[str, Any]:
    """Backend index -> its conditions."""
    return {
        "metadata": {"name": "web-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [str(sandbox.backends[i].ipv4)], "conditions": c}
                      for i, c in states.items()],
    }  # fmt: skip


def answers(sandbox: Sandbox, count: int = 30) -> set[str]:
    return {sandbox.http_get(VIP, 80) for _ in range(count)}


def test_nothing_is_programmed_before_both_lists_arrived(sandbox: Sandbox, dp: lb.Datapath) -> None:
    """kube-proxy's isInitialized: a Service seen before its EndpointSlices would be
    programmed with no endpoints and refuse connections."""
    proxy = k8s.ServiceProxy(dp, min_sync_period=0)
    proxy.on_service("ADDED", service())
    proxy.mark_synced("Service")
    assert proxy.sync() is False and dp.services == []
    proxy.on_endpointslice("ADDED", endpointslice(sandbox, {0: {"ready": True}}))
    proxy.mark_synced("EndpointSlice")
    assert proxy.sync() is True
    assert answers(sandbox) == {"backend-1"}


def test_changes_through_the_watch_are_followed_by_traffic(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    now = [100.0]
    proxy = k8s.ServiceProxy(dp, min_sync_period=1.0, clock=lambda: now[0])
    proxy.replace_all([service()], [endpointslice(sandbox, {0: {"ready": True}})])
    assert proxy.sync()
    assert answers(sandbox) == {"backend-1"}
    # Scaled up: a second ready endpoint.
    proxy.on_endpointslice("MODIFIED", endpointslice(sandbox, {0: {"ready": True},
                                                                1: {"ready": True}}))  # fmt: skip
    assert proxy.sync() is False and proxy.pending  # minSyncPeriod: not yet
    now[0] += 1.0
    assert proxy.sync() and not proxy.pending
    assert answers(sandbox) == {"backend-1", "backend-2"}
    # backend-1 terminating but serving: an open connection to it goes on; new ones go
    # to backend-2 (kube-proxy falls back to it only when nothing is ready).
    with sandbox.connection(VIP, 80) as open_conn:
        first = open_conn.get()
        terminating = {"ready": False, "serving": True, "terminating": True}
        if first == "backend-1":
            states = {0: terminating, 1: {"ready": True}}
        else:
            states = {0: {"ready": True}, 1: terminating}
        proxy.on_endpointslice("MODIFIED", endpointslice(sandbox, states))
        assert proxy.sync(force=True)
        assert answers(sandbox) == ({"backend-2"} if first == "backend-1" else {"backend-1"})
        assert open_conn.get() == first
    # A malformed Service is reported and skipped; the rest goes on.
    other = service("10.96.0.300")
    other["metadata"] = {"name": "broken", "namespace": "shop"}
    proxy.on_service("ADDED", other)
    assert proxy.sync(force=True)
    (event,) = proxy.events
    assert event["reason"] == "FailedToProgram" and event["involvedObject"]["name"] == "broken"
    assert "10.96.0.300" in event["message"]
    assert [s.name for s in dp.services] == ["shop/web"]
    # Deleted: gone from the datapath.
    proxy.on_service("DELETED", service())
    assert proxy.sync(force=True)
    assert dp.services == []


def test_bad_events_and_kinds_are_refused(dp: lb.Datapath) -> None:
    proxy = k8s.ServiceProxy(dp)
    with pytest.raises(ValueError, match="event must be one of ADDED, MODIFIED, DELETED"):
        proxy.on_service("UPDATED", service())
    with pytest.raises(
        ValueError,
        match=r"kind must be one of 'Service', 'EndpointSlice', got 'Pod' \(network_policy=True",
    ):
        proxy.mark_synced("Pod")
    with pytest.raises(ValueError, match=r"enforces no NetworkPolicy \(network_policy=False\)"):
        proxy.on_pod("ADDED", {"metadata": {"name": "p"}})
    with pytest.raises(ValueError, match="got 'Pods'"):
        k8s.ServiceProxy(dp, network_policy=True).replace("Pods", [])
    with pytest.raises(ValueError, match="min_sync_period must be >= 0 seconds"):
        k8s.ServiceProxy(dp, min_sync_period=-1)


def test_a_frontend_another_service_holds_is_refused_then_taken_when_freed(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    """A ClusterIP handed to a new Service before the old one's deletion arrived (the
    watch delivers them in that order): the new one is refused with a Warning Event,
    never taking the frontend from the old, which goes on answering; once the old one
    is deleted the new one is programmed at the same sync."""
    proxy = k8s.ServiceProxy(dp, min_sync_period=0)
    proxy.replace_all([service()], [endpointslice(sandbox, {0: {"ready": True}})])
    assert proxy.sync()
    new = service()
    new["metadata"] = {"name": "web2", "namespace": "shop"}
    slice2 = endpointslice(sandbox, {2: {"ready": True}})
    slice2["metadata"] = {"name": "web2-1", "namespace": "shop",
                          "labels": {"kubernetes.io/service-name": "web2"}}  # fmt: skip
    proxy.on_service("ADDED", new)
    proxy.on_endpointslice("ADDED", slice2)
    assert proxy.sync()
    (event,) = proxy.events
    assert event["involvedObject"]["name"] == "web2" and event["reason"] == "FailedToProgram"
    assert "is held by service 'shop/web'" in event["message"]
    assert answers(sandbox) == {"backend-1"}
    assert proxy.programmed == ["shop/web"]
    proxy.on_service("DELETED", service())
    assert proxy.sync()
    assert answers(sandbox) == {"backend-3"}
    assert proxy.programmed == ["shop/web2"] and len(proxy.events) == 1


def many(sandbox: Sandbox, count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    services, slices = [], []
    for i in range(count):
        svc = service(f"10.96.1.{i + 1}")
        svc["metadata"] = {"name": f"web{i}", "namespace": "shop"}
        piece = endpointslice(sandbox, {i % 3: {"ready": True}})
        piece["metadata"] = {"name": f"web{i}-1", "namespace": "shop",
                             "labels": {"kubernetes.io/service-name": f"web{i}"}}  # fmt: skip
        services.append(svc)
        slices.append(piece)
    return services, slices


def test_many_changes_are_one_datapath_sync_and_a_conflict_falls_back_to_one_by_one(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    """The first sync of many Services (or a relist) is one all-or-nothing datapath sync;
    a Service the datapath would refuse makes it write them one by one, so only that one
    is refused (with its Event) and the others are programmed."""
    count = k8s.proxy.BATCH_FROM + 6
    services, slices = many(sandbox, count)
    proxy = k8s.ServiceProxy(dp, min_sync_period=0)
    proxy.replace_all(services, slices)
    assert proxy.sync()
    assert len(dp.services) == count and proxy.events == []
    assert sandbox.http_get("10.96.1.5", 80) == "backend-2"  # web4: backend index 1
    # A relist where one more Service wants web0's ClusterIP: refused alone.
    clash = service("10.96.1.1")
    clash["metadata"] = {"name": "clash", "namespace": "shop"}
    moved = [service(f"10.96.2.{i + 1}") for i in range(count)]
    for i, svc in enumerate(moved):
        svc["metadata"] = {"name": f"web{i}", "namespace": "shop"}
    moved[0] = services[0]  # web0 keeps its address
    proxy.replace_all([*moved, clash], slices)
    assert proxy.sync()
    (event,) = proxy.events
    assert event["involvedObject"]["name"] == "clash"
    assert proxy.refused.keys() == {"shop/clash"}
    assert len(dp.services) == count
    assert sandbox.http_get("10.96.2.5", 80) == "backend-2"
    assert sandbox.http_get("10.96.1.1", 80) == "backend-1"  # web0's, not the clash's


def test_a_list_item_that_is_no_object_is_skipped_not_the_list(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    proxy = k8s.ServiceProxy(dp, min_sync_period=0)
    proxy.replace_all(["not an object", service()],
                      [endpointslice(sandbox, {0: {"ready": True}}), 42])  # fmt: skip
    assert proxy.sync()
    assert answers(sandbox) == {"backend-1"}
