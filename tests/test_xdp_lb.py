"""The load balancer's ingress built for XDP (lb_xdp.bpf.c): the same lib/ steps over
struct xdp_md, on the tc datapath's own maps. Crafted packets (BPF_PROG_TEST_RUN, exact
bytes out) and real TCP through a veth where XDP alone translates the client's packets."""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import PIN_ROOT
from lbtest import addresses, bad_checksums, datapath, packet, service
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from scapy.layers.l2 import Ether

import pyebpflb as lb
from pyebpflb import objects
from pyebpflb._bpf import LoadedObject, XdpLink, netns
from pyebpflb.testing.sandbox import BACKEND_PORT, Sandbox

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
FLAVOURS = [(4, "tcp"), (4, "udp"), (6, "tcp"), (6, "udp")]
IDS = ["ipv4-tcp", "ipv4-udp", "ipv6-tcp", "ipv6-udp"]


def on_maps_of(dp: lb.Datapath) -> LoadedObject:
    """lb_xdp loaded over every map of ``dp``: one state for both hooks."""
    opened = objects.open_object("lb_xdp")
    for name in opened.map_names():
        opened.reuse_map(name, dp._object.map(name))
    return opened.load()


@pytest.fixture
def dp(request: pytest.FixtureRequest) -> Iterator[lb.Datapath]:
    with datapath(request.node.name[:40]) as created:
        yield created


@pytest.fixture
def xdp(dp: lb.Datapath) -> Iterator[LoadedObject]:
    with on_maps_of(dp) as loaded:
        yield loaded


def run(xdp: LoadedObject, pkt: Any) -> tuple[int, Any]:
    result = xdp.program("lb_xdp_ingress").test_run(bytes(pkt))
    return result.retval, Ether(result.data)


def l3(family: int) -> Any:
    return IP if family == 4 else IPv6


def l4(protocol: str) -> Any:
    return TCP if protocol == "tcp" else UDP


@pytest.mark.parametrize(("family", "protocol"), FLAVOURS, ids=IDS)
def test_xdp_translates_a_new_flow_and_tc_egress_answers_it(
    dp: lb.Datapath, xdp: LoadedObject, family: int, protocol: str
) -> None:
    svc = service(family, protocol)
    dp.upsert(svc)
    client, vip, backends = addresses(family)
    sent = packet(family, protocol, client, vip, 40000, 80, payload=b"x" * 33)
    verdict, out = run(xdp, sent)
    assert verdict == XDP_PASS
    assert out[l3(family)].dst in backends and out[l4(protocol)].dport == 8080
    assert bytes(out[l4(protocol)].payload) == b"x" * 33
    assert bad_checksums(out) == []
    # The flow XDP recorded is the tc datapath's: its egress answers as the VIP.
    reply = packet(family, protocol, out[l3(family)].dst, client, 8080, 40000, payload=b"ok")
    result = dp._object.program("lb_egress").test_run(bytes(reply))
    back = Ether(result.data)
    assert (back[l3(family)].src, back[l4(protocol)].sport) == (vip, 80)
    assert bad_checksums(back) == []
    assert dp.stats(svc).packets == 1


def test_xdp_rewrites_through_the_software_checksums_with_ip_options(
    dp: lb.Datapath, xdp: LoadedObject
) -> None:
    # IPv4 with options misses the direct path: every field goes through
    # ctx_store_bytes and the XDP checksum updates of lib/ctx.h.
    dp.upsert(service(4, "tcp"))
    sent = (
        Ether()
        / IP(src="10.1.0.5", dst="10.96.0.10", options=[b"\x94\x04\x00\x00"])
        / TCP(sport=40000, dport=80)
        / b"payload"
    )
    verdict, out = run(xdp, sent)
    assert verdict == XDP_PASS
    assert out[IP].ihl == 6 and out[IP].dst in addresses(4)[2] and out[TCP].dport == 8080
    assert bad_checksums(out) == []


def test_xdp_keeps_an_absent_udp_checksum_absent(dp: lb.Datapath, xdp: LoadedObject) -> None:
    dp.upsert(service(4, "udp"))
    sent = Ether(bytes(packet(4, "udp", "10.1.0.5", "10.96.0.10", 5000, 80)))
    sent[UDP].chksum = 0
    _, out = run(xdp, Ether(bytes(sent)))
    assert out[UDP].chksum == 0 and out[UDP].dport == 8080


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_xdp_refuses_udp_without_backends_with_icmp_sent_back(
    dp: lb.Datapath, xdp: LoadedObject, family: int
) -> None:
    dp.upsert(service(family, "udp", count=0))
    client, vip, _ = addresses(family)
    sent = packet(family, "udp", client, vip, 40000, 80, payload=b"q" * 100)
    verdict, out = run(xdp, sent)
    assert verdict == XDP_TX
    assert (out[Ether].src, out[Ether].dst) == (sent[Ether].dst, sent[Ether].src)
    assert (out[l3(family)].src, out[l3(family)].dst) == (vip, client)
    if family == 4:
        assert (out[ICMP].type, out[ICMP].code) == (3, 3)
        assert (out[IPerror].dst, out[UDPerror].dport) == (vip, 80)
    else:
        assert out[ICMPv6DestUnreach].code == 4
    assert bad_checksums(out) == []
    assert dp.drops()["no backend"].packets == 1


def test_xdp_resets_tcp_without_backends(dp: lb.Datapath, xdp: LoadedObject) -> None:
    dp.upsert(service(4, "tcp", count=0))
    sent = packet(4, "tcp", "10.1.0.5", "10.96.0.10", 40000, 80, payload=b"", flags="S", seq=1000)
    verdict, out = run(xdp, sent)
    assert verdict == XDP_TX
    assert (out[TCP].sport, out[TCP].dport, str(out[TCP].flags)) == (80, 40000, "RA")
    assert out[TCP].ack == 1001
    assert bad_checksums(out) == []


def test_xdp_enforces_policy_of_the_shared_maps(dp: lb.Datapath, xdp: LoadedObject) -> None:
    dp.sync([service(4, "tcp")], [lb.Policy("in", [lb.Rule("deny", "10.1.0.0/24")])])
    verdict, _ = run(xdp, packet(4, "tcp", "10.1.0.5", "10.96.0.10", 40000, 80))
    assert verdict == XDP_DROP
    assert dp.drops()["policy denied"].packets == 1
    verdict, _ = run(xdp, packet(4, "tcp", "10.2.0.5", "10.96.0.10", 40000, 80))
    assert verdict == XDP_PASS


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(backends=2) as built:
        yield built


def test_real_tcp_through_the_vip_with_xdp_ingress(sandbox: Sandbox) -> None:
    name = f"t{os.getpid()}-xdp-real"
    iface = sandbox.lb.iface
    with lb.Datapath(name, netns=sandbox.lb.netns, pin_root=PIN_ROOT) as dp:
        attachment = dp.attach(iface)
        # Only XDP translates the client's packets now; replies take tc egress.
        attachment.ingress.detach()
        svc = lb.Service(
            vip="10.96.0.10",
            port=80,
            protocol="tcp",
            name="default/xdp",
            backends=[lb.Backend(b.address(4), BACKEND_PORT) for b in sandbox.backends],
        )
        dp.sync([svc])
        with on_maps_of(dp) as xdp, netns.entered(sandbox.lb.netns):
            link = XdpLink.attach(xdp.program("lb_xdp_ingress"), iface)
            try:
                answers = collections.Counter(sandbox.http_get("10.96.0.10", 80) for _ in range(20))
            finally:
                link.detach()
        assert set(answers) == {"backend-1", "backend-2"}
        assert all(t.packets > 0 for t in dp.stats(svc).backends.values())
