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

Anything that cannot be translated raises :class:`ManifestError` naming the
object and the field; nothing is returned then, so nothing is applied.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from pyebpflb.model import (
    DEFAULT_AFFINITY_SECONDS,
    Address,
    Backend,
    BackendState,
    Service,
)


class ManifestError(ValueError):
    """A manifest that cannot be translated; the message names the object and field."""


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
    """The pyebpflb services of every Kubernetes Service in ``objects``."""
    objects = list(objects)
    result: list[Service] = []
    pods = [o for o in objects if o.get("kind") == "Pod"]
    slices = [o for o in objects if o.get("kind") == "EndpointSlice"]
    known = {"Service", "Pod", "EndpointSlice"}
    for obj in objects:
        if obj.get("kind") not in known:
            raise ManifestError(
                f"{_where(obj)}: kind {obj.get('kind')!r} is not translated "
                "(Service, Pod and EndpointSlice are)"
            )
    for obj in objects:
        if obj.get("kind") == "Service":
            result.extend(_translate(obj, pods, slices))
    if not result:
        raise ManifestError("the manifest has no Service")
    return result


def _namespace(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("namespace") or "default")


def _translate(
    svc: dict[str, Any], pods: list[dict[str, Any]], slices: list[dict[str, Any]]
) -> list[Service]:
    where = _where(svc)
    name = f"{_namespace(svc)}/{_get(svc, 'metadata.name')}"
    kind = _get(svc, "spec.type", "ClusterIP")
    if kind not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise ManifestError(
            f"{where}: spec.type {kind!r} is not translated (ClusterIP, NodePort and "
            "LoadBalancer are)"
        )
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
    result = []
    for index, port in enumerate(ports):
        field = f"spec.ports[{index}]"
        protocol = str(port.get("protocol", "TCP"))
        if protocol not in ("TCP", "UDP"):
            raise ManifestError(f"{where}: {field}.protocol {protocol!r} (TCP or UDP)")
        if "port" not in port:
            raise ManifestError(f"{where}: {field}.port is missing")
        target = port.get("targetPort", port["port"])
        for vip in vips:
            if own_slices:
                backends = _from_slices(own_slices, port, vip.version, protocol)
            else:
                backends = _from_pods(matched, target, vip.version, protocol, where, field)
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
    return result


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
            raise ManifestError(
                f"{where}: spec.clusterIP {ip!r}: a headless service has no VIP to balance"
            )
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


def _state(ready: bool, terminating: bool) -> BackendState:
    if terminating:
        return BackendState.TERMINATING
    return BackendState.ACTIVE if ready else BackendState.MAINTENANCE


def _from_pods(
    pods: list[dict[str, Any]], target: Any, family: int, protocol: str, where: str, field: str
) -> list[Backend]:
    backends = []
    for pod in pods:
        pod_where = _where(pod)
        if isinstance(target, int):
            number = target
        else:
            found = [
                p["containerPort"]
                for c in _get(pod, "spec.containers", [])
                for p in c.get("ports") or []
                if p.get("name") == target and p.get("protocol", "TCP") == protocol
            ]
            if not found:
                raise ManifestError(
                    f"{where}: {field}.targetPort {target!r} names no {protocol} containerPort "
                    f"of {pod_where}"
                )
            number = found[0]
        addresses = [a.get("ip") for a in _get(pod, "status.podIPs", None) or []] or [
            _get(pod, "status.podIP", None)
        ]
        if not any(addresses):
            raise ManifestError(f"{pod_where}: status.podIP is missing (the pod has no address)")
        conditions = {c.get("type"): c.get("status") for c in _get(pod, "status.conditions", [])}
        ready = conditions.get("Ready", "True") == "True"
        terminating = bool(_get(pod, "metadata.deletionTimestamp", None))
        node = _get(pod, "spec.nodeName", None) or None
        for address in addresses:
            ip = ipaddress.ip_address(address)
            if ip.version == family:
                backends.append(Backend(ip, number, state=_state(ready, terminating), node=node))
    return backends


def _from_slices(
    slices: list[dict[str, Any]], port: dict[str, Any], family: int, protocol: str
) -> list[Backend]:
    backends = []
    for piece in slices:
        where = _where(piece)
        address_type = _get(piece, "addressType")
        if address_type not in ("IPv4", "IPv6"):
            raise ManifestError(f"{where}: addressType {address_type!r} (IPv4 or IPv6)")
        if int(address_type[-1]) != family:
            continue
        numbers = [
            p.get("port")
            for p in _get(piece, "ports", []) or []
            if p.get("name", "") == port.get("name", "") and p.get("protocol", "TCP") == protocol
        ]
        if not numbers or numbers[0] is None:
            raise ManifestError(
                f"{where}: ports has no {protocol} port named {port.get('name', '')!r}"
            )
        for index, endpoint in enumerate(_get(piece, "endpoints", []) or []):
            conditions = endpoint.get("conditions") or {}
            ready = conditions.get("ready", True) is not False
            terminating = conditions.get("terminating", False) is True
            node = endpoint.get("nodeName") or None
            for address in endpoint.get("addresses") or []:
                try:
                    ip = ipaddress.ip_address(address)
                except ValueError:
                    raise ManifestError(
                        f"{where}: endpoints[{index}].addresses: {address!r} is not an IP"
                    ) from None
                backends.append(
                    Backend(ip, numbers[0], state=_state(ready, terminating), node=node)
                )
    return backends


__all__ = ["ManifestError", "load", "services"]
