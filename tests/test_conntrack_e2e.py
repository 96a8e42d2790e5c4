"""Conntrack under real traffic: a client that reuses a few source ports for VIP and
direct connections alike, closing with RST, as kube-proxy's iptables mode serves it."""

from __future__ import annotations

import collections
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import PIN_ROOT

import pyebpflb as lb
from pyebpflb import maps
from pyebpflb._bpf.netns import entered
from pyebpflb.testing.sandbox import BACKEND_PORT, Host, HttpConnection, Sandbox

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

VIPS = ["10.96.0.10", "10.96.0.11"]
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(backends=2, prefix="pyebpflb-ct") as built:
        yield built


def ask(sandbox: Sandbox, address: str, port: int, source_port: int) -> str:
    """GET / from ``source_port`` on a new connection, closed with RST."""
    sock = sandbox.client.socket(4)
    try:
        sock.settimeout(2.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", source_port))
        sock.connect((address, port))
        answer = HttpConnection(sock).get()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        return answer
    finally:
        sock.close()


def test_vip_and_direct_connections_reusing_40_ports_with_rst_never_fail(
    sandbox: Sandbox,
) -> None:
    first, second = sandbox.backends
    with lb.Datapath(f"t{os.getpid()}-ct-mix", netns=sandbox.lb.netns, pin_root=PIN_ROOT) as dp:
        dp.attach(sandbox.lb.iface)
        dp.sync(
            [
                lb.Service(
                    vip,
                    80,
                    name=f"default/mix-{index}",
                    backends=[lb.Backend(b.ipv4, BACKEND_PORT) for b in (first, second)],
                )
                for index, vip in enumerate(VIPS)
            ]
        )
        targets = [
            (VIPS[0], 80, None),
            (str(first.ipv4), BACKEND_PORT, first.name),
            (VIPS[1], 80, None),
            (str(second.ipv4), BACKEND_PORT, second.name),
        ]
        failures: list[str] = []
        answers = 0
        for round_ in range(250):
            port = 42000 + round_ % 40
            for address, target_port, expected in targets:
                try:
                    name = ask(sandbox, address, target_port, port)
                except OSError as exc:
                    failures.append(f"round {round_} port {port} -> {address}: {exc!r}")
                    continue
                if expected is not None and name != expected:
                    failures.append(f"round {round_} {address} answered by {name}")
                answers += 1
        assert failures == [], f"{len(failures)} of 1000 failed: {failures[:5]}"
        assert answers == 1000


def test_a_client_of_a_backend_that_vanished_is_reset_and_reconnects_to_another() -> None:
    source_port = 43210
    with (
        Sandbox(backends=2, prefix="pyebpflb-gone") as sandbox,
        lb.Datapath(f"t{os.getpid()}-ct-gone", netns=sandbox.lb.netns, pin_root=PIN_ROOT) as dp,
    ):
        dp.attach(sandbox.lb.iface)
        web = lb.Service(
            VIPS[0],
            80,
            name="default/gone",
            backends=[lb.Backend(b.ipv4, BACKEND_PORT) for b in sandbox.backends],
        )
        dp.sync([web])
        sock = sandbox.client.socket(4)
        sock.settimeout(2.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", source_port))
        sock.connect((VIPS[0], 80))
        with HttpConnection(sock) as connection:
            gone = connection.get()
            (vanished,) = [b for b in sandbox.backends if b.name == gone]
            # The pod's node dies: no FIN, no RST, nothing answers at its address.
            subprocess.run(["ip", "-n", vanished.netns, "link", "set", "eth0", "down"], check=True)
            started = time.monotonic()
            dp.sync([web.with_backends([b for b in web.backends if b.address != vanished.ipv4])])
            with pytest.raises(ConnectionResetError):
                connection.get()  # the datapath resets the dead flow at once
        answer = ask(sandbox, VIPS[0], 80, source_port)
        took = time.monotonic() - started
        assert answer != gone and answer in {b.name for b in sandbox.backends}
        assert took < 3.0, f"reconnected after {took:.1f} s"
        assert dp.drops()["backend gone"].packets >= 1


@pytest.mark.parametrize("family", [4, 6])
def test_a_1_mb_answer_through_the_vip_finds_the_path_mtu_of_a_1280_byte_link(
    family: int,
) -> None:
    """A router on the client's side with a 1280-byte MTU towards it: the backend's
    1500-byte segments (from the VIP) meet 'fragmentation needed' / 'packet too big'
    sent to the VIP, which the datapath passes on to the backend."""
    vip = VIPS[0] if family == 4 else "fd00:96::10"
    with (
        Sandbox(backends=1, prefix="pyebpflb-pmtu", router_mtu=1280) as sandbox,
        lb.Datapath(
            f"t{os.getpid()}-pmtu{family}", netns=sandbox.lb.netns, pin_root=PIN_ROOT
        ) as dp,
    ):
        dp.attach(sandbox.lb.iface)
        (backend,) = sandbox.backends
        dp.sync(
            [
                lb.Service(
                    vip,
                    80,
                    name="default/big",
                    backends=[lb.Backend(backend.address(family), 8080)],
                )
            ]
        )
        body = sandbox.http_get(vip, 80, path="/bytes/1000000", timeout=10.0)
        assert len(body) == 1_000_000 and set(body) == {"x"}


def call_from(host: Host, address: str) -> str:
    """GET / from inside ``host`` (a backend) on a new connection."""
    family = 6 if ":" in address else 4
    with host.socket(family) as sock:
        sock.settimeout(2.0)
        sock.connect((address, 80))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\n\r\n")
        return HttpConnection(sock).read()


@pytest.mark.parametrize("family", [4, 6])
def test_each_backend_calling_its_own_service_30_times_gets_30_answers(
    sandbox: Sandbox, family: int
) -> None:
    vip = VIPS[0] if family == 4 else "fd00:96::10"
    with lb.Datapath(
        f"t{os.getpid()}-hairpin{family}", netns=sandbox.lb.netns, pin_root=PIN_ROOT
    ) as dp:
        # Pods' traffic meets the datapath where it enters the node: every backend's link too.
        for iface in [sandbox.lb.iface, *(f"be{i}" for i in range(1, len(sandbox.backends) + 1))]:
            dp.attach(iface)
        dp.sync(
            [
                lb.Service(
                    vip,
                    80,
                    name="default/self",
                    backends=[
                        lb.Backend(b.address(family), BACKEND_PORT) for b in sandbox.backends
                    ],
                )
            ]
        )
        for backend in sandbox.backends:
            answers = collections.Counter(call_from(backend, vip) for _ in range(30))
            assert sum(answers.values()) == 30
            assert answers[backend.name] > 0, f"{backend.name} never reached itself: {answers}"
        assert sandbox.http_get(vip, 80) in {b.name for b in sandbox.backends}  # and clients


@pytest.mark.parametrize("family", [4, 6])
def test_4000_byte_datagrams_through_the_vip_both_ways(sandbox: Sandbox, family: int) -> None:
    """A big query reaches a backend in fragments and is answered; a big answer
    (a large DNS response, say) reaches the client in fragments, from the VIP."""
    vip = VIPS[1] if family == 4 else "fd00:96::11"
    with lb.Datapath(
        f"t{os.getpid()}-frag{family}", netns=sandbox.lb.netns, pin_root=PIN_ROOT
    ) as dp:
        dp.attach(sandbox.lb.iface)
        backends = [lb.Backend(b.address(family), BACKEND_PORT) for b in sandbox.backends]
        dp.sync([lb.Service(vip, 53, protocol="udp", name="default/dns", backends=backends)])
        names = {b.name for b in sandbox.backends}
        name, source = sandbox.udp_request(vip, 53, payload=b"q" * 4000)
        assert name in names and str(source) == vip
        answer, source = sandbox.udp_request(vip, 53, payload=b"/bytes/4000")
        assert answer == "x" * 4000 and str(source) == vip


def test_an_idle_connection_survives_a_flood_of_100_times_the_udp_tables_size() -> None:
    udp_table = 256
    with (
        Sandbox(backends=2, prefix="pyebpflb-flood") as sandbox,
        lb.Datapath(
            f"t{os.getpid()}-flood",
            netns=sandbox.lb.netns,
            pin_root=PIN_ROOT,
            max_conntrack_udp=udp_table,
        ) as dp,
    ):
        dp.attach(sandbox.lb.iface)
        backends = [lb.Backend(b.ipv4, BACKEND_PORT) for b in sandbox.backends]
        web = lb.Service(VIPS[0], 80, name="default/web", backends=backends)
        dns = lb.Service(VIPS[0], 53, protocol="udp", name="default/dns", backends=backends)
        dp.sync([web, dns])
        with sandbox.connection(VIPS[0], 80) as kept:
            owner = kept.get()
            with entered(sandbox.client.netns):  # new UDP flows, each from its own port
                for port in range(20000, 20000 + 100 * udp_table):
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                        sock.bind(("", port))
                        sock.sendto(b"query", (VIPS[0], 53))
            assert dp.stats(dns).packets >= 100 * udp_table - 10  # they all arrived
            assert len(list(dp._object.map(maps.CT_UDP))) <= udp_table
            # The owner stops taking new flows: had the flood evicted the connection's
            # entries, its next segment would be balanced to the other backend.
            draining = [
                lb.Backend(
                    b.address,
                    b.port,
                    state="terminating" if b.address == owner_address(sandbox, owner) else "active",
                )
                for b in backends
            ]
            dp.sync([web.with_backends(draining), dns])
            assert kept.get() == owner


def owner_address(sandbox: Sandbox, name: str) -> object:
    (host,) = [b for b in sandbox.backends if b.name == name]
    return lb.model.to_address(host.ipv4)


def test_one_udp_socket_asking_a_vip_then_its_backend_gets_each_answer_from_whom_it_asked(
    sandbox: Sandbox,
) -> None:
    vip = VIPS[1]
    with lb.Datapath(f"t{os.getpid()}-udpmix", netns=sandbox.lb.netns, pin_root=PIN_ROOT) as dp:
        dp.attach(sandbox.lb.iface)
        backends = [lb.Backend(b.ipv4, BACKEND_PORT) for b in sandbox.backends]
        dp.sync([lb.Service(vip, 53, protocol="udp", name="default/dns", backends=backends)])
        with sandbox.client.socket(4, socket.SOCK_DGRAM) as sock:  # bound to one port, unconnected
            sock.settimeout(2.0)
            sock.bind(("", 5353))
            for _ in range(5):
                sock.sendto(b"query", (vip, 53))
                name, source = sock.recvfrom(2048)
                assert source == (vip, 53)
                (backend,) = [b for b in sandbox.backends if b.name == name.decode().strip()]
                sock.sendto(b"query", (str(backend.ipv4), BACKEND_PORT))
                name, source = sock.recvfrom(2048)
                assert source == (str(backend.ipv4), BACKEND_PORT)
                assert name.decode().strip() == backend.name
