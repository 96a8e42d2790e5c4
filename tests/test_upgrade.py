"""Upgrades keep connections (issue 13): a datapath made by the first release,
v0.1.0 (commit cfb391b, layout 3), built here from a `git worktree` of it into a
venv of its own, is adopted by this version and upgraded in place while a
keep-alive connection runs through it; a datapath of layout 8 (policies with
subjects) likewise, its policies still deciding; and an old version meeting an
upgraded datapath, or this one meeting a newer layout, refuses and changes nothing."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest
from conftest import PIN_ROOT
from lbtest import TC_ACT_OK, TC_ACT_SHOT
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether
from scapy.layers.sctp import SCTP, SCTPChunkInit

import pyebpflb as lb
from pyebpflb.datapath import LAYOUT_VERSION
from pyebpflb.testing.sandbox import BACKEND_PORT, LB_IFACE, Sandbox

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

FIRST_RELEASE = "cfb391b"  # v0.1.0: every clone of the repository has it
LAST_LAYOUT_8 = "43061de"  # the last commit whose datapaths are of layout 8
REPO = pathlib.Path(__file__).resolve().parent.parent

# Run by v0.1.0's interpreter: make the datapath, or report what it holds.
OLD = textwrap.dedent(
    """
    import json, sys
    import pyebpflb as lb
    what, name, netns, pin_root, backends = sys.argv[1:6]
    backends = json.loads(backends)
    if what == "make":
        dp = lb.Datapath(name, persist=True, netns=netns, pin_root=pin_root)
        dp.attach("lb0")
        dp.sync([
            lb.Service("10.96.0.10", 80, name="default/web",
                       backends=[lb.Backend(b, 8080) for b in backends]),
            lb.Service("10.96.0.11", 80, name="default/api", scheduler="maglev",
                       backends=[lb.Backend(b, 8080) for b in backends[:2]]),
            lb.Service("10.96.0.12", 80, name="default/one", affinity_timeout=600,
                       backends=[lb.Backend(backends[2], 8080)]),
            lb.Service("10.96.0.14", 53, protocol="udp", name="default/dns",
                       backends=[lb.Backend(b, 8080) for b in backends]),
        ])
        # Changed once: its entry (and Maglev table) are at generation 1.
        dp.upsert(lb.Service("10.96.0.11", 80, name="default/api", scheduler="maglev",
                             backends=[lb.Backend(b, 8080) for b in backends[1:]]))
        dp.close()
    else:
        dp = lb.Datapath(name, persist=True, netns=netns, pin_root=pin_root, create=False)
        print(json.dumps({s.name: [dp.stats(s).packets, dp.stats(s).bytes] for s in dp.services}))
        dp.close()
    """
)

# Run by layout 8's interpreter: a datapath whose policies have subjects, one of them
# one address (layout 8 keeps it in the trie of subject CIDRs), or its policies.
OLD8 = textwrap.dedent(
    """
    import json, sys
    import pyebpflb as lb
    what, name, netns, pin_root, backends = sys.argv[1:6]
    b = json.loads(backends)
    if what == "make":
        dp = lb.Datapath(name, persist=True, netns=netns, pin_root=pin_root)
        dp.attach("lb0")
        dp.sync(
            [lb.Service("10.96.0.10", 80, name="default/closed",
                        backends=[lb.Backend(b[0], 8080)]),
             lb.Service("10.96.0.11", 80, name="default/open",
                        backends=[lb.Backend(b[1], 8080)])],
            [lb.Policy("closed", [], "deny", subjects=[b[0]]),
             lb.Policy("open", [lb.Rule("allow", "10.90.0.2")], "deny",
                       subjects=[b[1].rsplit(".", 1)[0] + ".0/24"])],
        )
        dp.close()
    else:
        dp = lb.Datapath(name, persist=True, netns=netns, pin_root=pin_root, create=False)
        print(json.dumps(sorted(p.name for p in dp.policies)))
        dp.close()
    """
)


@contextlib.contextmanager
def venv_of(commit: str, place: pathlib.Path) -> Iterator[str]:
    """The interpreter of a venv holding the wheel built from ``commit``."""
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git clone: commit {commit} cannot be checked out")
    source, wheels, venv = place / "src", place / "wheels", place / "venv"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(source), commit],
        check=True,
        capture_output=True,
    )
    try:
        pip = [sys.executable, "-m", "pip", "-q"]
        subprocess.run(
            [*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(wheels), str(source)],
            check=True,
            capture_output=True,
        )
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        wheel = next(wheels.glob("pyebpflb-*.whl"))
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "-q", "install", str(wheel)],
            check=True,
            capture_output=True,
        )
        yield str(venv / "bin" / "python")
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(source)],
            check=False,
            capture_output=True,
        )


@pytest.fixture(scope="module")
def old_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """v0.1.0's interpreter (layout 3)."""
    with venv_of(FIRST_RELEASE, tmp_path_factory.mktemp("v0.1.0")) as python:
        yield python


@pytest.fixture(scope="module")
def layout8_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The interpreter of the last version of layout 8 (policies with subjects, every
    subject in the trie)."""
    with venv_of(LAST_LAYOUT_8, tmp_path_factory.mktemp("layout8")) as python:
        yield python


@contextlib.contextmanager
def udp_flow(sandbox: Sandbox) -> Iterator[Callable[[], str]]:
    """One UDP flow from the client (one socket, one source port): each call sends a
    datagram through the VIP and returns the name of the backend that answered."""
    sock = sandbox.client.socket(4, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    sock.connect(("10.96.0.14", 53))

    def ask() -> str:
        sock.send(b"hello")
        return sock.recv(65535).decode().strip()

    try:
        yield ask
    finally:
        sock.close()


def destroy(name: str, *where: str) -> None:
    """`pyebpflb destroy`: it loads nothing, so it removes a datapath of any layout."""
    gone = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyebpflb",
            "--datapath",
            name,
            *where,
            "--pin-root",
            str(PIN_ROOT),
            "destroy",
        ],
        capture_output=True,
        text=True,
    )
    assert gone.returncode == 0, gone.stderr


def old(python: str, *args: str, script: str = OLD) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-c", script, *args], capture_output=True, text=True, timeout=120, cwd="/"
    )


def test_an_upgrade_from_the_first_release_keeps_the_connection_and_the_counters(
    old_python: str,
) -> None:
    name = f"t{os.getpid()}-upgrade"
    with Sandbox(backends=3) as sandbox:
        backends = json.dumps([str(b.ipv4) for b in sandbox.backends])
        where = [name, sandbox.lb.netns, str(PIN_ROOT), backends]
        made = old(old_python, "make", *where)
        assert made.returncode == 0, made.stderr
        try:
            with sandbox.connection("10.96.0.10", 80) as conn, udp_flow(sandbox) as dns:
                answering, answering_udp = conn.get(), dns()
                for vip in ("10.96.0.10", "10.96.0.11", "10.96.0.12"):
                    sandbox.http_get(vip, 80)
                counted = old(old_python, "stats", *where)
                assert counted.returncode == 0, counted.stderr
                before = json.loads(counted.stdout)
                # A look (pin=False) at the older layout changes nothing and writes nothing.
                with lb.Datapath(
                    name, netns=sandbox.lb.netns, pin_root=PIN_ROOT, pin=False, create=False
                ) as look:
                    old_programs = {h.program_id for h in look.hooks()}
                    assert len(old_programs) == 2 and len(look.services) == 4
                    with pytest.raises(lb.PyEbpfLbError, match="runs layout 3, older than"):
                        look.upsert(lb.Service("10.96.0.99", 80))
                with lb.Datapath(
                    name, persist=True, netns=sandbox.lb.netns, pin_root=PIN_ROOT
                ) as dp:
                    assert dp.upgraded_from == 3
                    assert dp.whereabouts().layout == LAYOUT_VERSION
                    assert dp.interfaces == [LB_IFACE]
                    assert not {h.program_id for h in dp.hooks()} & old_programs  # swapped
                    # Counters kept their values (no packet since they were read).
                    now = {s.name: [dp.stats(s).packets, dp.stats(s).bytes] for s in dp.services}
                    assert now == before and all(p > 0 for p, _ in now.values())
                    # The open connection goes on, to the backend it had.
                    assert {conn.get() for _ in range(5)} == {answering}
                    # The UDP flow too: moved to the UDP table, where the new programs look.
                    assert {dns() for _ in range(5)} == {answering_udp}
                    udp_table = next(t for t in dp.conntrack_stats() if t.table == "udp")
                    assert udp_table.entries == 2  # its two halves
                    services = {s.name: s for s in dp.services}
                    service_ids = {
                        i.service.name: i.id for i in dp._state.snapshot.services.values()
                    }
                    addresses = [b.ipv4 for b in sandbox.backends]
                    assert services["default/web"] == lb.Service(
                        "10.96.0.10",
                        80,
                        name="default/web",
                        backends=[lb.Backend(a, BACKEND_PORT) for a in addresses],
                    )
                    assert services["default/api"].scheduler.value == "maglev"
                    assert [b.address for b in services["default/api"].backends] == addresses[1:]
                    assert services["default/one"].affinity_timeout == 600
                    # New connections balance, with the new programs.
                    names = {sandbox.http_get("10.96.0.10", 80) for _ in range(30)}
                    assert names == {b.name for b in sandbox.backends}
                    # The Maglev table of generation 1, found under its new key (a
                    # lookup that misses falls back to the slots: traffic cannot tell).
                    maglev_keys = set(dp._object.map("lb_maglev").keys())
                    assert maglev_keys == {1 << 31 | service_ids["default/api"]}
                    api = {sandbox.http_get("10.96.0.11", 80) for _ in range(30)}
                    assert api == {b.name for b in sandbox.backends[1:]}
                    dp.upsert(
                        lb.Service(
                            "10.96.0.11",
                            80,
                            name="default/api",
                            scheduler="maglev",
                            backends=[lb.Backend(addresses[0], BACKEND_PORT)],
                        )
                    )
                    assert sandbox.http_get("10.96.0.11", 80) == sandbox.backends[0].name
                    dp.upsert(
                        lb.Service(
                            "10.96.0.13",
                            80,
                            name="default/new",
                            backends=[lb.Backend(addresses[0], BACKEND_PORT)],
                        )
                    )
                    assert sandbox.http_get("10.96.0.13", 80) == sandbox.backends[0].name
                pins = sorted(PIN_ROOT.rglob("*"))
                # The old version meets the upgraded datapath: it refuses, changing nothing.
                refused = old(old_python, "stats", *where)
                assert refused.returncode != 0
                assert "not datapath" in refused.stderr and "another pyebpflb version" in (
                    refused.stderr
                )
                assert sorted(PIN_ROOT.rglob("*")) == pins
                assert conn.get() == answering
        finally:
            destroy(name, "--netns", sandbox.lb.netns)


def sctp_verdict(dp: lb.Datapath, destination: str) -> int:
    """The ingress program's verdict on an SCTP INIT from the client."""
    frame = (
        Ether()
        / IP(src="10.90.0.2", dst=destination)
        / SCTP(sport=40000, dport=5000)
        / SCTPChunkInit(init_tag=7)
    )
    dp.flush_conntrack()
    return int(dp._object.program("lb_ingress").test_run(bytes(frame)).retval)


def test_an_upgrade_from_layout_8_keeps_policies_with_subjects_in_force(
    layout8_python: str,
) -> None:
    """Layout 9 finds one-address subjects in a hash (lb_pol_addrs): those layout 8
    wrote into the trie must still decide after the upgrade, until a change rewrites
    them; its rules (lb_pol_rules, grown by their origin) are carried over."""
    name = f"t{os.getpid()}-upgrade8"
    with Sandbox(backends=2) as sandbox:
        first, second = (str(b.ipv4) for b in sandbox.backends)
        where = [name, sandbox.lb.netns, str(PIN_ROOT), json.dumps([first, second])]
        made = old(layout8_python, "make", *where, script=OLD8)
        assert made.returncode == 0, made.stderr
        try:

            def closed() -> bool:
                try:
                    sandbox.http_get("10.96.0.10", 80, timeout=1.0)
                except TimeoutError:
                    return True
                return False

            with sandbox.connection("10.96.0.11", 80) as conn:
                assert conn.get() == sandbox.backends[1].name
                assert closed()  # the old programs: "closed" isolates its one address
                with lb.Datapath(
                    name, persist=True, netns=sandbox.lb.netns, pin_root=PIN_ROOT
                ) as dp:
                    assert dp.upgraded_from == 8
                    assert {p.name: p.subjects for p in dp.policies} == {
                        "closed": (ipaddress.ip_network(first),),
                        "open": (ipaddress.ip_network(f"{second.rsplit('.', 1)[0]}.0/24"),),
                    }
                    # The rules, copied into layout 9's lb_pol_rules, read back the same.
                    opening = next(p for p in dp.policies if p.name == "open")
                    assert opening.rules == (lb.Rule("allow", "10.90.0.2"),)
                    # The new programs: the one-address subject, still in the trie, decides.
                    assert closed()
                    # SCTP (no kernel module here to send it: a run of the program) is
                    # matched as any other protocol by layout 8's classes, as it was.
                    assert sctp_verdict(dp, first) == TC_ACT_SHOT
                    assert sctp_verdict(dp, second) == TC_ACT_OK
                    assert conn.get() == sandbox.backends[1].name
                    assert sandbox.http_get("10.96.0.11", 80) == sandbox.backends[1].name
                    endpoints = dp._object.map("lb_pol_addrs")
                    assert list(endpoints.keys()) == []
                    # A change writes the one-address subject to the hash, where it decides.
                    opened = lb.Policy(
                        "closed", [lb.Rule("allow", "10.90.0.2")], "deny", subjects=[first]
                    )
                    dp.set_policies([opened, *(p for p in dp.policies if p.name == "open")])
                    assert len(list(endpoints.keys())) == 1
                    assert len(list(dp._object.map("lb_pol_subjects").keys())) == 1  # the /24
                    assert sandbox.http_get("10.96.0.10", 80) == sandbox.backends[0].name
                    assert conn.get() == sandbox.backends[1].name
                    # Compiled again, SCTP has its own pieces: the "any" rules hold them.
                    assert sctp_verdict(dp, first) == TC_ACT_OK
                    assert sctp_verdict(dp, second) == TC_ACT_OK
                    dp.set_policies([lb.Policy("closed", [], "deny", subjects=[first])])
                    assert sctp_verdict(dp, first) == TC_ACT_SHOT
                # Layout 8's version meets layout 9: it refuses, naming both layouts.
                refused = old(layout8_python, "policies", *where, script=OLD8)
                assert refused.returncode != 0
                assert "made by a newer pyebpflb; nothing was changed" in refused.stderr
                assert f"layout {LAYOUT_VERSION}, this pyebpflb knows layouts up to 8" in (
                    refused.stderr
                )
        finally:
            destroy(name, "--netns", sandbox.lb.netns)


def test_a_datapath_of_a_newer_layout_is_refused_and_left_as_it_is() -> None:
    name = f"t{os.getpid()}-newer"
    with lb.Datapath(name, persist=True, pin_root=PIN_ROOT) as dp:
        dp.upsert(lb.Service("10.96.0.10", 80, name="default/web"))
        config_map = dp._object.map("lb_config")
        config = config_map[0]
        config.layout_version = LAYOUT_VERSION + 1  # as a later pyebpflb would leave it
        config_map[0] = config
    pins = sorted((PIN_ROOT / name).iterdir())
    try:
        for create in (False, True):
            with pytest.raises(
                lb.IncompatibleDatapath,
                match=rf"datapath '{name}' was made by a newer pyebpflb; nothing was changed: .*"
                rf"lb_config: layout {LAYOUT_VERSION + 1}, this pyebpflb knows layouts up to "
                rf"{LAYOUT_VERSION}",
            ):
                lb.Datapath(name, persist=True, pin_root=PIN_ROOT, create=create)
        assert sorted((PIN_ROOT / name).iterdir()) == pins
    finally:
        destroy(name)
