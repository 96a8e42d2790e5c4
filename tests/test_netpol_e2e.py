"""Policies with subjects and Kubernetes NetworkPolicies, enforced by the kernel on
real traffic in the sandbox (its backends are the pods), each test named after the
case of Kubernetes' test/e2e/network/netpol/network_policy.go it follows."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from lbtest import attached

import pyebpflb as lb
from pyebpflb import k8s
from pyebpflb.model import Policy, Rule
from pyebpflb.testing.sandbox import BACKEND_PORT, Sandbox

pytestmark = pytest.mark.kernel

SECOND_CLIENT = "10.90.0.3"
DENIED = 1.0  # seconds a dropped request waits for the answer that does not come


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(backends=3, prefix="pyebpflb-np") as built:
        built.add_client_address(SECOND_CLIENT)
        yield built


@pytest.fixture
def dp(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[lb.Datapath]:
    with attached(sandbox, request) as datapath:
        yield datapath


def services(sandbox: Sandbox) -> list[lb.Service]:
    """One ClusterIP per pod, 10.96.0.1N -> backend N."""
    return [
        lb.Service(f"10.96.0.1{i}", 80, name=f"x/svc-{i}",
                   backends=[lb.Backend(b.ipv4, BACKEND_PORT)])
        for i, b in enumerate(sandbox.backends, start=1)
    ]  # fmt: skip


def reaches(sandbox: Sandbox, address: str, source: str | None = None) -> bool:
    try:
        sandbox.http_get(address, BACKEND_PORT if address.startswith("10.91") else 80,
                         source=source, timeout=DENIED)  # fmt: skip
    except TimeoutError:
        return False
    return True


def pods(sandbox: Sandbox) -> list[str]:
    return [str(b.ipv4) for b in sandbox.backends]


def test_default_deny_ingress_for_one_pod_leaves_the_others_open(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    """network_policy.go "should support a 'default-deny-ingress' policy", for one pod:
    directly and through its Service (after DNAT) it is dropped; the others answer."""
    first, second, third = pods(sandbox)
    dp.sync(services(sandbox), [Policy("x/deny", [], "deny", subjects=[first])])
    assert not reaches(sandbox, first) and not reaches(sandbox, "10.96.0.11")
    assert reaches(sandbox, second) and reaches(sandbox, "10.96.0.12") and reaches(sandbox, third)
    assert dp.drops()["policy denied"].packets >= 2
    # Read back as installed, from the kernel's maps.
    (installed,) = dp.policies
    assert installed.subjects == (lb.Policy("p", [], subjects=[first]).subjects)


def test_allow_from_one_client_to_one_pod(sandbox: Sandbox, dp: lb.Datapath) -> None:
    """network_policy.go "should enforce policy to allow traffic only from a different
    namespace": one client admitted into the isolated pod, the other not; an
    unselected pod takes both."""
    first, second, _ = pods(sandbox)
    allow = Policy("x/allow", [Rule("allow", SECOND_CLIENT, "tcp", BACKEND_PORT)], "deny",
                   subjects=[first])  # fmt: skip
    dp.sync(services(sandbox), [allow])
    assert reaches(sandbox, first, source=SECOND_CLIENT)
    assert not reaches(sandbox, first, source=str(sandbox.client.ipv4))
    assert reaches(sandbox, second, source=str(sandbox.client.ipv4))
    assert dp.policy_stats("x/allow")[0].packets >= 1


def test_egress_denied_on_the_client_side_for_its_subject_only(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    """network_policy.go "should deny egress from pods based on PodSelector": the
    selected pod's datagram to the client is dropped, another pod's passes."""
    first = pods(sandbox)[0]
    dp.sync(services(sandbox), [Policy("x/no-out", [], "deny", "egress", subjects=[first])])
    with sandbox.client.socket(4, socket.SOCK_DGRAM) as listening:
        listening.bind(("0.0.0.0", 5000))
        listening.settimeout(DENIED)
        for backend in sandbox.backends[:2]:
            with backend.socket(4, socket.SOCK_DGRAM) as sock:
                sock.sendto(backend.name.encode(), (str(sandbox.client.ipv4), 5000))
        assert listening.recv(100) == sandbox.backends[1].name.encode()
        with pytest.raises(TimeoutError):
            listening.recv(100)


def manifest(sandbox: Sandbox, labels: dict[int, dict[str, str]]) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = [{"kind": "Namespace", "metadata": {"name": "x"}}]
    for i, backend in enumerate(sandbox.backends):
        objects.append({
            "kind": "Pod",
            "metadata": {"name": backend.name, "namespace": "x", "labels": labels.get(i, {})},
            "status": {"podIP": str(backend.ipv4), "phase": "Running"},
        })  # fmt: skip
    objects.append({
        "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-second", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"from": [{"ipBlock": {"cidr": f"{SECOND_CLIENT}/32"}}],
                              "ports": [{"port": BACKEND_PORT}]}]},
    })  # fmt: skip
    return objects


def test_a_label_change_moves_a_pod_in_and_out_of_a_policy_while_a_client_connects(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    """network_policy.go "should enforce updated policy": a NetworkPolicy translated by
    pyebpflb.k8s.network_policies; relabelling pods recompiles it (services untouched)
    while another client keeps connecting to an unselected pod without a failure."""
    first, second, third = pods(sandbox)
    svc = services(sandbox)
    done = k8s.network_policies(manifest(sandbox, {0: {"app": "web"}}))
    assert done.problems == []
    dp.sync(svc, done.policies)
    assert not reaches(sandbox, first) and reaches(sandbox, first, source=SECOND_CLIENT)
    failures: list[str] = []
    stop = threading.Event()

    def keep_connecting() -> None:
        while not stop.is_set():
            try:
                sandbox.http_get(third, BACKEND_PORT, timeout=DENIED)
            except OSError as exc:
                failures.append(repr(exc))

    worker = threading.Thread(target=keep_connecting)
    worker.start()
    try:
        # backend-2 labelled in, backend-1 out.
        done = k8s.network_policies(manifest(sandbox, {1: {"app": "web"}}))
        (moved,) = [p for p in done.policies if p.name == "x/web-from-second"]
        dp.upsert_policy(moved)
        assert reaches(sandbox, first) and not reaches(sandbox, second)
        assert reaches(sandbox, second, source=SECOND_CLIENT)
    finally:
        stop.set()
        worker.join()
    assert failures == []
    assert [s.name for s in dp.services] == [s.name for s in svc]
