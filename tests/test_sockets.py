"""Host-reachable services: socket-level balancing (lb_sock.bpf.c) for processes of
the node's own network namespace, which no attached interface sees.

The node is the sandbox's load balancer namespace; the datapath is attached to no
interface there (but where a test says so), only to a cgroup of this test, and the
clients are real processes (curl, python) started in that cgroup under
``ip netns exec``.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from conftest import PIN_ROOT

import pyebpflb as lb
from pyebpflb._bpf import fs
from pyebpflb.testing.sandbox import BACKEND_PORT, Sandbox

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

VIP4, VIP6 = "10.96.0.10", "fd00:96::10"
NODE = lb.Node("node-a", ["10.90.0.1", "fd00:90::1"])


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(backends=3) as built:
        yield built


@pytest.fixture
def cgroup() -> Iterator[pathlib.Path]:
    path = pathlib.Path(fs.cgroup2_root()) / f"pyebpflb-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()  # every process of the test has ended: nothing is left in it


@pytest.fixture
def dp(
    sandbox: Sandbox, cgroup: pathlib.Path, request: pytest.FixtureRequest
) -> Iterator[lb.Datapath]:
    name = f"t{os.getpid()}-{request.node.name}"[:60]
    with lb.Datapath(name, netns=sandbox.lb.netns, pin_root=PIN_ROOT, node=NODE) as datapath:
        datapath.attach_cgroup(cgroup)
        yield datapath


def backends(
    sandbox: Sandbox, family: int = 4, nodes: list[str | None] | None = None
) -> list[lb.Backend]:
    nodes = nodes or [None] * len(sandbox.backends)
    return [
        lb.Backend(b.address(family), BACKEND_PORT, node=node)
        for b, node in zip(sandbox.backends, nodes, strict=True)
    ]


def run(
    netns: str, cgroup: pathlib.Path, argv: list[str], *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``argv`` in network namespace ``netns``, as a process of ``cgroup``."""

    def enter() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        preexec_fn=enter,
        capture_output=True,
        text=True,
        timeout=30,
        check=check,
    )


def python(netns: str, cgroup: pathlib.Path, code: str, *args: str) -> object:
    """Run ``code`` there; it prints one JSON value, returned."""
    done = run(netns, cgroup, [sys.executable, "-c", code, *args])
    return json.loads(done.stdout)


def curl(netns: str, cgroup: pathlib.Path, url: str) -> subprocess.CompletedProcess[str]:
    return run(netns, cgroup, ["curl", "-sS", "--max-time", "3", url], check=False)


CONNECT = """
import json, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except OSError as e:
    print(json.dumps({"errno": e.errno})); sys.exit()
peer = s.getpeername()
s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
body = data.decode().split("\\r\\n\\r\\n")[-1].strip()
print(json.dumps({"peer": [peer[0], peer[1]], "body": body}))
"""

UDP = """
import json, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(b"hello", (sys.argv[1], int(sys.argv[2])))
data, source = s.recvfrom(4096)
print(json.dumps({"source": [source[0], source[1]], "body": data.decode().strip()}))
"""


def test_curl_from_the_node_reaches_every_backend_through_no_interface(
    sandbox: Sandbox, cgroup: pathlib.Path, dp: lb.Datapath
) -> None:
    dp.upsert(lb.Service(VIP4, 80, name="default/web", backends=backends(sandbox)))
    assert dp.interfaces == []  # no tc program on any path: the socket is translated
    seen = set()
    for _ in range(30):
        done = curl(sandbox.lb.netns, cgroup, f"http://{VIP4}/")
        assert done.returncode == 0, done.stderr
        seen.add(done.stdout.strip())
    assert seen == {b.name for b in sandbox.backends}
    stats = dp.stats(dp.services[0])
    assert stats.packets == 30  # one new flow counted per connection


def test_getpeername_shows_the_vip(sandbox: Sandbox, cgroup: pathlib.Path, dp: lb.Datapath) -> None:
    dp.upsert(lb.Service(VIP4, 80, backends=backends(sandbox)[:1]))
    got = python(sandbox.lb.netns, cgroup, CONNECT, VIP4, "80")
    assert got == {"peer": [VIP4, 80], "body": sandbox.backends[0].name}


def test_unconnected_udp_is_answered_from_the_vip(
    sandbox: Sandbox, cgroup: pathlib.Path, dp: lb.Datapath
) -> None:
    dp.upsert(lb.Service(VIP4, 53, "udp", backends=backends(sandbox)[:1]))
    got = python(sandbox.lb.netns, cgroup, UDP, VIP4, "53")
    assert got == {"source": [VIP4, 53], "body": sandbox.backends[0].name}


def test_ipv6_and_v4_mapped_sockets(
    sandbox: Sandbox, cgroup: pathlib.Path, dp: lb.Datapath
) -> None:
    dp.upsert(lb.Service(VIP6, 80, backends=backends(sandbox, 6)[:1]))
    dp.upsert(lb.Service(VIP4, 80, backends=backends(sandbox)[1:2]))
    got = python(sandbox.lb.netns, cgroup, CONNECT, VIP6, "80")
    assert got == {"peer": [VIP6, 80], "body": sandbox.backends[0].name}
    mapped = f"::ffff:{VIP4}"
    got = python(sandbox.lb.netns, cgroup, CONNECT, mapped, "80")
    assert got == {"peer": [mapped, 80], "body": sandbox.backends[1].name}


def test_another_namespace_in_the_same_cgroup_is_not_translated(
    sandbox: Sandbox, cgroup: pathlib.Path, dp: lb.Datapath
) -> None:
    dp.upsert(lb.Service(VIP4, 80, backends=backends(sandbox)))
    # The client's namespace answers the VIP itself: only an untranslated connect gets there.
    subprocess.run(
        ["ip", "-n", sandbox.client.netns, "addr", "add", f"{VIP4}/32", "dev", "lo"], check=True
    )
    try:
        serve = (
            "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
            f"socket.SO_REUSEADDR, 1); s.bind(('{VIP4}', 80)); s.listen(); print('ready', "
            "flush=True); c, _ = s.accept(); c.recv(100); "
            "c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nuntranslated\\n'); c.close()"
        )
        server = subprocess.Popen(
            ["ip", "netns", "exec", sandbox.client.netns, sys.executable, "-c", serve],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            got = python(sandbox.client.netns, cgroup, CONNECT, VIP4, "80")
            assert got == {"peer": [VIP4, 80], "body": "untranslated"}
        finally:
            server.kill()
            server.wait()
    finally:
        subprocess.run(
            ["ip", "-n", sandbox.client.netns, "addr", "del", f"{VIP4}/32", "dev", "lo"],
            check=True,
        )
    assert dp.stats(dp.services[0]).packets == 0


HAIRPIN = """
import json, socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("10.90.0.1", 9090))
server.listen()
client = socket.socket()
client.settimeout(3)
client.connect((sys.argv[1], 80))
peer = client.getpeername()
conn, source = server.accept()
conn.sendall(b"itself")
print(json.dumps({"peer": [peer[0], peer[1]], "answer": client.recv(100).decode(),
                  "source": source[0]}))
"""


def test_a_backend_reaching_its_own_service_is_answered(
    sandbox: Sandbox, cgroup: pathlib.Path, dp: lb.Datapath
) -> None:
    """A hostNetwork backend calling its own service: the socket goes straight to
    itself, from its own address (no hairpin address, no reverse NAT needed)."""
    dp.upsert(lb.Service(VIP4, 80, backends=[lb.Backend("10.90.0.1", 9090)]))
    got = python(sandbox.lb.netns, cgroup, HAIRPIN, VIP4)
    assert got == {"peer": [VIP4, 80], "answer": "itself", "source": "10.90.0.1"}


def test_internal_traffic_policy_local(
    sandbox: Sandbox, cgroup: pathlib.Path, dp: lb.Datapath
) -> None:
    local = backends(sandbox, nodes=["node-a", "node-a", "node-b"])
    dp.upsert(lb.Service(VIP4, 80, backends=local, internal_traffic_policy="local"))
    assert dp.services[0].backends == tuple(local)  # read back with their nodes
    seen = set()
    for _ in range(20):
        done = curl(sandbox.lb.netns, cgroup, f"http://{VIP4}/")
        assert done.returncode == 0, done.stderr
        seen.add(done.stdout.strip())
    assert seen == {sandbox.backends[0].name, sandbox.backends[1].name}

    remote = backends(sandbox, nodes=["node-b", "node-c", "node-b"])
    dp.upsert(lb.Service(VIP4, 80, backends=remote, internal_traffic_policy="local"))
    got = python(sandbox.lb.netns, cgroup, CONNECT, VIP4, "80")
    assert got == {"errno": errno.EHOSTUNREACH}
    assert dp.drops()["no local backend"].packets == 1


def test_no_backends_and_unallocated_ports_refuse_at_once(
    sandbox: Sandbox, cgroup: pathlib.Path, dp: lb.Datapath
) -> None:
    dp.upsert(lb.Service(VIP4, 80, backends=backends(sandbox)))
    dp.upsert(lb.Service(VIP4, 443))
    assert python(sandbox.lb.netns, cgroup, CONNECT, VIP4, "443") == {"errno": errno.ECONNREFUSED}
    assert python(sandbox.lb.netns, cgroup, CONNECT, VIP4, "8443") == {"errno": errno.ECONNREFUSED}
    drops = dp.drops()
    assert (drops["no backend"].packets, drops["no service port"].packets) == (1, 1)
    # The packet path refuses the unallocated port too: a reset for TCP.
    dp.attach(sandbox.lb.iface)
    with pytest.raises(ConnectionRefusedError):
        sandbox.http_get(VIP4, 8443)
    assert dp.drops()["no service port"].packets == 2
    assert sandbox.http_get(VIP4, 80) in {b.name for b in sandbox.backends}
    dp.remove(lb.Service(VIP4, 443))
    dp.remove(lb.Service(VIP4, 80))
    # The address has no service left: not refused any more (no route: unreachable).
    got = python(sandbox.lb.netns, cgroup, CONNECT, VIP4, "8443")
    assert got["errno"] != errno.ECONNREFUSED  # type: ignore[index]


def test_policy_decides_at_connect(sandbox: Sandbox, cgroup: pathlib.Path, dp: lb.Datapath) -> None:
    dp.upsert(lb.Service(VIP4, 80, name="web", backends=backends(sandbox)))
    dp.upsert_policy(lb.Policy("only-10.1", [lb.Rule("allow", "10.1.0.0/16")], default="deny"))
    assert python(sandbox.lb.netns, cgroup, CONNECT, VIP4, "80") == {"errno": errno.EPERM}
    assert dp.drops()["policy denied"].packets == 1
    # The node's address is the local client's source as policy sees it.
    dp.upsert_policy(lb.Policy("only-10.1", [lb.Rule("allow", "10.90.0.1/32")], default="deny"))
    got = python(sandbox.lb.netns, cgroup, CONNECT, VIP4, "80")
    assert got["peer"] == [VIP4, 80]  # type: ignore[index]


def test_adopted_attached_again_listed_and_detached(
    sandbox: Sandbox, cgroup: pathlib.Path, dp: lb.Datapath
) -> None:
    dp.upsert(lb.Service(VIP4, 80, backends=backends(sandbox)[:1]))
    name = f"/{cgroup.name}"
    assert dp.cgroups == [name]
    # Another process adopts it, attaches again (idempotent: the link is updated in
    # place, not doubled) and the status lists the cgroup.
    again = (
        "import json, pyebpflb as lb; "
        f"dp = lb.Datapath({dp.name!r}, pin_root={str(PIN_ROOT)!r}, create=False); "
        f"print(json.dumps([dp.attach_cgroup({name!r}, unconnected_udp=False), dp.cgroups, "
        "dp.node.name])); dp.close()"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", sandbox.lb.netns, sys.executable, "-c", again],
        capture_output=True,
        text=True,
        check=True,
    )
    attached, listed, node = json.loads(done.stdout)
    assert "lb_sendmsg4" not in attached and listed == [name] and node == "node-a"
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyebpflb",
            "--netns",
            sandbox.lb.netns,
            "--pin-root",
            str(PIN_ROOT),
            "--datapath",
            dp.name,
            "status",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(shown.stdout)["cgroups"] == [name]
    programs = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True, check=True
    )
    assert sorted(p["name"] for p in json.loads(programs.stdout)) == sorted(
        [
            "lb_connect4",
            "lb_connect6",
            "lb_recvmsg4",
            "lb_recvmsg6",
            "lb_getpeername4",
            "lb_getpeername6",
        ]
    )
    # The translation survived the other process.
    assert python(sandbox.lb.netns, cgroup, CONNECT, VIP4, "80")["body"] == sandbox.backends[0].name  # type: ignore[index]
    dp.detach_cgroup(cgroup)
    assert dp.cgroups == []
    with pytest.raises(lb.NotFound, match="not attached there"):
        dp.detach_cgroup(cgroup)
    got = python(sandbox.lb.netns, cgroup, CONNECT, VIP4, "80")
    assert "errno" in got  # type: ignore[operator]


def test_a_datapath_serves_one_node(sandbox: Sandbox, dp: lb.Datapath) -> None:
    with pytest.raises(ValueError, match="serves node 'node-a', not 'node-b'"):
        lb.Datapath(dp.name, netns=sandbox.lb.netns, pin_root=PIN_ROOT, node=lb.Node("node-b"))
    assert dp.node == NODE


def test_local_policy_needs_a_node(sandbox: Sandbox) -> None:
    with lb.Datapath(f"t{os.getpid()}-nonode", netns=sandbox.lb.netns, pin_root=PIN_ROOT) as bare:
        with pytest.raises(ValueError, match="knows no node"):
            bare.upsert(lb.Service(VIP4, 80, internal_traffic_policy="local"))
        assert bare.services == []


def test_the_cli_attaches_and_detaches_a_cgroup(
    sandbox: Sandbox, cgroup: pathlib.Path, dp: lb.Datapath
) -> None:
    dp.upsert(lb.Service(VIP4, 80, backends=backends(sandbox)[:1]))
    dp.detach_cgroup(cgroup)
    cli = [sys.executable, "-m", "pyebpflb", "--netns", sandbox.lb.netns, "--pin-root",
           str(PIN_ROOT), "--datapath", dp.name]  # fmt: skip
    name = f"/{cgroup.name}"
    done = subprocess.run(
        [*cli, "attach-cgroup", name, "--connected-udp-only"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"balances sockets of cgroup {name}" in done.stdout and "sendmsg" not in done.stdout
    assert python(sandbox.lb.netns, cgroup, CONNECT, VIP4, "80")["peer"] == [VIP4, 80]  # type: ignore[index]
    status = subprocess.run([*cli, "status"], capture_output=True, text=True, check=True).stdout
    assert f"cgroups    {name}" in status and "node       node-a" in status
    done = subprocess.run([*cli, "detach-cgroup", name], capture_output=True, text=True, check=True)
    assert dp.cgroups == []
    bad = subprocess.run([*cli, "attach-cgroup", "/no-such-cgroup"], capture_output=True, text=True)
    assert bad.returncode != 0 and "'/no-such-cgroup' is no cgroup v2 directory" in bad.stderr
    assert dp.cgroups == []
    # destroy, which loads nothing, detaches the socket programs too and says so.
    subprocess.run([*cli, "attach-cgroup", name], capture_output=True, text=True, check=True)
    gone = subprocess.run([*cli, "destroy"], capture_output=True, text=True, check=True).stdout
    assert f"detached from no interface and cgroup {name}" in gone
    shown = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True, check=True
    )
    assert json.loads(shown.stdout.strip() or "[]") == []  # bpftool prints nothing for none


def test_socket_translations_make_flow_events(
    sandbox: Sandbox, cgroup: pathlib.Path, dp: lb.Datapath
) -> None:
    dp.upsert(lb.Service(VIP4, 80, name="default/web", backends=backends(sandbox)[:1]))
    monitor = dp.open_monitor()
    try:
        python(sandbox.lb.netns, cgroup, CONNECT, VIP4, "80")
        python(sandbox.lb.netns, cgroup, CONNECT, VIP4, "81")
        seen = []
        for event in monitor.events(2.0):
            seen.append(event)
            if len(seen) == 2:
                break
    finally:
        monitor.close()
    trace, drop = seen
    assert (trace.type, trace.interface, trace.service) == ("trace", "socket", "default/web")
    assert trace.backend == f"{sandbox.backends[0].ipv4}:{BACKEND_PORT}"
    assert (str(trace.destination), trace.destination_port) == (VIP4, 80)
    assert str(trace.source) == "10.90.0.1"  # the node's address stands for an unbound source
    assert (drop.type, drop.interface, drop.drop_reason) == ("drop", "socket", "no service port")


def test_the_root_cgroup_is_named_slash_as_the_cli_default_says() -> None:
    """`attach-cgroup` with its default "/" (and `agent --cgroup /`) means the root of
    the hierarchy, as None does; it used to be refused as no cgroup v2 directory."""
    from pyebpflb.datapath import sockets

    assert sockets.resolve("/") == sockets.resolve(None) == (sockets.cgroup2_root(), "/")
