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


LOAD_BALANCER = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  externalIPs: [10.98.0.1, "fd00:98::1"]
  externalTrafficPolicy: Local
  healthCheckNodePort: 31234
  loadBalancerSourceRanges: [10.70.0.0/24, "fd00:70::/64"]
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}
status:
  loadBalancer:
    ingress:
    - {ip: 10.99.0.1}
    - {ip: 10.99.0.2, ipMode: Proxy}
    - {hostname: lb.example.com}
"""


def test_load_balancer_service_maps_every_north_south_field() -> None:
    """kube-proxy's fields of a LoadBalancer Service: nodePort per port, externalIPs and
    the ingress IPs per family (not those of ipMode Proxy, nor hostnames), the source
    ranges with the load-balancer IPs, externalTrafficPolicy and healthCheckNodePort."""
    web4, web6, dns4, dns6 = k8s.services(k8s.load(LOAD_BALANCER + SLICES))
    assert (web4.node_port, dns4.node_port, web6.node_port) == (30080, 30053, 30080)
    assert [str(a) for a in web4.external_ips] == ["10.98.0.1"]
    assert [str(a) for a in web6.external_ips] == ["fd00:98::1"]
    assert [str(a) for a in web4.load_balancer_ips] == ["10.99.0.1"]
    assert web6.load_balancer_ips == () and web6.source_ranges == ()  # no IPv6 ingress
    assert [str(n) for n in web4.source_ranges] == ["10.70.0.0/24"]
    assert web4.external_traffic_policy is lb.TrafficPolicy.LOCAL
    assert (web4.health_check_node_port, dns6.health_check_node_port) == (31234, 31234)
    kinds = [f.kind.value for f in web4.frontends()]
    assert kinds == ["cluster_ip", "node_port", "external_ip", "load_balancer"]


def test_node_port_and_cluster_policy_services() -> None:
    node_port = LOAD_BALANCER.replace("type: LoadBalancer", "type: NodePort").replace(
        "externalTrafficPolicy: Local", "externalTrafficPolicy: Cluster"
    )
    web4 = k8s.services(k8s.load(node_port + SLICES))[0]
    # A NodePort Service has no load-balancer IPs, so its source ranges mean nothing;
    # healthCheckNodePort is only for Local.
    assert (web4.node_port, web4.load_balancer_ips, web4.source_ranges) == (30080, (), ())
    assert web4.health_check_node_port is None
    assert web4.external_traffic_policy is lb.TrafficPolicy.CLUSTER
    plain = k8s.services(k8s.load(SERVICE + SLICES))[0]
    assert plain.frontends() == (plain,)
    with pytest.raises(k8s.ManifestError, match="externalTrafficPolicy 'Global'"):
        k8s.services(k8s.load(node_port.replace(": Cluster", ": Global") + SLICES))
    with pytest.raises(k8s.ManifestError, match=r"spec\.externalIPs: '10\.98\.0\.300'"):
        k8s.services(k8s.load(node_port.replace("10.98.0.1", "10.98.0.300") + SLICES))
