"""Network policy in pure Python: the reference evaluator, and the compiler
that turns policies into the datapath's lookup tables.

:func:`evaluate` is the definition of what policies mean (docs/policy.md);
the kernel must agree with it, and the tests check that it does, packet by
packet. :func:`compile_policies` flattens the rules so that the kernel
decides with two longest-prefix lookups, whatever the number of rules:

1. the peer address finds its *class*: the most specific CIDR any rule of the
   direction (and scope) names. A class holds its own rules and those of
   every CIDR containing it, so the longest match sees every rule that
   matches the address;
2. (class, protocol, destination port) finds the verdict of the port range
   the port falls in: the class's port ranges are cut into pieces, each piece
   resolved (deny beats allow, then the longest prefix, then policy name and
   rule order). A class of a few pieces carries them in its own entry; the
   pieces of a larger one are written as port prefixes to a second trie.
"""

from __future__ import annotations

import collections
import heapq
import ipaddress
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import attrs

from pyebpflb.layout import POLICY_INLINE, POLICY_PIECE_EVERY, POLICY_RULESET, PolicyProto
from pyebpflb.model import (
    PROTOCOL_NUMBERS,
    Action,
    Address,
    Backend,
    Direction,
    Policy,
    Rule,
    RuleProtocol,
    Service,
    to_address,
    to_direction,
)

# enum pyebpflb_policy_proto, as the header has it: the kernel numbers protocols so too.
# Plain ints: the compiler hashes them by the million, and an enum member hashes slowly.
PROTO_CODES = tuple(int(code) for code in PolicyProto)
TCP, UDP, ICMP, OTHER, TCP_NOPORT, UDP_NOPORT, SCTP, SCTP_NOPORT = PROTO_CODES
WITH_PORTS = (TCP, UDP, SCTP)  # the codes whose pieces are port ranges
INLINE = POLICY_INLINE  # port ranges a class carries itself
PIECE_EVERY = POLICY_PIECE_EVERY  # an inline piece for every protocol
# ICMPv6 multicast listener (130-132, 143) and neighbour discovery (133-137): IPv6
# needs them on the link; no policy stops them.
LINK_CONTROL_TYPES = frozenset([*range(130, 138), 143])


def _to_protocol_number(value: object) -> int:
    if isinstance(value, str) and value.lower() in PROTOCOL_NUMBERS:
        return PROTOCOL_NUMBERS[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return value
    raise ValueError(
        f"protocol must be 'tcp', 'udp', 'sctp', 'icmp' or an IP protocol number 0-255, got "
        f"{value!r}"
    )


def _to_port(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"a packet's port must be 0 to 65535 (None: not known), got {value!r}")
    return value


@attrs.frozen
class Packet:
    """A packet as policy sees it.

    ``dst_port=None``: a TCP, UDP or SCTP packet whose ports are not known (a later
    fragment whose first fragment was not seen); only rules for every port
    match it. ``protocol``: 'tcp', 'udp', 'sctp', 'icmp' or an IP protocol number.
    """

    src: Address = attrs.field(converter=to_address)
    dst: Address = attrs.field(converter=to_address)
    protocol: int = attrs.field(default=6, converter=_to_protocol_number)
    src_port: int | None = attrs.field(default=0, converter=_to_port)
    dst_port: int | None = attrs.field(default=0, converter=_to_port)
    direction: Direction = attrs.field(default=Direction.INGRESS, converter=to_direction)
    icmp_type: int = attrs.field(default=-1)  # ICMP(v6) type; -1: an echo request

    def __attrs_post_init__(self) -> None:
        if self.src.version != self.dst.version:
            raise ValueError(f"src {self.src} and dst {self.dst} are of different IP versions")
        if self.protocol == 1 and self.src.version == 6:
            object.__setattr__(self, "protocol", 58)

    @property
    def family(self) -> int:
        return self.src.version

    @property
    def peer(self) -> Address:
        return self.src if self.direction is Direction.INGRESS else self.dst

    @property
    def local(self) -> Address:
        """The endpoint policies are for: the destination on ingress, the source on
        egress."""
        return self.dst if self.direction is Direction.INGRESS else self.src

    @property
    def proto_code(self) -> int:
        if self.protocol == 6:
            return TCP if self.dst_port is not None else TCP_NOPORT
        if self.protocol == 17:
            return UDP if self.dst_port is not None else UDP_NOPORT
        if self.protocol == 132:
            return SCTP if self.dst_port is not None else SCTP_NOPORT
        if self.protocol in (1, 58):
            return ICMP
        return OTHER


@attrs.frozen
class Verdict:
    """What policy does with a packet: ``action``, and why.

    ``reason`` is "rule" (``policy`` and ``rule``, its index, name the rule
    that decided), "default" (no rule matched; the direction's default),
    "no policy" (no policy for the packet's direction and endpoint), "neighbour
    discovery" (ICMPv6 neighbour and multicast listener discovery, types
    130-137 and 143, always let through) or "self" (an endpoint a policy with
    subjects selects, talking to itself: never blocked, as in Kubernetes).
    """

    action: Action
    reason: str
    policy: str | None = None
    rule: int | None = None

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW

    def __str__(self) -> str:
        if self.reason == "rule":
            return f"{self.action.value} by policy {self.policy!r} rule {self.rule}"
        return f"{self.action.value} ({self.reason})"


def _protocol_matches(rule: Rule, code: int) -> bool:
    """Does ``rule`` apply to packets of protocol ``code`` (its ports aside)?"""
    if rule.protocol is RuleProtocol.ANY:
        return True
    if code in (TCP, TCP_NOPORT):
        return rule.protocol is RuleProtocol.TCP and (code == TCP or rule.ports is None)
    if code in (UDP, UDP_NOPORT):
        return rule.protocol is RuleProtocol.UDP and (code == UDP or rule.ports is None)
    if code in (SCTP, SCTP_NOPORT):
        return rule.protocol is RuleProtocol.SCTP and (code == SCTP or rule.ports is None)
    return code == ICMP and rule.protocol is RuleProtocol.ICMP


def _contains(rule: Rule, address: Address) -> bool:
    return rule.cidr is None or (rule.cidr.version == address.version and address in rule.cidr)


Candidate = tuple[int, int, str, int]  # (-prefixlen, scope rank, policy name, index): smaller wins


def evaluate(
    policies: Iterable[Policy],
    packet: Packet,
    *,
    service: Service | None = None,
    backend: Backend | None = None,
) -> Verdict:
    """The verdict of ``policies`` on ``packet``: the reference semantics.

    ``service`` is the service the packet is addressed to (its VIP:port), if
    any, and ``backend`` the backend it is translated to; rules naming the
    service see the VIP's port, the others the backend's (the VIP's when there
    is no backend). Rules are matched by the peer (source on ingress,
    destination on egress), protocol and destination port. Then:

    - a matching deny beats any matching allow;
    - among the matching rules of that action, the most specific CIDR wins
      (then a rule naming the service, then a rule of a policy with subjects,
      then policy name, then rule order: this only decides which rule is
      reported and counted);
    - no matching rule: deny if any policy of the direction has
      ``default="deny"``, else allow.

    Only the policies for the packet's endpoint count (its ``local`` address: the
    backend's on ingress when it is translated): those without subjects and those
    whose subjects hold it. An endpoint a policy with subjects selects is never
    blocked from itself.
    """
    local = packet.local
    if service is not None and backend is not None and packet.direction is Direction.INGRESS:
        local = backend.address
    mine = [p for p in policies if p.direction is packet.direction and p.selects(local)]
    if not mine:
        return Verdict(Action.ALLOW, "no policy")
    if packet.protocol == 58 and packet.icmp_type in LINK_CONTROL_TYPES:
        return Verdict(Action.ALLOW, "neighbour discovery")
    if local == packet.peer and any(p.subjects for p in mine):
        return Verdict(Action.ALLOW, "self")
    code = packet.proto_code
    best: dict[Action, tuple[Candidate, Policy, int]] = {}
    for policy in mine:
        for index, rule in enumerate(policy.rules):
            if not _protocol_matches(rule, code) or not _contains(rule, packet.peer):
                continue
            if rule.service is not None:
                if service is None or rule.service != service.name:
                    continue
                port = packet.dst_port
                rank = 0
            else:
                port = packet.dst_port
                if service is not None and backend is not None:
                    port = backend.port
                rank = 1 if policy.subjects else 2
            if code in WITH_PORTS:
                low, high = rule.port_range
                assert port is not None
                if not low <= port <= high:
                    continue
            candidate = (-rule.prefixlen, rank, policy.name, index)
            if rule.action not in best or candidate < best[rule.action][0]:
                best[rule.action] = (candidate, policy, index)
    for action in (Action.DENY, Action.ALLOW):
        if action in best:
            _, policy, index = best[action]
            return Verdict(action, "rule", policy.name, index)
    deny = any(p.default is Action.DENY for p in mine)
    return Verdict(Action.DENY if deny else Action.ALLOW, "default")


# -- compiling ----------------------------------------------------------------------------


@attrs.frozen
class RuleRef:
    """One installed rule: its id in the kernel and where it comes from."""

    id: int
    policy: str
    index: int
    rule: Rule


@attrs.frozen
class Piece:
    """A port range of a class (0..65535 for protocols without ports) and its verdict."""

    proto: int
    low: int
    high: int
    action: Action
    rule_id: int
    cidr_prefixlen: int


@attrs.frozen
class SubjectEntry:
    """An endpoint CIDR of a direction and the rule set of the policies for it."""

    direction: Direction
    family: int
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    scope: int  # POLICY_RULESET | the rule set
    deny: bool  # one of the policies for it denies by default


@attrs.frozen
class CidrEntry:
    direction: Direction
    scope: int  # service id, 0: every endpoint's rules; POLICY_RULESET | n: a rule set
    family: int
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    class_id: int
    pieces: tuple[Piece, ...]  # at most INLINE; else () and the ranges are port entries
    spilled: bool


@attrs.frozen
class PortEntry:
    class_id: int
    proto: int
    port: int  # the prefix's first port
    port_prefixlen: int  # 0..16
    action: Action
    rule_id: int
    cidr_prefixlen: int


Ruleset = tuple[Direction, frozenset[str]]  # a direction, the policies with subjects in it


@attrs.frozen
class Compiled:
    cidrs: list[CidrEntry]
    ports: list[PortEntry]
    ingress_on: bool
    ingress_deny: bool  # of the policies for every endpoint
    ingress_service_rules: bool  # a rule names a service: packets to services look twice
    egress_on: bool
    egress_deny: bool
    subjects: list[SubjectEntry] = attrs.field(factory=list)
    rulesets: dict[Ruleset, int] = attrs.field(factory=dict)  # -> its number
    subject_directions: frozenset[Direction] = frozenset()  # a policy has subjects in it
    # A policy for every endpoint has rules (scope 0) in it: endpoints with a rule set
    # meet those too.
    everyone_directions: frozenset[Direction] = frozenset()

    def has_subjects(self, direction: Direction) -> bool:
        return direction in self.subject_directions


def port_prefixes(low: int, high: int) -> list[tuple[int, int]]:
    """The fewest (first port, prefix length) blocks covering ``low..high`` exactly."""
    blocks = []
    while low <= high:
        size = low & -low if low else 1 << 16
        while low + size - 1 > high:
            size >>= 1
        blocks.append((low, 16 - size.bit_length() + 1))
        low += size
    return blocks


def _resolve(
    members: Sequence[tuple[Candidate, Action, int, tuple[int, int], int]],
) -> list[tuple[int, int, Action, int, int]]:
    """Cut 0..65535 into pieces where the winner is the same: (low, high, action, rule id,
    prefixlen). ``members``: (rank, action, rule id, port range, prefixlen) per rule."""
    starts = sorted(members, key=lambda m: m[3][0])
    points = sorted({0} | {m[3][0] for m in members} | {m[3][1] + 1 for m in members})
    heaps: dict[Action, list[tuple[Candidate, int, int, int]]] = {
        Action.DENY: [],
        Action.ALLOW: [],
    }
    pieces: list[tuple[int, int, Action, int, int]] = []
    at = 0
    for i, low in enumerate(points):
        if low > 65535:
            break
        high = (points[i + 1] - 1) if i + 1 < len(points) else 65535
        while at < len(starts) and starts[at][3][0] <= low:
            rank, action, rule_id, (_, end), prefixlen = starts[at]
            heapq.heappush(heaps[action], (rank, end, rule_id, prefixlen))
            at += 1
        winner = None
        for action in (Action.DENY, Action.ALLOW):
            heap = heaps[action]
            while heap and heap[0][1] < low:
                heapq.heappop(heap)
            if heap:
                _, _, rule_id, prefixlen = heap[0]
                winner = (action, rule_id, prefixlen)
                break
        if winner is None:
            continue
        if pieces and pieces[-1][1] == low - 1 and pieces[-1][2:] == winner:
            pieces[-1] = (pieces[-1][0], high, *winner)
        else:
            pieces.append((low, high, *winner))
    return pieces


def compile_policies(
    policies: Sequence[Policy],
    refs: Sequence[RuleRef],
    service_ids: dict[str, list[int]],
    class_base: int = 0,
) -> Compiled:
    """The lookup tables of ``policies`` (whose rules are ``refs``, ids assigned).

    ``service_ids`` maps a service name to the ids of the installed services of
    that name; ``class_base`` is or-ed into every class id (the generation).
    """
    cidrs: list[CidrEntry] = []
    ports: list[PortEntry] = []
    class_ids = itertools.count(class_base | 1)
    subjects, rulesets = _subjects(policies)
    groups = _groups(policies, refs, service_ids, rulesets)
    for (direction, scope, family), members in sorted(
        groups.items(), key=lambda g: (g[0][0].value, g[0][1], g[0][2])
    ):
        made_cidrs, made_ports = classes(direction, scope, family, members, class_ids)
        cidrs += made_cidrs
        ports += made_ports
    return attrs.evolve(_compiled(policies, cidrs, ports), subjects=subjects, rulesets=rulesets)


def prefix_walk(
    by_cidr: dict[tuple[int, int], Any], bits: int
) -> Callable[[int, int], Iterator[Any]]:
    """For a network (prefix length, address), what ``by_cidr`` holds for it and for
    every network containing it, walking only the prefix lengths present."""
    lengths = sorted({length for length, _ in by_cidr}, reverse=True)

    def walk(prefixlen: int, network: int) -> Iterator[Any]:
        for length in lengths:
            if length <= prefixlen:
                mask = ((1 << length) - 1) << (bits - length) if length else 0
                found = by_cidr.get((length, network & mask))
                if found is not None:
                    yield found

    return walk


def classes(
    direction: Direction,
    scope: int,
    family: int,
    members: Sequence[RuleRef],
    class_ids: Iterator[int],
) -> tuple[list[CidrEntry], list[PortEntry]]:
    """The classes of one scope and family (``members``: its rules), each with the
    rules whose CIDRs contain it, and the port entries of those that spill."""
    bits = 32 if family == 4 else 128
    net_type = ipaddress.IPv4Network if family == 4 else ipaddress.IPv6Network
    by_cidr: dict[tuple[int, int], list[RuleRef]] = {}
    for ref in members:
        cidr = ref.rule.cidr
        at = (0, 0) if cidr is None else (cidr.prefixlen, int(cidr.network_address))
        by_cidr.setdefault(at, []).append(ref)
    up = prefix_walk(by_cidr, bits)
    cidrs: list[CidrEntry] = []
    ports: list[PortEntry] = []
    for prefixlen, network in sorted(by_cidr):
        applying = [ref for found in up(prefixlen, network) for ref in found]
        class_id = next(class_ids)
        pieces = _pieces(applying)
        inline = _compact(pieces)
        spilled = len(inline) > INLINE
        if spilled:
            ports.extend(_port_entries(class_id, pieces))
        cidrs.append(
            CidrEntry(
                direction,
                scope,
                family,
                net_type((network, prefixlen)),
                class_id,
                () if spilled else tuple(inline),
                spilled,
            )
        )
    return cidrs, ports


def _subjects(policies: Sequence[Policy]) -> tuple[list[SubjectEntry], dict[Ruleset, int]]:
    """The endpoint CIDRs of the policies with subjects, each with the rule set of
    the policies for it: those whose subjects contain it (the longest match in the
    kernel then finds, for an address, every policy with a subject containing it),
    with the policies for every endpoint. Equal sets are one rule set."""
    entries: list[SubjectEntry] = []
    rulesets: dict[Ruleset, int] = {}
    by_name = {p.name: p for p in policies}
    for direction in (Direction.INGRESS, Direction.EGRESS):
        everyone_denies = any(
            p.direction is direction and not p.subjects and p.default is Action.DENY
            for p in policies
        )
        for family in (4, 6):
            bits = 32 if family == 4 else 128
            by_cidr: dict[tuple[int, int], list[str]] = {}
            for p in policies:
                if p.direction is not direction:
                    continue
                for subject in p.subjects:
                    if subject.version == family:
                        at = (subject.prefixlen, int(subject.network_address))
                        by_cidr.setdefault(at, []).append(p.name)
            up = prefix_walk(by_cidr, bits)
            for prefixlen, network in sorted(by_cidr):
                members = frozenset(name for found in up(prefixlen, network) for name in found)
                number = rulesets.setdefault((direction, members), len(rulesets) + 1)
                deny = everyone_denies or any(by_name[n].default is Action.DENY for n in members)
                net_type = ipaddress.IPv4Network if family == 4 else ipaddress.IPv6Network
                entries.append(
                    SubjectEntry(
                        direction,
                        family,
                        net_type((network, prefixlen)),
                        POLICY_RULESET | number,
                        deny,
                    )
                )
    return entries, rulesets


def _groups(
    policies: Sequence[Policy],
    refs: Sequence[RuleRef],
    service_ids: dict[str, list[int]],
    rulesets: dict[Ruleset, int] | None = None,
) -> dict[tuple[Direction, int, int], list[RuleRef]]:
    """The rules by (direction, scope, family): a rule naming a service is in the
    scope of each installed service of that name; the others of policies for every
    endpoint in scope 0 (which endpoints with a rule set also meet); those of policies
    with subjects in the rule sets they are members of."""
    by_policy = {p.name: p for p in policies}
    groups: dict[tuple[Direction, int, int], list[RuleRef]] = {}
    own: dict[str, list[RuleRef]] = {}
    for ref in refs:
        own.setdefault(ref.policy, []).append(ref)

    def add(scope: int, direction: Direction, ref: RuleRef) -> None:
        families = (ref.rule.cidr.version,) if ref.rule.cidr is not None else (4, 6)
        for family in families:
            groups.setdefault((direction, scope, family), []).append(ref)

    for ref in refs:
        policy = by_policy[ref.policy]
        if ref.rule.service is not None:
            for scope in service_ids[ref.rule.service]:
                add(scope, policy.direction, ref)
        elif not policy.subjects:
            add(0, policy.direction, ref)
    for (direction, members), number in (rulesets or {}).items():
        for name in sorted(members):
            for ref in own.get(name, ()):
                add(POLICY_RULESET | number, direction, ref)
    return groups


def _pieces(applying: list[RuleRef]) -> list[Piece]:
    """The port ranges of one class (the rules whose CIDRs contain it), per
    protocol code, each with the rule that decides it."""
    pieces: list[Piece] = []
    for code in PROTO_CODES:
        relevant = [
            (
                (-r.rule.prefixlen, 0, r.policy, r.index),
                r.rule.action,
                r.id,
                r.rule.port_range if code in WITH_PORTS else (0, 65535),
                r.rule.prefixlen,
            )
            for r in applying
            if _protocol_matches(r.rule, code)
        ]
        for low, high, action, rule_id, cidr_len in _resolve(relevant):
            if code not in WITH_PORTS:
                low, high = 0, 65535
            pieces.append(Piece(code, low, high, action, rule_id, cidr_len))
    return pieces


def _compact(pieces: list[Piece]) -> list[Piece]:
    """``pieces`` in fewer when they do not fit inline: when every protocol code is
    covered on every port (a rule for every protocol and port applies, as a
    NetworkPolicy peer without ports), the codes decided by one same piece share a
    single last piece for every protocol (PIECE_EVERY), after the others' own."""
    if len(pieces) <= INLINE:
        return pieces
    by_code: dict[int, list[Piece]] = {}
    for piece in pieces:
        by_code.setdefault(piece.proto, []).append(piece)
    if len(by_code) != len(PROTO_CODES):
        return pieces  # a code without pieces: a piece for every protocol would cover it
    for own in by_code.values():
        edge = -1
        for piece in sorted(own, key=lambda p: p.low):
            if piece.low != edge + 1:
                return pieces
            edge = piece.high
        if edge != 65535:
            return pieces  # a gap: there the protocol's verdict is no rule's

    def decision(own: list[Piece]) -> tuple[Action, int, int] | None:
        """What a code's single piece decides (None: the code has several)."""
        return (own[0].action, own[0].rule_id, own[0].cidr_prefixlen) if len(own) == 1 else None

    whole = collections.Counter(d for own in by_code.values() if (d := decision(own)))
    if not whole:
        return pieces
    shared, count = whole.most_common(1)[0]
    if count < 2:
        return pieces
    kept = [p for own in by_code.values() if decision(own) != shared for p in own]
    return [*kept, Piece(PIECE_EVERY, 0, 65535, *shared)]


def _port_entries(class_id: int, pieces: list[Piece]) -> Iterator[PortEntry]:
    """A spilled class's pieces as port-trie entries (prefixes covering each range)."""
    for piece in pieces:
        for port, length in port_prefixes(piece.low, piece.high):
            yield PortEntry(
                class_id,
                piece.proto,
                port,
                length,
                piece.action,
                piece.rule_id,
                piece.cidr_prefixlen,
            )


def flags(policies: Sequence[Policy]) -> Compiled:
    """The head flags of ``policies``, no lookup entries compiled."""
    return _compiled(policies, [], [])


def _compiled(
    policies: Sequence[Policy], cidrs: list[CidrEntry], ports: list[PortEntry]
) -> Compiled:
    return Compiled(
        cidrs=cidrs,
        ports=ports,
        ingress_on=any(p.direction is Direction.INGRESS for p in policies),
        ingress_deny=any(
            p.direction is Direction.INGRESS and p.default is Action.DENY and not p.subjects
            for p in policies
        ),
        ingress_service_rules=any(r.service is not None for p in policies for r in p.rules),
        egress_on=any(p.direction is Direction.EGRESS for p in policies),
        egress_deny=any(
            p.direction is Direction.EGRESS and p.default is Action.DENY and not p.subjects
            for p in policies
        ),
        subject_directions=frozenset(p.direction for p in policies if p.subjects),
        everyone_directions=frozenset(
            p.direction
            for p in policies
            if not p.subjects and any(r.service is None for r in p.rules)
        ),
    )


def check_policies(policies: Iterable[Any], service_names: Iterable[str]) -> list[Policy]:
    """``policies`` as a list, after checking what the model cannot check alone: unique
    names, and that every service a rule names exists. Raises ``ValueError``."""
    names = set(service_names)
    result: list[Policy] = []
    seen: set[str] = set()
    for policy in policies:
        if not isinstance(policy, Policy):
            raise ValueError(f"expected a Policy, got {policy!r}")
        if policy.name in seen:
            raise ValueError(f"two policies are named {policy.name!r}; names must be unique")
        seen.add(policy.name)
        if policy.subjects:
            result.append(policy)  # its rules name no service: Policy refuses that
            continue
        for index, rule in enumerate(policy.rules):
            if rule.service is not None and rule.service not in names:
                known = ", ".join(sorted(repr(n) for n in names if n)) or "none"
                raise ValueError(
                    f"policy {policy.name!r} rule {index} ({rule}) names service "
                    f"{rule.service!r}, which is not installed (or this change removes it); "
                    f"services by name: {known}"
                )
        result.append(policy)
    return result


__all__ = [
    "Compiled",
    "Packet",
    "RuleRef",
    "SubjectEntry",
    "Verdict",
    "check_policies",
    "classes",
    "compile_policies",
    "evaluate",
    "flags",
    "port_prefixes",
    "prefix_walk",
]
