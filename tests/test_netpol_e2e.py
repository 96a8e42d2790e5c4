"""Policies with subjects and Kubernetes NetworkPolicies, enforced by the kernel on
real traffic in the sandbox (its backends are the pods), each test named after the
case of Kubernetes' test/e2e/network/netpol/network_policy.go it follows."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import PIN_ROOT
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


# -- NetworkPolicies over pods in several namespaces ---------------------------------------
# The backends are pods in namespaces x, y and z; the two client addresses are pods too
# (client-a in namespace c1, team a; client-b in c2, team b), so that pod and namespace
# selectors can pick them as peers.


def cluster(sandbox: Sandbox, *policies: dict[str, Any]) -> list[Policy]:
    objects: list[dict[str, Any]] = []
    ports = [{"name": "serve-8080", "containerPort": BACKEND_PORT},
             {"name": "serve-81", "containerPort": 81}]  # fmt: skip
    for namespace, labels in (("x", {}), ("y", {}), ("z", {}), ("c1", {"team": "a"}),
                              ("c2", {"team": "b"})):  # fmt: skip
        objects.append({"kind": "Namespace", "metadata": {"name": namespace, "labels": labels}})
    # Dual stack: each pod's podIPs has both families (client-b only its IPv4).
    pods = [(b.name, ns, [str(b.ipv4), str(b.ipv6)], {"app": "web"})
            for b, ns in zip(sandbox.backends, "xyz", strict=True)]  # fmt: skip
    pods += [("client-a", "c1", [str(sandbox.client.ipv4), str(sandbox.client.ipv6)],
              {"role": "client"}),
             ("client-b", "c2", [SECOND_CLIENT], {"role": "client"})]  # fmt: skip
    for name, namespace, addresses, labels in pods:
        objects.append({
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"containers": [{"name": "main", "ports": ports}]},
            "status": {"podIP": addresses[0], "podIPs": [{"ip": a} for a in addresses],
                       "phase": "Running"},
        })  # fmt: skip
    for number, spec in enumerate(policies):
        objects.append(
            {
                "kind": "NetworkPolicy",
                "metadata": {"name": f"np-{number}", "namespace": "x"},
                "spec": spec,
            }
        )
    done = k8s.network_policies(objects)
    assert done.problems == []
    return done.policies


WEB = {"matchLabels": {"app": "web"}}


def test_should_ensure_an_ip_overlapping_both_ipblock_cidr_and_except_is_allowed(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    """network_policy.go "should ensure an IP overlapping both IPBlock.CIDR and
    IPBlock.Except is allowed": except subtracts inside its own peer only."""
    first = pods(sandbox)[0]
    block = {"ingress": [{"from": [{"ipBlock": {"cidr": "10.90.0.0/24",
                                                "except": [f"{SECOND_CLIENT}/32"]}}]}],
             "podSelector": WEB}  # fmt: skip
    dp.sync(services(sandbox), cluster(sandbox, block))
    assert reaches(sandbox, first) and not reaches(sandbox, first, source=SECOND_CLIENT)
    allow = {"podSelector": WEB,
             "ingress": [{"from": [{"ipBlock": {"cidr": f"{SECOND_CLIENT}/32"}}]}]}  # fmt: skip
    dp.set_policies(cluster(sandbox, block, allow))
    assert reaches(sandbox, first, source=SECOND_CLIENT) and reaches(sandbox, first)


def test_should_allow_ingress_access_on_one_named_port(sandbox: Sandbox, dp: lb.Datapath) -> None:
    """network_policy.go "should allow ingress access on one named port": the name is
    resolved against the selected pod's containers."""
    first = pods(sandbox)[0]
    named = {"podSelector": WEB, "ingress": [{"ports": [{"port": "serve-8080"}]}]}
    dp.sync(services(sandbox), cluster(sandbox, named))
    assert reaches(sandbox, first)
    other = {"podSelector": WEB, "ingress": [{"ports": [{"port": "serve-81"}]}]}
    dp.set_policies(cluster(sandbox, other))  # port 81 only: 8080 is closed
    assert not reaches(sandbox, first)


def test_should_allow_ingress_access_from_namespace_on_one_named_port_and_pod_in_one_peer(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    """network_policy.go "should enforce policy based on PodSelector and NamespaceSelector"
    (both in one peer: pods matching the first in namespaces matching the second)."""
    first = pods(sandbox)[0]
    peer = {"podSelector": WEB, "ingress": [{"from": [{
        "namespaceSelector": {"matchLabels": {"team": "b"}},
        "podSelector": {"matchExpressions": [{"key": "role", "operator": "In",
                                              "values": ["client"]}]}}]}]}  # fmt: skip
    dp.sync(services(sandbox), cluster(sandbox, peer))
    assert reaches(sandbox, first, source=SECOND_CLIENT)  # client-b: team b, a client
    assert not reaches(sandbox, first)  # client-a: a client, but team a


def test_should_enforce_ingress_policy_allowing_any_port_traffic_to_a_server_on_a_range(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    """network_policy.go "should enforce policy to allow ingress traffic from pods in all
    namespaces" with an endPort range: 8000-8100 holds 8080, 8000-8079 does not."""
    first = pods(sandbox)[0]
    wide = {"podSelector": WEB, "ingress": [{"ports": [{"port": 8000, "endPort": 8100}]}]}
    dp.sync(services(sandbox), cluster(sandbox, wide))
    assert reaches(sandbox, first)
    narrow = {"podSelector": WEB, "ingress": [{"ports": [{"port": 8000, "endPort": 8079}]}]}
    dp.set_policies(cluster(sandbox, narrow))
    assert not reaches(sandbox, first)


def test_policies_on_a_pod_reached_through_a_service_behave_as_on_the_pod(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    """A NetworkPolicy admitting client-b to the x pods: through the pod's ClusterIP
    (after DNAT, the backend is the subject, its port the pod's) as directly; the pods of
    y and z, selected by no policy, take both clients."""
    only_b = {"podSelector": WEB, "ingress": [{
        "from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}],
        "ports": [{"port": BACKEND_PORT}]}]}  # fmt: skip
    dp.sync(services(sandbox), cluster(sandbox, only_b))
    first, second, _ = pods(sandbox)
    for address in (first, "10.96.0.11"):
        assert reaches(sandbox, address, source=SECOND_CLIENT)
        assert not reaches(sandbox, address)
    assert reaches(sandbox, second) and reaches(sandbox, "10.96.0.12")
    explained = dp.explain(str(sandbox.client.ipv4), "10.96.0.11:80")
    assert explained.endpoint == first and explained.selected_by == ("x/np-0",)


def test_a_verdict_names_the_network_policy_and_its_rule_in_another_process(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    """A policy verdict names the NetworkPolicy (namespace/name) and the index of its
    rule that decided, read from the datapath by other processes: `pyebpflb explain`
    and the flow events of `pyebpflb monitor`."""
    first = pods(sandbox)[0]
    two_rules = {"podSelector": WEB, "ingress": [
        {"ports": [{"port": 81}, {"port": 82}]},  # two pyebpflb rules, 0 and 1
        {"from": [{"ipBlock": {"cidr": f"{SECOND_CLIENT}/32"}}],
         "ports": [{"port": BACKEND_PORT}]}]}  # fmt: skip
    dp.sync(services(sandbox), cluster(sandbox, two_rules))
    where = ["--datapath", dp.name, "--netns", sandbox.lb.netns, "--pin-root", str(PIN_ROOT)]
    cli = [sys.executable, "-m", "pyebpflb", *where]
    explained = subprocess.run(
        [*cli, "explain", "--src", SECOND_CLIENT, "--dst", f"{first}:{BACKEND_PORT}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "allowed by policy 'x/np-0' rule 2 (ingress rule 1)" in explained.stdout
    watching = subprocess.Popen(
        [*cli, "monitor", "--type", "policy", "--timeout", "10", "-o", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watching.stderr is not None and watching.stdout is not None
        assert watching.stderr.readline().startswith("# reading the flow events")
        assert reaches(sandbox, first, source=SECOND_CLIENT)
        assert not reaches(sandbox, first)
        seen: dict[str, dict[str, Any]] = {}
        while len(seen) < 2:
            line = watching.stdout.readline()
            assert line, f"monitor ended with {sorted(seen)}: {watching.stderr.read()}"
            event = json.loads(line)
            seen.setdefault(event["verdict"], event)
    finally:
        watching.kill()
        watching.wait()
    allowed, denied = seen["allowed"], seen["denied"]
    assert (allowed["source"], allowed["policy"]) == (SECOND_CLIENT, "x/np-0")
    assert allowed["origin"] == "ingress rule 1"  # its rule 2: rule 1 of the NetworkPolicy
    assert denied["source"] == str(sandbox.client.ipv4) and denied["policy"] is None
    assert denied["origin"] is None  # the default denied: no rule


def test_dual_stack_pods_are_policed_on_both_families(sandbox: Sandbox, dp: lb.Datapath) -> None:
    """A pod's podIPs are all its subjects and all its peer addresses: client-a, selected
    as a peer by its labels, reaches the x pod on IPv4 and IPv6; an ipBlock of client-a's
    IPv6 address alone admits IPv6 only."""
    backend = sandbox.backends[0]

    def over(family: int) -> bool:
        try:
            sandbox.http_get(backend.address(family), BACKEND_PORT, timeout=DENIED)
        except TimeoutError:
            return False
        return True

    peers = {
        "podSelector": WEB,
        "ingress": [
            {
                "from": [
                    {"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "client"}}}
                ]
            }
        ],
    }
    dp.sync(services(sandbox), cluster(sandbox, peers))
    assert over(4) and over(6)
    block = {
        "podSelector": WEB,
        "ingress": [{"from": [{"ipBlock": {"cidr": f"{sandbox.client.ipv6}/128"}}]}],
    }
    dp.set_policies(cluster(sandbox, block))
    assert over(6) and not over(4)
    (installed,) = [p for p in dp.policies if p.name == "x/np-0"]
    assert {str(s) for s in installed.subjects} == {f"{backend.ipv4}/32", f"{backend.ipv6}/128"}
