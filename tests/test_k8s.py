"""Kubernetes manifests -> services (pure Python)."""

from __future__ import annotations

import pytest

import pyebpflb as lb
from pyebpflb import k8s

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"""

SLICES = """\
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.0.1.1]
  conditions: {ready: true}
- addresses: [10.0.1.2]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: ["fd00:1::1"]
"""


def test_a_service_with_endpoint_slices() -> None:
    services = k8s.services(k8s.load(SERVICE + SLICES))
    assert [(str(s.vip), s.port, s.protocol.value) for s in services] == [
        ("10.96.0.10", 80, "tcp"),
        ("fd00:96::10", 80, "tcp"),
        ("10.96.0.10", 53, "udp"),
        ("fd00:96::10", 53, "udp"),
    ]
    web4 = services[0]
    assert web4.name == "shop/web" and web4.affinity_timeout == 600
    assert web4.backends == (
        lb.Backend("10.0.1.1", 8080),
        lb.Backend("10.0.1.2", 8080, state="terminating"),
    )
    assert services[3].backends == (lb.Backend("fd00:1::1", 5353),)


def test_named_target_ports_of_pods_and_a_list() -> None:
    manifest = """\
kind: List
items:
- kind: Service
  metadata: {name: api}
  spec:
    clusterIP: 10.96.0.12
    selector: {app: api}
    sessionAffinity: ClientIP
    ports: [{port: 443, targetPort: https}]
- kind: Pod
  metadata: {name: api-1, labels: {app: api}, deletionTimestamp: "2026-11-26T10:00:00Z"}
  spec: {containers: [{name: c, ports: [{name: https, containerPort: 8443}]}]}
  status: {podIP: 10.0.2.1}
- kind: Pod
  metadata: {name: api-2, labels: {app: api}}
  spec: {containers: [{name: c, ports: [{name: https, containerPort: 9443}]}]}
  status: {podIPs: [{ip: 10.0.2.2}], conditions: [{type: Ready, status: "False"}]}
"""
    (svc,) = k8s.services(k8s.load(manifest))
    assert svc.name == "default/api"
    assert svc.affinity_timeout == lb.model.DEFAULT_AFFINITY_SECONDS
    assert svc.backends == (
        lb.Backend("10.0.2.1", 8443, state="terminating"),
        lb.Backend("10.0.2.2", 9443, state="maintenance"),
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('clusterIPs: [10.96.0.10, "fd00:96::10"]', "clusterIP: None"), "spec.clusterIP 'None'"),
        (('clusterIPs: [10.96.0.10, "fd00:96::10"]', "clusterIP: 10.96.0.300"), "not an IP"),
        (("protocol: UDP, targetPort", "protocol: SCTP, targetPort"), "protocol 'SCTP'"),
        (("sessionAffinity: ClientIP", "sessionAffinity: Cookie"), "sessionAffinity 'Cookie'"),
        (("kind: Service", "kind: Ingress"), "kind 'Ingress' is not translated"),
        (
            (
                "- {name: dns, port: 5353, protocol: UDP}\nendpoints:\n- addresses: [10.0.1.1]",
                "endpoints:\n- addresses: [10.0.1.1]",
            ),
            "no UDP port named 'dns'",
        ),
    ],
)
def test_untranslatable_fields_are_named(change: tuple[str, str], message: str) -> None:
    text = (SERVICE + SLICES).replace(*change, 1)
    with pytest.raises(k8s.ManifestError, match=message.replace("(", r"\(")):
        k8s.services(k8s.load(text))


def test_not_yaml_and_no_service() -> None:
    with pytest.raises(k8s.ManifestError, match="not YAML"):
        k8s.load("a: [")
    with pytest.raises(k8s.ManifestError, match="the manifest has no Service"):
        k8s.services(k8s.load(SLICES))
    with pytest.raises(k8s.ManifestError, match=r"Pod default/p: status.podIP is missing"):
        k8s.services(
            k8s.load(
                "kind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.1, "
                "selector: {a: b}, ports: [{port: 80}]}\n---\n"
                "kind: Pod\nmetadata: {name: p, labels: {a: b}}\nspec: {containers: []}\n"
            )
        )


def test_internal_traffic_policy_and_node_names() -> None:
    """internalTrafficPolicy and the endpoints' nodeName (slices) / spec.nodeName (pods)."""
    local = SERVICE.replace("  sessionAffinity: ClientIP\n", "  internalTrafficPolicy: Local\n")
    slices = SLICES.replace(
        "- addresses: [10.0.1.1]\n", "- addresses: [10.0.1.1]\n  nodeName: node-a\n"
    )
    web4 = k8s.services(k8s.load(local + slices))[0]
    assert web4.internal_traffic_policy is lb.TrafficPolicy.LOCAL
    assert [b.node for b in web4.backends] == ["node-a", None]
    assert web4.usable_backends("node-a") == (lb.Backend("10.0.1.1", 8080, node="node-a"),)
    assert web4.usable_backends("node-b") == ()
    with pytest.raises(k8s.ManifestError, match="internalTrafficPolicy 'Nearby'"):
        k8s.services(k8s.load(local.replace("Local", "Nearby") + slices))
