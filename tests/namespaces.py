"""Network namespaces and veth pairs for tests, built with pyroute2.

Every namespace made here carries the prefix of this test run, so the
session's final check can prove nothing was left behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import NetNS, netns

from pyebpflb._bpf import netns as bpf_netns

PREFIX = f"pyebpflb-t{os.getpid()}-"
_counter = itertools.count()


def new_name(role: str) -> str:
    return f"{PREFIX}{role}{next(_counter)}"


def ours() -> list[str]:
    """Namespaces of this test run that still exist."""
    return [name for name in netns.listnetns() if name.startswith(PREFIX)]


@dataclass(frozen=True)
class Host:
    """One end of a veth pair, living in its own network namespace."""

    netns: str
    iface: str
    address: str
    mac: str

    def socket(self, kind: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket created inside this host's namespace."""
        with bpf_netns.entered(self.netns):
            return socket.socket(socket.AF_INET, kind)


@dataclass(frozen=True)
class VethPair:
    left: Host
    right: Host


def _configure(ns: NetNS, iface: str, address: str, peer_ip: str, peer_mac: str) -> str:
    index = ns.link_lookup(ifname=iface)[0]
    ns.addr("add", index=index, address=address, prefixlen=24)
    ns.link("set", index=index, state="up")
    ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    # A static neighbour entry: no ARP, so counted traffic is exactly what the test sends.
    ns.neigh("add", dst=peer_ip, lladdr=peer_mac, ifindex=index, state=0x80)  # NUD_PERMANENT
    return str(ns.get_links(index)[0].get("address"))


@contextlib.contextmanager
def veth_pair(subnet: int = 0) -> Iterator[VethPair]:
    """Two namespaces joined by a veth, 10.248.<subnet>.1 <-> .2, IPv6 off."""
    left_ns, right_ns = new_name("l"), new_name("r")
    left_ip, right_ip = f"10.248.{subnet}.1", f"10.248.{subnet}.2"
    left_mac, right_mac = "02:eb:1b:00:00:01", "02:eb:1b:00:00:02"
    created: list[str] = []
    try:
        for name in (left_ns, right_ns):
            netns.create(name)
            created.append(name)
            # IPv6 off: no router solicitations or MLD reports in the counts.
            with bpf_netns.entered(name):
                for scope in ("all", "default"):
                    with open(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6", "w") as knob:
                        knob.write("1")
        with NetNS(left_ns) as left:
            left.link(
                "add",
                ifname="veth-l",
                kind="veth",
                address=left_mac,
                peer={"ifname": "veth-r", "net_ns_fd": right_ns, "address": right_mac},
            )
            _configure(left, "veth-l", left_ip, right_ip, right_mac)
        with NetNS(right_ns) as right:
            _configure(right, "veth-r", right_ip, left_ip, left_mac)
        yield VethPair(
            Host(left_ns, "veth-l", left_ip, left_mac),
            Host(right_ns, "veth-r", right_ip, right_mac),
        )
    finally:
        for name in created:
            netns.remove(name)  # takes the veth pair (and any tc/XDP on it) with it
