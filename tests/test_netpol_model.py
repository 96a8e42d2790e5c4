"""Kubernetes NetworkPolicy -> pyebpflb policies with subjects, checked with the
reference evaluator the way Kubernetes' e2e tests check a cluster
(test/e2e/network/netpol/network_policy.go): namespaces x, y, z with pods a, b, c
each, and a reachability matrix. Each test is named after the case it follows."""

from __future__ import annotations

from typing import Any

import pytest

from pyebpflb import k8s
from pyebpflb.k8s import netpol
from pyebpflb.k8s.translate import ManifestError
from pyebpflb.model import Backend, Service
from pyebpflb.policy import Packet, evaluate

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
NODE = "10.0.0.1"


def ip(namespace: str, pod: str) -> str:
    return f"10.1.{NAMESPACES.index(namespace) + 1}.{PODS.index(pod) + 1}"


def cluster(labels: dict[str, dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """The e2e framework's pods: label pod=<name>, ports serve-80-tcp, serve-81-tcp,
    serve-80-udp, serve-81-udp."""
    objects: list[dict[str, Any]] = []
    for ns in NAMESPACES:
        objects.append({"kind": "Namespace", "metadata": {"name": ns, "labels": {"ns": ns}}})
        for pod in PODS:
            objects.append({
                "kind": "Pod",
                "metadata": {"name": pod, "namespace": ns,
                             "labels": (labels or {}).get(f"{ns}/{pod}", {"pod": pod})},
                "spec": {"containers": [{"name": f"cont-{port}-{proto.lower()}", "ports": [
                    {"name": f"serve-{port}-{proto.lower()}", "containerPort": port,
                     "protocol": proto}]} for port in (80, 81) for proto in ("TCP", "UDP")]},
                "status": {"podIP": ip(ns, pod), "hostIP": NODE, "phase": "Running"},
            })  # fmt: skip
    return objects


def policy(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": namespace},
            "spec": spec}  # fmt: skip


def compiled(*policies: dict[str, Any], labels: dict[str, dict[str, str]] | None = None) -> Any:
    done = netpol.network_policies([*cluster(labels), *policies])
    assert done.problems == []
    return done


def reach(done: Any, src: str, dst: str, port: int = 80, protocol: str = "tcp") -> bool:
    """Can pod ``src`` ("x/a") reach ``dst`` on ``port``: its egress and the server's
    ingress both allow it."""
    (s_ns, s_pod), (d_ns, d_pod) = src.split("/"), dst.split("/")
    a, b = ip(s_ns, s_pod), ip(d_ns, d_pod)
    out = evaluate(done.policies, Packet(a, b, protocol, 40000, port, "egress"))
    into = evaluate(done.policies, Packet(a, b, protocol, 40000, port, "ingress"))
    return out.allowed and into.allowed


def everyone() -> list[str]:
    return [f"{ns}/{pod}" for ns in NAMESPACES for pod in PODS]


def test_should_support_a_default_deny_ingress_policy() -> None:
    """A default-deny-ingress in x isolates x's pods; y's and z's stay open."""
    done = compiled(policy("x", "deny-ingress", {"podSelector": {}}))
    for src in everyone():
        for dst in everyone():
            expected = not dst.startswith("x/") or src == dst
            assert reach(done, src, dst) is expected, (src, dst)


def test_should_enforce_policy_to_allow_traffic_only_from_a_pod_in_the_same_namespace() -> None:
    """Deny all into x/a but from x/b (podSelector peer: the policy's namespace)."""
    done = compiled(policy("x", "allow-b", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
    }))  # fmt: skip
    assert reach(done, "x/b", "x/a")
    assert not reach(done, "x/c", "x/a") and not reach(done, "y/b", "x/a")
    assert reach(done, "x/c", "x/b")  # x/b is not selected


def test_should_allow_ingress_access_from_namespace_and_pod_in_one_peer() -> None:
    """podSelector AND namespaceSelector in one peer: pods b of namespaces y only."""
    done = compiled(policy("x", "both", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                                  {"key": "ns", "operator": "In", "values": ["y"]}]},
                               "podSelector": {"matchLabels": {"pod": "b"}}}]}],
    }))  # fmt: skip
    assert reach(done, "y/b", "x/a")
    assert not reach(done, "y/c", "x/a") and not reach(done, "z/b", "x/a")
    assert not reach(done, "x/b", "x/a")  # its own namespace is not selected


def test_should_allow_ingress_access_on_one_named_port() -> None:
    done = compiled(policy("x", "named", {
        "podSelector": {},
        "ingress": [{"ports": [{"port": "serve-81-tcp"}]}],
    }))  # fmt: skip
    assert reach(done, "y/a", "x/b", 81) and not reach(done, "y/a", "x/b", 80)
    assert not reach(done, "y/a", "x/b", 81, "udp")


def test_should_enforce_except_clause_while_egress_access_to_server_in_cidr_block() -> None:
    """An IP in one policy's ipBlock except and allowed by another policy is admitted:
    except subtracts inside its peer, it does not deny."""
    hole = f"{ip('y', 'b')}/32"
    block = policy("x", "block", {
        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.1.0.0/16", "except": [hole]}}]}],
    })  # fmt: skip
    done = compiled(block)
    assert reach(done, "x/a", "y/a") and not reach(done, "x/a", "y/b")
    allow_b = policy("x", "allow-b", {
        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": f"{ip('y', 'b')}/32"}}]}],
    })  # fmt: skip
    done = compiled(block, allow_b)
    assert reach(done, "x/a", "y/b") and reach(done, "x/a", "y/a")


def test_should_deny_egress_from_pods_based_on_podselector_even_if_ingress_allows() -> None:
    """The client's egress deny wins over the server's ingress allow."""
    done = compiled(
        policy("x", "deny-egress-a", {"podSelector": {"matchLabels": {"pod": "a"}},
                                       "policyTypes": ["Egress"]}),
        policy("y", "allow-all-in", {"podSelector": {}, "ingress": [{}]}),
    )  # fmt: skip
    assert not reach(done, "x/a", "y/b")
    assert reach(done, "x/b", "y/b")


def test_should_enforce_ingress_policy_allowing_any_port_traffic_to_a_server_on_a_range() -> None:
    """endPort: 80 to 81 allowed, the rest of the ports not."""
    done = compiled(policy("x", "range", {
        "podSelector": {},
        "ingress": [{"ports": [{"port": 80, "endPort": 81, "protocol": "TCP"}]}],
    }))  # fmt: skip
    assert reach(done, "y/a", "x/a", 80) and reach(done, "y/a", "x/a", 81)
    assert not reach(done, "y/a", "x/a", 82) and not reach(done, "y/a", "x/a", 80, "udp")


def test_should_enforce_updated_policy_when_a_pod_changes_labels() -> None:
    """A label change moves a pod into and out of a policy: the translation follows."""
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}],
    }
    done = compiled(policy("x", "clients", spec))
    assert not reach(done, "x/b", "x/a")
    done = compiled(policy("x", "clients", spec),
                    labels={"x/b": {"pod": "b", "role": "client"}})  # fmt: skip
    assert reach(done, "x/b", "x/a")
    done = compiled(policy("x", "clients", spec), labels={"x/a": {"pod": "moved"}})
    assert reach(done, "x/c", "x/a")  # a no longer selected: open again


def test_policies_on_a_pod_reached_through_a_service_apply_after_translation() -> None:
    done = compiled(policy("x", "allow-b", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
    }))  # fmt: skip
    web = Service("10.96.0.10", 80, name="x/web", backends=[Backend(ip("x", "a"), 80)])
    for src, allowed in (("b", True), ("c", False)):
        packet = Packet(ip("x", src), "10.96.0.10", "tcp", 40000, 80, "ingress")
        verdict = evaluate(done.policies, packet, service=web, backend=web.backends[0])
        assert verdict.allowed is allowed


def test_traffic_from_the_pods_node_is_allowed_and_policies_say_where_they_come_from() -> None:
    done = compiled(policy("x", "deny", {"podSelector": {}, "ingress": []}))
    packet = Packet(NODE, ip("x", "a"), "tcp", 40000, 8080, "ingress")
    verdict = evaluate(done.policies, packet)
    assert verdict.allowed and verdict.policy == f"x/deny:node {NODE}"
    assert done.origins["x/deny"] == ("x/deny", "Ingress")
    assert done.origins[f"x/deny:node {NODE}"] == ("x/deny", "Ingress")


def test_policy_types_default_and_rule_origins() -> None:
    """No policyTypes: Ingress, and Egress when there are egress rules; each pyebpflb
    rule knows the NetworkPolicy rule it came from."""
    done = compiled(policy("x", "both", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": "10.9.0.0/16"}}]},
                    {"ports": [{"port": 81}]}],
        "egress": [{"to": [{"namespaceSelector": {}}]}],
    }))  # fmt: skip
    names = [p.name for p in done.policies]
    assert names == ["x/both", f"x/both:node {NODE}", "x/both:egress"]
    assert done.rules[("x/both", 0)] == 0 and done.rules[("x/both", 1)] == 1
    assert reach(done, "x/a", "z/c")  # egress to every namespace's pods
    outside = Packet(ip("x", "a"), "192.0.2.1", "udp", 40000, 53, "egress")
    assert not evaluate(done.policies, outside).allowed  # but nowhere else
    # A verdict named in Kubernetes' terms.
    inside = Packet("10.9.1.1", ip("x", "a"), "tcp", 40000, 80)
    verdict = evaluate(done.policies, inside)
    assert done.describe(verdict.policy, verdict.rule) == "NetworkPolicy x/both ingress rule 0"
    assert done.describe("x/both", 1) == "NetworkPolicy x/both ingress rule 1"
    assert done.describe("x/both:egress", None) == "NetworkPolicy x/both egress (default deny)"
    assert (
        done.describe(f"x/both:node {NODE}", 0) == "NetworkPolicy x/both ingress (its pod's node)"
    )
    assert done.describe("mine", 0) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "spec.podSelector is missing"),
        ({"podSelector": {}, "policyTypes": ["Sideways"]}, "'Sideways' (Ingress or Egress)"),
        ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}},
         "operator 'Near'"),
        ({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 70}]}]},
         "endPort 70 must be from port 80 to 65535"),
        ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                                 "except": ["11.0.0.0/16"]}}]}]},
         "11.0.0.0/16 is not inside 10.0.0.0/8"),
    ],
)  # fmt: skip
def test_a_bad_network_policy_is_named_and_left_out(spec: dict[str, Any], message: str) -> None:
    done = netpol.network_policies([*cluster(), policy("x", "bad", spec),
                                    policy("y", "good", {"podSelector": {}})])  # fmt: skip
    (problem,) = done.problems
    assert problem.startswith("NetworkPolicy x/bad") and message in problem
    assert [p.name for p in done.policies] == ["y/good", f"y/good:node {NODE}"]
    assert isinstance(ManifestError(problem), ValueError)


def test_the_translator_follows_events_and_a_relist_of_the_same_objects_changes_nothing() -> None:
    """NetworkPolicyTranslator: the result of events equals a translation of the whole;
    a relist returning the same objects (without their kind, as a list's items) gives
    the same Policy objects, and a pod's status update changes nothing."""
    objects = [*cluster(), policy("x", "web", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})]  # fmt: skip
    translator = k8s.NetworkPolicyTranslator()
    for obj in objects:
        feed = {"Pod": translator.on_pod, "Namespace": translator.on_namespace}
        feed.get(obj["kind"], translator.on_network_policy)("ADDED", obj)
    first = translator.result()
    assert first.policies == k8s.network_policies(objects).policies
    for kind in ("Namespace", "Pod", "NetworkPolicy"):
        translator.replace(kind, [{k: v for k, v in o.items() if k != "kind"}
                                  for o in objects if o["kind"] == kind])  # fmt: skip
    again = translator.result()
    assert [id(p) for p in again.policies] == [id(p) for p in first.policies]
    (pod,) = [o for o in objects if o["kind"] == "Pod" and o["metadata"]["name"] == "a"
              and o["metadata"]["namespace"] == "x"]  # fmt: skip
    translator.on_pod("MODIFIED", {**pod, "status": {**pod["status"], "conditions": []}})
    assert translator.result() is again
    # x/a relabelled out: its policies go, as a whole translation says.
    moved = {**pod, "metadata": {**pod["metadata"], "labels": {"pod": "z"}}}
    translator.on_pod("MODIFIED", moved)
    whole = k8s.network_policies([o if o is not pod else moved for o in objects])
    assert translator.result().policies == whole.policies
