"""Kubernetes NetworkPolicy -> pyebpflb policies with subjects (pure Python).

Each NetworkPolicy becomes a policy per direction it isolates, named
``namespace/name`` (ingress) and ``namespace/name:egress``, whose subjects are the
addresses of the pods its ``podSelector`` selects and whose rules allow what its rules
allow, by default deny: Kubernetes' semantics as its documentation and the e2e tests
(``test/e2e/network/netpol``) state them:

- allow-only, the union over every policy selecting a pod; a pod no policy of a
  type selects is not isolated for that type;
- ``policyTypes``: as given, else Ingress, and Egress when there are egress rules;
  an empty rule list denies the whole direction;
- a peer: ``ipBlock`` (its ``except`` subtracted inside that peer, not a deny: another
  policy allowing an excepted address still allows it), ``podSelector`` (the policy's
  namespace), ``namespaceSelector`` (every pod of those namespaces), both in one peer
  (pods matching the first in namespaces matching the second); no peers: everyone;
- ``ports``: a number or a name, ``endPort`` ranges, protocol TCP by default; a named
  port is resolved against the selected pod (ingress: pods resolving it differently
  get policies of their own, ``:ingress#2``...) or each peer pod (egress; an
  ``ipBlock`` peer cannot resolve a name and gets nothing); no ports: every port and
  protocol;
- traffic from a pod's own node (its ``status.hostIP``) is allowed into it
  (``:node <ip>`` policies for the pods of each node), and a pod is never blocked
  from itself (the evaluator's and datapath's rule).

Selectors: ``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists, DoesNotExist);
namespaces carry ``kubernetes.io/metadata.name`` as the API server sets it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import attrs

from pyebpflb.k8s.translate import ManifestError, _get, _namespace, _where
from pyebpflb.model import Network, Policy, Rule

NAME_LABEL = "kubernetes.io/metadata.name"


@attrs.frozen
class PolicyTranslation:
    """What :func:`network_policies` made: ``policies``; ``problems`` (one line each,
    naming the object and field: that NetworkPolicy is left out); ``skipped`` (what is
    not enforced, and why); ``origins``: pyebpflb policy name -> (the NetworkPolicy's
    ``namespace/name``, direction), and ``rules``: (policy name, rule index) -> the
    index of the NetworkPolicy rule it comes from."""

    policies: list[Policy]
    problems: list[str]
    skipped: list[str]
    origins: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    rules: dict[tuple[str, int], int] = attrs.field(factory=dict)


def selects(selector: Any, labels: dict[str, str], where: str) -> bool:
    """Does a LabelSelector select ``labels``? ``{}`` selects everything."""
    if not isinstance(selector, dict):
        raise ManifestError(f"{where}: a label selector must be a mapping, got {selector!r}")
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression.get("key"), expression.get("operator")
        values = expression.get("values") or []
        if operator == "In":
            ok = labels.get(key) in values
        elif operator == "NotIn":
            ok = labels.get(key) not in values  # absent: not in
        elif operator == "Exists":
            ok = key in labels
        elif operator == "DoesNotExist":
            ok = key not in labels
        else:
            raise ManifestError(
                f"{where}: matchExpressions operator {operator!r} (In, NotIn, Exists, DoesNotExist)"
            )
        if not ok:
            return False
    return True


@attrs.frozen
class _Pod:
    namespace: str
    name: str
    labels: dict[str, str] = attrs.field(hash=False)
    addresses: tuple[Network, ...]
    host: Network | None
    obj: dict[str, Any] = attrs.field(hash=False, repr=False)

    def port(self, name: str, protocol: str) -> int | None:
        from pyebpflb.k8s.translate import _container_port

        found = _container_port(self.obj, name, protocol)
        return found if isinstance(found, int) and not isinstance(found, bool) else None


def _pods(objects: list[dict[str, Any]], problems: list[str]) -> list[_Pod]:
    pods = []
    for obj in objects:
        if obj.get("kind") != "Pod" or _get(obj, "status.phase", None) in ("Succeeded", "Failed"):
            continue
        addresses = [a.get("ip") for a in _get(obj, "status.podIPs", None) or []] or [
            _get(obj, "status.podIP", None)
        ]
        try:
            networks = tuple(ipaddress.ip_network(str(a)) for a in addresses if a)
            host_ip = _get(obj, "status.hostIP", None)
            host = ipaddress.ip_network(str(host_ip)) if host_ip else None
        except ValueError as exc:
            problems.append(f"{_where(obj)}: status: {exc}")
            continue
        if networks:
            labels = dict(_get(obj, "metadata.labels", {}) or {})
            name = str(_get(obj, "metadata.name", ""))
            pods.append(_Pod(_namespace(obj), name, labels, networks, host, obj))
    return pods


def _namespaces(objects: list[dict[str, Any]], pods: list[_Pod]) -> dict[str, dict[str, str]]:
    found = {
        str(_get(o, "metadata.name", "")): dict(_get(o, "metadata.labels", {}) or {})
        for o in objects
        if o.get("kind") == "Namespace"
    }
    for pod in pods:  # a namespace only known from its pods has the label the server sets
        found.setdefault(pod.namespace, {})
    for name, labels in found.items():
        labels.setdefault(NAME_LABEL, name)
    return found


def network_policies(objects: Iterable[dict[str, Any]]) -> PolicyTranslation:
    """The pyebpflb policies of every NetworkPolicy in ``objects``, its selectors
    resolved against the Pods and Namespaces there."""
    objects = [o for o in objects if isinstance(o, dict)]
    problems: list[str] = []
    skipped: list[str] = []
    pods = _pods(objects, problems)
    namespaces = _namespaces(objects, pods)
    result = PolicyTranslation([], problems, skipped)
    for obj in objects:
        if obj.get("kind") != "NetworkPolicy":
            continue
        try:
            _translate(obj, pods, namespaces, result)
        except ManifestError as exc:
            problems.append(str(exc))
    return result


def _translate(
    obj: dict[str, Any],
    pods: list[_Pod],
    namespaces: dict[str, dict[str, str]],
    out: PolicyTranslation,
) -> None:
    where = _where(obj)
    namespace = _namespace(obj)
    origin = f"{namespace}/{_get(obj, 'metadata.name')}"
    spec = _get(obj, "spec", {}) or {}
    selector = spec.get("podSelector")
    if selector is None:
        raise ManifestError(f"{where}: spec.podSelector is missing ({{}} selects every pod)")
    subjects = [
        p
        for p in pods
        if p.namespace == namespace and selects(selector, p.labels, f"{where}: spec.podSelector")
    ]
    types = spec.get("policyTypes") or (["Ingress"] + (["Egress"] if spec.get("egress") else []))
    for kind in types:
        if kind not in ("Ingress", "Egress"):
            raise ManifestError(f"{where}: spec.policyTypes: {kind!r} (Ingress or Egress)")
    made: list[tuple[Policy, dict[int, int], str]] = []
    for kind in types:
        field = kind.lower()
        rules = spec.get(field) or []
        if not isinstance(rules, list):
            raise ManifestError(f"{where}: spec.{field} must be a list of rules")
        name = origin if kind == "Ingress" else f"{origin}:egress"
        if not subjects:
            out.skipped.append(f"{where}: {kind}: its podSelector selects no pod (yet)")
            continue
        groups = _by_named_ports(subjects, rules, kind) if kind == "Ingress" else [subjects]
        for number, group in enumerate(groups, start=1):
            label = name if number == 1 else f"{name}#{number}"
            translated, origins = _rules(
                rules, kind, group, namespace, pods, namespaces, where, out
            )
            addresses = [a for p in group for a in p.addresses]
            made.append(
                (
                    Policy(label, translated, "deny", field, subjects=addresses),
                    origins,
                    kind,
                )
            )
        if kind == "Ingress":
            for host in sorted({p.host for p in subjects if p.host is not None}, key=str):
                on_node = [a for p in subjects if p.host == host for a in p.addresses]
                label = f"{origin}:node {host.network_address}"
                made.append(
                    (Policy(label, [Rule("allow", host)], "deny", subjects=on_node), {}, kind)
                )
    for policy, origins, kind in made:
        out.policies.append(policy)
        out.origins[policy.name] = (origin, kind)
        for index, k8s_index in origins.items():
            out.rules[(policy.name, index)] = k8s_index


def _by_named_ports(subjects: list[_Pod], rules: list[Any], kind: str) -> list[list[_Pod]]:
    """The selected pods grouped by what the rules' named ports resolve to on them."""
    names = [
        (str(port["port"]), str(port.get("protocol", "TCP")))
        for rule in rules
        if isinstance(rule, dict)
        for port in rule.get("ports") or []
        if isinstance(port, dict) and isinstance(port.get("port"), str)
    ]
    groups: dict[tuple[int | None, ...], list[_Pod]] = {}
    for pod in subjects:
        groups.setdefault(tuple(pod.port(n, proto) for n, proto in names), []).append(pod)
    return list(groups.values())


def _rules(
    rules: list[Any],
    kind: str,
    subjects: list[_Pod],
    namespace: str,
    pods: list[_Pod],
    namespaces: dict[str, dict[str, str]],
    where: str,
    out: PolicyTranslation,
) -> tuple[list[Rule], dict[int, int]]:
    """Allow rules for ``rules`` (one direction's), and rule index -> k8s rule index."""
    made: list[Rule] = []
    origins: dict[int, int] = {}
    peers_field = "from" if kind == "Ingress" else "to"
    for index, rule in enumerate(rules):
        at = f"{where}: spec.{kind.lower()}[{index}]"
        if not isinstance(rule, dict):
            raise ManifestError(f"{at} must be a mapping")
        peers = rule.get(peers_field) or []
        ports = rule.get("ports") or [None]
        targets: list[tuple[Network | None, _Pod | None]] = []
        if not peers:
            targets = [(None, None)]
        for number, peer in enumerate(peers):
            at_peer = f"{at}.{peers_field}[{number}]"
            targets.extend(_peer(peer, at_peer, namespace, pods, namespaces))
        for port in ports:
            for cidr, peer_pod in targets:
                for made_rule in _port_rules(port, cidr, peer_pod, subjects, kind, at, out):
                    origins[len(made)] = index
                    made.append(made_rule)
    return made, origins


def _peer(
    peer: Any, at: str, namespace: str, pods: list[_Pod], namespaces: dict[str, dict[str, str]]
) -> list[tuple[Network | None, _Pod | None]]:
    if not isinstance(peer, dict):
        raise ManifestError(f"{at} must be a mapping")
    block = peer.get("ipBlock")
    if block is not None:
        try:
            cidr = ipaddress.ip_network(str(block.get("cidr")), strict=False)
            excepts = [
                ipaddress.ip_network(str(e), strict=False) for e in block.get("except") or []
            ]
        except ValueError as exc:
            raise ManifestError(f"{at}.ipBlock: {exc}") from None
        left = [cidr]
        for hole in excepts:
            if hole.version != cidr.version or not hole.subnet_of(cidr):  # type: ignore[arg-type]
                raise ManifestError(f"{at}.ipBlock.except: {hole} is not inside {cidr}")
            left = [
                piece
                for part in left
                for piece in (
                    part.address_exclude(hole)  # type: ignore[arg-type]
                    if hole.subnet_of(part)  # type: ignore[arg-type]
                    else ([] if part.subnet_of(hole) else [part])  # type: ignore[arg-type]
                )
            ]
        return [(piece, None) for piece in sorted(left, key=str)]
    pod_selector = peer.get("podSelector")
    namespace_selector = peer.get("namespaceSelector")
    if pod_selector is None and namespace_selector is None:
        raise ManifestError(f"{at}: give ipBlock, podSelector or namespaceSelector")
    chosen: list[tuple[Network | None, _Pod | None]] = []
    for pod in pods:
        if namespace_selector is None:
            if pod.namespace != namespace:  # a podSelector alone: the policy's namespace
                continue
        elif not selects(namespace_selector, namespaces.get(pod.namespace, {}), at):
            continue
        if pod_selector is not None and not selects(pod_selector, pod.labels, at):
            continue
        chosen.extend((address, pod) for address in pod.addresses)
    return chosen


def _port_rules(
    port: Any,
    cidr: Network | None,
    peer_pod: _Pod | None,
    subjects: list[_Pod],
    kind: str,
    at: str,
    out: PolicyTranslation,
) -> list[Rule]:
    if port is None:
        return [Rule("allow", cidr)]
    if not isinstance(port, dict):
        raise ManifestError(f"{at}.ports: {port!r} must be a mapping")
    protocol = str(port.get("protocol", "TCP"))
    if protocol == "SCTP":
        out.skipped.append(f"{at}.ports: SCTP is not matched by pyebpflb's rules")
        return []
    if protocol not in ("TCP", "UDP"):
        raise ManifestError(f"{at}.ports: protocol {protocol!r} (TCP, UDP or SCTP)")
    number = port.get("port")
    if number is None:
        return [Rule("allow", cidr, protocol.lower())]  # every port of the protocol
    if isinstance(number, str):
        # Ingress: the selected pods of this group resolve it alike; egress: the peer.
        owner = subjects[0] if kind == "Ingress" else peer_pod
        resolved = owner.port(number, protocol) if owner is not None else None
        if resolved is None:
            return []  # nothing has that port: the rule matches nothing
        number = resolved
    end = port.get("endPort")
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
        raise ManifestError(f"{at}.ports: port {number!r} must be from 1 to 65535 or a name")
    if end is not None and (
        isinstance(end, bool) or not isinstance(end, int) or not number <= end <= 65535
    ):
        raise ManifestError(f"{at}.ports: endPort {end!r} must be from port {number} to 65535")
    return [Rule("allow", cidr, protocol.lower(), (number, end) if end else number)]


def owned_by(name: str, origin: str) -> bool:
    """Is the pyebpflb policy ``name`` one that NetworkPolicy ``origin`` (namespace/name)
    is translated to?"""
    return name == origin or name.startswith((f"{origin}:", f"{origin}#"))


__all__ = ["NAME_LABEL", "PolicyTranslation", "network_policies", "owned_by", "selects"]
