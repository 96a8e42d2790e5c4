"""The counter program end to end: real traffic across a veth in namespaces."""

from __future__ import annotations

import select
import socket
from typing import Any

import pytest
from namespaces import VethPair

from pyebpflb import Count, InterfaceCounter
from pyebpflb._bpf import netns
from pyebpflb._bpf.netlink import TC_H_EGRESS, TC_H_INGRESS, count_filters

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

DATAGRAMS = 25
PAYLOAD = b"p" * 100
FRAME = 14 + 20 + 8 + len(PAYLOAD)  # Ethernet + IPv4 + UDP + payload


def send_udp(pair: VethPair, count: int) -> int:
    """Send ``count`` datagrams left -> right; return how many arrived."""
    with pair.right.socket() as receiver, pair.left.socket() as sender:
        receiver.bind((pair.right.address, 9000))
        for _ in range(count):
            sender.sendto(PAYLOAD, (pair.right.address, 9000))
        arrived = 0
        while arrived < count and select.select([receiver], [], [], 2.0)[0]:
            receiver.recv(2048)
            arrived += 1
        return arrived


def test_counts_real_udp_traffic_exactly(veth: VethPair) -> None:
    with InterfaceCounter() as counter:
        counter.attach(veth.left.iface, netns_name=veth.left.netns)
        counter.attach(veth.right.iface, netns_name=veth.right.netns)
        assert send_udp(veth, DATAGRAMS) == DATAGRAMS
        right = counter.counts(veth.right.iface, netns_name=veth.right.netns)
        left = counter.counts(veth.left.iface, netns_name=veth.left.netns)
    assert right["ingress"] == Count(packets=DATAGRAMS, bytes=DATAGRAMS * FRAME)
    assert left["egress"] == Count(packets=DATAGRAMS, bytes=DATAGRAMS * FRAME)
    assert right["egress"] == Count(0, 0)
    assert left["ingress"] == Count(0, 0)


def test_close_detaches_every_filter(veth: VethPair) -> None:
    with InterfaceCounter() as counter:
        counter.attach(veth.right.iface, netns_name=veth.right.netns)
        with netns.entered(veth.right.netns):
            index = socket.if_nametoindex(veth.right.iface)
            assert count_filters(index, TC_H_INGRESS) == 1
    with netns.entered(veth.right.netns):
        assert count_filters(index, TC_H_INGRESS) == count_filters(index, TC_H_EGRESS) == 0


def test_events_from_real_traffic_name_the_interface(veth: VethPair) -> None:
    events: list[Any] = []
    with InterfaceCounter(events=True) as counter:
        counter.attach(veth.right.iface, netns_name=veth.right.netns)
        assert send_udp(veth, 3) == 3
        with counter.ring_buffer(events.append, netns_name=veth.right.netns) as ring:
            ring.poll(timeout=1.0)
        with netns.entered(veth.right.netns):
            index = socket.if_nametoindex(veth.right.iface)
    assert len(events) == 3
    assert {(e.ifindex, e.len) for e in events} == {(index, FRAME)}
