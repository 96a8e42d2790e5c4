"""Policy end to end: real connections in the sandbox, with real servers.

A denied packet is dropped silently, so a denied request times out; the
timeouts here are short because on this link an allowed answer takes
well under a millisecond.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from lbtest import attached

import pyebpflb as lb
from pyebpflb.model import Policy, Rule
from pyebpflb.testing.sandbox import BACKEND_PORT, Sandbox

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

VIP = "10.96.0.10"
SECOND_CLIENT = "10.90.0.3"
DENIED = 1.0  # seconds a denied request waits for the answer that does not come


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(backends=2, prefix="pyebpflb-pol") as built:
        built.add_client_address(SECOND_CLIENT)
        yield built


@pytest.fixture
def dp(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[lb.Datapath]:
    with attached(sandbox, request) as datapath:
        yield datapath


def web(sandbox: Sandbox) -> lb.Service:
    return lb.Service(
        VIP,
        80,
        name="default/my-app-service",
        backends=[lb.Backend(b.ipv4, BACKEND_PORT) for b in sandbox.backends],
    )


def refused_silently(call: object) -> bool:
    """Does ``call()`` time out (the packet was dropped)?"""
    try:
        call()  # type: ignore[operator]
    except TimeoutError:
        return True
    return False


def test_an_allow_list_on_a_service_admits_one_client_and_not_another(
    sandbox: Sandbox, dp: lb.Datapath
) -> None:
    svc = web(sandbox)
    only_client = Policy(
        "my-app-source-ranges",
        [Rule("allow", f"{sandbox.client.ipv4}/32", service=svc.name)],
        default="deny",
    )
    dp.sync([svc], [only_client])
    names = {b.name for b in sandbox.backends}
    assert sandbox.http_get(VIP, 80, source=sandbox.client.ipv4) in names
    assert refused_silently(lambda: sandbox.http_get(VIP, 80, source=SECOND_CLIENT, timeout=DENIED))
    stats = dp.policy_stats("my-app-source-ranges")
    assert stats[0].packets >= 1  # the SYN, and the rest of that connection
    assert dp.drops()["policy denied"].packets >= 1
    # Removing the policy opens the service to the second client.
    dp.remove_policy(only_client)
    assert sandbox.http_get(VIP, 80, source=SECOND_CLIENT) in names


def test_default_deny_with_one_allowed_port(sandbox: Sandbox, dp: lb.Datapath) -> None:
    svc = web(sandbox)
    backend = sandbox.backends[0]
    dp.sync([svc], [Policy("web-only", [Rule("allow", None, "tcp", BACKEND_PORT)], "deny")])
    # The allowed port, directly and through the VIP (whose backends listen on it).
    assert sandbox.http_get(backend.ipv4, BACKEND_PORT) == backend.name
    assert sandbox.http_get(VIP, 80) in {b.name for b in sandbox.backends}
    # UDP to the same port, and TCP to a port nothing listens on: dropped, so no
    # answer at all (not even the reset the backend would send for the latter).
    assert refused_silently(lambda: sandbox.udp_request(backend.ipv4, BACKEND_PORT, timeout=DENIED))
    assert refused_silently(lambda: sandbox.http_get(backend.ipv4, 9999, timeout=DENIED))
    dp.sync([svc], [])
    with pytest.raises(ConnectionRefusedError):
        sandbox.http_get(backend.ipv4, 9999)


def listen_udp(sandbox: Sandbox, port: int) -> socket.socket:
    sock = sandbox.client.socket(4, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(DENIED)
    return sock


def send_from_backend(sandbox: Sandbox, port: int) -> None:
    with sandbox.backends[0].socket(4, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"from a backend", (str(sandbox.client.ipv4), port))


def test_egress_deny(sandbox: Sandbox, dp: lb.Datapath) -> None:
    dp.sync(
        [web(sandbox)], [Policy("no-5001", [Rule("deny", None, "udp", 5001)], direction="egress")]
    )
    with listen_udp(sandbox, 5000) as allowed, listen_udp(sandbox, 5001) as denied:
        send_from_backend(sandbox, 5000)
        send_from_backend(sandbox, 5001)
        assert allowed.recv(100) == b"from a backend"
        with pytest.raises(TimeoutError):
            denied.recv(100)
    assert dp.policy_stats("no-5001")[0].packets == 1


def test_answers_pass_a_default_deny_both_ways(sandbox: Sandbox, dp: lb.Datapath) -> None:
    svc = web(sandbox)
    backend = sandbox.backends[0]
    closed_out = Policy("closed-out", default="deny", direction="egress")
    dp.sync([svc], [closed_out])
    # Connections the client opens: through the VIP and straight to a backend.
    assert sandbox.http_get(VIP, 80) in {b.name for b in sandbox.backends}
    assert sandbox.http_get(backend.ipv4, BACKEND_PORT) == backend.name
    assert sandbox.udp_request(backend.ipv4, BACKEND_PORT)[0] == backend.name
    # What a backend starts towards the client is new traffic, and denied.
    with listen_udp(sandbox, 5000) as client:
        send_from_backend(sandbox, 5000)
        with pytest.raises(TimeoutError):
            client.recv(100)

    # The other way round: ingress closed, a backend connects to the client.
    dp.sync([svc], [Policy("closed-in", default="deny")])
    with sandbox.client.socket(4) as server:
        server.bind(("0.0.0.0", 7000))
        server.listen()
        server.settimeout(2)
        with backend.socket(4) as outgoing:
            outgoing.settimeout(2)
            outgoing.connect((str(sandbox.client.ipv4), 7000))
            accepted, _ = server.accept()
            with accepted:
                accepted.sendall(b"answer")
                assert outgoing.recv(100) == b"answer"
    # ...while the client cannot open a connection of its own.
    assert refused_silently(lambda: sandbox.http_get(backend.ipv4, BACKEND_PORT, timeout=DENIED))


BIG = b"x" * 4000  # three IPv4 fragments on a 1500-byte link


def test_fragments_do_not_bypass_a_deny(sandbox: Sandbox, dp: lb.Datapath) -> None:
    backend = sandbox.backends[0]
    svc = web(sandbox)
    # Without policy, the big datagram arrives (reassembled) and is answered.
    dp.sync([svc], [])
    assert sandbox.udp_request(backend.ipv4, BACKEND_PORT, payload=BIG)[0] == backend.name
    # A deny of the port stops it, fragments and all.
    dp.sync([svc], [Policy("no-udp-8080", [Rule("deny", None, "udp", BACKEND_PORT)])])
    drops = dp.drops()["policy denied"].packets
    assert refused_silently(
        lambda: sandbox.udp_request(backend.ipv4, BACKEND_PORT, payload=BIG, timeout=DENIED)
    )
    assert dp.drops()["policy denied"].packets - drops == 3
    # Allowed under default deny, every fragment passes: the later ones carry no
    # port, and are let through by their first fragment's.
    dp.sync([svc], [Policy("udp-8080", [Rule("allow", None, "udp", BACKEND_PORT)], "deny")])
    assert sandbox.udp_request(backend.ipv4, BACKEND_PORT, payload=BIG)[0] == backend.name
    assert dp.policy_stats("udp-8080")[0].packets == 3
