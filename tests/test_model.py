"""The model: pure Python, validated at construction, no kernel needed."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import textwrap

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pyebpflb as lb
from pyebpflb import Backend, Protocol, Service


def test_strings_become_addresses_and_protocols() -> None:
    svc = Service(vip="10.96.0.10", port=80, protocol="TCP", backends=[Backend("10.0.1.1", 8080)])
    assert svc.vip == ipaddress.IPv4Address("10.96.0.10")
    assert svc.protocol is Protocol.TCP
    assert svc.backends == (Backend(ipaddress.ip_address("10.0.1.1"), 8080),)
    assert svc.label == "10.96.0.10:80/tcp"
    assert str(Backend("fd00::1", 80)) == "[fd00::1]:80"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vip": ""}, "an address must be an IPv4 or IPv6 address, got ''"),
        ({"vip": "10.96.0.300"}, "'10.96.0.300' is not an IPv4 or IPv6 address"),
        ({"vip": None}, "got None"),
        ({"vip": "0.0.0.0"}, "vip 0.0.0.0 is not a unicast address"),
        ({"vip": "224.0.0.1"}, "vip 224.0.0.1 is not a unicast address"),
        ({"port": 0}, "port must be an integer from 1 to 65535, got 0"),
        ({"port": 65536}, "port must be an integer from 1 to 65535, got 65536"),
        ({"port": "80"}, "port must be an integer from 1 to 65535, got '80'"),
        ({"port": True}, "got True"),
        ({"protocol": "sctp"}, "protocol must be 'tcp' or 'udp', got 'sctp'"),
        ({"name": "x" * 256}, "name must be at most 255 bytes"),
        ({"name": 5}, "name must be a string, got 5"),
        ({"backends": "10.0.1.1"}, "backends must be a list of Backend, got '10.0.1.1'"),
        (
            {"backends": [("10.0.1.1", 80)]},
            r"backends must be Backend objects, got \('10.0.1.1', 80\)",
        ),
        (
            {"backends": [Backend("fd00::1", 80)]},
            r"backend \[fd00::1\]:80 is IPv6 but the vip 10.96.0.10 is IPv4",
        ),
        (
            {"backends": [Backend("10.0.1.1", 80), Backend("10.0.1.1", 80)]},
            "backend 10.0.1.1:80 is listed twice",
        ),
    ],
)
def test_invalid_service_raises_valueerror_naming_the_value(
    kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"vip": "10.96.0.10", "port": 80, **kwargs}
    with pytest.raises(ValueError, match=message):
        Service(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("address", "port", "message"),
    [
        ("not-an-ip", 80, "'not-an-ip' is not an IPv4 or IPv6 address"),
        ("10.0.1.1", -1, "port must be an integer from 1 to 65535, got -1"),
        ("::", 80, "backend address :: is not a unicast address"),
    ],
)
def test_invalid_backend_raises_valueerror(address: str, port: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backend(address, port)


def test_services_are_frozen_values() -> None:
    svc = Service(vip="10.96.0.10", port=80)
    with pytest.raises(AttributeError):
        svc.port = 81  # type: ignore[misc]
    assert svc == Service(vip="10.96.0.10", port=80, protocol="tcp")
    assert hash(svc) == hash(Service(vip="10.96.0.10", port=80))


ports = st.integers(min_value=1, max_value=65535)
ipv4 = st.ip_addresses(v=4).filter(lambda a: not (a.is_unspecified or a.is_multicast))


@given(vip=ipv4, port=ports, backends=st.lists(st.tuples(ipv4, ports), unique=True, max_size=8))
def test_any_valid_service_round_trips_through_its_fields(
    vip: ipaddress.IPv4Address, port: int, backends: list[tuple[ipaddress.IPv4Address, int]]
) -> None:
    svc = Service(vip=str(vip), port=port, backends=[Backend(str(a), p) for a, p in backends])
    again = Service(
        vip=svc.vip,
        port=svc.port,
        protocol=svc.protocol,
        name=svc.name,
        backends=list(svc.backends),
    )
    assert again == svc and again.key == (vip, port, Protocol.TCP)


def test_the_model_imports_without_the_kernel_binding() -> None:
    # As off Linux or without libbpf: the compiled binding cannot be imported.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["pyebpflb._bpf._libbpf"] = None
        import pyebpflb as lb
        svc = lb.Service(vip="10.96.0.10", port=80, backends=[lb.Backend("10.0.1.1", 8080)])
        print(svc.label)
        try:
            lb.Datapath
        except ImportError:
            print("datapath needs the binding")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["10.96.0.10:80/tcp", "datapath needs the binding"]


def test_backend_weight_and_state_are_validated() -> None:
    assert Backend("10.0.0.1", 80, 3, "TERMINATING").state.value == "terminating"
    with pytest.raises(ValueError, match="weight must be an integer from 0 to 65535, got 65536"):
        Backend("10.0.0.1", 80, weight=65536)
    with pytest.raises(ValueError, match="weight must be an integer from 0 to 65535, got -1"):
        Backend("10.0.0.1", 80, weight=-1)
    with pytest.raises(
        ValueError, match="one of 'active', 'terminating', 'maintenance', got 'gone'"
    ):
        Backend("10.0.0.1", 80, state="gone")


def test_the_same_endpoint_twice_is_refused_whatever_its_weight() -> None:
    with pytest.raises(ValueError, match=r"backend 10\.0\.0\.1:80 is listed twice"):
        Service(
            vip="10.96.0.1",
            port=80,
            backends=[Backend("10.0.0.1", 80), Backend("10.0.0.1", 80, weight=5)],
        )


@pytest.mark.parametrize(
    ("states", "weights", "usable"),
    [
        (["active", "terminating", "active"], [1, 1, 0], [0]),
        (["terminating", "maintenance", "terminating"], [1, 1, 1], [0, 2]),
        (["maintenance", "maintenance"], [1, 1], []),
        (["active", "terminating"], [0, 1], [1]),
    ],
)
def test_usable_backends_follow_kubernetes_terminating_fallback(
    states: list[str], weights: list[int], usable: list[int]
) -> None:
    members = [
        Backend(f"10.0.0.{i + 1}", 80, w, s)
        for i, (s, w) in enumerate(zip(states, weights, strict=True))
    ]
    svc = Service(vip="10.96.0.1", port=80, backends=members)
    assert list(svc.usable_backends()) == [members[i] for i in usable]


def test_internal_traffic_policy_local_chooses_this_nodes_backends() -> None:
    """kube-proxy's CategorizeEndpoints for Local: the node's ready endpoints, else its
    serving-terminating ones, else none (dropped), never another node's."""
    backends = [
        lb.Backend("10.0.0.1", 80, node="a"),
        lb.Backend("10.0.0.2", 80, node="b"),
        lb.Backend("10.0.0.3", 80, node="a", state="terminating"),
    ]
    service = lb.Service("10.96.0.1", 80, backends=backends, internal_traffic_policy="local")
    assert service.usable_positions("a") == [0]
    assert service.usable_positions("b") == [1]
    assert service.with_backends(backends[1:]).usable_positions("a") == [1]
    assert service.usable_positions("c") == [] and service.usable_positions(None) == []
    cluster = attrs.evolve(service, internal_traffic_policy="cluster")
    assert cluster.usable_positions("c") == [0, 1]
    with pytest.raises(ValueError, match="internal_traffic_policy must be 'cluster' or 'local'"):
        lb.Service("10.96.0.1", 80, internal_traffic_policy="nearby")
    with pytest.raises(ValueError, match="node must be at most 63 bytes"):
        lb.Backend("10.0.0.1", 80, node="x" * 64)
    with pytest.raises(ValueError, match="at most one IPv4 address"):
        lb.Node("n", ["10.0.0.1", "10.0.0.2"])


def test_a_service_with_north_south_frontends_splits_and_assembles_back() -> None:
    from pyebpflb.model import assemble

    web = lb.Service(
        "10.96.0.10", 80, name="web", backends=[lb.Backend("10.0.0.1", 8080, node="a")],
        node_port=30080, external_ips=["10.98.0.2", "10.98.0.1"], load_balancer_ips=["10.99.0.1"],
        external_traffic_policy="local", source_ranges=["10.70.0.0/24"],
        health_check_node_port=31000,
    )  # fmt: skip
    parts = web.frontends()
    assert [(p.kind.value, str(p.vip), p.port) for p in parts] == [
        ("cluster_ip", "10.96.0.10", 80),
        ("node_port", "0.0.0.0", 30080),
        ("external_ip", "10.98.0.1", 80),  # the addresses are kept sorted
        ("external_ip", "10.98.0.2", 80),
        ("load_balancer", "10.99.0.1", 80),
    ]
    assert [p.source_ranges != () for p in parts] == [False, False, False, False, True]
    assert parts[0].external_traffic_policy is lb.TrafficPolicy.CLUSTER
    assert parts[1].usable_backends("a") and not parts[1].usable_backends("b")
    assert parts[0].usable_backends("b")  # the ClusterIP keeps internalTrafficPolicy Cluster
    assert assemble([(p, web.key) for p in parts]) == [web]
    assert assemble([(parts[1], None)]) == [parts[1]]  # a frontend alone stands alone
    assert parts[1].label == "web (*:30080/tcp nodeport)"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"external_traffic_policy": "local"}, "external_traffic_policy applies to external"),
        ({"node_port": 0}, "node_port must be an integer from 1 to 65535, got 0"),
        ({"external_ips": ["fd00::1"]}, "external_ips address fd00::1 is IPv6"),
        ({"load_balancer_ips": ["10.99.0.1", "10.99.0.1"]}, "addresses must be distinct"),
        ({"node_port": 30080, "source_ranges": ["10.0.0.0/8"]}, "has no load_balancer_ips"),
        ({"load_balancer_ips": ["10.9.0.1"], "source_ranges": ["10.0.0.1/8"]}, "host bits"),
        ({"node_port": 30080, "health_check_node_port": 31000}, "is 'cluster'"),
        ({"kind": "node_port"}, "a node_port frontend's vip is 0.0.0.0"),
        ({"kind": "load_balancer", "node_port": 1}, "node_port, external_ips and load_balancer"),
        ({"kind": "ingress"}, "kind must be one of 'cluster_ip'"),
    ],
)
def test_north_south_fields_are_checked(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lb.Service("10.96.0.10", 80, **fields)  # type: ignore[arg-type]
