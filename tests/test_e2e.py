"""End to end: real TCP and UDP through a VIP, in a sandbox of namespaces with real servers."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from conftest import PIN_ROOT
from lbtest import attached

import pyebpflb as lb
from pyebpflb.testing.sandbox import BACKEND_PORT, Sandbox

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

VIP = {4: "10.96.0.10", 6: "fd00:96::10"}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(backends=3) as built:
        yield built


@pytest.fixture
def dp(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[lb.Datapath]:
    with attached(sandbox, request) as datapath:
        yield datapath


def web(
    sandbox: Sandbox,
    family: int,
    protocol: str = "tcp",
    port: int = 80,
    backends: list[int] | None = None,
    target: int = BACKEND_PORT,
) -> lb.Service:
    chosen = sandbox.backends if backends is None else [sandbox.backends[i] for i in backends]
    return lb.Service(
        vip=VIP[family],
        port=port,
        protocol=protocol,
        name="default/my-app-service",
        backends=[lb.Backend(b.address(family), target) for b in chosen],
    )


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_tcp_through_the_vip_reaches_every_backend(
    sandbox: Sandbox, dp: lb.Datapath, family: int
) -> None:
    svc = web(sandbox, family)
    dp.sync([svc])
    answers = collections.Counter(sandbox.http_get(VIP[family], 80) for _ in range(60))
    assert set(answers) == {"backend-1", "backend-2", "backend-3"}
    stats = dp.stats(svc)
    assert all(t.packets > 0 for t in stats.backends.values())


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_udp_replies_come_from_the_vip(sandbox: Sandbox, dp: lb.Datapath, family: int) -> None:
    dp.sync([web(sandbox, family, "udp", port=53)])
    answers = [sandbox.udp_request(VIP[family], 53) for _ in range(40)]
    assert {source for _, source in answers} == {lb.model.to_address(VIP[family])}
    assert {name for name, _ in answers} == {"backend-1", "backend-2", "backend-3"}


def test_tcp_peer_address_is_the_vip(sandbox: Sandbox, dp: lb.Datapath) -> None:
    dp.sync([web(sandbox, 4)])
    with sandbox.connection(VIP[4], 80) as conn:
        conn.get()
        assert conn.socket.getpeername() == (VIP[4], 80)


def test_all_requests_of_one_connection_reach_one_backend(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    dp.sync([web(sandbox, 4)])
    with sandbox.connection(VIP[4], 80) as conn:
        assert len({conn.get() for _ in range(30)}) == 1


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_service_without_backends_refuses_at_once(
    sandbox: Sandbox, dp: lb.Datapath, family: int
) -> None:
    dp.sync([web(sandbox, family, backends=[]), web(sandbox, family, "udp", 53, backends=[])])
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        sandbox.http_get(VIP[family], 80, timeout=5)
    with pytest.raises(ConnectionRefusedError):
        sandbox.udp_request(VIP[family], 53, timeout=5)
    assert time.monotonic() - started < 1.0  # refused, not timed out
    assert dp.drops()["no backend"].packets >= 2


def test_icmp_error_from_a_backend_reaches_the_client_socket(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    # Nothing listens on 9999: each backend answers port unreachable, which
    # must come back as an error on the client's socket connected to the VIP.
    dp.sync([web(sandbox, 4, "udp", 53, target=9999)])
    with pytest.raises(ConnectionRefusedError):
        sandbox.udp_request(VIP[4], 53, timeout=5)


def test_a_draining_backend_finishes_its_connections_and_a_removed_one_resets_them(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    svc = web(sandbox, 4)
    dp.sync([svc])
    with sandbox.connection(VIP[4], 80) as kept:
        first = kept.get()
        gone = lb.model.to_address(sandbox.backends[int(first[-1]) - 1].ipv4)
        draining = [
            lb.Backend(b.address, b.port, state="terminating" if b.address == gone else "active")
            for b in svc.backends
        ]
        dp.upsert(svc.with_backends(draining))
        answers = {sandbox.http_get(VIP[4], 80) for _ in range(30)}
        assert first not in answers and len(answers) == 2
        # The open connection finishes on the backend it had, which takes no new ones.
        assert {kept.get() for _ in range(5)} == {first}
        # Removed (the pod is gone): its connections end at once, as in Cilium.
        dp.upsert(svc.with_backends([b for b in svc.backends if b.address != gone]))
        with pytest.raises(ConnectionResetError):
            kept.get()
        assert {sandbox.http_get(VIP[4], 80) for _ in range(30)} == answers


SECOND_PROCESS = textwrap.dedent(
    """
    import sys
    import pyebpflb as lb
    name, netns, pin_root, vip, backend = sys.argv[1:6]
    dp = lb.Datapath(name, persist=True, netns=netns, pin_root=pin_root)
    dp.attach("lb0")  # the same programs' successors take over, in place
    dp.upsert(lb.Service(vip=vip, port=8000, name="new", backends=[lb.Backend(backend, 8080)]))
    print(dp.adopted, len(dp.services))
    dp.close()
    """
)


def test_a_second_process_adopts_a_persisted_datapath_without_breaking_a_connection(
    sandbox: Sandbox,
) -> None:
    name = f"t{os.getpid()}-adopt"
    svc = web(sandbox, 4)
    first = lb.Datapath(name, persist=True, netns=sandbox.lb.netns, pin_root=PIN_ROOT)
    try:
        first.attach(sandbox.lb.iface)
        first.sync([svc])
        with sandbox.connection(VIP[4], 80) as conn:
            backend = conn.get()
            first.close()  # persist: programs stay attached, maps stay pinned
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    SECOND_PROCESS,
                    name,
                    sandbox.lb.netns,
                    str(PIN_ROOT),
                    "10.96.0.20",
                    str(sandbox.backends[0].ipv4),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            assert out.stdout.split() == ["True", "2"]
            assert {conn.get() for _ in range(5)} == {backend}
        assert sandbox.http_get("10.96.0.20", 8000) == "backend-1"
    finally:
        lb.Datapath(name, netns=sandbox.lb.netns, pin_root=PIN_ROOT).destroy()
    with pytest.raises(OSError):
        sandbox.http_get(VIP[4], 80, timeout=0.5)


def test_weights_one_two_three_share_new_connections(sandbox: Sandbox, dp: lb.Datapath) -> None:
    svc = lb.Service(
        vip=VIP[4],
        port=80,
        backends=[
            lb.Backend(b.ipv4, BACKEND_PORT, weight=w)
            for b, w in zip(sandbox.backends, (1, 2, 3), strict=True)
        ],
    )
    dp.sync([svc])
    answers = collections.Counter(sandbox.http_get(VIP[4], 80) for _ in range(3000))
    for name, weight in (("backend-1", 1), ("backend-2", 2), ("backend-3", 3)):
        assert abs(answers[name] / 3000 - weight / 6) < 0.05, answers


def test_terminating_backend_finishes_its_connection_but_gets_no_new_ones(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    svc = web(sandbox, 4)
    dp.sync([svc])
    with sandbox.connection(VIP[4], 80) as kept:
        first = kept.get()
        draining = [
            lb.Backend(b.address, b.port, state="terminating" if host.name == first else "active")
            for b, host in zip(svc.backends, sandbox.backends, strict=True)
        ]
        dp.upsert(svc.with_backends(draining))
        assert first not in {sandbox.http_get(VIP[4], 80) for _ in range(30)}
        assert {kept.get() for _ in range(5)} == {first}
        # When no active backend is left, the terminating ones take new connections.
        only_draining = [lb.Backend(b.address, b.port, state="terminating") for b in svc.backends]
        dp.upsert(svc.with_backends(only_draining))
        assert len({sandbox.http_get(VIP[4], 80) for _ in range(30)}) == 3


def test_session_affinity_holds_a_client_then_lapses(sandbox: Sandbox, dp: lb.Datapath) -> None:
    svc = lb.Service(
        vip=VIP[4],
        port=80,
        affinity_timeout=1,
        backends=[lb.Backend(b.ipv4, BACKEND_PORT) for b in sandbox.backends],
    )
    dp.sync([svc])
    first = sandbox.http_get(VIP[4], 80)
    assert {sandbox.http_get(VIP[4], 80) for _ in range(100)} == {first}
    # After a second without a new connection the client draws again; with three
    # backends it keeps its old one 1 time in 3, so try a few timeouts.
    for _ in range(12):
        time.sleep(1.2)
        if sandbox.http_get(VIP[4], 80) != first:
            break
    else:
        pytest.fail(f"the client stayed on {first} through 12 affinity timeouts")


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_maglev_service_carries_real_traffic_to_every_backend(
    sandbox: Sandbox, dp: lb.Datapath, family: int
) -> None:
    svc = lb.Service(
        vip=VIP[family],
        port=80,
        scheduler="maglev",
        backends=[lb.Backend(b.address(family), BACKEND_PORT) for b in sandbox.backends],
    )
    dp.sync([svc])
    answers = collections.Counter(sandbox.http_get(VIP[family], 80) for _ in range(60))
    assert set(answers) == {"backend-1", "backend-2", "backend-3"}
    with sandbox.connection(VIP[family], 80) as conn:
        assert len({conn.get() for _ in range(10)}) == 1


def test_two_load_balancers_send_a_real_flow_to_the_same_maglev_backend(sandbox: Sandbox) -> None:
    # A second, identical network beside the first: its own namespaces, the same
    # addresses. The same client port gives the same 5-tuple in both (ports below
    # the ephemeral range, which earlier connections may still hold).
    with Sandbox(backends=3, prefix="pyebpflb-twin") as twin:
        answers = []
        for net in (sandbox, twin):
            svc = lb.Service(
                vip=VIP[4],
                port=80,
                scheduler="maglev",
                backends=[lb.Backend(b.ipv4, BACKEND_PORT) for b in net.backends],
            )
            name = f"t{os.getpid()}-twin-{len(answers)}"
            with lb.Datapath(name, netns=net.lb.netns, pin_root=PIN_ROOT) as dp:
                dp.attach(net.lb.iface)
                dp.sync([svc])
                answers.append(
                    [net.http_get(VIP[4], 80, source_port=p) for p in range(21000, 21030)]
                )
        assert answers[0] == answers[1]
        assert len(set(answers[0])) == 3
