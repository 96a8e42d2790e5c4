"""A small cluster on one machine, in network namespaces: an external client, a
router, and nodes, each with its own pods (and, in the tests that use it, its own
datapath). The north-south paths of a kube-proxy replacement (NodePort,
LoadBalancer, a backend on another node) need all of them.

``Cluster(nodes=2, pods=2)``::

    client 10.70.0.2 -- 10.70.0.1 [router] 10.80.1.1 -- 10.80.1.2 node-1 -- pods 10.244.1.0/24
           fd00:70::2     fd00:70::1        10.80.2.1 -- 10.80.2.2 node-2 -- pods 10.244.2.0/24

Node N's pod K sits on its own veth (``pK`` on the node, ``eth0`` in the pod),
10.244.N.(16K+2)/28 and fd00:244:N:K::2/64, its node's side .1 and ::1; the
router routes each node's pod range (10.244.N.0/24, fd00:244:N::/48) to it, so
pods reach pods on other nodes and the client reaches the nodes, as a flat
cluster network does. Every pod runs the sandbox's HTTP and UDP server on
port 8080, answering with its name (``node-N-pod-K``). Leaving the ``with``
block stops the servers and removes the namespaces, also after an error.
"""

from __future__ import annotations

import ipaddress
import os

import attrs

from pyebpflb.model import Address
from pyebpflb.testing.sandbox import Host, Namespaces, _ip, _sysctl, http_get, start_server


@attrs.frozen
class Node:
    """A node of the cluster: its namespace and address on the router's link, its pods."""

    name: str
    host: Host  # iface eth0, towards the router
    pods: tuple[Host, ...]  # iface eth0 each, towards this node

    @property
    def netns(self) -> str:
        return self.host.netns

    def address(self, family: int) -> Address:
        return self.host.address(family)


class Cluster(Namespaces):
    """An external client, a router and ``nodes`` nodes of ``pods`` pods each."""

    def __init__(self, nodes: int = 2, pods: int = 2, *, prefix: str = "pyebpflb") -> None:
        for what, value, most in (("nodes", nodes, 8), ("pods", pods, 14)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ValueError(f"{what} must be an integer from 1 to {most}, got {value!r}")
        tag = f"{prefix}-{os.getpid()}"
        v4, v6 = ipaddress.IPv4Address, ipaddress.IPv6Address
        self.client = Host("client", f"{tag}-ext", "eth0", v4("10.70.0.2"), v6("fd00:70::2"))
        self.router = Host("router", f"{tag}-rt", "ext", v4("10.70.0.1"), v6("fd00:70::1"))
        self.nodes = [
            Node(
                f"node-{n}",
                Host(f"node-{n}", f"{tag}-n{n}", "eth0", v4(f"10.80.{n}.2"), v6(f"fd00:80:{n}::2")),
                tuple(
                    Host(
                        f"node-{n}-pod-{k}",
                        f"{tag}-n{n}p{k}",
                        "eth0",
                        v4(f"10.244.{n}.{16 * k + 2}"),
                        v6(f"fd00:244:{n}:{k}::2"),
                    )
                    for k in range(1, pods + 1)
                ),
            )
            for n in range(1, nodes + 1)
        ]
        super().__init__()

    @property
    def namespaces(self) -> list[str]:
        found = [self.client.netns, self.router.netns]
        for node in self.nodes:
            found += [node.netns, *(pod.netns for pod in node.pods)]
        return found

    @property
    def pods(self) -> list[Host]:
        return [pod for node in self.nodes for pod in node.pods]

    def _add(self, name: str, *, forwarding: bool = False) -> None:
        self._add_netns(name)
        if forwarding:
            _sysctl(name, "net.ipv4.ip_forward", "1")
            _sysctl(name, "net.ipv6.conf.all.forwarding", "1")

    def _wire(
        self,
        near: str,
        near_iface: str,
        far: str,
        far_iface: str,
        addresses: dict[str, tuple[str, str]],
    ) -> None:
        """A veth near <-> far; ``addresses``: namespace -> (IPv4/len, IPv6/len) of its end."""
        _ip("-n", near, "link", "add", near_iface, "type", "veth", "peer", "name", far_iface,
            "netns", far)  # fmt: skip
        for netns, iface in ((near, near_iface), (far, far_iface)):
            ipv4, ipv6 = addresses[netns]
            _ip("-n", netns, "addr", "add", ipv4, "dev", iface)
            _ip("-n", netns, "addr", "add", ipv6, "dev", iface, "nodad")
            _ip("-n", netns, "link", "set", iface, "up")

    def _route(self, netns: str, destination: str, via: str) -> None:
        family = "-6" if ":" in via else "-4"
        _ip("-n", netns, family, "route", "add", destination, "via", via)

    def _build(self) -> None:
        client, router = self.client, self.router
        self._add(client.netns)
        self._add(router.netns, forwarding=True)
        self._wire(
            router.netns,
            router.iface,
            client.netns,
            client.iface,
            {router.netns: ("10.70.0.1/24", "fd00:70::1/64"),
             client.netns: ("10.70.0.2/24", "fd00:70::2/64")},
        )  # fmt: skip
        self._route(client.netns, "default", "10.70.0.1")
        self._route(client.netns, "default", "fd00:70::1")
        for n, node in enumerate(self.nodes, start=1):
            self._add(node.netns, forwarding=True)
            self._wire(
                router.netns,
                f"n{n}",
                node.netns,
                "eth0",
                {router.netns: (f"10.80.{n}.1/24", f"fd00:80:{n}::1/64"),
                 node.netns: (f"10.80.{n}.2/24", f"fd00:80:{n}::2/64")},
            )  # fmt: skip
            self._route(node.netns, "default", f"10.80.{n}.1")
            self._route(node.netns, "default", f"fd00:80:{n}::1")
            self._route(router.netns, f"10.244.{n}.0/24", f"10.80.{n}.2")
            self._route(router.netns, f"fd00:244:{n}::/48", f"fd00:80:{n}::2")
            for k, pod in enumerate(node.pods, start=1):
                self._add(pod.netns)
                self._wire(
                    node.netns,
                    f"p{k}",
                    pod.netns,
                    "eth0",
                    {node.netns: (f"10.244.{n}.{16 * k + 1}/28", f"fd00:244:{n}:{k}::1/64"),
                     pod.netns: (f"10.244.{n}.{16 * k + 2}/28", f"fd00:244:{n}:{k}::2/64")},
                )  # fmt: skip
                self._route(pod.netns, "default", f"10.244.{n}.{16 * k + 1}")
                self._route(pod.netns, "default", f"fd00:244:{n}:{k}::1")
        for pod in self.pods:
            start_server(pod, self._servers)

    def http_get(
        self,
        address: Address | str,
        port: int,
        *,
        timeout: float = 2.0,
        source: Address | str | None = None,
        path: str = "/",
    ) -> str:
        """GET ``path`` from the external client on a new connection (from ``source``,
        one of its addresses): "/" answers the pod's name, "/peer" its name and the
        client address it sees."""
        return http_get(self.client, address, port, timeout, None, source, path)

    def add_client_address(self, address: Address | str) -> Address:
        """Give the external client another address (a second client, as the nodes see
        it); the router reaches it on the client's link."""
        added = ipaddress.ip_address(address)
        length = 24 if added.version == 4 else 64
        extra = ["nodad"] if added.version == 6 else []
        _ip("-n", self.client.netns, "addr", "add", f"{added}/{length}", "dev", "eth0", *extra)
        return added


__all__ = ["Cluster", "Node"]
