"""Policies as values: validation, the reference semantics, and the compiler
(checked against the reference with a Python model of the kernel's lookups)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyebpflb.model import Action, Backend, Direction, Policy, Rule, Service
from pyebpflb.policy import (
    ICMP,
    OTHER,
    PIECE_EVERY,
    SCTP,
    TCP,
    UDP,
    Compiled,
    Packet,
    RuleRef,
    check_policies,
    compile_policies,
    evaluate,
    port_prefixes,
)

# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cidr": "10.0.0.0/33"}, "'10.0.0.0/33' is not an IPv4 or IPv6 CIDR"),
        ({"cidr": "10.0.0.1/8"}, "has host bits set; the network is '10.0.0.0/8'"),
        ({"cidr": "banana"}, "'banana' is not an IPv4 or IPv6 CIDR"),
        ({"cidr": 42}, "cidr must be an IPv4 or IPv6 CIDR such as '10.0.0.0/8', got 42"),
        (
            {"protocol": "gre"},
            "protocol must be one of 'tcp', 'udp', 'sctp', 'icmp', 'any', got 'gre'",
        ),
        ({"protocol": "tcp", "ports": 0}, "ports must be a port from 1 to 65535"),
        ({"protocol": "tcp", "ports": 70000}, "got 70000"),
        ({"protocol": "tcp", "ports": (90, 80)}, "ports range (90, 80) is empty"),
        ({"protocol": "tcp", "ports": "80"}, "got '80'"),
        ({"protocol": "tcp", "ports": (1, 2, 3)}, "got (1, 2, 3)"),
        ({"protocol": "icmp", "ports": 80}, "ports (80, 80) need protocol 'tcp', 'udp' or 'sctp'"),
        ({"ports": 80}, "got protocol 'any'"),
        ({"service": ""}, "service must be the name of a service, got ''"),
        ({"origin": ""}, "origin must be a printable line saying where a rule comes from"),
        ({"origin": "rule\n1"}, "got 'rule\\n1'"),
        ({"origin": "é" * 32}, "origin must be at most 63 bytes of UTF-8, got 64"),
    ],
)
def test_bad_rules_name_the_value(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as error:
        Rule("allow", **kwargs)  # type: ignore[arg-type]
    assert message in str(error.value)


def test_an_origin_fits_the_kernel_s_field() -> None:
    from pyebpflb._bpf._libbpf import ffi
    from pyebpflb.model import RULE_ORIGIN_MAX_BYTES

    assert len(ffi.new("struct pyebpflb_policy_rule *").origin) == RULE_ORIGIN_MAX_BYTES + 1
    assert Rule("allow", origin="é" * 31 + "x").origin == "é" * 31 + "x"  # 63 bytes


def test_bad_policies_name_the_value() -> None:
    with pytest.raises(ValueError, match="action must be 'allow' or 'deny', got 'permit'"):
        Rule("permit")
    with pytest.raises(ValueError, match="default must be 'allow' or 'deny', got 'drop'"):
        Policy("p", default="drop")
    with pytest.raises(ValueError, match="direction must be 'ingress' or 'egress', got 'in'"):
        Policy("p", direction="in")
    with pytest.raises(ValueError, match="policy name must be a non-empty string, got ''"):
        Policy("")
    with pytest.raises(ValueError, match="rules must be Rule objects, got 'allow'"):
        Policy("p", rules=["allow"])
    with pytest.raises(ValueError, match="use direction='ingress'"):
        Policy("p", [Rule("allow", service="web")], direction="egress")


def test_rules_normalize() -> None:
    rule = Rule("DENY", "fd00::/64", "TCP", 443)
    assert rule.action is Action.DENY
    assert rule.cidr == ipaddress.ip_network("fd00::/64")
    assert rule.ports == (443, 443)
    assert Rule("allow", ipaddress.ip_address("10.0.0.1")).cidr == ipaddress.ip_network(
        "10.0.0.1/32"
    )
    assert str(Rule("allow", "10.0.0.0/8", "udp", (53, 54), service="dns")) == (
        "allow 10.0.0.0/8 udp ports 53-54 to service dns"
    )


def test_check_policies_refuses_unknown_services_and_twins() -> None:
    web = Policy("web", [Rule("allow", "10.0.0.0/8", service="default/web")])
    assert check_policies([web], ["default/web"]) == [web]
    with pytest.raises(ValueError) as error:
        check_policies([web], ["default/db"])
    assert "names service 'default/web', which is not installed" in str(error.value)
    assert "'default/db'" in str(error.value)
    with pytest.raises(ValueError, match="two policies are named 'web'"):
        check_policies([web, web], ["default/web"])


# -- semantics ---------------------------------------------------------------------------


def pkt(src: str = "10.1.2.3", dst: str = "10.9.9.9", **kw: object) -> Packet:
    return Packet(src, dst, **kw)  # type: ignore[arg-type]


def test_deny_beats_allow_whatever_the_prefix() -> None:
    policy = Policy("p", [Rule("allow", "10.1.2.3/32"), Rule("deny", "10.0.0.0/8")])
    verdict = evaluate([policy], pkt())
    assert (verdict.action, verdict.rule) == (Action.DENY, 1)


def test_most_specific_prefix_is_the_rule_that_decides() -> None:
    policy = Policy(
        "p", [Rule("allow", "10.0.0.0/8"), Rule("allow", "10.1.0.0/16"), Rule("allow", None)]
    )
    assert evaluate([policy], pkt()).rule == 1
    assert evaluate([policy], pkt(src="192.168.0.1")).rule == 2


def test_port_ranges_are_inclusive() -> None:
    policy = Policy("p", [Rule("allow", None, "tcp", (80, 90))], default="deny")
    assert [evaluate([policy], pkt(dst_port=p)).allowed for p in (79, 80, 90, 91)] == [
        False,
        True,
        True,
        False,
    ]


def test_default_deny_and_no_policy() -> None:
    deny = Policy("p", [Rule("allow", "10.0.0.0/8", "udp")], default="deny")
    assert evaluate([deny], pkt(protocol="tcp")).reason == "default"
    assert not evaluate([deny], pkt(protocol="tcp")).allowed
    assert evaluate([deny], pkt(protocol="udp")).allowed
    # One default-deny policy makes the whole direction deny by default.
    assert not evaluate([deny, Policy("q")], pkt(protocol="tcp")).allowed
    # Egress policies do not see ingress packets.
    egress = Policy("e", default="deny", direction="egress")
    assert evaluate([egress], pkt()).reason == "no policy"


def test_egress_matches_the_destination() -> None:
    policy = Policy("e", [Rule("deny", "10.9.9.9/32")], direction="egress")
    assert not evaluate([policy], pkt(direction="egress")).allowed
    assert evaluate([policy], pkt(src="10.9.9.9", dst="10.1.1.1", direction="egress")).allowed


def test_protocols() -> None:
    policy = Policy(
        "p", [Rule("allow", None, "icmp"), Rule("allow", None, "tcp", 22)], default="deny"
    )
    assert evaluate([policy], pkt(protocol="icmp")).allowed
    assert evaluate([policy], Packet("fd00::1", "fd00::2", protocol="icmp")).allowed
    assert not evaluate([policy], pkt(protocol=47)).allowed  # GRE: only "any" rules
    assert evaluate([Policy("q", [Rule("allow")], default="deny")], pkt(protocol=47)).allowed


def test_ports_unknown_match_only_rules_for_every_port() -> None:
    policy = Policy(
        "p", [Rule("allow", None, "udp", 53), Rule("allow", None, "tcp")], default="deny"
    )
    assert not evaluate([policy], pkt(protocol="udp", dst_port=None)).allowed
    assert evaluate([policy], pkt(protocol="tcp", dst_port=None)).allowed


def test_neighbour_discovery_always_passes() -> None:
    policy = Policy("p", default="deny")
    assert evaluate([policy], Packet("fe80::1", "ff02::1", "icmp", icmp_type=135)).allowed
    assert not evaluate([policy], Packet("fe80::1", "ff02::1", "icmp", icmp_type=128)).allowed
    assert evaluate([policy], Packet("fe80::1", "ff02::16", "icmp", icmp_type=143)).allowed


def test_service_rules_see_the_vip_others_the_backend() -> None:
    web = Service("10.96.0.10", 80, name="web", backends=[Backend("10.0.1.1", 8080)])
    policy = Policy(
        "p",
        [
            Rule("allow", "10.1.0.0/16", "tcp", 80, service="web"),
            Rule("deny", "10.1.2.3/32", "tcp", 8080),
        ],
        default="deny",
    )
    to_vip = pkt(dst="10.96.0.10", dst_port=80)
    assert evaluate([policy], to_vip, service=web, backend=web.backends[0]).rule == 1
    other = pkt(src="10.1.2.4", dst="10.96.0.10", dst_port=80)
    assert evaluate([policy], other, service=web, backend=web.backends[0]).allowed
    # Not addressed to the service: its rules do not apply.
    assert not evaluate([policy], other).allowed
    # Equal prefixes: the service's rule is the one reported.
    tie = Policy(
        "t",
        [Rule("allow", "10.1.0.0/16", "tcp", 8080), Rule("allow", "10.1.0.0/16", service="web")],
    )
    assert evaluate([tie], to_vip, service=web, backend=web.backends[0]).rule == 1


# -- the compiler --------------------------------------------------------------------------


@given(st.integers(0, 65535), st.integers(0, 65535))
def test_port_prefixes_cover_exactly(a: int, b: int) -> None:
    low, high = min(a, b), max(a, b)
    covered = []
    for start, length in port_prefixes(low, high):
        size = 1 << (16 - length)
        assert start % size == 0
        covered.extend(range(start, start + size))
    assert covered == list(range(low, high + 1))


def lpm_lookup(compiled: Compiled, packet: Packet, scope: int, port: int | None) -> object:
    """What the kernel's two lookups find, computed over the compiled entries."""
    peer = packet.peer
    classes = [
        c
        for c in compiled.cidrs
        if c.direction is packet.direction
        and c.scope == scope
        and c.family == peer.version
        and peer in c.network
    ]
    if not classes:
        return None
    best = max(classes, key=lambda c: c.network.prefixlen)
    code = packet.proto_code
    look = port if code in (TCP, UDP, SCTP) else 0
    assert look is not None
    if not best.spilled:
        assert len(best.pieces) <= 4
        every = [p for p in best.pieces if p.proto == PIECE_EVERY]
        assert every in ([], list(best.pieces[-1:])), "a piece for every protocol comes last"
        # The kernel's loop: the first piece of the packet's code, or for every protocol.
        found = [
            p for p in best.pieces if p.proto in (code, PIECE_EVERY) and p.low <= look <= p.high
        ]
        assert len([p for p in found if p.proto == code]) <= 1, "pieces of one class overlap"
        return found[0] if found else None
    hits = [
        p
        for p in compiled.ports
        if p.class_id == best.class_id
        and p.proto == code
        and p.port <= look < p.port + (1 << (16 - p.port_prefixlen))
    ]
    assert len(hits) <= 1, "port prefixes of one class overlap"
    return hits[0] if hits else None


CIDRS4 = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "192.168.0.0/16", None]
CIDRS6 = ["fd00::/8", "fd00:1::/32", "fd00:1::3/128", None]
PORTS = [None, 22, 80, 8080, (1, 1024), (80, 8080), (8000, 9000), (65535, 65535)]

rules = st.builds(
    Rule,
    action=st.sampled_from(["allow", "deny"]),
    cidr=st.sampled_from(CIDRS4 + CIDRS6),
    protocol=st.sampled_from(["tcp", "udp", "sctp", "icmp", "any"]),
).flatmap(
    lambda r: st.sampled_from(PORTS if r.protocol.value in ("tcp", "udp", "sctp") else [None]).map(
        lambda ports: Rule(r.action, r.cidr, r.protocol, ports)
    )
)
policies = st.lists(
    st.builds(
        lambda i, rs, default, direction: Policy(f"p{i}", rs, default, direction),
        st.integers(0, 3),
        st.lists(rules, max_size=6),
        st.sampled_from(["allow", "deny"]),
        st.sampled_from(["ingress", "egress"]),
    ),
    max_size=3,
    unique_by=lambda p: p.name,
)
packets = st.builds(
    Packet,
    src=st.sampled_from(["10.1.2.3", "10.1.9.9", "10.200.0.1", "192.168.4.4", "172.16.0.1"]),
    dst=st.sampled_from(["10.1.2.3", "10.5.5.5", "192.168.4.4"]),
    protocol=st.sampled_from(["tcp", "udp", "sctp", "icmp", 47]),
    dst_port=st.sampled_from([None, 0, 1, 22, 80, 1024, 1025, 8080, 8500, 9001, 65535]),
    direction=st.sampled_from(["ingress", "egress"]),
)
packets6 = st.builds(
    Packet,
    src=st.sampled_from(["fd00:1::3", "fd00:1::4", "fd00:2::1", "fe80::1"]),
    dst=st.sampled_from(["fd00:1::3", "fd00:9::9"]),
    protocol=st.sampled_from(["tcp", "udp", "sctp", "icmp", 47]),
    dst_port=st.sampled_from([None, 22, 80, 8080, 65535]),
    direction=st.sampled_from(["ingress", "egress"]),
)


@settings(max_examples=300, deadline=None)
@given(policies, st.lists(st.one_of(packets, packets6), min_size=1, max_size=10))
def test_compiled_tables_decide_as_the_reference(
    installed: list[Policy], sample: list[Packet]
) -> None:
    refs = [
        RuleRef(100 * int(p.name[1:]) + i + 1, p.name, i, r)
        for p in installed
        for i, r in enumerate(p.rules)
    ]
    by_id = {r.id: r for r in refs}
    compiled = compile_policies(installed, refs, {})
    for packet in sample:
        expected = evaluate(installed, packet)
        on = compiled.ingress_on if packet.direction is Direction.INGRESS else compiled.egress_on
        deny = (
            compiled.ingress_deny if packet.direction is Direction.INGRESS else compiled.egress_deny
        )
        hit = lpm_lookup(compiled, packet, 0, packet.dst_port)
        if not on:
            assert expected.reason == "no policy"
        elif hit is None:
            assert expected.reason == "default"
            assert expected.allowed is not deny
        else:
            ref = by_id[hit.rule_id]  # type: ignore[attr-defined]
            assert (expected.action, expected.policy, expected.rule) == (
                hit.action,  # type: ignore[attr-defined]
                ref.policy,
                ref.index,
            )


def test_small_classes_carry_their_ranges_large_ones_spill() -> None:
    installed = [
        Policy(
            "p",
            [
                Rule("allow", "10.0.0.0/8"),
                Rule("deny", "10.1.0.0/16", "icmp"),
                Rule("allow", "10.2.0.0/16", "tcp", 22),
            ],
        )
    ]
    refs = [RuleRef(i + 1, "p", i, r) for i, r in enumerate(installed[0].rules)]
    compiled = compile_policies(installed, refs, {})
    shapes = {str(c.network): [(p.proto, p.low, p.high) for p in c.pieces] for c in compiled.cidrs}
    # /8: allow for every protocol and port, 8 protocol codes: one piece for them all.
    # /16s: the codes with pieces of their own (ICMP denied; TCP's port 22 by the
    # narrower rule) come first, then that piece for the others.
    every = (PIECE_EVERY, 0, 65535)
    assert shapes == {
        "10.0.0.0/8": [every],
        "10.1.0.0/16": [(ICMP, 0, 65535), every],
        "10.2.0.0/16": [(TCP, 0, 21), (TCP, 22, 22), (TCP, 23, 65535), every],
    }
    assert not any(c.spilled for c in compiled.cidrs) and compiled.ports == []
    # With a gap in a protocol's ports, no piece may stand for every protocol: spilled,
    # each code its own entries; ICMP and other protocols one entry for every port.
    ranges = [Rule("allow", "10.3.0.0/16", "tcp", (p, p)) for p in (1, 3, 5, 7)]
    gappy = [Policy("g", [Rule("allow", "10.3.0.0/16", "icmp"), *ranges])]
    compiled = compile_policies(
        gappy, [RuleRef(i + 1, "g", i, r) for i, r in enumerate(gappy[0].rules)], {}
    )
    (entry,) = compiled.cidrs
    assert entry.spilled and {p.proto for p in compiled.ports} == {TCP, ICMP}
    for port_entry in compiled.ports:
        if port_entry.proto in (ICMP, OTHER):
            assert port_entry.port_prefixlen == 0
    alone = [Policy("q", [Rule("allow", "10.0.0.0/8", "tcp", (80, 90))])]
    (entry,) = compile_policies(alone, [RuleRef(1, "q", 0, alone[0].rules[0])], {}).cidrs
    assert not entry.spilled
    assert [(p.proto, p.low, p.high) for p in entry.pieces] == [(TCP, 80, 90)]


# -- subjects ------------------------------------------------------------------------------


def test_a_policy_with_subjects_isolates_only_them() -> None:
    """Kubernetes: a pod selected by a policy of a type is isolated for that type;
    the other pods are untouched (network_policy.go "should support a 'default-deny-
    ingress' policy" in one namespace leaves the others open)."""
    deny_web = Policy("shop/deny", [], default="deny", subjects=["10.0.1.0/24"])
    to_web = Packet("10.0.9.9", "10.0.1.5", "tcp", 1234, 80)
    to_db = Packet("10.0.9.9", "10.0.2.5", "tcp", 1234, 5432)
    assert evaluate([deny_web], to_web) == evaluate([deny_web], to_web)  # pure
    assert evaluate([deny_web], to_web).reason == "default"
    assert not evaluate([deny_web], to_web).allowed
    assert evaluate([deny_web], to_db).reason == "no policy"
    # Egress subjects are sources: the web pods' outgoing traffic, not the others'.
    out = Policy("shop/out", [], default="deny", direction="egress", subjects=["10.0.1.5"])
    assert not evaluate([out], Packet("10.0.1.5", "1.1.1.1", "udp", 5, 53, "egress")).allowed
    assert evaluate([out], Packet("10.0.1.6", "1.1.1.1", "udp", 5, 53, "egress")).allowed


def test_rules_of_policies_for_one_subject_combine_and_others_do_not_leak() -> None:
    """Allow rules union over the policies that select the endpoint; a policy for
    another endpoint adds nothing to it (network_policy.go "should enforce policy to
    allow traffic only from a pod ... " with two policies)."""
    web = Policy("a", [Rule("allow", "10.0.9.0/24", "tcp", 80)], "deny", subjects=["10.0.1.5"])
    more = Policy("b", [Rule("allow", "10.0.8.0/24")], "deny", subjects=["10.0.1.0/24"])
    other = Policy("c", [Rule("allow", "10.0.7.0/24")], "deny", subjects=["10.0.2.5"])
    policies = [web, more, other]
    assert evaluate(policies, Packet("10.0.9.1", "10.0.1.5", "tcp", 1, 80)).policy == "a"
    assert evaluate(policies, Packet("10.0.8.1", "10.0.1.5", "tcp", 1, 22)).policy == "b"
    assert not evaluate(policies, Packet("10.0.7.1", "10.0.1.5", "tcp", 1, 80)).allowed
    assert evaluate(policies, Packet("10.0.7.1", "10.0.2.5", "tcp", 1, 80)).policy == "c"


def test_the_subject_of_a_translated_packet_is_its_backend() -> None:
    """Policies on a pod reached through a Service act on the pod (after DNAT)."""
    web = Service("10.96.0.10", 80, name="shop/web", backends=[Backend("10.0.1.5", 8080)])
    policy = Policy("p", [Rule("allow", "10.0.9.0/24", "tcp", 8080)], "deny",
                    subjects=["10.0.1.5"])  # fmt: skip
    packet = Packet("10.0.9.1", "10.96.0.10", "tcp", 1, 80)
    assert evaluate([policy], packet, service=web, backend=web.backends[0]).allowed
    outsider = Packet("10.0.8.1", "10.96.0.10", "tcp", 1, 80)
    assert not evaluate([policy], outsider, service=web, backend=web.backends[0]).allowed


def test_an_isolated_endpoint_is_never_blocked_from_itself() -> None:
    policy = Policy("p", [], "deny", subjects=["10.0.1.5"])
    assert evaluate([policy], Packet("10.0.1.5", "10.0.1.5", "tcp", 1, 80)).reason == "self"


def test_subjects_are_validated() -> None:
    with pytest.raises(ValueError, match="subjects must be a list of addresses or CIDRs"):
        Policy("p", [], subjects="10.0.0.1")
    with pytest.raises(ValueError, match="has host bits set"):
        Policy("p", [], subjects=["10.0.0.1/8"])
    with pytest.raises(ValueError, match="polices the real endpoints, after translation"):
        Policy("p", [Rule("allow", service="shop/web")], subjects=["10.0.0.1"])
    assert Policy("p", [], subjects=["10.0.0.2", "10.0.0.1", "10.0.0.2"]).subjects == (
        ipaddress.ip_network("10.0.0.1/32"),
        ipaddress.ip_network("10.0.0.2/32"),
    )
