"""Kubernetes manifests -> pyebpflb services (pure Python, no kernel).

Takes what ``kubectl get -o yaml`` prints (or what one writes by hand): a
``Service`` plus the ``Pod``s its selector matches, or a ``Service`` plus its
``EndpointSlice``s. Each port of a Service becomes one :class:`Service`
named ``namespace/name`` (so a policy rule naming it covers all its ports,
as ``loadBalancerSourceRanges`` does): ``clusterIP`` (every one of
``clusterIPs``) and ``port``, to the endpoints' addresses on ``targetPort``
(a number, or the name of a pod's ``containerPort``; the EndpointSlice's
port of the same name). ``sessionAffinity: ClientIP`` becomes
``affinity_timeout`` (``timeoutSeconds``, 10800 by default).

North-south, as kube-proxy serves it: a ``NodePort`` or ``LoadBalancer`` port's
``nodePort`` becomes ``node_port``; ``externalIPs`` ``external_ips``; a
``LoadBalancer``'s ``status.loadBalancer.ingress`` IPs (but those with ``ipMode:
Proxy``, which the cloud load balancer answers itself) ``load_balancer_ips``,
with ``loadBalancerSourceRanges`` as ``source_ranges``; ``externalTrafficPolicy``
and ``healthCheckNodePort`` as they are; Cilium's annotation
``service.cilium.io/forwarding-mode: dsr`` as ``forwarding="dsr"``. Each address
goes with the clusterIP of its family.

Which objects and endpoints count is kube-proxy's (``pkg/proxy``,
``endpointslicecache.go``, ``topology.go`` ``CategorizeEndpoints``) and the
EndpointSlice controller's (``k8s.io/endpointslice/utils.go``): see
:func:`translate`. Each Service is translated on its own: :func:`translate`
returns the services and every problem of the manifest at once (one bad object
never blocks the others); :func:`services` raises :class:`ManifestError` with all
of them, so that nothing is applied.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import attrs

from pyebpflb.model import (
    DEFAULT_AFFINITY_SECONDS,
    Address,
    Backend,
    BackendState,
    Node,
    Service,
)


class ManifestError(ValueError):
    """A manifest that cannot be translated; the message names the object and field."""


# kube-proxy lists Services and EndpointSlices without these labels (its label
# selector): another proxy serves the first, the second marks a headless Service's.
IGNORED_LABELS = ("service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless")


@attrs.frozen
class Translation:
    """What :func:`translate` made of a manifest.

    ``problems``: what could not be translated, one line each naming the object and
    the field (its Service is left out, the others are not). ``skipped``: objects
    and ports kube-proxy does not proxy either (headless and ExternalName Services,
    those labelled for another proxy) or pyebpflb cannot (SCTP), and why.
    """

    services: list[Service]
    problems: list[str]
    skipped: list[str]
    # Services (namespace/name) whose endpoints the manifest does not hold: no
    # EndpointSlice of theirs and no Pod their selector matches (`kubectl get svc`).
    without_endpoints: list[str] = attrs.field(factory=list)


def load(text: str) -> list[dict[str, Any]]:
    """The objects of a YAML (or JSON) stream; ``kind: List`` is unpacked."""
    import yaml  # only reading manifests needs PyYAML

    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ManifestError(f"not YAML: {exc}") from None
    objects: list[dict[str, Any]] = []
    for document in documents:
        if document is None:
            continue
        if not isinstance(document, dict):
            raise ManifestError(f"a manifest document must be a mapping, got {document!r:.60}")
        if document.get("kind") == "List":
            objects.extend(document.get("items") or [])
        else:
            objects.append(document)
    return objects


def _where(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')} {meta.get('namespace', 'default')}/{meta.get('name', '?')}"


def _get(obj: dict[str, Any], path: str, default: Any = ...) -> Any:
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            if default is not ...:
                return default
            raise ManifestError(f"{_where(obj)}: {path} is missing")
        value = value[part]
    return value


def services(objects: Iterable[dict[str, Any]]) -> list[Service]:
    """The pyebpflb services of every Kubernetes Service in ``objects``;
    :class:`ManifestError` listing every problem if any (then none is returned)."""
    objects = list(objects)
    done = translate(objects)
    if done.problems:
        raise ManifestError("; ".join(done.problems))
    if not any(o.get("kind") == "Service" for o in objects):
        raise ManifestError("the manifest has no Service")
    return done.services


def _labelled_away(obj: dict[str, Any]) -> str | None:
    labels = _get(obj, "metadata.labels", None) or {}
    return next((label for label in IGNORED_LABELS if label in labels), None)


ZONE_LABEL = "topology.kubernetes.io/zone"


def translate(objects: Iterable[dict[str, Any]], *, node: Node | None = None) -> Translation:
    """Every Kubernetes Service in ``objects``, translated on its own, as kube-proxy
    would proxy it. Skipped as kube-proxy skips them: headless Services (clusterIP
    None), ExternalName ones, Services and EndpointSlices labelled
    ``service.kubernetes.io/service-proxy-name`` or ``service.kubernetes.io/headless``;
    and SCTP ports (not balanced here). Endpoints: an EndpointSlice's by kube-proxy's
    rules (the first address of each; FQDN slices and placeholder slices without
    ports contribute none; the same endpoint in two slices once; ``ready`` ->
    active, else ``serving`` and ``terminating`` -> terminating, else no new flows);
    a Pod's by the EndpointSlice controller's (``publishNotReadyAddresses``; a
    missing Ready condition is not ready; Succeeded, Failed and address-less pods
    are left out; named ports of sidecar init containers count).

    Topology, as kube-proxy on ``node`` (its name and zone) applies it
    (``topologyModeFromHints``): when every ready endpoint of a port has a
    ``hints.forNodes`` and one names this node, only those take new flows; else when
    every one has ``hints.forZones`` and one names the node's zone, only those. The
    others keep their connections (``maintenance``). Endpoints made from Pods get the
    hints the EndpointSlice controller would write for ``spec.trafficDistribution``
    (``PreferClose``/``PreferSameZone``: the zone of the pod's node, from the Node
    objects of the manifest; ``PreferSameNode``: its node too)."""
    objects = list(objects)
    result: list[Service] = []
    problems: list[str] = []
    skipped: list[str] = []
    without: list[str] = []
    pods = [o for o in objects if o.get("kind") == "Pod"]
    slices = [o for o in objects if o.get("kind") == "EndpointSlice" and _labelled_away(o) is None]
    zones = {
        str(_get(o, "metadata.name", "")): str((_get(o, "metadata.labels", {}) or {})[ZONE_LABEL])
        for o in objects
        if isinstance(o, dict)
        and o.get("kind") == "Node"
        and ZONE_LABEL in (_get(o, "metadata.labels", {}) or {})
    }
    # NetworkPolicies (and the Namespaces their selectors read) are netpol's.
    known = {"Service", "Pod", "EndpointSlice", "Node", "NetworkPolicy", "Namespace"}
    for obj in objects:
        if not isinstance(obj, dict) or obj.get("kind") not in known:
            kind = obj.get("kind") if isinstance(obj, dict) else None
            where = _where(obj) if isinstance(obj, dict) else repr(obj)[:60]
            problems.append(
                f"{where}: kind {kind!r} is not translated (Service, Pod, EndpointSlice, Node, "
                "NetworkPolicy and Namespace are)"
            )
    for obj in objects:
        if not isinstance(obj, dict) or obj.get("kind") != "Service":
            continue
        label = _labelled_away(obj)
        if label is not None:
            skipped.append(f"{_where(obj)}: labelled {label} (kube-proxy does not proxy it)")
            continue
        try:
            made, left = _translate(obj, pods, slices, _Topology(node, zones))
        except ManifestError as exc:
            problems.append(str(exc))
            continue
        result.extend(made)
        skipped.extend(left)
        if made and not _own_slices(obj, slices) and not _selected_pods(obj, pods):
            without.append(made[0].name)
    return Translation(result, problems, skipped, without)


def _namespace(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("namespace") or "default")


@attrs.frozen
class _Topology:
    """Where the translation is for (the datapath's node) and the zones of nodes."""

    node: Node | None
    zones: dict[str, str]

    def hints(self, svc: dict[str, Any], node: str | None) -> _Hints:
        """The hints the EndpointSlice controller writes for an endpoint of a pod on
        ``node`` (``trafficdist``: PreferClose/PreferSameZone its zone, PreferSameNode
        its node and zone)."""
        distribution = _get(svc, "spec.trafficDistribution", None)
        zone = self.zones.get(node or "")
        if distribution not in ("PreferClose", "PreferSameZone", "PreferSameNode") or not zone:
            return _Hints()
        nodes = frozenset([node]) if distribution == "PreferSameNode" and node else frozenset()
        return _Hints(frozenset([zone]), nodes)

    def apply(self, endpoints: list[tuple[Backend, _Hints]]) -> list[Backend]:
        """kube-proxy's ``topologyModeFromHints`` and ``availableForTopology``: the ready
        endpoints outside the mode this node uses take no new flows."""
        backends = [backend for backend, _ in endpoints]
        ready = [(b, h) for b, h in endpoints if b.state is BackendState.ACTIVE]
        if self.node is None or not ready:
            return backends
        name, zone = self.node.name, self.node.zone
        if all(h.nodes for _, h in ready) and any(name in h.nodes for _, h in ready):
            keep = [name in h.nodes for _, h in endpoints]
        elif all(h.zones for _, h in ready) and any(zone and zone in h.zones for _, h in ready):
            keep = [zone in h.zones for _, h in endpoints]
        else:
            return backends
        return [
            attrs.evolve(b, state=BackendState.MAINTENANCE)
            if b.state is BackendState.ACTIVE and not kept
            else b
            for b, kept in zip(backends, keep, strict=True)
        ]


@attrs.frozen
class _Hints:
    zones: frozenset[str] = frozenset()
    nodes: frozenset[str] = frozenset()


def _translate(
    svc: dict[str, Any],
    pods: list[dict[str, Any]],
    slices: list[dict[str, Any]],
    topology: _Topology,
) -> tuple[list[Service], list[str]]:
    """The services of ``svc``, and what of it is skipped (and why)."""
    where = _where(svc)
    name = f"{_namespace(svc)}/{_get(svc, 'metadata.name')}"
    kind = _get(svc, "spec.type", "ClusterIP")
    if kind == "ExternalName":
        return [], [f"{where}: type ExternalName (a DNS name, nothing to proxy)"]
    if kind not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise ManifestError(
            f"{where}: spec.type {kind!r} is not translated (ClusterIP, NodePort, "
            "LoadBalancer and ExternalName are)"
        )
    if _get(svc, "spec.clusterIP", None) in ("None", "") or (
        _get(svc, "spec.clusterIPs", None) or [None]
    )[0] in ("None", ""):
        return [], [f"{where}: headless (clusterIP None: no VIP to balance)"]
    vips = _vips(svc, where)
    north_south = _north_south(svc, kind, where)
    affinity = _affinity(svc, where)
    traffic = _get(svc, "spec.internalTrafficPolicy", "Cluster")
    if traffic not in ("Cluster", "Local"):
        raise ManifestError(f"{where}: spec.internalTrafficPolicy {traffic!r} (Cluster or Local)")
    ports = _get(svc, "spec.ports")
    if not isinstance(ports, list) or not ports:
        raise ManifestError(f"{where}: spec.ports must be a non-empty list")
    own_slices = _own_slices(svc, slices)
    matched = [] if own_slices else _selected_pods(svc, pods)
    publish = bool(_get(svc, "spec.publishNotReadyAddresses", False))
    result, skipped = [], []
    for index, port in enumerate(ports):
        field = f"spec.ports[{index}]"
        protocol = str(port.get("protocol", "TCP"))
        if protocol == "SCTP":
            skipped.append(f"{where}: {field}: SCTP is not balanced by pyebpflb")
            continue
        if protocol not in ("TCP", "UDP"):
            raise ManifestError(f"{where}: {field}.protocol {protocol!r} (TCP, UDP or SCTP)")
        if "port" not in port:
            raise ManifestError(f"{where}: {field}.port is missing")
        target = port.get("targetPort", port["port"])
        for vip in vips:
            if own_slices:
                endpoints = _from_slices(own_slices, port, vip.version, protocol)
            else:
                endpoints = [
                    (b, topology.hints(svc, b.node))
                    for b in _from_pods(matched, target, vip.version, protocol, publish)
                ]
            backends = topology.apply(endpoints)
            try:
                result.append(
                    Service(
                        vip=vip,
                        port=port["port"],
                        protocol=protocol.lower(),
                        name=name,
                        backends=backends,
                        affinity_timeout=affinity,
                        internal_traffic_policy=traffic.lower(),
                        **north_south.fields(port, vip.version, kind),
                    )
                )
            except ValueError as exc:
                raise ManifestError(f"{where}: {field}: {exc}") from None
    return result, skipped


# Cilium's per-service choice between SNAT and direct server return.
FORWARDING_ANNOTATION = "service.cilium.io/forwarding-mode"


class _NorthSouth:
    """A Service's external frontends, split by family for its clusterIPs."""

    def __init__(
        self,
        external: list[Address],
        balancers: list[Address],
        ranges: list[Any],
        policy: str,
        health_port: int | None,
        forwarding: str,
    ) -> None:
        self.external, self.balancers, self.ranges = external, balancers, ranges
        self.policy, self.health_port, self.forwarding = policy, health_port, forwarding

    def fields(self, port: dict[str, Any], family: int, kind: str) -> dict[str, Any]:
        node_port = port.get("nodePort") if kind in ("NodePort", "LoadBalancer") else None
        external = [a for a in self.external if a.version == family]
        balancers = [a for a in self.balancers if a.version == family]
        if node_port is None and not external and not balancers:
            return {}
        return {
            "node_port": node_port,
            "external_ips": external,
            "load_balancer_ips": balancers,
            "external_traffic_policy": self.policy.lower(),
            "source_ranges": [n for n in self.ranges if n.version == family] if balancers else [],
            "health_check_node_port": self.health_port if self.policy == "Local" else None,
            "forwarding": self.forwarding,
        }


def _addresses(values: Any, where: str, field: str) -> list[Address]:
    if values is None:
        return []
    if not isinstance(values, list):
        raise ManifestError(f"{where}: {field} must be a list of IP addresses")
    found = []
    for value in values:
        try:
            found.append(ipaddress.ip_address(str(value)))
        except ValueError:
            raise ManifestError(f"{where}: {field}: {value!r} is not an IP address") from None
    return found


def _north_south(svc: dict[str, Any], kind: str, where: str) -> _NorthSouth:
    policy = _get(svc, "spec.externalTrafficPolicy", "Cluster")
    if policy not in ("Cluster", "Local"):
        raise ManifestError(f"{where}: spec.externalTrafficPolicy {policy!r} (Cluster or Local)")
    external = _addresses(_get(svc, "spec.externalIPs", None), where, "spec.externalIPs")
    balancers: list[Address] = []
    ranges = []
    if kind == "LoadBalancer":
        ingress = _get(svc, "status.loadBalancer.ingress", None) or []
        served = [i.get("ip") for i in ingress if i.get("ip") and i.get("ipMode") != "Proxy"]
        balancers = _addresses(served, where, "status.loadBalancer.ingress")
        for text in _get(svc, "spec.loadBalancerSourceRanges", None) or []:
            try:
                ranges.append(ipaddress.ip_network(str(text).strip(), strict=False))
            except ValueError:
                raise ManifestError(
                    f"{where}: spec.loadBalancerSourceRanges: {text!r} is not a CIDR"
                ) from None
    health = _get(svc, "spec.healthCheckNodePort", None)
    annotations = _get(svc, "metadata.annotations", None) or {}
    forwarding = str(annotations.get(FORWARDING_ANNOTATION, "snat")).lower()
    if forwarding not in ("snat", "dsr"):
        raise ManifestError(
            f"{where}: metadata.annotations[{FORWARDING_ANNOTATION!r}] {forwarding!r} (snat or dsr)"
        )
    return _NorthSouth(
        sorted(set(external), key=external.index),
        sorted(set(balancers), key=balancers.index),
        ranges,
        policy,
        health,
        forwarding,
    )


def _vips(svc: dict[str, Any], where: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    ips = _get(svc, "spec.clusterIPs", None) or [_get(svc, "spec.clusterIP")]
    vips = []
    for ip in ips:
        if ip in (None, "None", ""):
            raise ManifestError(f"{where}: spec.clusterIP is missing")
        try:
            vips.append(ipaddress.ip_address(str(ip)))
        except ValueError:
            raise ManifestError(f"{where}: spec.clusterIP {ip!r} is not an IP address") from None
    return vips


def _affinity(svc: dict[str, Any], where: str) -> int | None:
    mode = _get(svc, "spec.sessionAffinity", "None")
    if mode == "ClientIP":
        timeout: int = _get(
            svc, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", DEFAULT_AFFINITY_SECONDS
        )
        return timeout
    if mode != "None":
        raise ManifestError(f"{where}: spec.sessionAffinity {mode!r} (None or ClientIP)")
    return None


def _own_slices(svc: dict[str, Any], slices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The EndpointSlices of ``svc``: its namespace, labelled with its name."""
    return [
        s
        for s in slices
        if _namespace(s) == _namespace(svc)
        and (_get(s, "metadata.labels", {}) or {}).get("kubernetes.io/service-name")
        == _get(svc, "metadata.name")
    ]


def _selected_pods(svc: dict[str, Any], pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    selector = _get(svc, "spec.selector", None)
    if not selector:
        return []
    return [
        p
        for p in pods
        if _namespace(p) == _namespace(svc)
        and all((_get(p, "metadata.labels", {}) or {}).get(k) == v for k, v in selector.items())
    ]


def _state(ready: bool, serving: bool, terminating: bool) -> BackendState:
    """kube-proxy's use of an endpoint: ready ones take new flows; when a service has
    none, serving-and-terminating ones do (``CategorizeEndpoints``); the rest none."""
    if ready:
        return BackendState.ACTIVE
    if serving and terminating:
        return BackendState.TERMINATING
    return BackendState.MAINTENANCE


def _container_port(pod: dict[str, Any], name: str, protocol: str) -> Any:
    """The number of a pod's named port (``podutil.FindPort``): its containers', then
    its sidecars' (init containers with ``restartPolicy: Always``); None if none."""
    spec = _get(pod, "spec", {}) or {}
    sidecars = [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    for container in [*(spec.get("containers") or []), *sidecars]:
        for port in container.get("ports") or []:
            if port.get("name") == name and port.get("protocol", "TCP") == protocol:
                return port.get("containerPort")
    return None


def _from_pods(
    pods: list[dict[str, Any]], target: Any, family: int, protocol: str, publish: bool
) -> list[Backend]:
    """Endpoints of the selected pods, as the EndpointSlice controller makes them
    (``ShouldPodBeInEndpoints``, ``podToEndpoint``)."""
    backends = []
    for pod in pods:
        pod_where = _where(pod)
        if _get(pod, "status.phase", None) in ("Succeeded", "Failed"):
            continue  # ended: never an endpoint
        addresses = [a.get("ip") for a in _get(pod, "status.podIPs", None) or []] or [
            _get(pod, "status.podIP", None)
        ]
        ips = []
        for address in addresses:
            if not address:
                continue
            try:
                ips.append(ipaddress.ip_address(str(address)))
            except ValueError:
                raise ManifestError(
                    f"{pod_where}: status.podIPs: {address!r} is not an IP address"
                ) from None
        ip = next((a for a in ips if a.version == family), None)
        if ip is None:
            continue  # no address (yet) of this family: not an endpoint
        number = target if isinstance(target, int) else _container_port(pod, target, protocol)
        if number is None:
            continue  # the controller leaves a pod without the named port out
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
            raise ManifestError(
                f"{pod_where}: containerPort {number!r} (for targetPort {target!r}) must be "
                "from 1 to 65535"
            )
        conditions = {c.get("type"): c.get("status") for c in _get(pod, "status.conditions", [])}
        serving = conditions.get("Ready") == "True"  # no Ready condition: not ready
        terminating = bool(_get(pod, "metadata.deletionTimestamp", None))
        ready = publish or (serving and not terminating)
        node = _get(pod, "spec.nodeName", None) or None
        backends.append(Backend(ip, number, state=_state(ready, serving, terminating), node=node))
    return backends


def _from_slices(
    slices: list[dict[str, Any]], port: dict[str, Any], family: int, protocol: str
) -> list[tuple[Backend, _Hints]]:
    """Endpoints of a Service's slices for one of its ports, as kube-proxy's
    endpointslicecache reads them: the slices of the family that have the port (a
    placeholder slice has none), the first address of each endpoint, and each
    address:port once (the first slice that names it wins); with their hints."""
    backends: list[tuple[Backend, _Hints]] = []
    seen: set[tuple[Any, int]] = set()
    for piece in sorted(slices, key=lambda s: str(_get(s, "metadata.name", ""))):
        where = _where(piece)
        address_type = _get(piece, "addressType", None)
        if address_type == "FQDN":
            continue  # kube-proxy ignores FQDN slices
        if address_type not in ("IPv4", "IPv6"):
            raise ManifestError(f"{where}: addressType {address_type!r} (IPv4, IPv6 or FQDN)")
        if int(address_type[-1]) != family:
            continue
        numbers = [
            p.get("port")
            for p in _get(piece, "ports", []) or []
            if (p.get("name") or "") == (port.get("name") or "")
            and p.get("protocol", "TCP") == protocol
        ]
        if not numbers or numbers[0] is None:
            continue  # this slice has no endpoints for this port
        number = numbers[0]
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
            raise ManifestError(f"{where}: ports: {number!r} must be from 1 to 65535")
        for index, endpoint in enumerate(_get(piece, "endpoints", []) or []):
            addresses = endpoint.get("addresses") or []
            if not addresses:
                continue
            try:
                ip = ipaddress.ip_address(str(addresses[0]))  # kube-proxy uses the first
            except ValueError:
                raise ManifestError(
                    f"{where}: endpoints[{index}].addresses: {addresses[0]!r} is not an IP"
                ) from None
            if (ip, number) in seen:
                continue
            seen.add((ip, number))
            conditions = endpoint.get("conditions") or {}
            ready = conditions.get("ready") is not False  # nil: ready
            serving = ready if conditions.get("serving") is None else conditions["serving"]
            terminating = conditions.get("terminating") is True
            node = endpoint.get("nodeName") or None
            state = _state(ready, serving is True, terminating)
            hints = endpoint.get("hints") or {}
            found = _Hints(
                frozenset(str(z.get("name")) for z in hints.get("forZones") or [] if z.get("name")),
                frozenset(str(n.get("name")) for n in hints.get("forNodes") or [] if n.get("name")),
            )
            backends.append((Backend(ip, number, state=state, node=node), found))
    return backends


__all__ = [
    "IGNORED_LABELS",
    "ZONE_LABEL",
    "ManifestError",
    "Translation",
    "load",
    "services",
    "translate",
]
