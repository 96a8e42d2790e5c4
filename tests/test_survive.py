"""State that survives the process that made it (issue 13), tried the way people run
tools in a namespace: separate `ip netns exec` invocations, each its own mount namespace
with its own bpffs, so the pins of one are gone for the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from conftest import PIN_ROOT
from namespaces import VethPair, veth_pair

import pyebpflb as lb

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

PYEBPFLB = os.path.join(os.path.dirname(sys.executable), "pyebpflb")

SETUP = textwrap.dedent(
    """
    import sys
    import pyebpflb as lb
    name, iface, pin_root = sys.argv[1:4]
    dp = lb.Datapath(name, persist=True, pin_root=pin_root)
    dp.attach(iface)
    dp.sync([
        lb.Service("10.96.0.10", 80, name="default/web", backends=[lb.Backend("10.0.1.1", 8080)]),
        lb.Service("10.96.0.11", 53, protocol="udp", name="kube-system/dns",
                   backends=[lb.Backend("10.0.1.2", 53)]),
    ], [lb.Policy("only-clients", [lb.Rule("allow", "10.1.0.0/16")], default="allow")])
    dp.close()
    """
)


CHECK_AND_DESTROY = textwrap.dedent(
    """
    import sys
    import pyebpflb as lb
    name, pin_root = sys.argv[1:3]
    dp = lb.Datapath(name, persist=True, pin_root=pin_root, create=False)
    print(*[p.name for p in dp.policies], len(dp.services))
    dp.destroy()
    """
)


@pytest.fixture
def pair() -> Iterator[VethPair]:
    with veth_pair(subnet=77) as made:
        yield made


def in_netns(netns: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *command], capture_output=True, text=True, timeout=60
    )


def test_a_datapath_made_under_ip_netns_exec_is_found_whole_by_the_next_one(
    pair: VethPair,
) -> None:
    netns, name = pair.right.netns, f"t{os.getpid()}-survive"
    made = in_netns(netns, sys.executable, "-c", SETUP, name, pair.right.iface, str(PIN_ROOT))
    assert made.returncode == 0, made.stderr
    # A second `ip netns exec`: a new mount namespace, a new empty bpffs, no pins.
    cli = [PYEBPFLB, "--datapath", name, "--pin-root", str(PIN_ROOT)]
    listed = in_netns(netns, *cli, "service", "list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(s["name"] for s in json.loads(listed.stdout)) == [
        "default/web",
        "kube-system/dns",
    ]
    # From outside the namespace, through --netns (the host's bpffs, no pins there).
    outside = subprocess.run(
        [*cli, "--netns", netns, "service", "list", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert outside.returncode == 0, outside.stderr
    assert len(json.loads(outside.stdout)) == 2
    assert not (PIN_ROOT / name).exists()  # a read-only command pins nothing
    # A third, in Python: the policy with its name, and then it is torn down.
    peek = in_netns(netns, sys.executable, "-c", CHECK_AND_DESTROY, name, str(PIN_ROOT))
    assert peek.returncode == 0, peek.stderr
    assert peek.stdout.split() == ["only-clients", "2"]


def test_a_peek_with_create_false_leaves_the_datapath_serving(pair: VethPair) -> None:
    name = f"t{os.getpid()}-peek"
    made = lb.Datapath(name, persist=True, pin_root=PIN_ROOT, netns=pair.right.netns)
    made.attach(pair.right.iface)
    made.upsert(lb.Service("10.96.0.10", 80, name="default/web"))
    made.close()
    # A notebook's look at the running load balancer (persist defaults to False).
    with lb.Datapath(name, pin_root=PIN_ROOT, netns=pair.right.netns, create=False) as peek:
        assert [s.name for s in peek.services] == ["default/web"]
    with lb.Datapath(name, pin_root=PIN_ROOT, netns=pair.right.netns, create=False) as again:
        assert again.interfaces == [pair.right.iface]  # still attached and serving
        again.destroy()


WRITER = textwrap.dedent(
    """
    import sys, time
    import pyebpflb as lb
    name, pin_root, netns, first, start_at = sys.argv[1:6]
    dp = lb.Datapath(name, persist=True, pin_root=pin_root, netns=netns, create=False)
    while time.time() < float(start_at):
        pass
    base = int(first)
    for i in range(200):
        dp.upsert(lb.Service(f"10.97.{base + i // 200}.{i % 200 + 1}", 80, name=f"w{base}/{i}",
                             backends=[lb.Backend(f"10.0.{base}.{i % 250 + 1}", 8080)]))
    dp.close()
    """
)


def test_two_processes_upserting_at_once_lose_no_update(pair: VethPair) -> None:
    name = f"t{os.getpid()}-writers"
    with lb.Datapath(name, persist=True, pin_root=PIN_ROOT, netns=pair.right.netns) as made:
        made.attach(pair.right.iface)
    start_at = str(time.time() + 1.0)  # both begin at the same instant
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                name,
                str(PIN_ROOT),
                pair.right.netns,
                str(first),
                start_at,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for first in (1, 2)
    ]
    errors = [w.communicate(timeout=120)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    with lb.Datapath(name, pin_root=PIN_ROOT, netns=pair.right.netns, create=False) as dp:
        names = {s.name for s in dp.services}
        backends = sum(len(s.backends) for s in dp.services)
        dp.destroy()
    assert len(names) == 400 and backends == 400


def test_upsert_of_a_frontend_another_service_holds_raises_unless_told_to_replace() -> None:
    with lb.Datapath(f"t{os.getpid()}-takeover", pin_root=PIN_ROOT) as dp:
        dp.upsert(lb.Service("10.96.0.10", 80, name="default/a"))
        with pytest.raises(
            ValueError,
            match=r"10\.96\.0\.10:80/tcp is held by service 'default/a', not 'default/b': "
            r"upsert\(\.\.\., replace=True\) takes it over",
        ):
            dp.upsert(lb.Service("10.96.0.10", 80, name="default/b"))
        assert [s.name for s in dp.services] == ["default/a"]  # nothing changed
        dp.upsert(
            lb.Service("10.96.0.10", 80, name="default/a", backends=[lb.Backend("10.0.1.1", 80)])
        )
        dp.upsert(lb.Service("10.96.0.10", 80, name="default/b"), replace=True)
        assert [s.name for s in dp.services] == ["default/b"]
