"""The load balancer's programs on crafted packets (BPF_PROG_TEST_RUN): exact bytes out."""

from __future__ import annotations

import collections
import errno
import time
from collections.abc import Iterator
from typing import Any

import pytest
from lbtest import (
    CLIENT4,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    VIP4,
    addresses,
    bad_checksums,
    datapath,
    packet,
    run,
    service,
)
from namespaces import VethPair
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6PacketTooBig,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.inet6 import (
    UDPerror as UDPerror6,
)
from scapy.layers.l2 import ARP, Ether

import pyebpflb as lb
from pyebpflb._bpf.program import TEST_SKB_CHECKSUM_COMPLETE as CSUM_COMPLETE

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

FLAVOURS = [(4, "tcp"), (4, "udp"), (6, "tcp"), (6, "udp")]
IDS = ["ipv4-tcp", "ipv4-udp", "ipv6-tcp", "ipv6-udp"]


def l3(family: int) -> Any:
    return IP if family == 4 else IPv6


def l4(protocol: str) -> Any:
    return TCP if protocol == "tcp" else UDP


@pytest.fixture
def dp(request: pytest.FixtureRequest) -> Iterator[lb.Datapath]:
    with datapath(request.node.name[:40]) as created:
        yield created


@pytest.mark.parametrize(("family", "protocol"), FLAVOURS, ids=IDS)
def test_service_packet_is_dnat_ed_with_valid_checksums(
    dp: lb.Datapath, family: int, protocol: str
) -> None:
    svc = service(family, protocol)
    dp.upsert(svc)
    client, vip, backends = addresses(family)
    sent = packet(family, protocol, client, vip, 40000, 80, payload=b"x" * 33)
    verdict, out = run(dp, "lb_ingress", sent)
    assert verdict == TC_ACT_OK
    assert out[l3(family)].src == client
    assert out[l3(family)].dst in backends
    assert out[l4(protocol)].dport == 8080 and out[l4(protocol)].sport == 40000
    assert bytes(out[l4(protocol)].payload) == b"x" * 33
    assert bad_checksums(out) == []
    assert len(bytes(out)) == len(bytes(sent))


@pytest.mark.parametrize(("family", "protocol"), FLAVOURS, ids=IDS)
def test_reply_is_reverse_translated_to_the_vip(
    dp: lb.Datapath, family: int, protocol: str
) -> None:
    dp.upsert(service(family, protocol))
    client, vip, _ = addresses(family)
    _, forward = run(dp, "lb_ingress", packet(family, protocol, client, vip, 40000, 80))
    backend = forward[l3(family)].dst
    reply = packet(family, protocol, backend, client, 8080, 40000, payload=b"answer")
    verdict, out = run(dp, "lb_egress", reply)
    assert verdict == TC_ACT_OK
    assert (out[l3(family)].src, out[l4(protocol)].sport) == (vip, 80)
    assert (out[l3(family)].dst, out[l4(protocol)].dport) == (client, 40000)
    assert bytes(out[l4(protocol)].payload) == b"answer"
    assert bad_checksums(out) == []


def checksum_complete_supported() -> bool:
    """Can BPF_PROG_TEST_RUN hand a program a CHECKSUM_COMPLETE packet (Linux 6.17)?"""
    with datapath("csum-probe") as probe:
        try:
            run(probe, "lb_ingress", packet(4, "udp", CLIENT4, VIP4, 1, 2), flags=CSUM_COMPLETE)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return False
            raise
    return True


@pytest.mark.parametrize(("family", "protocol"), FLAVOURS, ids=IDS)
def test_nat_keeps_the_skb_csum_of_checksum_complete_packets(
    dp: lb.Datapath, family: int, protocol: str
) -> None:
    """A NIC's CHECKSUM_COMPLETE packet: after DNAT and reverse NAT, skb->csum still
    sums the packet's bytes (the kernel checks, and fails the run with EBADMSG)."""
    if not checksum_complete_supported():
        pytest.skip("this kernel's BPF_PROG_TEST_RUN has no BPF_F_TEST_SKB_CHECKSUM_COMPLETE")
    dp.upsert(service(family, protocol))
    client, vip, _ = addresses(family)
    sent = packet(family, protocol, client, vip, 40000, 80, payload=b"x" * 33)
    verdict, forward = run(dp, "lb_ingress", sent, flags=CSUM_COMPLETE)
    assert verdict == TC_ACT_OK and bad_checksums(forward) == []
    backend = forward[l3(family)].dst
    reply = packet(family, protocol, backend, client, 8080, 40000, payload=b"answer")
    verdict, out = run(dp, "lb_egress", reply, flags=CSUM_COMPLETE)
    assert verdict == TC_ACT_OK and out[l3(family)].src == vip


def test_ipv4_udp_without_checksum_keeps_none(dp: lb.Datapath) -> None:
    dp.upsert(service(4, "udp"))
    sent = packet(4, "udp", "10.1.0.5", "10.96.0.10", 5000, 80)
    sent[UDP].chksum = 0
    _, out = run(dp, "lb_ingress", Ether(bytes(sent)))
    assert out[UDP].chksum == 0 and out[UDP].dport == 8080
    assert bad_checksums(out) == []


def test_every_packet_of_a_flow_goes_to_one_backend_and_flows_spread(dp: lb.Datapath) -> None:
    dp.upsert(service(4, "tcp"))
    same_flow = {
        run(dp, "lb_ingress", packet(4, "tcp", "10.1.0.5", "10.96.0.10", 41000, 80))[1][IP].dst
        for _ in range(50)
    }
    assert len(same_flow) == 1
    flows = {
        run(dp, "lb_ingress", packet(4, "tcp", "10.1.0.5", "10.96.0.10", port, 80))[1][IP].dst
        for port in range(42000, 42090)
    }
    assert flows == {"10.0.1.1", "10.0.1.2", "10.0.1.3"}


def test_stats_count_packets_per_service_and_backend(dp: lb.Datapath) -> None:
    svc = service(4, "udp")
    dp.upsert(svc)
    sent = packet(4, "udp", "10.1.0.5", "10.96.0.10", 5000, 80)
    for _ in range(7):
        run(dp, "lb_ingress", sent)
    stats = dp.stats(svc)
    assert (stats.packets, stats.bytes) == (7, 7 * len(sent))
    assert sorted(t.packets for t in stats.backends.values()) == [0, 0, 7]
    assert stats.replies == lb.Traffic(0, 0)


def test_replies_are_counted_per_service_and_backend(dp: lb.Datapath) -> None:
    svc = service(4, "udp")
    dp.upsert(svc)
    _, forward = run(dp, "lb_ingress", packet(4, "udp", "10.1.0.5", "10.96.0.10", 5000, 80))
    backend = forward[IP].dst
    answer = packet(4, "udp", backend, "10.1.0.5", 8080, 5000, payload=b"x" * 100)
    for _ in range(3):
        run(dp, "lb_egress", answer)
    stats = dp.stats(svc)
    assert (stats.packets, stats.replies) == (1, lb.Traffic(3, 3 * len(answer)))
    replied = {str(b.address): t for b, t in stats.backend_replies.items()}
    assert replied[backend] == lb.Traffic(3, 3 * len(answer))
    assert sum(t.packets for t in replied.values()) == 3
    # A reply that belongs to no flow is not counted.
    run(dp, "lb_egress", packet(4, "udp", backend, "10.1.0.6", 8080, 5000))
    assert dp.stats(svc).replies.packets == 3


@pytest.mark.parametrize(
    "sent",
    [
        packet(4, "tcp", "10.1.0.5", "10.96.0.11", 40000, 80),  # another address
        packet(6, "tcp", "fd00:1::5", "fd00:96::10", 40000, 80),  # another family
        Ether() / IP(src="10.1.0.5", dst="10.96.0.10") / ICMP(),
        Ether() / ARP(pdst="10.96.0.10"),
    ],
    ids=["address", "family", "icmp", "arp"],
)
def test_packets_for_no_service_pass_byte_identical(dp: lb.Datapath, sent: Any) -> None:
    dp.upsert(service(4, "tcp"))
    for program in ("lb_ingress", "lb_egress"):
        verdict, out = run(dp, program, sent)
        assert verdict == TC_ACT_OK
        assert bytes(out) == bytes(sent)


@pytest.mark.parametrize("protocol, port", [("tcp", 81), ("udp", 80)])
def test_an_unallocated_port_of_a_service_address_is_refused(
    dp: lb.Datapath, protocol: str, port: int
) -> None:
    """kube-proxy's nftables mode: a ClusterIP's ports that no service has are rejected
    (a reset, ICMP port unreachable), not routed on; replies leaving pass untouched."""
    dp.upsert(service(4, "tcp"))
    sent = packet(4, protocol, "10.1.0.5", "10.96.0.10", 40000, port)
    _, out = run(dp, "lb_ingress", sent)
    if protocol == "tcp":
        assert out[TCP].flags.R and (out[IP].src, out[IP].dst) == ("10.96.0.10", "10.1.0.5")
    else:
        assert (out[ICMP].type, out[ICMP].code) == (3, 3)
    assert bytes(run(dp, "lb_egress", sent)[1]) == bytes(sent)
    assert dp.drops()["no service port"].packets == 1


def truncated_tcp() -> Any:
    whole = bytes(packet(4, "tcp", "10.1.0.5", "10.96.0.10", 40000, 80, payload=b""))
    return Ether(whole[: 14 + 20 + 10])  # half a TCP header


def lying_total_length() -> Any:
    sent = packet(4, "tcp", "10.1.0.5", "10.96.0.10", 40000, 80)
    sent[IP].len = 400
    return Ether(bytes(sent))


def short_ihl() -> Any:
    raw = bytearray(bytes(packet(4, "udp", "10.1.0.5", "10.96.0.10", 40000, 80)))
    raw[14] = 0x44  # version 4, ihl 4 (16 bytes): impossible
    return Ether(bytes(raw))


def lying_udp_length() -> Any:
    sent = packet(4, "udp", "10.1.0.5", "10.96.0.10", 40000, 80)
    sent[UDP].len = 200
    return Ether(bytes(sent))


def short_tcp_offset() -> Any:
    sent = packet(4, "tcp", "10.1.0.5", "10.96.0.10", 40000, 80)
    sent[TCP].dataofs = 3
    return Ether(bytes(sent))


@pytest.mark.parametrize(
    "make",
    [truncated_tcp, lying_total_length, short_ihl, lying_udp_length, short_tcp_offset],
)
def test_malformed_and_truncated_packets_are_never_rewritten(dp: lb.Datapath, make: Any) -> None:
    dp.upsert(service(4, "tcp"))
    dp.upsert(service(4, "udp"))
    sent = make()
    verdict, out = run(dp, "lb_ingress", sent)
    assert verdict == TC_ACT_OK
    assert bytes(out)[: len(bytes(sent))] == bytes(sent)
    assert dp.conntrack() == []


@pytest.mark.parametrize("family", [4, 6])
def test_a_zero_ip_length_below_64_kib_is_not_taken_for_big_tcp(
    dp: lb.Datapath, family: int
) -> None:
    """BIG TCP aggregates (over 64 KiB) carry length 0; a small packet saying 0 is
    not one of them and is left untranslated."""
    dp.upsert(service(family, "tcp"))
    client, vip, _ = addresses(family)
    sent = packet(family, "tcp", client, vip, 40000, 80)
    if family == 4:
        sent[IP].len = 0
    else:
        sent[IPv6].plen = 0
    sent = Ether(bytes(sent))
    verdict, out = run(dp, "lb_ingress", sent)
    assert verdict == TC_ACT_OK and bytes(out) == bytes(sent)


def test_ipv4_options_are_skipped_to_find_the_ports(dp: lb.Datapath) -> None:
    dp.upsert(service(4, "tcp"))
    sent = (
        Ether()
        / IP(src="10.1.0.5", dst="10.96.0.10", options=[b"\x94\x04\x00\x00"])
        / TCP(sport=40000, dport=80)
    )
    verdict, out = run(dp, "lb_ingress", sent)
    assert verdict == TC_ACT_OK
    assert out[IP].ihl == 6 and out[IP].dst in addresses(4)[2] and out[TCP].dport == 8080
    assert bad_checksums(out) == []


def test_ipv6_extension_headers_are_skipped_to_find_the_ports(dp: lb.Datapath) -> None:
    dp.upsert(service(6, "udp"))
    sent = (
        Ether()
        / IPv6(src="fd00:1::5", dst="fd00:96::10")
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / UDP(sport=5000, dport=80)
        / b"data"
    )
    verdict, out = run(dp, "lb_ingress", sent)
    assert verdict == TC_ACT_OK
    assert out[IPv6].dst in addresses(6)[2] and out[UDP].dport == 8080
    assert bad_checksums(out) == []


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_udp_to_a_service_without_backends_gets_icmp_port_unreachable(
    dp: lb.Datapath, family: int
) -> None:
    dp.upsert(service(family, "udp", count=0))
    client, vip, _ = addresses(family)
    sent = packet(family, "udp", client, vip, 40000, 80, payload=b"q" * 100)
    verdict, out = run(dp, "lb_ingress", sent)
    assert verdict == TC_ACT_REDIRECT  # back out of the interface it came in on
    assert (out[Ether].src, out[Ether].dst) == (sent[Ether].dst, sent[Ether].src)
    assert (out[l3(family)].src, out[l3(family)].dst) == (vip, client)
    if family == 4:
        assert (out[ICMP].type, out[ICMP].code) == (3, 3)
        quoted, quoted_udp = out[IPerror], out[UDPerror]
    else:
        assert out[ICMPv6DestUnreach].code == 4
        quoted, quoted_udp = out[IPerror6], out[UDPerror6]
    assert (quoted.src, quoted.dst) == (client, vip)
    assert (quoted_udp.sport, quoted_udp.dport) == (40000, 80)
    assert bad_checksums(out) == []
    assert dp.drops()["no backend"].packets == 1
    assert dp.conntrack() == []


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize(
    ("flags", "seq", "ack", "payload", "want_flags", "want_seq", "want_ack"),
    [
        ("S", 1000, 0, b"", "RA", 0, 1001),  # a connection attempt: RST+ACK of the SYN
        ("PA", 5000, 777, b"data!", "R", 777, 0),  # a segment of a lost flow: RST at its ACK
    ],
    ids=["syn", "established"],
)
def test_tcp_to_a_service_without_backends_gets_a_reset(
    dp: lb.Datapath,
    family: int,
    flags: str,
    seq: int,
    ack: int,
    payload: bytes,
    want_flags: str,
    want_seq: int,
    want_ack: int,
) -> None:
    dp.upsert(service(family, "tcp", count=0))
    client, vip, _ = addresses(family)
    sent = packet(
        family,
        "tcp",
        client,
        vip,
        40000,
        80,
        payload=payload,
        flags=flags,
        seq=seq,
        ack=ack,
        options=[("MSS", 1460), ("Timestamp", (1, 0))],
    )
    verdict, out = run(dp, "lb_ingress", sent)
    assert verdict == TC_ACT_REDIRECT
    assert (out[Ether].src, out[Ether].dst) == (sent[Ether].dst, sent[Ether].src)
    assert (out[l3(family)].src, out[l3(family)].dst) == (vip, client)
    assert (out[TCP].sport, out[TCP].dport) == (80, 40000)
    assert (str(out[TCP].flags), out[TCP].seq) == (want_flags, want_seq)
    if "A" in want_flags:
        assert out[TCP].ack == want_ack
    assert bad_checksums(out) == []
    assert dp.drops()["no backend"].packets == 1


def test_service_without_backends_counts_its_refused_packets(dp: lb.Datapath) -> None:
    svc = service(4, "udp", count=0)
    dp.upsert(svc)
    sent = packet(4, "udp", "10.1.0.5", "10.96.0.10", 40000, 80)
    for _ in range(3):
        run(dp, "lb_ingress", sent)
    assert dp.stats(svc).packets == 3 and dp.stats(svc).backends == {}
    assert dp.drops()["no backend"] == lb.Traffic(3, 3 * len(sent))


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_icmp_error_from_a_backend_is_translated_for_the_client(
    dp: lb.Datapath, family: int
) -> None:
    dp.upsert(service(family, "udp"))
    client, vip, _ = addresses(family)
    _, forward = run(dp, "lb_ingress", packet(family, "udp", client, vip, 5000, 80))
    backend = forward[l3(family)].dst
    # What the backend's kernel sends when nothing listens on 8080: it quotes
    # the packet it got, client -> backend:8080.
    got = forward[l3(family)]
    if family == 4:
        error = Ether() / IP(src=backend, dst=client) / ICMP(type=3, code=3) / bytes(got)[:28]
    else:
        error = Ether() / IPv6(src=backend, dst=client) / ICMPv6DestUnreach(code=4) / bytes(got)
    verdict, out = run(dp, "lb_egress", Ether(bytes(error)))
    assert verdict == TC_ACT_OK
    assert out[l3(family)].src == vip
    quoted = out[IPerror] if family == 4 else out[IPerror6]
    udp_quoted = out[UDPerror] if family == 4 else out[UDPerror6]
    assert (quoted.src, quoted.dst) == (client, vip)
    assert (udp_quoted.sport, udp_quoted.dport) == (5000, 80)
    assert bad_checksums(out) == []


def test_icmp_error_from_a_router_keeps_its_source(dp: lb.Datapath) -> None:
    dp.upsert(service(4, "udp"))
    _, forward = run(dp, "lb_ingress", packet(4, "udp", "10.1.0.5", "10.96.0.10", 5000, 80))
    error = Ether() / IP(src="10.0.9.9", dst="10.1.0.5") / ICMP(type=11) / bytes(forward[IP])[:28]
    _, out = run(dp, "lb_egress", Ether(bytes(error)))
    assert out[IP].src == "10.0.9.9" and out[IPerror].dst == "10.96.0.10"
    assert bad_checksums(out) == []


@pytest.mark.parametrize(("family", "protocol"), FLAVOURS, ids=IDS)
def test_icmp_error_for_a_vip_goes_on_to_the_flows_backend(
    dp: lb.Datapath, family: int, protocol: str
) -> None:
    """Path MTU discovery through the VIP: a router on the client's side could not
    forward the backend's (reverse-translated) packet and tells its source, the VIP."""
    dp.upsert(service(family, protocol))
    client, vip, _ = addresses(family)
    _, forward = run(dp, "lb_ingress", packet(family, protocol, client, vip, 5000, 80))
    backend = forward[l3(family)].dst
    big = packet(family, protocol, backend, client, 8080, 5000, payload=b"x" * 1400)
    _, left = run(dp, "lb_egress", big)  # as it left the load balancer: VIP -> client
    router = "10.1.9.9" if family == 4 else "fd00:1:9::9"
    if family == 4:
        error = IP(src=router, dst=vip) / ICMP(type=3, code=4, nexthopmtu=1280)
        error = error / bytes(left[IP])[:48]
    else:
        error = IPv6(src=router, dst=vip) / ICMPv6PacketTooBig(mtu=1280) / bytes(left[IPv6])[:1232]
    verdict, out = run(dp, "lb_ingress", Ether() / error)
    assert verdict == TC_ACT_OK
    assert (out[l3(family)].src, out[l3(family)].dst) == (router, backend)
    quoted = out[IPerror] if family == 4 else out[IPerror6]
    assert (quoted.src, quoted.dst) == (backend, client)
    quoted_l4 = bytes(quoted.payload)
    assert quoted_l4[:4] == (8080).to_bytes(2, "big") + (5000).to_bytes(2, "big")
    assert bad_checksums(out) == []


def test_icmp_error_for_a_vip_about_no_flow_is_left_alone(dp: lb.Datapath) -> None:
    dp.upsert(service(4, "udp"))
    stray = IP(src="10.0.9.9", dst="10.1.0.5") / UDP(sport=80, dport=5999)
    error = Ether() / IP(src="10.1.9.9", dst="10.96.0.10") / ICMP(type=3, code=4) / bytes(stray)
    verdict, out = run(dp, "lb_ingress", Ether(bytes(error)))
    assert verdict == TC_ACT_OK and bytes(out) == bytes(error)


def test_tcp_connection_of_a_terminating_backend_finishes_there(dp: lb.Datapath) -> None:
    svc = service(4, "tcp")
    dp.upsert(svc)
    flow = packet(4, "tcp", "10.1.0.5", "10.96.0.10", 43000, 80, flags="A")
    first = run(dp, "lb_ingress", flow)[1][IP].dst
    dp.upsert(
        svc.with_backends(
            [
                lb.Backend(
                    b.address, b.port, state="terminating" if str(b.address) == first else "active"
                )
                for b in svc.backends
            ]
        )
    )
    assert {run(dp, "lb_ingress", flow)[1][IP].dst for _ in range(10)} == {first}
    new_flows = {
        run(dp, "lb_ingress", packet(4, "tcp", "10.1.0.5", "10.96.0.10", p, 80))[1][IP].dst
        for p in range(47000, 47040)
    }
    assert first not in new_flows and len(new_flows) == 2


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_segment_of_a_removed_backends_flow_gets_a_reset(dp: lb.Datapath, family: int) -> None:
    client, vip, _ = addresses(family)
    svc = service(family, "tcp")
    dp.upsert(svc)
    opening = packet(family, "tcp", client, vip, 43000, 80, flags="S")
    first = run(dp, "lb_ingress", opening)[1][IPv6 if family == 6 else IP].dst
    dp.upsert(svc.with_backends([b for b in svc.backends if str(b.address) != first]))
    data = packet(family, "tcp", client, vip, 43000, 80, flags="PA", seq=1000, ack=2000)
    verdict, out = run(dp, "lb_ingress", data)
    assert verdict == TC_ACT_REDIRECT  # back to the client at once
    l3 = out[IPv6 if family == 6 else IP]
    assert (l3.src, l3.dst, out[TCP].sport, out[TCP].dport) == (vip, client, 80, 43000)
    assert out[TCP].flags == "R" and out[TCP].seq == 2000
    assert bad_checksums(out) == []
    assert dp.drops()["backend gone"].packets == 1
    assert dp.conntrack() == []  # the dead flow is gone, both halves


def test_syn_on_the_tuple_of_a_removed_backends_flow_picks_a_live_backend(
    dp: lb.Datapath,
) -> None:
    svc = service(4, "tcp")
    dp.upsert(svc)
    syn = packet(4, "tcp", "10.1.0.5", "10.96.0.10", 43000, 80, flags="S")
    first = run(dp, "lb_ingress", syn)[1][IP].dst
    dp.upsert(svc.with_backends([b for b in svc.backends if str(b.address) != first]))
    verdict, out = run(dp, "lb_ingress", syn)  # the client gave up and reconnects
    assert verdict == TC_ACT_OK and out[IP].dst != first
    assert out[IP].dst in {str(b.address) for b in svc.backends}
    assert dp.drops()["backend gone"].packets == 0


def test_udp_flow_of_a_removed_backend_moves_to_a_remaining_one(dp: lb.Datapath) -> None:
    svc = service(4, "udp")
    dp.upsert(svc)
    flow = packet(4, "udp", "10.1.0.5", "10.96.0.10", 43000, 80)
    first = run(dp, "lb_ingress", flow)[1][IP].dst
    dp.upsert(svc.with_backends([b for b in svc.backends if str(b.address) != first]))
    again = {run(dp, "lb_ingress", flow)[1][IP].dst for _ in range(10)}
    assert len(again) == 1 and first not in again


def test_adding_a_backend_keeps_existing_flows_where_they_are(dp: lb.Datapath) -> None:
    svc = service(4, "tcp", count=2)
    dp.upsert(svc)
    flows = [packet(4, "tcp", "10.1.0.5", "10.96.0.10", port, 80) for port in range(44000, 44020)]
    before = [run(dp, "lb_ingress", f)[1][IP].dst for f in flows]
    dp.upsert(service(4, "tcp", count=3))
    assert [run(dp, "lb_ingress", f)[1][IP].dst for f in flows] == before


def flow_created(dp: lb.Datapath) -> int:
    (created,) = [f.created_ns for f in dp.conntrack() if f.kind == "service"]
    return created


def test_idle_udp_flow_expires_and_starts_over() -> None:
    with datapath("expiry", ct_timeouts=lb.ConntrackTimeouts(udp=0.2)) as dp:
        dp.upsert(service(4, "udp"))
        flow = packet(4, "udp", "10.1.0.5", "10.96.0.10", 5000, 80)
        run(dp, "lb_ingress", flow)
        first = flow_created(dp)
        run(dp, "lb_ingress", flow)
        assert flow_created(dp) == first  # refreshed, not recreated
        time.sleep(0.3)  # past the 0.2 s timeout on the kernel's monotonic clock
        run(dp, "lb_ingress", flow)
        assert flow_created(dp) > first


def test_tcp_flow_closed_by_fins_from_both_sides_gets_the_short_timeout() -> None:
    timeouts = lb.ConntrackTimeouts(tcp_established=3600, tcp_syn=3600, tcp_closing=0.2)
    with datapath("fin", ct_timeouts=timeouts) as dp:
        dp.upsert(service(4, "tcp"))
        client = ("10.1.0.5", "10.96.0.10", 45000, 80)
        run(dp, "lb_ingress", packet(4, "tcp", *client, flags="S"))
        first = flow_created(dp)
        (flow,) = [f for f in dp.conntrack() if f.kind == "service"]
        assert flow.backend is not None
        address, port = flow.backend.rsplit(":", 1)
        time.sleep(0.3)
        run(dp, "lb_ingress", packet(4, "tcp", *client, flags="A"))
        assert flow_created(dp) == first  # no FIN yet: the long timeout holds
        # The client half-closes: the backend may still send for as long as it likes.
        run(dp, "lb_ingress", packet(4, "tcp", *client, flags="FA"))
        time.sleep(0.3)
        run(dp, "lb_ingress", packet(4, "tcp", *client, flags="A"))
        assert flow_created(dp) == first
        # The backend's FIN closes it: now the short timeout.
        answer = packet(4, "tcp", address, "10.1.0.5", int(port), 45000, flags="FA")
        assert run(dp, "lb_egress", answer)[1][IP].src == "10.96.0.10"
        time.sleep(0.3)
        run(dp, "lb_ingress", packet(4, "tcp", *client, flags="A"))
        assert flow_created(dp) > first


def test_tcp_flow_reset_gets_the_short_timeout() -> None:
    timeouts = lb.ConntrackTimeouts(tcp_established=3600, tcp_syn=3600, tcp_closing=0.2)
    with datapath("rst", ct_timeouts=timeouts) as dp:
        dp.upsert(service(4, "tcp"))
        client = ("10.1.0.5", "10.96.0.10", 45000, 80)
        run(dp, "lb_ingress", packet(4, "tcp", *client, flags="S"))
        first = flow_created(dp)
        run(dp, "lb_ingress", packet(4, "tcp", *client, flags="R"))
        time.sleep(0.3)
        run(dp, "lb_ingress", packet(4, "tcp", *client, flags="A"))
        assert flow_created(dp) > first


def test_new_connection_on_a_reused_port_goes_to_the_same_backend(dp: lb.Datapath) -> None:
    dp.upsert(service(4, "tcp"))

    def send(flags: str) -> str:
        pkt = packet(4, "tcp", "10.1.0.5", "10.96.0.10", 48000, 80, flags=flags)
        return str(run(dp, "lb_ingress", pkt)[1][IP].dst)

    def flags() -> tuple[bool, bool, bool]:
        (flow,) = [f for f in dp.conntrack() if f.kind == "service"]
        return flow.closing, flow.half_closed, flow.answered

    first = send("S")
    assert send("FA") == first
    assert flags() == (False, True, False)
    # The client reuses its port for a new connection: its SYN goes where the old
    # connection's TIME_WAIT is, and the flow starts afresh.
    assert {send("S") for _ in range(10)} == {first}
    assert flags() == (False, False, False)


def test_reply_refreshes_the_flow(dp: lb.Datapath) -> None:
    dp.upsert(service(4, "tcp"))
    _, fwd = run(dp, "lb_ingress", packet(4, "tcp", "10.1.0.5", "10.96.0.10", 46000, 80, flags="S"))
    run(dp, "lb_egress", packet(4, "tcp", fwd[IP].dst, "10.1.0.5", 8080, 46000, flags="SA"))
    (flow,) = [f for f in dp.conntrack() if f.kind == "service"]
    assert flow.answered  # the established timeout applies


def backend_counts(dp: lb.Datapath, flows: int, protocol: str = "udp") -> collections.Counter[str]:
    """Where ``flows`` new flows (distinct source ports) were sent."""
    return collections.Counter(
        str(run(dp, "lb_ingress", packet(4, protocol, "10.1.0.7", "10.96.0.10", p, 80))[1][IP].dst)
        for p in range(20000, 20000 + flows)
    )


def weighted(weights: list[int], states: list[str] | None = None) -> lb.Service:
    states = states or ["active"] * len(weights)
    return lb.Service(
        vip="10.96.0.10",
        port=80,
        protocol="udp",
        backends=[
            lb.Backend(f"10.0.1.{i + 1}", 8080, w, s)
            for i, (w, s) in enumerate(zip(weights, states, strict=True))
        ],
    )


def test_weights_share_new_flows(dp: lb.Datapath) -> None:
    dp.upsert(weighted([1, 2, 3]))
    counts = backend_counts(dp, 6000)
    for backend, weight in (("10.0.1.1", 1), ("10.0.1.2", 2), ("10.0.1.3", 3)):
        assert abs(counts[backend] / 6000 - weight / 6) < 0.03, counts


def test_weight_zero_and_maintenance_and_terminating_get_no_new_flows(dp: lb.Datapath) -> None:
    dp.upsert(weighted([1, 0, 1, 1], ["active", "active", "maintenance", "terminating"]))
    assert set(backend_counts(dp, 200)) == {"10.0.1.1"}


def test_terminating_backends_take_new_flows_when_no_active_is_left(dp: lb.Datapath) -> None:
    dp.upsert(weighted([1, 1, 1], ["maintenance", "terminating", "terminating"]))
    assert set(backend_counts(dp, 200)) == {"10.0.1.2", "10.0.1.3"}


def test_established_flows_of_a_backend_that_stops_taking_new_ones_continue(
    dp: lb.Datapath,
) -> None:
    dp.upsert(weighted([1, 1]))
    flow = packet(4, "udp", "10.1.0.7", "10.96.0.10", 31000, 80)
    first = str(run(dp, "lb_ingress", flow)[1][IP].dst)
    states = ["terminating" if b == first else "active" for b in ("10.0.1.1", "10.0.1.2")]
    dp.upsert(weighted([1, 1], states))
    assert {str(run(dp, "lb_ingress", flow)[1][IP].dst) for _ in range(10)} == {first}
    assert first not in backend_counts(dp, 100)
    assert dp.services == [weighted([1, 1], states)]


def sticky(timeout: int = 1) -> lb.Service:
    return lb.Service(
        vip="10.96.0.10",
        port=80,
        protocol="udp",
        affinity_timeout=timeout,
        backends=[lb.Backend(f"10.0.1.{i}", 8080) for i in (1, 2, 3)],
    )


def first_backend(dp: lb.Datapath, client: str, sport: int) -> str:
    sent = packet(4, "udp", client, "10.96.0.10", sport, 80)
    return str(run(dp, "lb_ingress", sent)[1][IP].dst)


def test_session_affinity_keeps_a_clients_new_flows_on_one_backend(dp: lb.Datapath) -> None:
    dp.upsert(sticky(timeout=3600))
    for client in ("10.1.0.1", "10.1.0.2", "10.1.0.3"):
        assert len({first_backend(dp, client, port) for port in range(21000, 21050)}) == 1
    spread = {first_backend(dp, f"10.1.1.{i}", 22000) for i in range(1, 40)}
    assert len(spread) == 3  # different clients still spread
    assert dp.services == [sticky(timeout=3600)]


def test_session_affinity_lapses_after_the_timeout() -> None:
    with datapath("affinity-timeout") as dp:
        dp.upsert(sticky(timeout=1))
        clients = [f"10.1.2.{i}" for i in range(1, 13)]
        before = {c: first_backend(dp, c, 23000) for c in clients}
        time.sleep(1.3)  # past the 1 s timeout on the kernel's clock
        after = {c: first_backend(dp, c, 23001) for c in clients}
        # Each client draws anew: all twelve keeping theirs has odds (1/3)^12.
        assert before != after


def test_session_affinity_never_returns_to_a_backend_that_takes_no_new_flows(
    dp: lb.Datapath,
) -> None:
    svc = sticky(timeout=3600)
    dp.upsert(svc)
    chosen = first_backend(dp, "10.1.3.1", 24000)
    draining = [
        lb.Backend(b.address, b.port, state="terminating" if str(b.address) == chosen else "active")
        for b in svc.backends
    ]
    dp.upsert(svc.with_backends(draining))
    assert chosen not in {first_backend(dp, "10.1.3.1", p) for p in range(24001, 24020)}


def test_affinity_timeout_is_validated() -> None:
    with pytest.raises(ValueError, match=r"whole seconds from 1 to 86400 .* got 0"):
        sticky(timeout=0)
    with pytest.raises(ValueError, match=r"got 1\.5"):
        sticky(timeout=1.5)  # type: ignore[arg-type]


def maglev_service(weights: tuple[int, ...] = (1, 1, 1), affinity: int | None = None) -> lb.Service:
    return lb.Service(
        vip="10.96.0.10",
        port=80,
        protocol="udp",
        scheduler="maglev",
        affinity_timeout=affinity,
        backends=[lb.Backend(f"10.0.1.{i + 1}", 8080, w) for i, w in enumerate(weights)],
    )


def choices(dp: lb.Datapath, flows: range, client: str = "10.1.0.7") -> list[str]:
    return [
        str(run(dp, "lb_ingress", packet(4, "udp", client, "10.96.0.10", p, 80))[1][IP].dst)
        for p in flows
    ]


def test_two_load_balancers_with_the_same_maglev_service_agree_on_every_flow(
    veth: VethPair,
) -> None:
    # Two datapaths, in two network namespaces, programmed alike.
    with (
        datapath("maglev-a", netns=veth.left.netns) as a,
        datapath("maglev-b", netns=veth.right.netns) as b,
    ):
        a.upsert(maglev_service())
        b.upsert(maglev_service())
        flows = range(30000, 30400)
        seen = choices(a, flows)
        assert seen == choices(b, flows)
        assert set(seen) == {"10.0.1.1", "10.0.1.2", "10.0.1.3"}
        assert a.services == [maglev_service()]


def test_maglev_honours_weights(dp: lb.Datapath) -> None:
    dp.upsert(maglev_service((1, 2, 3)))
    counts = collections.Counter(choices(dp, range(20000, 26000)))
    for backend, weight in (("10.0.1.1", 1), ("10.0.1.2", 2), ("10.0.1.3", 3)):
        assert abs(counts[backend] / 6000 - weight / 6) < 0.03, counts


def test_removing_a_backend_moves_almost_no_other_flow_under_maglev() -> None:
    with datapath("maglev-full") as full, datapath("maglev-less") as less:
        full.upsert(maglev_service((1, 1, 1, 1)))
        reduced = maglev_service((1, 1, 1, 1))
        less.upsert(reduced.with_backends(reduced.backends[1:]))
        flows = range(40000, 42000)
        pairs = [
            (f, r)
            for f, r in zip(choices(full, flows), choices(less, flows), strict=True)
            if f != "10.0.1.1"
        ]
        moved = sum(1 for f, r in pairs if f != r)
        assert moved <= 0.03 * len(pairs), f"{moved} of {len(pairs)} flows moved"


def test_maglev_with_affinity_hashes_the_client_address_alone() -> None:
    with datapath("maglev-aff-a") as a, datapath("maglev-aff-b") as b:
        a.upsert(maglev_service(affinity=600))
        b.upsert(maglev_service(affinity=600))
        for client in ("10.1.4.1", "10.1.4.2", "10.1.4.3"):
            mine = set(choices(a, range(25000, 25040), client))
            assert len(mine) == 1 and mine == set(choices(b, range(26000, 26010), client))


def test_bad_maglev_table_size_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"one of 251, 509, .*, 131071; got 1000"):
        lb.Datapath("x", maglev_table_size=1000)
