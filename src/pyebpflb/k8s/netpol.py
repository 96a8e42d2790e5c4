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
- ``ports``: a number or a name, ``endPort`` ranges, protocol TCP by default (UDP and
  SCTP too: SCTP's ports are matched like TCP's); a named
  port is resolved against the selected pod (ingress: pods resolving it differently
  get policies of their own, ``:ingress#2``...) or each peer pod (egress; an
  ``ipBlock`` peer cannot resolve a name and gets nothing); no ports: every port and
  protocol;
- traffic from a pod's own node (its ``status.hostIP``) is allowed into it
  (``:node <ip>`` policies for the pods of each node), and a pod is never blocked
  from itself (the evaluator's and datapath's rule).

Each rule made says where it comes from (``Rule.origin``: "ingress rule 1", the index
in the NetworkPolicy's ``spec.ingress``; "its pod's node"), kept in the datapath, so flow
events and ``explain`` in any process name the NetworkPolicy (the policy's name) and
its rule.

Selectors: ``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists, DoesNotExist);
namespaces carry ``kubernetes.io/metadata.name`` as the API server sets it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import attrs

from pyebpflb._gc import gc_paused
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

    def describe(self, policy: str | None, rule: int | None = None) -> str | None:
        """What a verdict's pyebpflb policy and rule (a flow event's, an explanation's)
        are in Kubernetes: "NetworkPolicy ns/name ingress rule 0", "... (its pod's
        node)", "... (default deny)"; None for a policy no NetworkPolicy made."""
        if policy is None or policy not in self.origins:
            return None
        origin, kind = self.origins[policy]
        text = f"NetworkPolicy {origin} {kind.lower()}"
        if rule is None:
            return f"{text} (default deny)"
        if (policy, rule) not in self.rules:
            return f"{text} (its pod's node)"
        return f"{text} rule {self.rules[(policy, rule)]}"


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

    def same_for_policies(self, other: _Pod) -> bool:
        """Do both read the same to a policy: labels, addresses, node, container ports?"""
        return (self.labels, self.addresses, self.host) == (
            other.labels,
            other.addresses,
            other.host,
        ) and _get(self.obj, "spec.containers", None) == _get(other.obj, "spec.containers", None)

    def port(self, name: str, protocol: str) -> int | None:
        from pyebpflb.k8s.translate import _container_port

        found = _container_port(self.obj, name, protocol)
        return found if isinstance(found, int) and not isinstance(found, bool) else None


def _pod(obj: dict[str, Any]) -> _Pod | None:
    """A Pod as policies see it; None when it has no address (yet) or is done.
    Raises ValueError for an address that is none."""
    if _get(obj, "status.phase", None) in ("Succeeded", "Failed"):
        return None
    addresses = [a.get("ip") for a in _get(obj, "status.podIPs", None) or []] or [
        _get(obj, "status.podIP", None)
    ]
    networks = tuple(ipaddress.ip_network(str(a)) for a in addresses if a)
    host_ip = _get(obj, "status.hostIP", None)
    host = ipaddress.ip_network(str(host_ip)) if host_ip else None
    if not networks:
        return None
    labels = dict(_get(obj, "metadata.labels", {}) or {})
    name = str(_get(obj, "metadata.name", ""))
    return _Pod(_namespace(obj), name, labels, networks, host, obj)


Ref = tuple[str, str]  # (namespace, name)
_Made = list[tuple[Policy, dict[int, int], str]]  # a policy, its rules' origins, its type


@attrs.define
class _Done:
    """One NetworkPolicy translated: what it made, its problem, what it skips."""

    made: _Made
    problem: str | None
    skipped: list[str]
    policies: list[Policy] = attrs.field(factory=list)  # those of ``made``


class NetworkPolicyTranslator:
    """:func:`network_policies` kept up to date: feed it Pods, Namespaces and
    NetworkPolicies as a watch delivers them (``on_pod``, ``on_namespace``,
    ``on_network_policy`` with ADDED/MODIFIED/DELETED, or ``replace`` after a list);
    :meth:`result` translates again only the NetworkPolicies a change can alter (a
    pod's labels, address or ports: the policies selecting it, before or after, as a
    subject or a peer; a namespace's labels: those with namespace selectors), and the
    policies of the others are the same objects as before (so a datapath sees at once
    that they did not change)."""

    def __init__(self) -> None:
        self._pods: dict[Ref, _Pod] = {}
        self._by_namespace: dict[str, dict[str, _Pod]] = {}
        self._namespace_labels: dict[str, dict[str, str]] = {}  # from Namespace objects
        self._pod_problems: dict[Ref, str] = {}
        self._objects: dict[Ref, dict[str, Any]] = {}
        self._in_namespace: dict[str, set[Ref]] = {}
        self._namespace_selecting: set[Ref] = set()  # a peer with a namespaceSelector
        self._peers: dict[Ref, list[dict[str, Any]]] = {}
        # namespace -> the NetworkPolicies with a namespaceSelector peer selecting it
        # (found when a pod there changes; forgotten when a Namespace or policy does).
        self._peering: dict[str, set[Ref]] = {}
        self._origins: dict[str, tuple[str, str]] = {}
        self._rules: dict[tuple[str, int], int] = {}
        self._done: dict[Ref, _Done] = {}
        self._dirty: set[Ref] = set()
        self._result: PolicyTranslation | None = None

    # -- what the API server says ----------------------------------------------------------
    def on_pod(self, event: str, obj: dict[str, Any]) -> None:
        obj = {**obj, "kind": "Pod"}  # a list's items carry no kind
        ref = (_namespace(obj), str(_get(obj, "metadata.name", "")))
        old = self._pods.pop(ref, None)
        self._pod_problems.pop(ref, None)
        new = None
        if event != "DELETED":
            try:
                new = _pod(obj)
            except ValueError as exc:
                self._pod_problems[ref] = f"{_where(obj)}: status: {exc}"
        pods = self._by_namespace.setdefault(ref[0], {})
        if new is not None:
            self._pods[ref] = new
            pods[ref[1]] = new
        else:
            pods.pop(ref[1], None)
            if not pods:
                del self._by_namespace[ref[0]]
        if old is not None and new is not None and old.same_for_policies(new):
            return  # a status update: nothing a policy reads changed
        for pod in (old, new):
            if pod is not None:  # only those translated and not yet to be translated again
                candidates = self._candidates(pod.namespace) - self._dirty
                self._dirty |= {r for r in candidates if r in self._done and self._touches(r, pod)}
        self._result = None

    def on_namespace(self, event: str, obj: dict[str, Any]) -> None:
        name = str(_get(obj, "metadata.name", ""))
        if event == "DELETED":
            self._namespace_labels.pop(name, None)
        else:
            self._namespace_labels[name] = dict(_get(obj, "metadata.labels", {}) or {})
        self._peering.clear()
        self._dirty |= self._namespace_selecting
        self._result = None

    def on_network_policy(self, event: str, obj: dict[str, Any]) -> None:
        obj = {**obj, "kind": "NetworkPolicy"}
        ref = (_namespace(obj), str(_get(obj, "metadata.name", "")))
        self._objects.pop(ref, None)
        self._in_namespace.get(ref[0], set()).discard(ref)
        self._namespace_selecting.discard(ref)
        self._peers.pop(ref, None)
        self._peering.clear()
        if event != "DELETED":
            self._objects[ref] = obj
            self._in_namespace.setdefault(ref[0], set()).add(ref)
            self._peers[ref] = _peers(obj)
            if any(p.get("namespaceSelector") is not None for p in self._peers[ref]):
                self._namespace_selecting.add(ref)
        self._dirty.add(ref)
        self._result = None

    def replace(self, kind: str, objects: Iterable[dict[str, Any]]) -> None:
        """What a list of ``kind`` ("Pod", "Namespace" or "NetworkPolicy") returned: the
        cache of that kind becomes exactly that."""
        add = {
            "Pod": self.on_pod,
            "Namespace": self.on_namespace,
            "NetworkPolicy": self.on_network_policy,
        }.get(kind)
        if add is None:
            raise ValueError(f"kind must be 'Pod', 'Namespace' or 'NetworkPolicy', got {kind!r}")
        items = [o for o in objects if isinstance(o, dict)]
        keep = {(_namespace(o), str(_get(o, "metadata.name", ""))) for o in items}
        if kind == "Pod":
            known = set(self._pods) | set(self._pod_problems)
        elif kind == "NetworkPolicy":
            known = set(self._objects)
        else:
            known = {("", name) for name in self._namespace_labels}
            keep = {("", str(_get(o, "metadata.name", ""))) for o in items}
        for namespace, name in sorted(known - keep):
            add("DELETED", {"metadata": {"namespace": namespace or None, "name": name}})
        for obj in items:
            if not self._unchanged(kind, obj):  # a relist mostly returns what is held
                add("ADDED", obj)

    def _unchanged(self, kind: str, obj: dict[str, Any]) -> bool:
        ref = (_namespace(obj), str(_get(obj, "metadata.name", "")))
        if kind == "Pod":
            held = self._pods.get(ref)
            return held is not None and held.obj == {**obj, "kind": "Pod"}
        if kind == "NetworkPolicy":
            return self._objects.get(ref) == {**obj, "kind": "NetworkPolicy"}
        name = str(_get(obj, "metadata.name", ""))
        labels = dict(_get(obj, "metadata.labels", {}) or {})
        return self._namespace_labels.get(name) == labels

    # -- which policies a change can alter -------------------------------------------------
    def _candidates(self, namespace: str) -> set[Ref]:
        """The NetworkPolicies a pod of ``namespace`` can be a subject or peer of: those
        of its namespace, and those whose namespace selectors select it."""
        peering = self._peering.get(namespace)
        if peering is None:
            labels = self._labels_of(namespace)
            peering = set()
            for ref in self._namespace_selecting:
                for peer in self._peers[ref]:
                    chosen = peer.get("namespaceSelector")
                    try:
                        if chosen is not None and selects(chosen, labels, ""):
                            peering.add(ref)
                            break
                    except (ManifestError, AttributeError, TypeError):
                        peering.add(ref)  # malformed: translating it again reports it
                        break
            self._peering[namespace] = peering
        return self._in_namespace.get(namespace, set()) | peering

    def _touches(self, ref: Ref, pod: _Pod) -> bool:
        """Can ``pod`` be a subject or a peer of NetworkPolicy ``ref``?"""
        obj = self._objects[ref]
        try:
            if ref[0] == pod.namespace:
                spec = _get(obj, "spec", {}) or {}
                if selects(spec.get("podSelector"), pod.labels, ""):
                    return True
            for peer in self._peers[ref]:
                by_namespace = peer.get("namespaceSelector")
                by_pod = peer.get("podSelector")
                if by_namespace is None and by_pod is None:
                    continue  # an ipBlock
                if by_namespace is None:
                    if pod.namespace != ref[0]:
                        continue
                elif not selects(by_namespace, self._labels_of(pod.namespace), ""):
                    continue
                if by_pod is None or selects(by_pod, pod.labels, ""):
                    return True
        except (ManifestError, AttributeError, TypeError):
            return True  # a malformed policy: translating it again reports it
        return False

    def _labels_of(self, namespace: str) -> dict[str, str]:
        labels = dict(self._namespace_labels.get(namespace, {}))
        labels.setdefault(NAME_LABEL, namespace)  # as the API server sets it
        return labels

    # -- the result ------------------------------------------------------------------------
    def result(self) -> PolicyTranslation:
        """The translation of everything fed so far."""
        if self._result is not None:
            return self._result
        with gc_paused():
            return self._translated()

    def _translated(self) -> PolicyTranslation:
        for ref in self._dirty:
            for policy, origins, _ in getattr(self._done.pop(ref, None), "made", []):
                self._origins.pop(policy.name, None)
                for index in origins:
                    self._rules.pop((policy.name, index), None)
            obj = self._objects.get(ref)
            if obj is None:
                continue
            done = _Done([], None, [])
            try:
                done.made = _translate(obj, self, done.skipped)
            except ManifestError as exc:
                done.problem = str(exc)
            done.policies = [policy for policy, _, _ in done.made]
            self._done[ref] = done
            origin = f"{ref[0]}/{ref[1]}"
            for policy, origins, kind in done.made:
                self._origins[policy.name] = (origin, kind)
                for index, k8s_index in origins.items():
                    self._rules[(policy.name, index)] = k8s_index
        self._dirty = set()
        out = PolicyTranslation(
            [], list(self._pod_problems.values()), [], dict(self._origins), dict(self._rules)
        )
        for ref in self._objects:
            done = self._done[ref]
            if done.problem is not None:
                out.problems.append(done.problem)
            if done.skipped:
                out.skipped.extend(done.skipped)
            out.policies.extend(done.policies)
        self._result = out
        return out


def _peers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Every peer of a NetworkPolicy's rules (both directions), the mappings only."""
    spec = _get(obj, "spec", {}) or {}
    found = []
    for field, peers_field in (("ingress", "from"), ("egress", "to")):
        for rule in spec.get(field) or []:
            if isinstance(rule, dict):
                found += [p for p in rule.get(peers_field) or [] if isinstance(p, dict)]
    return found


def network_policies(objects: Iterable[dict[str, Any]]) -> PolicyTranslation:
    """The pyebpflb policies of every NetworkPolicy in ``objects``, its selectors
    resolved against the Pods and Namespaces there."""
    translator = NetworkPolicyTranslator()
    for obj in objects:
        if not isinstance(obj, dict):
            continue
        kind = obj.get("kind")
        if kind == "Pod":
            translator.on_pod("ADDED", obj)
        elif kind == "Namespace":
            translator.on_namespace("ADDED", obj)
        elif kind == "NetworkPolicy":
            translator.on_network_policy("ADDED", obj)
    return translator.result()


def _translate(obj: dict[str, Any], cluster: NetworkPolicyTranslator, skipped: list[str]) -> _Made:
    where = _where(obj)
    namespace = _namespace(obj)
    origin = f"{namespace}/{_get(obj, 'metadata.name')}"
    spec = _get(obj, "spec", {}) or {}
    selector = spec.get("podSelector")
    if selector is None:
        raise ManifestError(f"{where}: spec.podSelector is missing ({{}} selects every pod)")
    subjects = [
        p
        for p in cluster._by_namespace.get(namespace, {}).values()
        if selects(selector, p.labels, f"{where}: spec.podSelector")
    ]
    types = spec.get("policyTypes") or (["Ingress"] + (["Egress"] if spec.get("egress") else []))
    for kind in types:
        if kind not in ("Ingress", "Egress"):
            raise ManifestError(f"{where}: spec.policyTypes: {kind!r} (Ingress or Egress)")
    made: _Made = []
    for kind in types:
        field = kind.lower()
        rules = spec.get(field) or []
        if not isinstance(rules, list):
            raise ManifestError(f"{where}: spec.{field} must be a list of rules")
        name = origin if kind == "Ingress" else f"{origin}:egress"
        if not subjects:
            skipped.append(f"{where}: {kind}: its podSelector selects no pod (yet)")
            continue
        groups = _by_named_ports(subjects, rules, kind) if kind == "Ingress" else [subjects]
        for number, group in enumerate(groups, start=1):
            label = name if number == 1 else f"{name}#{number}"
            translated, origins = _rules(rules, kind, group, namespace, cluster, where, skipped)
            addresses = [a for p in group for a in p.addresses]
            made.append(
                (Policy(label, translated, "deny", field, subjects=addresses), origins, kind)
            )
        if kind == "Ingress":
            for host in sorted({p.host for p in subjects if p.host is not None}, key=str):
                on_node = [a for p in subjects if p.host == host for a in p.addresses]
                label = f"{origin}:node {host.network_address}"
                made.append(
                    (
                        Policy(
                            label,
                            [Rule("allow", host, origin="its pod's node")],
                            "deny",
                            subjects=on_node,
                        ),
                        {},
                        kind,
                    )
                )
    return made


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
    cluster: NetworkPolicyTranslator,
    where: str,
    skipped: list[str],
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
            targets.extend(_peer(peer, at_peer, namespace, cluster))
        for port in ports:
            for cidr, peer_pod in targets:
                origin = f"{kind.lower()} rule {index}"
                for made_rule in _port_rules(port, cidr, peer_pod, subjects, kind, at, origin):
                    origins[len(made)] = index
                    made.append(made_rule)
    return made, origins


def _peer(
    peer: Any, at: str, namespace: str, cluster: NetworkPolicyTranslator
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
    if namespace_selector is None:  # a podSelector alone: the policy's namespace
        namespaces = [namespace]
    else:
        namespaces = [
            n
            for n in cluster._by_namespace
            if selects(namespace_selector, cluster._labels_of(n), at)
        ]
    for name in namespaces:
        for pod in cluster._by_namespace.get(name, {}).values():
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
    origin: str,
) -> list[Rule]:
    if port is None:
        return [Rule("allow", cidr, origin=origin)]
    if not isinstance(port, dict):
        raise ManifestError(f"{at}.ports: {port!r} must be a mapping")
    protocol = str(port.get("protocol", "TCP"))
    if protocol not in ("TCP", "UDP", "SCTP"):
        raise ManifestError(f"{at}.ports: protocol {protocol!r} (TCP, UDP or SCTP)")
    number = port.get("port")
    if number is None:
        return [Rule("allow", cidr, protocol.lower(), origin=origin)]  # every port of it
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
    return [Rule("allow", cidr, protocol.lower(), (number, end) if end else number, origin=origin)]


def owned_by(name: str, origin: str) -> bool:
    """Is the pyebpflb policy ``name`` one that NetworkPolicy ``origin`` (namespace/name)
    is translated to?"""
    return name == origin or name.startswith((f"{origin}:", f"{origin}#"))


__all__ = [
    "NAME_LABEL",
    "NetworkPolicyTranslator",
    "PolicyTranslation",
    "network_policies",
    "owned_by",
    "selects",
]
