"""North-south traffic in a small cluster (pyebpflb.testing.cluster): an external
client reaches NodePorts, load-balancer IPs and external IPs through the router,
each node running its own datapath on its link to the router, as kube-proxy (or
Cilium) runs on every node.

Every pod's server says who it is and whom it sees (``/peer``), so each test
asserts where a connection went and with which source it arrived.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import PIN_ROOT

import pyebpflb as lb
from pyebpflb.testing.cluster import Cluster
from pyebpflb.testing.sandbox import HttpConnection

pytestmark = pytest.mark.kernel  # network namespaces and BPF programs: root

CLUSTER_IP = "10.96.0.10"
LB_IP, LB_IP6 = "10.99.0.1", "fd00:99::1"
EXTERNAL_IP = "10.98.0.1"
OTHER_CLIENT = "10.70.0.3"
TRIES = 48  # new connections a check: all of four backends answer (p = 4e-6 to miss one)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(nodes=2, pods=2) as built:
        router = built.router.netns
        # What a cloud load balancer or BGP does: the load-balancer and external IPs,
        # and (for the tests that need it) the ClusterIP range, are routed to node 1.
        for destination, via in (
            (f"{LB_IP}/32", "10.80.1.2"),
            (f"{EXTERNAL_IP}/32", "10.80.1.2"),
            ("10.96.0.0/16", "10.80.1.2"),
            (f"{LB_IP6}/128", "fd00:80:1::2"),
        ):
            subprocess.run(
                ["ip", "-n", router, "route", "add", destination, "via", via], check=True
            )
        built.add_client_address(OTHER_CLIENT)
        yield built


@pytest.fixture
def datapaths(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[list[lb.Datapath]]:
    """One datapath per node, on its link to the router, knowing its node."""
    made: list[lb.Datapath] = []
    try:
        for node in cluster.nodes:
            name = f"t{os.getpid()}-{node.name}-{request.node.name}"[:60]
            dp = lb.Datapath(
                name,
                netns=node.netns,
                pin_root=PIN_ROOT,
                node=lb.Node(node.name, [node.host.ipv4, node.host.ipv6]),
            )
            made.append(dp)
            dp.attach("eth0")
        yield made
    finally:
        for dp in made:
            dp.destroy()


def backends(
    cluster: Cluster, family: int = 4, nodes: tuple[int, ...] = (1, 2)
) -> list[lb.Backend]:
    return [
        lb.Backend(pod.address(family), 8080, node=node.name)
        for n, node in enumerate(cluster.nodes, start=1)
        if n in nodes
        for pod in node.pods
    ]


def answers(cluster: Cluster, address: str, port: int, **kwargs: object) -> dict[str, set[str]]:
    """Pod -> the client addresses it saw, over TRIES new connections."""
    seen: dict[str, set[str]] = {}
    for _ in range(TRIES):
        pod, peer = cluster.http_get(address, port, path="/peer", **kwargs).split()  # type: ignore[arg-type]
        seen.setdefault(pod, set()).add(peer)
    return seen


def refused(cluster: Cluster, address: str, port: int, **kwargs: object) -> bool:
    """The connection gets no answer (dropped: a timeout, not a reset)."""
    with pytest.raises(OSError) as caught:
        cluster.http_get(address, port, timeout=0.5, **kwargs)  # type: ignore[arg-type]
    return isinstance(caught.value, TimeoutError)


def test_nodeport_on_each_node_reaches_pods_on_both_nodes_remote_ones_by_snat(
    cluster: Cluster, datapaths: list[lb.Datapath]
) -> None:
    service = lb.Service(
        CLUSTER_IP, 80, name="default/web", backends=backends(cluster), node_port=30080
    )
    for dp in datapaths:
        dp.sync([service])
    client = str(cluster.client.ipv4)
    for node in cluster.nodes:
        seen = answers(cluster, str(node.host.ipv4), 30080)
        assert sorted(seen) == sorted(p.name for p in cluster.pods)
        for pod, peers in seen.items():
            local = pod.startswith(node.name + "-")
            # A local backend sees the client (no SNAT needed: its answer leaves through
            # this node); a remote one sees the balancing node, whose answer comes back.
            assert peers == ({client} if local else {str(node.host.ipv4)}), (node.name, pod)


def test_nodeport_over_ipv6_and_its_own_counters(
    cluster: Cluster, datapaths: list[lb.Datapath]
) -> None:
    service = lb.Service(
        "fd00:96::10", 80, name="default/web6", backends=backends(cluster, 6), node_port=30081
    )
    for dp in datapaths:
        dp.sync([service])
    node = cluster.nodes[1]
    seen = answers(cluster, str(node.host.ipv6), 30081)
    assert sorted(seen) == sorted(p.name for p in cluster.pods)
    assert seen["node-1-pod-1"] == {str(node.host.ipv6)}
    assert seen["node-2-pod-1"] == {str(cluster.client.ipv6)}
    cluster_ip, node_port = datapaths[1].frontends
    assert node_port.kind is lb.Frontend.NODE_PORT and str(node_port.vip) == "::"
    assert datapaths[1].stats(node_port).packets >= 3 * TRIES  # SYN, request, ACKs, FIN
    assert datapaths[1].stats(node_port).replies.packets >= 3 * TRIES
    assert datapaths[1].stats(cluster_ip).packets == 0
    assert datapaths[0].stats(node_port).packets == 0


def test_load_balancer_and_external_ips_reach_both_nodes_and_read_back_whole(
    cluster: Cluster, datapaths: list[lb.Datapath]
) -> None:
    service = lb.Service(
        CLUSTER_IP,
        80,
        name="default/web",
        backends=backends(cluster),
        node_port=30080,
        load_balancer_ips=[LB_IP],
        external_ips=[EXTERNAL_IP],
    )
    for dp in datapaths:
        dp.sync([service])
    for address in (LB_IP, EXTERNAL_IP):
        seen = answers(cluster, address, 80)
        assert sorted(seen) == sorted(p.name for p in cluster.pods)
        assert seen["node-2-pod-2"] == {"10.80.1.2"}  # node 1 balanced it
        assert seen["node-1-pod-2"] == {str(cluster.client.ipv4)}
    assert datapaths[0].services == [service]
    kinds = [(f.kind, str(f.vip), f.port) for f in datapaths[0].frontends]
    assert kinds == [
        (lb.Frontend.CLUSTER_IP, CLUSTER_IP, 80),
        (lb.Frontend.NODE_PORT, "0.0.0.0", 30080),
        (lb.Frontend.EXTERNAL_IP, EXTERNAL_IP, 80),
        (lb.Frontend.LOAD_BALANCER, LB_IP, 80),
    ]
    # Another process opening the datapath reads the same Service back.
    script = (
        "import pyebpflb as lb; "
        f"dp = lb.Datapath({datapaths[0].name!r}, pin_root={str(PIN_ROOT)!r}, "
        f"netns={cluster.nodes[0].netns!r}, create=False); "
        "s = dp.services[0]; print(s.node_port, [str(a) for a in s.load_balancer_ips], "
        "[str(a) for a in s.external_ips])"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["30080", f"['{LB_IP}']", f"['{EXTERNAL_IP}']"]
    # The NodePort goes when the Service no longer has one; the rest stays.
    datapaths[0].upsert(
        lb.Service(
            CLUSTER_IP,
            80,
            name="default/web",
            backends=backends(cluster),
            load_balancer_ips=[LB_IP],
        )
    )
    assert [f.kind for f in datapaths[0].frontends] == [
        lb.Frontend.CLUSTER_IP,
        lb.Frontend.LOAD_BALANCER,
    ]
    with pytest.raises(ConnectionRefusedError):  # the node's own stack: nothing listens
        cluster.http_get("10.80.1.2", 30080, timeout=1)
    assert datapaths[0].remove(service)
    assert datapaths[0].frontends == []


def test_local_policy_keeps_the_client_address_and_uses_local_pods_only(
    cluster: Cluster, datapaths: list[lb.Datapath]
) -> None:
    service = lb.Service(
        CLUSTER_IP,
        80,
        name="default/web",
        backends=backends(cluster),
        node_port=30080,
        load_balancer_ips=[LB_IP],
        external_traffic_policy="local",
    )
    for dp in datapaths:
        dp.sync([service])
    client = str(cluster.client.ipv4)
    for n, node in enumerate(cluster.nodes, start=1):
        seen = answers(cluster, str(node.host.ipv4), 30080)
        assert seen == {f"node-{n}-pod-1": {client}, f"node-{n}-pod-2": {client}}
    assert answers(cluster, LB_IP, 80).keys() == {"node-1-pod-1", "node-1-pod-2"}
    # The ClusterIP keeps its own (Cluster) policy: pods of both nodes.
    assert len(answers(cluster, CLUSTER_IP, 80)) == 4


def test_local_policy_with_no_local_pod_drops_and_the_health_port_says_so(
    cluster: Cluster, datapaths: list[lb.Datapath]
) -> None:
    service = lb.Service(
        CLUSTER_IP,
        80,
        name="shop/web",
        backends=backends(cluster, nodes=(2,)),
        node_port=30080,
        load_balancer_ips=[LB_IP],
        external_traffic_policy="local",
        health_check_node_port=31234,
    )
    for dp in datapaths:
        dp.sync([service])
    with lb.HealthServer(datapaths[0], port=10256) as one, lb.HealthServer(datapaths[1]) as two:
        assert one.ports == two.ports == [31234]
        assert refused(cluster, "10.80.1.2", 30080)
        assert refused(cluster, LB_IP, 80)
        assert datapaths[0].drops()["no local backend"].packets >= 2
        assert set(answers(cluster, "10.80.2.2", 30080)) == {"node-2-pod-1", "node-2-pod-2"}
        status, headers, body = http(cluster, "10.80.1.2", 31234)
        assert status == 503
        assert body == {
            "service": {"namespace": "shop", "name": "web"},
            "localEndpoints": 0,
            "serviceProxyHealthy": True,
        }
        status, headers, body = http(cluster, "10.80.2.2", 31234)
        assert (status, body["localEndpoints"]) == (200, 2)
        assert headers["x-load-balancing-endpoint-weight"] == "2"
        for path in ("/healthz", "/livez"):
            status, _, body = http(cluster, "10.80.1.2", 10256, path)
            assert status == 200 and body["nodeEligible"] is True and body["lastUpdated"]
        # A pod starting on node 1: its health port turns healthy once it follows.
        datapaths[0].upsert(
            lb.Service(
                CLUSTER_IP,
                80,
                name="shop/web",
                backends=backends(cluster),
                node_port=30080,
                load_balancer_ips=[LB_IP],
                external_traffic_policy="local",
                health_check_node_port=31234,
            )
        )
        one.refresh()
        status, _, body = http(cluster, "10.80.1.2", 31234)
        assert (status, body["localEndpoints"]) == (200, 2)
        datapaths[0].sync([])
        one.refresh()
        assert one.ports == []
        with pytest.raises(ConnectionRefusedError):
            http(cluster, "10.80.1.2", 31234)
    with pytest.raises(ConnectionRefusedError):
        http(cluster, "10.80.1.2", 10256, "/healthz")


def test_source_ranges_admit_only_their_clients_to_the_load_balancer_ip(
    cluster: Cluster, datapaths: list[lb.Datapath]
) -> None:
    client = str(cluster.client.ipv4)
    service = lb.Service(
        CLUSTER_IP,
        80,
        name="default/web",
        backends=backends(cluster),
        node_port=30080,
        load_balancer_ips=[LB_IP],
        source_ranges=[f"{client}/32"],
    )
    # A policy allowing everything to the pods cannot open what the ranges close.
    opened = lb.Policy("open", [lb.Rule("allow", "0.0.0.0/0")], default="deny")
    for dp in datapaths:
        dp.sync([service], [opened])
    assert len(answers(cluster, LB_IP, 80, source=client)) == 4
    assert refused(cluster, LB_IP, 80, source=OTHER_CLIENT)
    assert datapaths[0].drops()["source range"].packets >= 1
    # The ClusterIP and the NodePort are not load-balancer frontends: open to both.
    assert len(answers(cluster, CLUSTER_IP, 80, source=OTHER_CLIENT)) == 4
    assert len(answers(cluster, "10.80.1.2", 30080, source=OTHER_CLIENT)) == 4
    assert datapaths[0].services == [service]


def http(
    cluster: Cluster, address: str, port: int, path: str = "/"
) -> tuple[int, dict[str, str], dict[str, object]]:
    """GET from the external client: status, headers (lower-case names), JSON body."""
    with cluster.client.socket(4) as sock:
        sock.settimeout(2)
        sock.connect((address, port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_a_frontend_held_by_another_service_is_refused(
    cluster: Cluster, datapaths: list[lb.Datapath]
) -> None:
    dp = datapaths[0]
    dp.upsert(lb.Service(CLUSTER_IP, 80, name="a", node_port=30080))
    with pytest.raises(ValueError, match=r"\*:30080/tcp is held by service 'a', not 'b'"):
        dp.upsert(lb.Service("10.96.0.11", 80, name="b", node_port=30080))
    with pytest.raises(ValueError, match="have the same vip, port and protocol"):
        dp.sync(
            [
                lb.Service(CLUSTER_IP, 80, name="a", node_port=30080),
                lb.Service("10.96.0.11", 80, name="b", node_port=30080),
            ]
        )
    assert [s.name for s in dp.services] == ["a"]


class Capture:
    """Frames crossing an interface of a namespace (an AF_PACKET socket: the router's
    own view, as tcpdump would show it), read after the traffic: (source, source
    port, destination, destination port) of each IPv4 TCP segment."""

    def __init__(self, netns: str, iface: str) -> None:
        from pyebpflb._bpf.netns import entered

        with entered(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((iface, 0))
        self.sock.setblocking(False)

    def segments(self) -> list[tuple[str, int, str, int]]:
        found = []
        while True:
            try:
                frame = self.sock.recv(65535)
            except BlockingIOError:
                return found
            if frame[12:14] != b"\x08\x00" or frame[23] != socket.IPPROTO_TCP:
                continue
            ihl = (frame[14] & 0x0F) * 4
            tcp = 14 + ihl
            ports = frame[tcp : tcp + 4]
            source, destination = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
            sport, dport = int.from_bytes(ports[:2], "big"), int.from_bytes(ports[2:], "big")
            found.append((source, sport, destination, dport))

    def close(self) -> None:
        self.sock.close()


def test_dsr_answers_leave_from_the_backends_node_with_the_frontends_address(
    cluster: Cluster, datapaths: list[lb.Datapath]
) -> None:
    service = lb.Service(
        CLUSTER_IP,
        80,
        name="default/web",
        backends=backends(cluster, nodes=(2,)),
        node_port=30080,
        load_balancer_ips=[LB_IP],
        forwarding="dsr",
    )
    for dp in datapaths:
        dp.sync([service])
    client = str(cluster.client.ipv4)
    towards = {n: Capture(cluster.router.netns, f"n{n}") for n in (1, 2)}
    try:
        for address, port in (("10.80.1.2", 30080), (LB_IP, 80)):
            seen = answers(cluster, address, port)
            # Node 1 balanced every connection to node 2's pods: they see the client.
            assert seen == {"node-2-pod-1": {client}, "node-2-pod-2": {client}}
            answers_via = {
                n: [s for s in c.segments() if s[2] == client] for n, c in towards.items()
            }
            # Every answer came from node 2's link, from a frontend the client called (the
            # last segments of the connections to the other frontend may come in late).
            assert not answers_via[1], answers_via[1][:3]
            frontends = {("10.80.1.2", 30080), (LB_IP, 80)}
            assert {(s[0], s[1]) for s in answers_via[2]} <= frontends
            assert sum(1 for s in answers_via[2] if (s[0], s[1]) == (address, port)) >= 3 * TRIES
    finally:
        for capture in towards.values():
            capture.close()
    assert datapaths[0].services == [service]
    assert datapaths[0].conntrack()  # node 1 keeps its half of every flow


def test_dsr_over_ipv6_carries_the_frontend_in_a_destination_option(
    cluster: Cluster, datapaths: list[lb.Datapath]
) -> None:
    service = lb.Service(
        "fd00:96::10",
        80,
        name="default/web6",
        backends=backends(cluster, 6, (2,)),
        node_port=30081,
        forwarding="dsr",
    )
    for dp in datapaths:
        dp.sync([service])
    seen = answers(cluster, str(cluster.nodes[0].host.ipv6), 30081)
    assert seen == {
        "node-2-pod-1": {str(cluster.client.ipv6)},
        "node-2-pod-2": {str(cluster.client.ipv6)},
    }


def test_snat_keeps_the_clients_port_unless_a_mapping_or_a_node_socket_holds_it(
    cluster: Cluster, datapaths: list[lb.Datapath]
) -> None:
    """Two clients with the same source port, to the same remote backend through the
    same node: the second mapping takes another port. A connection the node itself
    holds from that port to the backend is not taken over either."""
    only = [lb.Backend(cluster.nodes[1].pods[0].ipv4, 8080, node="node-2")]
    service = lb.Service(CLUSTER_IP, 80, name="default/web", backends=only, node_port=30080)
    for dp in datapaths:
        dp.sync([service])
    pod = str(cluster.nodes[1].pods[0].ipv4)
    # The node's own connection, from its address and port 40001, to the pod.
    own = cluster.nodes[0].host.socket(4)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    own.bind((str(cluster.nodes[0].host.ipv4), 40001))
    own.connect((pod, 8080))
    try:
        with cluster.client.socket(4) as first, cluster.client.socket(4) as second:
            for sock, source in ((first, str(cluster.client.ipv4)), (second, OTHER_CLIENT)):
                sock.settimeout(2)
                sock.bind((source, 40001))
                sock.connect(("10.80.1.2", 30080))
            for sock in (first, second):
                assert HttpConnection(sock).get("/peer") == "node-2-pod-1 10.80.1.2"
        # The node's own connection still answers.
        assert HttpConnection(own).get("/peer") == "node-2-pod-1 10.80.1.2"
    finally:
        own.close()
    held = {
        (int(k.dir), int.from_bytes(bytes(k.dport.to_bytes(2, "little")), "big"))
        for k in _snat_keys(datapaths[0])
    }
    ports = {port for direction, port in held if direction == 1}  # IN halves: the node's ports
    assert len(ports) == 2 and 40001 not in ports  # neither took the node's own tuple


def _snat_keys(dp: lb.Datapath) -> list[object]:
    from pyebpflb import maps

    return [
        maps.typed("struct pyebpflb_ct_key", k) for k, _ in dp._object.map(maps.SNAT).lookup_batch()
    ]


def test_closed_snat_mappings_are_collected_after_the_closing_timeout(
    cluster: Cluster, request: pytest.FixtureRequest
) -> None:
    node = cluster.nodes[0]
    timeouts = lb.ConntrackTimeouts(tcp_closing=0.2)
    name = f"t{os.getpid()}-gc"
    with lb.Datapath(
        name,
        netns=node.netns,
        pin_root=PIN_ROOT,
        ct_timeouts=timeouts,
        node=lb.Node(node.name, [node.host.ipv4]),
    ) as dp:
        dp.attach("eth0")
        only = [lb.Backend(cluster.nodes[1].pods[0].ipv4, 8080, node="node-2")]
        dp.sync([lb.Service(CLUSTER_IP, 80, name="default/web", backends=only, node_port=30080)])
        for _ in range(3):
            assert cluster.http_get("10.80.1.2", 30080).startswith("node-2-pod-1")
        assert len(_snat_keys(dp)) == 6  # two halves a connection
        time.sleep(0.5)  # past the closing timeout of these closed connections
        dp.collect_garbage()
        assert _snat_keys(dp) == []


@contextlib.contextmanager
def mtu(netns: str, iface: str, value: int) -> Iterator[None]:
    """A link of the router with a smaller MTU (its other end keeps 1500), for the test."""
    subprocess.run(["ip", "-n", netns, "link", "set", iface, "mtu", str(value)], check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "-n", netns, "link", "set", iface, "mtu", "1500"], check=True)


def test_path_mtu_towards_the_client_reaches_a_remote_backend_through_snat(
    cluster: Cluster, datapaths: list[lb.Datapath]
) -> None:
    """The router's link to the client has 1280 bytes: the remote pod's 1500-byte answers
    (SNATed back through node 1) meet 'fragmentation needed' sent to node 1, which
    passes it on to the pod, quoting the packet as the pod sent it (to node 1's port)."""
    only = [lb.Backend(cluster.nodes[1].pods[0].ipv4, 8080, node="node-2")]
    service = lb.Service(CLUSTER_IP, 80, name="default/big", backends=only, node_port=30080)
    for dp in datapaths:
        dp.sync([service])
    with mtu(cluster.router.netns, cluster.router.iface, 1280):
        body = cluster.http_get("10.80.1.2", 30080, path="/bytes/300000", timeout=10.0)
    assert len(body) == 300_000 and set(body) == {"x"}


def test_path_mtu_towards_a_remote_backend_reaches_the_client_through_snat(
    cluster: Cluster, datapaths: list[lb.Datapath]
) -> None:
    """The router's link to node 2 has 1280 bytes: the client's 1500-byte upload, SNATed
    by node 1, meets 'fragmentation needed' sent to node 1's address about node 1's
    port, which node 1 turns into one for the client about the NodePort it called."""
    only = [lb.Backend(cluster.nodes[1].pods[0].ipv4, 8080, node="node-2")]
    service = lb.Service(CLUSTER_IP, 80, name="default/big", backends=only, node_port=30080)
    for dp in datapaths:
        dp.sync([service])
    data = b"y" * 300_000
    with mtu(cluster.router.netns, "n2", 1280), cluster.client.socket(4) as sock:
        sock.settimeout(10.0)
        sock.connect(("10.80.1.2", 30080))
        head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
        sock.sendall(head.encode() + data)
        assert HttpConnection(sock).read() == str(len(data))


def test_nodeports_are_served_on_the_addresses_the_datapath_is_told(cluster: Cluster) -> None:
    """Node(nodeport_addresses=[...]) (kube-proxy's --nodeport-addresses): the NodePort
    answers there, and the node's own address is left to the node."""
    node = cluster.nodes[0]
    subprocess.run(["ip", "-n", node.netns, "addr", "add", "10.80.1.3/24", "dev", "eth0"],
                   check=True)  # fmt: skip
    told = lb.Node(node.name, [node.host.ipv4], nodeport_addresses=["10.80.1.3"])
    try:
        with lb.Datapath(
            f"t{os.getpid()}-told", netns=node.netns, pin_root=PIN_ROOT, node=told
        ) as dp:
            dp.attach("eth0")
            local = [lb.Backend(p.ipv4, 8080, node=node.name) for p in node.pods]
            dp.sync([lb.Service(CLUSTER_IP, 80, name="default/web", backends=local,
                                node_port=30080)])  # fmt: skip
            assert cluster.http_get("10.80.1.3", 30080).startswith("node-1-pod-")
            with pytest.raises(ConnectionRefusedError):
                cluster.http_get("10.80.1.2", 30080, timeout=1)
            assert dp.node == told
    finally:
        subprocess.run(["ip", "-n", node.netns, "addr", "del", "10.80.1.3/24", "dev", "eth0"],
                       check=True)  # fmt: skip


def test_path_mtu_towards_the_client_reaches_a_dsr_backend(
    cluster: Cluster, datapaths: list[lb.Datapath]
) -> None:
    """DSR: the remote pod's answers leave node 2 from the frontend; the router's 1280-byte
    link to the client sends 'fragmentation needed' to the frontend (node 1), which
    relays it to the pod."""
    only = [lb.Backend(cluster.nodes[1].pods[0].ipv4, 8080, node="node-2")]
    service = lb.Service(CLUSTER_IP, 80, name="default/big", backends=only, node_port=30080,
                         forwarding="dsr")  # fmt: skip
    for dp in datapaths:
        dp.sync([service])
    with mtu(cluster.router.netns, cluster.router.iface, 1280):
        body = cluster.http_get("10.80.1.2", 30080, path="/bytes/300000", timeout=10.0)
    assert len(body) == 300_000 and set(body) == {"x"}
