"""Policy in the kernel, packet by packet (BPF_PROG_TEST_RUN): for random
policies and random packets the programs' verdict is the reference
evaluator's (pyebpflb.policy.evaluate), IPv4 and IPv6, with and without
services, fragments included; and the stateful parts the evaluator leaves
out: answers, ICMP errors, fragments after their first."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lbtest import TC_ACT_OK, TC_ACT_SHOT, datapath, run
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6MLReport2,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    RouterAlert,
)
from scapy.layers.l2 import Ether
from scapy.layers.sctp import SCTP, SCTPChunkInit
from scapy.packet import Raw

import pyebpflb as lb
from pyebpflb import k8s
from pyebpflb.model import Direction, Policy, Rule
from pyebpflb.policy import Packet, Verdict, evaluate

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

WEB4 = lb.Service("10.96.0.10", 80, name="web", backends=[lb.Backend("10.0.1.1", 8080)])
DNS4 = lb.Service("10.96.0.10", 53, "udp", name="web", backends=[lb.Backend("10.0.1.2", 5353)])
WEB6 = lb.Service("fd00:96::10", 80, name="web6", backends=[lb.Backend("fd00:2::1", 8080)])
SERVICES = [WEB4, DNS4, WEB6]
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def dp() -> Iterator[lb.Datapath]:
    with datapath("policy", max_conntrack=1024) as dp:
        dp.sync(SERVICES)
        yield dp


def frame(packet: Packet, *, first_fragment: bool = False, icmp_type: int | None = None) -> Any:
    """The Ethernet frame of ``packet`` (``dst_port=None``: a later fragment)."""
    v4 = packet.family == 4
    proto = packet.protocol
    later = proto in (6, 17, 132) and packet.dst_port is None
    ip: Any = (
        IP(src=str(packet.src), dst=str(packet.dst))
        if v4
        else IPv6(src=str(packet.src), dst=str(packet.dst))
    )
    frag_id = next(_ids)
    if later:
        if v4:
            ip.proto, ip.frag, ip.id = proto, 100, frag_id
        else:
            ip = ip / IPv6ExtHdrFragment(nh=proto, offset=100, id=frag_id, m=1)
        l4: Any = Raw(b"x" * 24)
    elif proto == 6:
        l4 = TCP(sport=40000, dport=packet.dst_port, flags="S") / Raw(b"hello")
    elif proto == 17:
        l4 = UDP(sport=40000, dport=packet.dst_port) / Raw(b"hello")
        if first_fragment:
            l4[UDP].len, l4[UDP].chksum = 1000, 0
    elif proto == 132:
        l4 = SCTP(sport=40000, dport=packet.dst_port) / SCTPChunkInit(init_tag=7)
    elif proto in (1, 58):
        kind = packet.icmp_type if icmp_type is None else icmp_type
        if v4:
            l4 = ICMP(type=8 if kind < 0 else kind, id=7)
        else:
            l4 = ICMPv6EchoRequest(id=7) if kind < 0 else ICMPv6ND_NS(tgt=str(packet.dst))
    else:
        l4 = Raw(b"gre-ish payload")
        if v4:
            ip.proto = proto
        else:
            ip.nh = proto
    if first_fragment:
        if v4:
            ip.flags, ip.id = "MF", frag_id
        else:
            ip = ip / IPv6ExtHdrFragment(nh=proto, offset=0, id=frag_id, m=1)
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip / l4


def program(packet: Packet) -> str:
    return "lb_ingress" if packet.direction is Direction.INGRESS else "lb_egress"


def denied_count(dp: lb.Datapath) -> int:
    return dp.drops()["policy denied"].packets


# -- differential -------------------------------------------------------------------------

CIDRS = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.3/32",
    "10.0.1.0/24",
    "192.168.0.0/16",
    "fd00::/8",
    "fd00:1::/32",
    "fd00:1::3/128",
    "fd00:2::/32",
    None,
]
PORTS = [None, 22, 53, 80, 5353, 8080, (1, 1024), (80, 8080), (8000, 9000)]


@st.composite
def rules(draw: st.DrawFn, ingress: bool) -> Rule:
    protocol = draw(st.sampled_from(["tcp", "udp", "sctp", "icmp", "any"]))
    ports = draw(st.sampled_from(PORTS)) if protocol in ("tcp", "udp", "sctp") else None
    service = draw(st.sampled_from([None, "web", "web6"])) if ingress else None
    return Rule(
        draw(st.sampled_from(["allow", "deny"])),
        draw(st.sampled_from(CIDRS)),
        protocol,
        ports,
        service=service,
    )


# Endpoints a policy may be for: none (every endpoint), backends of SERVICES, peers.
SUBJECTS = [
    (),
    (),
    ("10.0.1.1",),
    ("10.0.0.0/8",),
    ("10.1.2.3", "10.0.1.0/24"),
    ("10.1.0.0/16",),
    ("fd00:2::/32",),
    ("fd00:1::3", "fd00:2::1"),
]


@st.composite
def policy_sets(draw: st.DrawFn) -> list[Policy]:
    result = []
    for i in range(draw(st.integers(1, 4))):
        direction = draw(st.sampled_from(["ingress", "ingress", "egress"]))
        subjects = draw(st.sampled_from(SUBJECTS))
        # Rules naming a service apply before translation: not in a policy with subjects.
        service_rules = direction == "ingress" and not subjects
        result.append(
            Policy(
                f"p{i}",
                draw(st.lists(rules(service_rules), max_size=6)),
                default=draw(st.sampled_from(["allow", "deny"])),
                direction=direction,
                subjects=subjects,
            )
        )
    return result


PEERS4 = ["10.1.2.3", "10.1.7.7", "10.0.1.9", "10.0.1.1", "192.168.4.4", "172.16.0.1"]
PEERS6 = ["fd00:1::3", "fd00:1::4", "fd00:2::9", "fd00:2::1", "fd00:3::1"]


@st.composite
def cases(draw: st.DrawFn) -> tuple[Packet, lb.Service | None, bool]:
    """(packet, the service it is addressed to, sent as a first fragment)."""
    family = draw(st.sampled_from([4, 6]))
    peers = PEERS4 if family == 4 else PEERS6
    a, b = draw(st.sampled_from(peers)), draw(st.sampled_from(peers))
    direction = draw(st.sampled_from(["ingress", "egress"]))
    services = [s for s in SERVICES if s.vip.version == family]
    service = (
        draw(st.sampled_from([None, *services, *services])) if direction == "ingress" else None
    )
    if service is not None:
        packet = Packet(a, service.vip, service.protocol.value, 40000, service.port, direction)
        return packet, service, False
    protocol = draw(st.sampled_from(["tcp", "udp", "sctp", "icmp", 47]))
    port: int | None = 0
    if protocol in ("tcp", "udp", "sctp"):
        port = draw(st.sampled_from([None, 22, 53, 80, 1024, 5353, 8080, 8500, 9001]))
    packet = Packet(a, b, protocol, 40000, port, direction)
    first = port not in (None, 0) and draw(st.booleans())
    return packet, None, first


def kernel_agrees(
    dp: lb.Datapath,
    installed: list[Policy],
    packet: Packet,
    service: lb.Service | None,
    first: bool,
    context: str = "",
) -> tuple[Verdict, list[Any]]:
    """Run ``packet`` (conntrack flushed) and check the kernel's verdict is the
    reference's; the reference's verdict and what the program sent out."""
    dp.flush_conntrack()
    backend = service.backends[0] if service is not None else None
    expected = evaluate(installed, packet, service=service, backend=backend)
    retval, out = run(dp, program(packet), frame(packet, first_fragment=first))
    assert retval == (TC_ACT_OK if expected.allowed else TC_ACT_SHOT), (
        f"{packet} to {service}{context}: the kernel says {retval}, the reference {expected}"
    )
    return expected, out


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(policy_sets(), st.lists(cases(), min_size=4, max_size=16))
def test_kernel_verdicts_equal_the_reference(
    dp: lb.Datapath,
    installed: list[Policy],
    sample: list[tuple[Packet, lb.Service | None, bool]],
) -> None:
    dp.sync(SERVICES, installed)
    before = denied_count(dp)
    counted = {p.name: [t.packets for t in dp.policy_stats(p)] for p in installed}
    denied = 0
    for packet, service, first in sample:
        expected, out = kernel_agrees(dp, installed, packet, service, first)
        if expected.allowed and service is not None:
            assert out[1].dst == str(service.backends[0].address)
        denied += not expected.allowed
        if expected.reason == "rule":
            assert expected.policy is not None and expected.rule is not None
            counted[expected.policy][expected.rule] += 1
    assert denied_count(dp) - before == denied
    # Each packet was counted on the rule the reference says decided.
    now = {p.name: [t.packets for t in dp.policy_stats(p)] for p in installed}
    assert {
        name: [a - b for a, b in zip(now[name], counts, strict=True)]
        for name, counts in counted.items()
    } == {name: [0] * len(counts) for name, counts in now.items()}


@st.composite
def subject_policies(draw: st.DrawFn, prefix: str) -> list[Policy]:
    """Policies with subjects only (what a pod's label change alters)."""
    result = []
    for i in range(draw(st.integers(0, 4))):
        result.append(
            Policy(
                f"{prefix}{draw(st.integers(0, 5))}-{i}",
                draw(st.lists(rules(False), max_size=5)),
                default=draw(st.sampled_from(["allow", "deny"])),
                direction=draw(st.sampled_from(["ingress", "ingress", "egress"])),
                subjects=draw(st.sampled_from([s for s in SUBJECTS if s])),
            )
        )
    return list({p.name: p for p in result}.values())


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(subject_policies("s"), min_size=2, max_size=5),
    st.lists(cases(), min_size=6, max_size=12),
)
def test_patched_rule_sets_decide_as_the_reference(
    dp: lb.Datapath,
    steps: list[list[Policy]],
    sample: list[tuple[Packet, lb.Service | None, bool]],
) -> None:
    """Changing only policies with subjects patches the active generation in place
    (only the changed rule sets are written, endpoints re-pointed one by one); after
    each change the kernel decides as the reference, as a generation written whole."""
    everyone = [
        Policy("all-in", [Rule("deny", "10.1.7.7"), Rule("allow", None, "udp")], "allow"),
        Policy("all-out", [Rule("allow", "fd00:3::/64")], "allow", "egress"),
    ]
    # Each direction keeps a policy with subjects: the head's flags stay.
    keep = [
        Policy("keep", [], "deny", subjects=["172.16.0.0/12"]),
        Policy("keep-out", [], "deny", "egress", subjects=["172.16.0.0/12"]),
    ]
    dp.sync(SERVICES, [*everyone, *keep])
    gens = set()
    for wanted in steps:
        installed = [*everyone, *keep, *wanted]
        dp.set_policies(installed)
        assert sorted(dp.policies, key=str) == sorted(installed, key=str)
        gens.add(dp._state.policy.gen)
        for packet, service, first in sample:
            kernel_agrees(dp, installed, packet, service, first, f" under {wanted}")
    assert len(gens) == 1  # every change was a patch: the head never flipped


# -- what the reference leaves out: state -------------------------------------------------


def test_answers_of_a_flow_let_out_pass_a_default_deny(dp: lb.Datapath) -> None:
    out = Policy("out", [Rule("allow", "10.50.0.0/16", "tcp", 443)], direction="egress")
    closed = Policy("in", default="deny")
    dp.sync(SERVICES, [out, closed])
    dp.flush_conntrack()
    syn = Ether() / IP(src="10.1.2.3", dst="10.50.0.1") / TCP(sport=5555, dport=443, flags="S")
    answer = Ether() / IP(src="10.50.0.1", dst="10.1.2.3") / TCP(sport=443, dport=5555, flags="SA")
    stranger = Ether() / IP(src="10.50.0.1", dst="10.1.2.3") / TCP(sport=443, dport=5556)
    assert run(dp, "lb_ingress", answer)[0] == TC_ACT_SHOT  # nothing went out yet
    assert run(dp, "lb_egress", syn)[0] == TC_ACT_OK
    assert run(dp, "lb_ingress", answer)[0] == TC_ACT_OK
    assert run(dp, "lb_ingress", stranger)[0] == TC_ACT_SHOT
    # An ICMP error about the flow is part of it; one about another flow is not.
    quote = IP(src="10.1.2.3", dst="10.50.0.1") / TCP(sport=5555, dport=443)
    error = Ether() / IP(src="10.60.0.1", dst="10.1.2.3") / ICMP(type=3, code=4) / quote
    other = quote.copy()
    other[TCP].sport = 5557
    unrelated = Ether() / IP(src="10.60.0.1", dst="10.1.2.3") / ICMP(type=3, code=4) / other
    assert run(dp, "lb_ingress", error)[0] == TC_ACT_OK
    assert run(dp, "lb_ingress", unrelated)[0] == TC_ACT_SHOT
    # A denied flow leaves nothing for its answers.
    denied = Ether() / IP(src="10.1.2.3", dst="10.50.0.1") / TCP(sport=6000, dport=80, flags="S")
    dp.sync(SERVICES, [Policy("out", default="deny", direction="egress"), closed])
    assert run(dp, "lb_egress", denied)[0] == TC_ACT_SHOT
    back = Ether() / IP(src="10.50.0.1", dst="10.1.2.3") / TCP(sport=80, dport=6000, flags="SA")
    assert run(dp, "lb_ingress", back)[0] == TC_ACT_SHOT


def test_a_network_policy_s_sctp_port_is_enforced_and_its_answers_pass(dp: lb.Datapath) -> None:
    """A NetworkPolicy port of protocol SCTP (Kubernetes' ports[].protocol): the
    association's INIT to that port is admitted, to another port not; the pod's
    answers pass its egress default deny, a packet it starts does not. (This kernel
    has no SCTP module to send real SCTP: the packets run through the program.)"""
    pod = {"kind": "Pod", "metadata": {"name": "db", "namespace": "x", "labels": {"app": "db"}},
           "status": {"podIP": "10.0.1.1", "phase": "Running"}}  # fmt: skip
    policy = {"kind": "NetworkPolicy", "metadata": {"name": "db", "namespace": "x"},
              "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                       "policyTypes": ["Ingress", "Egress"],
                       "ingress": [{"from": [{"ipBlock": {"cidr": "10.1.0.0/16"}}],
                                    "ports": [{"protocol": "SCTP", "port": 5000}]}]}}  # fmt: skip
    done = k8s.network_policies([{"kind": "Namespace", "metadata": {"name": "x"}}, pod, policy])
    assert done.problems == [] and done.skipped == []
    dp.sync(SERVICES, done.policies)
    dp.flush_conntrack()

    def sctp(src: str, dst: str, sport: int, dport: int) -> Any:
        return Ether() / IP(src=src, dst=dst) / SCTP(sport=sport, dport=dport) / SCTPChunkInit()

    assert run(dp, "lb_egress", sctp("10.0.1.1", "10.1.2.3", 5000, 40000))[0] == TC_ACT_SHOT
    assert run(dp, "lb_ingress", sctp("10.1.2.3", "10.0.1.1", 40000, 5001))[0] == TC_ACT_SHOT
    assert run(dp, "lb_ingress", sctp("10.2.0.1", "10.0.1.1", 40000, 5000))[0] == TC_ACT_SHOT
    assert run(dp, "lb_ingress", sctp("10.1.2.3", "10.0.1.1", 40000, 5000))[0] == TC_ACT_OK
    assert run(dp, "lb_egress", sctp("10.0.1.1", "10.1.2.3", 5000, 40000))[0] == TC_ACT_OK
    assert run(dp, "lb_egress", sctp("10.0.1.1", "10.1.2.3", 5000, 40001))[0] == TC_ACT_SHOT
    assert dp.policy_stats("x/db")[0].packets == 1


def test_ping_answers_pass_by_identifier(dp: lb.Datapath) -> None:
    dp.sync(SERVICES, [Policy("in", default="deny")])
    dp.flush_conntrack()
    request = Ether() / IPv6(src="fd00:1::3", dst="fd00:9::9") / ICMPv6EchoRequest(id=9)
    reply = Ether() / IPv6(src="fd00:9::9", dst="fd00:1::3") / ICMPv6EchoReply(id=9)
    wrong = Ether() / IPv6(src="fd00:9::9", dst="fd00:1::3") / ICMPv6EchoReply(id=10)
    assert run(dp, "lb_egress", request)[0] == TC_ACT_OK
    assert run(dp, "lb_ingress", reply)[0] == TC_ACT_OK
    assert run(dp, "lb_ingress", wrong)[0] == TC_ACT_SHOT


@pytest.mark.parametrize("family", [4, 6])
def test_later_fragments_follow_their_first(dp: lb.Datapath, family: int) -> None:
    src, dst = ("10.1.2.3", "10.5.5.5") if family == 4 else ("fd00:1::3", "fd00:9::9")
    dns = Policy("in", [Rule("allow", None, "udp", 53)], default="deny")
    dp.sync(SERVICES, [dns])
    dp.flush_conntrack()
    for port, verdict in ((53, TC_ACT_OK), (54, TC_ACT_SHOT)):
        packet = Packet(src, dst, "udp", 40000, port)
        first = frame(packet, first_fragment=True)
        frag_id = first[IP].id if family == 4 else first[IPv6ExtHdrFragment].id
        later = frame(Packet(src, dst, "udp", 40000, None))
        if family == 4:
            later[IP].id = frag_id
        else:
            later[IPv6ExtHdrFragment].id = frag_id
        assert run(dp, "lb_ingress", first)[0] == verdict
        assert run(dp, "lb_ingress", later)[0] == verdict
    # Under a deny of the port, nothing of the datagram passes; without the first,
    # a later fragment has no port to be allowed by.
    dp.sync(SERVICES, [Policy("in", [Rule("deny", None, "udp", 53)])])
    packet = Packet(src, dst, "udp", 40000, 53)
    assert run(dp, "lb_ingress", frame(packet, first_fragment=True))[0] == TC_ACT_SHOT
    dp.sync(SERVICES, [dns])
    dp.flush_conntrack()
    orphan = frame(Packet(src, dst, "udp", 40000, None))
    assert run(dp, "lb_ingress", orphan)[0] == TC_ACT_SHOT


def test_unparseable_packets_are_dropped_under_policy(dp: lb.Datapath) -> None:
    # Seven hop-by-hop headers: more than the datapath follows, so the TCP
    # header (and its port) is not found. The kernel would still deliver it.
    deep: Any = IPv6(src="fd00:1::3", dst="fd00:9::9")
    for _ in range(7):
        deep = deep / IPv6ExtHdrHopByHop()
    deep = Ether() / deep / TCP(dport=22, flags="S")
    truncated = Ether(bytes(Ether() / IP(src="10.1.2.3", dst="10.5.5.5") / TCP(dport=22))[:40])
    dp.sync(SERVICES, [])
    assert run(dp, "lb_ingress", deep)[0] == TC_ACT_OK  # no policy: untouched
    dp.sync(SERVICES, [Policy("in", [Rule("deny", None, "tcp", 22)])])
    drops = dp.drops()
    assert run(dp, "lb_ingress", deep)[0] == TC_ACT_SHOT
    assert run(dp, "lb_ingress", truncated)[0] == TC_ACT_SHOT
    after = dp.drops()
    assert after["unsupported packet"].packets == drops["unsupported packet"].packets + 1
    assert after["malformed packet"].packets == drops["malformed packet"].packets + 1
    # IPv4 options move the TCP header; the port is still found.
    options = Ether() / IP(src="10.1.2.3", dst="10.5.5.5", options=b"\x01" * 8) / TCP(dport=22)
    assert run(dp, "lb_ingress", options)[0] == TC_ACT_SHOT
    options[TCP].dport = 23
    assert run(dp, "lb_ingress", options)[0] == TC_ACT_OK


def test_neighbour_discovery_passes_default_deny(dp: lb.Datapath) -> None:
    dp.sync(
        SERVICES, [Policy("in", default="deny"), Policy("out", default="deny", direction="egress")]
    )
    solicit = Ether() / IPv6(src="fe80::1", dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt="fe80::2")
    assert run(dp, "lb_ingress", solicit)[0] == TC_ACT_OK
    assert run(dp, "lb_egress", solicit)[0] == TC_ACT_OK
    # A multicast listener report behind its hop-by-hop router alert, as Linux sends them.
    report = (
        Ether()
        / IPv6(src="fe80::1", dst="ff02::16", hlim=1)
        / IPv6ExtHdrHopByHop(options=[RouterAlert()])
        / ICMPv6MLReport2()
    )
    assert run(dp, "lb_ingress", report)[0] == TC_ACT_OK
    echo = Ether() / IPv6(src="fe80::1", dst="fe80::2") / ICMPv6EchoRequest()
    assert run(dp, "lb_ingress", echo)[0] == TC_ACT_SHOT


def test_rule_counters(dp: lb.Datapath) -> None:
    policy = Policy("count", [Rule("deny", "10.1.0.0/16", "tcp"), Rule("allow", None, "tcp")])
    dp.sync(SERVICES, [policy])
    syn = Ether() / IP(src="10.1.2.3", dst="10.5.5.5") / TCP(dport=22, flags="S")
    other = Ether() / IP(src="10.2.2.3", dst="10.5.5.5") / TCP(dport=22, flags="S")
    for _ in range(3):
        run(dp, "lb_ingress", syn)
    run(dp, "lb_ingress", other)
    stats = dp.policy_stats("count")
    assert [s.packets for s in stats] == [3, 1]
    assert stats[0].bytes == 3 * len(syn)
    # A rule that stays keeps its counter when the policy around it changes.
    grown = Policy("count", [Rule("allow", "10.9.0.0/16"), *policy.rules])
    dp.upsert_policy(grown)
    assert [s.packets for s in dp.policy_stats("count")] == [0, 3, 1]


def test_a_reset_opens_nothing(dp: lb.Datapath) -> None:
    # The datapath's own refusals (a reset sent back through egress) and any other
    # reset leave no entry that would let the other side's packets in as answers.
    dp.sync(SERVICES, [Policy("in", default="deny")])
    dp.flush_conntrack()
    reset = Ether() / IP(src="10.96.0.99", dst="10.1.2.3") / TCP(sport=80, dport=5555, flags="RA")
    assert run(dp, "lb_egress", reset)[0] == TC_ACT_OK
    assert dp.flows() == []
    back = Ether() / IP(src="10.1.2.3", dst="10.96.0.99") / TCP(sport=5555, dport=80, flags="S")
    assert run(dp, "lb_ingress", back)[0] == TC_ACT_SHOT


def test_other_traffic_never_evicts_a_balanced_flow() -> None:
    with datapath("policy-lru", max_conntrack=64, max_policy_conntrack=16) as small:
        small.sync(SERVICES, [Policy("in", [Rule("allow")], default="deny")])
        syn = Ether() / IP(src="10.1.2.3", dst="10.96.0.10") / TCP(sport=7000, dport=80, flags="S")
        assert run(small, "lb_ingress", syn)[0] == TC_ACT_OK
        for port in range(1000, 1500):  # 500 other flows through a 16-entry table
            other = Ether() / IP(src="10.1.2.3", dst="10.5.5.5") / TCP(sport=port, dport=22)
            assert run(small, "lb_ingress", other)[0] == TC_ACT_OK
        kinds = sorted(f.kind for f in small.flows())
        assert kinds.count("service") == 1 and kinds.count("reply") == 1
        assert kinds.count("policy-out") <= 16
