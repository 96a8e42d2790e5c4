"""Fragmented datagrams to and from a VIP (BPF_PROG_TEST_RUN, exact bytes out): the
first fragment is balanced and every later one follows it, both directions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from lbtest import TC_ACT_OK, addresses, datapath, run, service
from scapy.layers.inet import IP, UDP, defragment, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, defragment6, fragment6
from scapy.layers.l2 import Ether

import pyebpflb as lb

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

BIG = bytes(range(256)) * 16  # 4,096 bytes: three fragments on a 1500-byte link


@pytest.fixture
def dp(request: pytest.FixtureRequest) -> Iterator[lb.Datapath]:
    with datapath(request.node.name[:40]) as created:
        yield created


def fragments(family: int, src: str, dst: str, sport: int, dport: int) -> list[Any]:
    """A 4 KB UDP datagram, in fragments of a 1500-byte link, each an Ethernet frame."""
    if family == 4:
        pieces = fragment(IP(src=src, dst=dst, id=4242) / UDP(sport=sport, dport=dport) / BIG, 1480)
    else:
        datagram = (
            IPv6(src=src, dst=dst)
            / IPv6ExtHdrFragment(id=4242)
            / UDP(sport=sport, dport=dport)
            / BIG
        )
        pieces = fragment6(datagram, 1500)
    assert len(pieces) == 3
    return [Ether(bytes(Ether() / piece)) for piece in pieces]


def reassembled(family: int, frames: list[Any]) -> Any:
    """The datagram the receiver puts together, parsed afresh."""
    if family == 4:
        whole = defragment([frame[IP] for frame in frames])[0]
        return IP(bytes(whole))
    return IPv6(bytes(defragment6([frame[IPv6] for frame in frames])))


def checksum_ok(datagram: Any) -> bool:
    fresh = datagram.copy()
    del fresh[UDP].chksum
    return type(datagram)(bytes(fresh))[UDP].chksum == datagram[UDP].chksum


@pytest.mark.parametrize("family", [4, 6])
def test_every_fragment_of_a_datagram_to_a_vip_goes_to_the_first_ones_backend(
    dp: lb.Datapath, family: int
) -> None:
    client, vip, backends = addresses(family)
    dp.upsert(service(family, "udp"))
    l3 = IP if family == 4 else IPv6
    out = []
    for frame in fragments(family, client, vip, 5000, 80):
        verdict, translated = run(dp, "lb_ingress", frame)
        assert verdict == TC_ACT_OK
        out.append(translated)
    chosen = {frame[l3].dst for frame in out}
    assert len(chosen) == 1 and chosen <= set(backends)
    assert all(frame[l3].src == client for frame in out)
    datagram = reassembled(family, out)
    assert (datagram[UDP].sport, datagram[UDP].dport) == (5000, 8080)
    assert bytes(datagram[UDP].payload) == BIG and checksum_ok(datagram)
    if family == 4:
        assert all(IP(bytes(frame[IP])).chksum == frame[IP].chksum for frame in out)


@pytest.mark.parametrize("family", [4, 6])
def test_every_fragment_of_a_backends_big_answer_leaves_from_the_vip(
    dp: lb.Datapath, family: int
) -> None:
    client, vip, _ = addresses(family)
    dp.upsert(service(family, "udp"))
    l3 = IP if family == 4 else IPv6
    (first, *_) = fragments(family, client, vip, 5000, 80)
    backend = run(dp, "lb_ingress", first)[1][l3].dst
    out = [
        run(dp, "lb_egress", frame)[1] for frame in fragments(family, backend, client, 8080, 5000)
    ]
    assert {frame[l3].src for frame in out} == {vip}
    datagram = reassembled(family, out)
    assert (datagram[UDP].sport, datagram[UDP].dport) == (80, 5000)
    assert bytes(datagram[UDP].payload) == BIG and checksum_ok(datagram)


def test_a_later_fragment_whose_first_was_not_seen_is_left_alone(dp: lb.Datapath) -> None:
    client, vip, _ = addresses(4)
    dp.upsert(service(4, "udp"))
    *_, last = fragments(4, client, vip, 5000, 80)
    verdict, out = run(dp, "lb_ingress", last)
    assert verdict == TC_ACT_OK and bytes(out) == bytes(last)


def test_fragments_of_another_datagram_are_not_taken_for_a_translated_ones(
    dp: lb.Datapath,
) -> None:
    client, vip, _ = addresses(4)
    dp.upsert(service(4, "udp"))
    run(dp, "lb_ingress", fragments(4, client, vip, 5000, 80)[0])
    other = fragments(4, client, vip, 5000, 80)[1]
    other[IP].id = 4243
    other = Ether(bytes(other))
    assert bytes(run(dp, "lb_ingress", other)[1]) == bytes(other)
