"""Helpers for load balancer tests: packets, checksums, a throwaway datapath."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import PIN_ROOT
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

import pyebpflb as lb
from pyebpflb._bpf import TestRun
from pyebpflb.testing.sandbox import Sandbox

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7

CLIENT4, VIP4 = "10.1.0.5", "10.96.0.10"
CLIENT6, VIP6 = "fd00:1::5", "fd00:96::10"
BACKENDS4 = ["10.0.1.1", "10.0.1.2", "10.0.1.3"]
BACKENDS6 = ["fd00:2::1", "fd00:2::2", "fd00:2::3"]


def addresses(family: int) -> tuple[str, str, list[str]]:
    return (CLIENT4, VIP4, BACKENDS4) if family == 4 else (CLIENT6, VIP6, BACKENDS6)


def service(
    family: int = 4,
    protocol: str = "tcp",
    port: int = 80,
    backend_port: int = 8080,
    count: int = 3,
    name: str = "default/web",
) -> lb.Service:
    _, vip, backends = addresses(family)
    return lb.Service(
        vip=vip,
        port=port,
        protocol=protocol,
        name=name,
        backends=[lb.Backend(b, backend_port) for b in backends[:count]],
    )


def packet(
    family: int,
    protocol: str,
    src: str,
    dst: str,
    sport: int,
    dport: int,
    payload: bytes = b"hello",
    **l4: Any,
) -> Any:
    ip = IP(src=src, dst=dst) if family == 4 else IPv6(src=src, dst=dst)
    layer = (
        TCP(sport=sport, dport=dport, **l4) if protocol == "tcp" else UDP(sport=sport, dport=dport)
    )
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip / layer / payload


def run(dp: lb.Datapath, program: str, pkt: Any, *, flags: int = 0) -> tuple[int, Any]:
    result: TestRun = dp._object.program(program).test_run(bytes(pkt), flags=flags)
    return result.retval, Ether(result.data)


def bad_checksums(pkt: Any) -> list[str]:
    """Layers whose checksum field differs from a fresh computation (inner L4 excluded)."""
    bad = []
    for layer, field in (
        (IP, "chksum"),
        (TCP, "chksum"),
        (UDP, "chksum"),
        (ICMP, "chksum"),
        (ICMPv6DestUnreach, "cksum"),
        (ICMPv6PacketTooBig, "cksum"),
        (IPerror, "chksum"),
    ):
        if layer not in pkt:
            continue
        if layer is UDP and pkt[UDP].chksum == 0 and IP in pkt:
            continue  # IPv4 UDP without checksum
        fresh = pkt.copy()
        delattr(fresh[layer], field)
        rebuilt = Ether(bytes(fresh))
        if getattr(rebuilt[layer], field) != getattr(pkt[layer], field):
            bad.append(layer.__name__)
    return bad


@contextmanager
def datapath(name: str, **kwargs: Any) -> Iterator[lb.Datapath]:
    """A datapath pinned under the test pin root, destroyed afterwards."""
    with lb.Datapath(f"t{os.getpid()}-{name}"[:60], pin_root=PIN_ROOT, **kwargs) as dp:
        yield dp


@contextmanager
def attached(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[lb.Datapath]:
    """A datapath named after the test, attached to the sandbox's load balancer."""
    name = f"t{os.getpid()}-{request.node.name}"[:60]
    with lb.Datapath(name, netns=sandbox.lb.netns, pin_root=PIN_ROOT) as dp:
        dp.attach(sandbox.lb.iface)
        yield dp
