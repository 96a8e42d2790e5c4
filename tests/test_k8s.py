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
  status: {podIP: 10.0.2.1, conditions: [{type: Ready, status: "True"}]}
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
        (('clusterIPs: [10.96.0.10, "fd00:96::10"]', "clusterIP: 10.96.0.300"), "not an IP"),
        (("protocol: UDP, targetPort", "protocol: QUIC, targetPort"), "protocol 'QUIC'"),
        (("sessionAffinity: ClientIP", "sessionAffinity: Cookie"), "sessionAffinity 'Cookie'"),
        (("kind: Service", "kind: Ingress"), "kind 'Ingress' is not translated"),
        (("addresses: [10.0.1.1]", "addresses: [10.0.1.300]"), "'10.0.1.300' is not an IP"),
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
    # A pod without an address is no endpoint (yet): the controller leaves it out.
    (svc,) = k8s.services(
        k8s.load(
            "kind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.1, "
            "selector: {a: b}, ports: [{port: 80}]}\n---\n"
            "kind: Pod\nmetadata: {name: p, labels: {a: b}}\nspec: {containers: []}\n"
        )
    )
    assert svc.backends == ()


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


def _slice(endpoints: str, ports: str = "[{name: http, port: 8080, protocol: TCP}]",
           name: str = "web-1", address_type: str = "IPv4", labels: str = "") -> str:  # fmt: skip
    return f"""\
---
kind: EndpointSlice
metadata:
  name: {name}
  namespace: shop
  labels: {{kubernetes.io/service-name: web{labels}}}
addressType: {address_type}
ports: {ports}
endpoints: {endpoints}
"""


WEB = """\
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


def _backends(manifest: str, node: lb.Node | None = None) -> list[tuple[str, str]]:
    done = k8s.translate(k8s.load(manifest), node=node)
    assert done.problems == []
    (svc,) = done.services
    return [(str(b.address), b.state.value) for b in svc.backends]


ZONE_A = lb.Node("node-1", zone="zone-a")


def test_topology_hints_prefer_the_zone_of_the_node() -> None:
    """kube-proxy's topologyModeFromHints (pkg/proxy/topology_test.go "hints enabled,
    hints annotation == auto"): every ready endpoint hinted, one for this zone: only
    those of the zone take new flows; the others keep their connections."""
    endpoints = """
- {addresses: [10.0.0.1], hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.0.0.2], hints: {forZones: [{name: zone-b}]}}
- {addresses: [10.0.0.3], hints: {forZones: [{name: zone-b}, {name: zone-a}]}}
"""
    assert _backends(WEB + _slice(endpoints), ZONE_A) == [
        ("10.0.0.1", "active"),
        ("10.0.0.2", "maintenance"),
        ("10.0.0.3", "active"),
    ]
    # No node (a manifest applied from anywhere), or a node without a zone: no topology.
    assert _backends(WEB + _slice(endpoints)) == [
        ("10.0.0.1", "active"),
        ("10.0.0.2", "active"),
        ("10.0.0.3", "active"),
    ]
    assert [s for _, s in _backends(WEB + _slice(endpoints), lb.Node("n"))] == ["active"] * 3


def test_topology_hints_are_ignored_unless_every_ready_endpoint_has_them() -> None:
    """topology_test.go "hints, but one endpoint is missing hints" and "hints, no
    endpoint for this zone": either way every ready endpoint takes new flows (not-ready
    endpoints' hints do not count)."""
    missing = """
- {addresses: [10.0.0.1], hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.0.0.2]}
- {addresses: [10.0.0.3], conditions: {ready: false}}
"""
    assert _backends(WEB + _slice(missing), ZONE_A) == [
        ("10.0.0.1", "active"),
        ("10.0.0.2", "active"),
        ("10.0.0.3", "maintenance"),
    ]
    elsewhere = "[{addresses: [10.0.0.1], hints: {forZones: [{name: zone-b}]}}]"
    assert _backends(WEB + _slice(elsewhere), ZONE_A) == [("10.0.0.1", "active")]


def test_topology_falls_back_to_serving_terminating_endpoints() -> None:
    """CategorizeEndpoints: topology picks among ready endpoints; with none ready the
    serving-and-terminating ones take new flows whatever their hints."""
    endpoints = """
- {addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true},
   hints: {forZones: [{name: zone-b}]}}
"""
    assert _backends(WEB + _slice(endpoints), ZONE_A) == [("10.0.0.1", "terminating")]


def test_prefer_same_node_hints_win_over_zone_hints() -> None:
    """topology_test.go "PreferSameNode" (trafficDistribution: PreferSameNode, KEP-3015):
    forNodes naming this node beat forZones; forNodes for other nodes only: the zone."""
    endpoints = """
- {addresses: [10.0.0.1], hints: {forNodes: [{name: node-1}], forZones: [{name: zone-a}]}}
- {addresses: [10.0.0.2], hints: {forNodes: [{name: node-2}], forZones: [{name: zone-a}]}}
- {addresses: [10.0.0.3], hints: {forNodes: [{name: node-3}], forZones: [{name: zone-b}]}}
"""
    assert _backends(WEB + _slice(endpoints), ZONE_A) == [
        ("10.0.0.1", "active"),
        ("10.0.0.2", "maintenance"),
        ("10.0.0.3", "maintenance"),
    ]
    assert _backends(WEB + _slice(endpoints), lb.Node("node-4", zone="zone-a")) == [
        ("10.0.0.1", "active"),
        ("10.0.0.2", "active"),
        ("10.0.0.3", "maintenance"),
    ]


def test_traffic_distribution_of_pods_is_hinted_as_the_controller_would() -> None:
    """Endpoints made from Pods get the EndpointSlice controller's hints
    (pkg/controller/endpointslice trafficdist: PreferClose -> the zone of the pod's
    node), the zones read from the manifest's Nodes."""
    manifest = """kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  trafficDistribution: PreferClose
  ports: [{port: 80, targetPort: 8080}]
---
kind: Node
metadata: {name: node-1, labels: {topology.kubernetes.io/zone: zone-a}}
---
kind: Node
metadata: {name: node-2, labels: {topology.kubernetes.io/zone: zone-b}}
"""
    for index, where in enumerate(["node-1", "node-2"], start=1):
        manifest += f"""---
kind: Pod
metadata: {{name: p{index}, namespace: shop, labels: {{app: web}}}}
spec: {{nodeName: {where}, containers: [{{name: c}}]}}
status: {{podIP: 10.0.0.{index}, conditions: [{{type: Ready, status: "True"}}]}}
"""
    assert _backends(manifest, ZONE_A) == [("10.0.0.1", "active"), ("10.0.0.2", "maintenance")]
    without = manifest.replace("  trafficDistribution: PreferClose\n", "")
    assert _backends(without, ZONE_A) == [("10.0.0.1", "active"), ("10.0.0.2", "active")]


def test_categorize_endpoints_falls_back_only_to_serving_terminating_ones() -> None:
    """kube-proxy's CategorizeEndpoints (pkg/proxy/topology.go): ready endpoints take new
    connections; with none, those serving and terminating; an endpoint terminating but
    not serving takes none, and `serving` unset means what `ready` says."""
    endpoints = """
- {addresses: [10.0.0.1], conditions: {ready: true}}
- {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.0.3], conditions: {ready: false, serving: false, terminating: true}}
- {addresses: [10.0.0.4], conditions: {ready: false, terminating: true}}
- {addresses: [10.0.0.5]}
"""
    assert _backends(WEB + _slice(endpoints)) == [
        ("10.0.0.1", "active"),
        ("10.0.0.2", "terminating"),
        ("10.0.0.3", "maintenance"),
        ("10.0.0.4", "maintenance"),
        ("10.0.0.5", "active"),  # no conditions: ready
    ]


def test_publish_not_ready_addresses_makes_terminating_endpoints_ready() -> None:
    """With publishNotReadyAddresses the slice controller writes ready: true for every
    endpoint, terminating ones too, and kube-proxy uses them as full members."""
    endpoints = "[{addresses: [10.0.0.1], conditions: {ready: true, terminating: true}}]"
    assert _backends(WEB + _slice(endpoints)) == [("10.0.0.1", "active")]


PODS = """\
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
---
kind: Pod
metadata: {name: ready, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.1, conditions: [{type: Ready, status: "True"}]}
---
kind: Pod
metadata: {name: no-condition, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.2}
---
kind: Pod
metadata: {name: done, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Succeeded, podIP: 10.0.0.3, conditions: [{type: Ready, status: "True"}]}
---
kind: Pod
metadata: {name: sidecar, namespace: shop, labels: {app: web}}
spec:
  containers: [{name: app}]
  initContainers: [{name: proxy, restartPolicy: Always, ports: [{name: http, containerPort: 9090}]}]
status: {podIP: 10.0.0.4, conditions: [{type: Ready, status: "True"}]}
---
kind: Pod
metadata:
  {name: leaving, namespace: shop, labels: {app: web}, deletionTimestamp: "2026-12-02T10:00:00Z"}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.5, conditions: [{type: Ready, status: "True"}]}
"""


def test_pods_become_endpoints_as_the_endpointslice_controller_makes_them() -> None:
    """k8s.io/endpointslice podToEndpoint and ShouldPodBeInEndpoints: a missing Ready
    condition is not ready, Succeeded and Failed pods are left out, a sidecar init
    container's named port counts, a terminating ready pod is serving-terminating;
    publishNotReadyAddresses makes every pod ready."""
    assert _backends(PODS) == [
        ("10.0.0.1", "active"),
        ("10.0.0.2", "maintenance"),
        ("10.0.0.4", "active"),
        ("10.0.0.5", "terminating"),
    ]
    (svc,) = k8s.services(
        k8s.load(PODS.replace("  selector:", "  publishNotReadyAddresses: true\n  selector:"))
    )
    assert [b.port for b in svc.backends] == [8080, 8080, 9090, 8080]
    assert {b.state.value for b in svc.backends} == {"active"}


def test_endpointslice_cache_merges_slices_as_kube_proxy_does() -> None:
    """kube-proxy's endpointslicecache: the controller's placeholder slice (no ports, no
    endpoints) and a slice without the Service's port contribute nothing, FQDN slices
    are ignored, an endpoint in two slices counts once, and only its first address is
    used."""
    manifest = (
        WEB
        + _slice("[]", ports="[]", name="web-placeholder")
        + _slice("[{addresses: [10.0.0.1, 10.0.0.9]}]", name="web-a")
        + _slice("[{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]", name="web-b")
        + _slice("[{addresses: [10.0.0.3]}]", ports="[{name: other, port: 1}]", name="web-c")
        + _slice("[{addresses: [web.example.com]}]", name="web-d", address_type="FQDN")
    )
    assert _backends(manifest) == [("10.0.0.1", "active"), ("10.0.0.2", "active")]
    assert _backends(WEB + _slice("[]", ports="null", name="web-placeholder")) == []


def test_services_kube_proxy_does_not_proxy_are_skipped_and_said_so() -> None:
    """Headless and ExternalName Services, those labelled service.kubernetes.io/
    service-proxy-name (another proxy's) or service.kubernetes.io/headless, and SCTP ports
    (kube-proxy proxies them; pyebpflb cannot): skipped, the rest translated, so
    `kubectl get svc -A -o yaml` applies."""
    manifest = """\
kind: List
items:
- {kind: Service, metadata: {name: db, namespace: shop},
   spec: {clusterIP: None, ports: [{port: 5432}]}}
- {kind: Service, metadata: {name: ext, namespace: shop},
   spec: {type: ExternalName, externalName: example.com}}
- {kind: Service,
   metadata: {name: other, namespace: shop, labels: {service.kubernetes.io/service-proxy-name: x}},
   spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}}
- {kind: Service, metadata: {name: sig, namespace: shop},
   spec: {clusterIP: 10.96.0.12, ports: [{port: 9, protocol: SCTP}, {port: 80}]}}
"""
    done = k8s.translate(k8s.load(manifest))
    assert done.problems == []
    assert [(s.name, s.port) for s in done.services] == [("shop/sig", 80)]
    assert done.skipped == [
        "Service shop/db: headless (clusterIP None: no VIP to balance)",
        "Service shop/ext: type ExternalName (a DNS name, nothing to proxy)",
        "Service shop/other: labelled service.kubernetes.io/service-proxy-name (kube-proxy "
        "does not proxy it)",
        "Service shop/sig: spec.ports[0]: SCTP is not balanced by pyebpflb",
    ]


def test_every_problem_of_a_manifest_is_reported_at_once_and_the_rest_translated() -> None:
    manifest = """\
kind: List
items:
- {kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}}
- {kind: Service, metadata: {name: b}, spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}}
- {kind: Service, metadata: {name: c},
   spec: {clusterIP: 10.96.0.3, selector: {x: y}, ports: [{port: 80}]}}
- {kind: Pod, metadata: {name: p, labels: {x: y}},
   spec: {containers: [{ports: [{containerPort: 70000}]}]}, status: {podIP: 10.0.0.300}}
"""
    done = k8s.translate(k8s.load(manifest))
    assert [s.name for s in done.services] == ["default/b"]
    assert done.problems == [
        "Service default/a: spec.clusterIP '10.96.0.300' is not an IP address",
        "Pod default/p: status.podIPs: '10.0.0.300' is not an IP address",
    ]
    with pytest.raises(k8s.ManifestError, match=r"10\.96\.0\.300.*; Pod default/p"):
        k8s.services(k8s.load(manifest))
    bad_port = manifest.replace("10.0.0.300", "10.0.0.1").replace(
        "selector: {x: y}, ports: [{port: 80}]",
        "selector: {x: y}, ports: [{port: 80, targetPort: 70000}]",
    )
    assert k8s.translate(k8s.load(bad_port)).problems == [
        "Service default/a: spec.clusterIP '10.96.0.300' is not an IP address",
        "Pod default/p: containerPort 70000 (for targetPort 70000) must be from 1 to 65535",
    ]
