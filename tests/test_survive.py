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


MANIFEST = """
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec: {clusterIP: 10.96.0.12, selector: {app: api}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: default, labels: {app: api}}
spec: {containers: [{name: c}]}
status: {podIP: 10.0.1.3, phase: Running, conditions: [{type: Ready, status: "True"}]}
"""

# `pyebpflb ... metrics` served and scraped inside the namespace, then stopped.
SCRAPE = textwrap.dedent(
    """
    import subprocess, sys, urllib.request
    server = subprocess.Popen([*sys.argv[1:], "metrics", "--port", "19311"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert "serving metrics" in server.stdout.readline()
        print(urllib.request.urlopen("http://127.0.0.1:19311/metrics", timeout=10).read().decode())
    finally:
        server.terminate()
        server.wait(timeout=10)
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
    try:
        found_everywhere(netns, name)
    finally:  # torn down by the last step; on a failure before it, here
        in_netns(netns, PYEBPFLB, "--datapath", name, "--pin-root", str(PIN_ROOT), "destroy")


def found_everywhere(netns: str, name: str) -> None:
    # A second `ip netns exec`: a new mount namespace, a new empty bpffs, no pins.
    cli = [PYEBPFLB, "--datapath", name, "--pin-root", str(PIN_ROOT)]
    listed = in_netns(netns, *cli, "service", "list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(s["name"] for s in json.loads(listed.stdout)) == [
        "default/web",
        "kube-system/dns",
    ]
    # From outside the namespace, through --netns; a read-only command pins nothing.
    pins = sorted(PIN_ROOT.rglob("*"))
    outside = subprocess.run(
        [*cli, "--netns", netns, "service", "list", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert outside.returncode == 0, outside.stderr
    assert len(json.loads(outside.stdout)) == 2
    assert sorted(PIN_ROOT.rglob("*")) == pins
    # A third `ip netns exec` each: the other commands find it whole too.
    conntrack = in_netns(netns, *cli, "ct", "list", "-o", "json")
    assert conntrack.returncode == 0 and json.loads(conntrack.stdout) == [], conntrack.stderr
    explained = in_netns(netns, *cli, "explain", "--src", "10.1.0.5", "--dst", "10.96.0.10:80")
    assert explained.returncode == 0, explained.stderr
    assert "default/web" in explained.stdout and "10.0.1.1:8080" in explained.stdout
    watched = in_netns(netns, *cli, "monitor", "--timeout", "0.5")
    assert watched.returncode == 0 and "# this monitor read 0 events" in watched.stderr
    applied = subprocess.run(
        ["ip", "netns", "exec", netns, *cli, "apply", "-f", "-"],
        input=MANIFEST,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert applied.returncode == 0, applied.stderr
    assert "service default/api (10.96.0.12:80/tcp): 1 backends" in applied.stdout
    scraped = in_netns(netns, sys.executable, "-c", SCRAPE, *cli)
    assert scraped.returncode == 0, scraped.stderr
    assert 'service="default/api"' in scraped.stdout
    # A last one, in Python: the policy with its name, and then it is torn down.
    peek = in_netns(netns, sys.executable, "-c", CHECK_AND_DESTROY, name, str(PIN_ROOT))
    assert peek.returncode == 0, peek.stderr
    assert peek.stdout.split() == ["only-clients", "3"]


SYNC_ONLY = textwrap.dedent(
    """
    import sys
    import pyebpflb as lb
    name, pin_root = sys.argv[1:3]
    with lb.Datapath(name, persist=True, pin_root=pin_root) as dp:  # attached nowhere
        dp.sync([lb.Service("10.96.0.10", 80, name="default/web")])
    """
)


def test_pins_made_under_ip_netns_exec_outlive_it_on_the_hosts_bpffs(pair: VethPair) -> None:
    netns, name = pair.right.netns, f"t{os.getpid()}-pins"
    # No program holds this datapath: only its pins do, so they must outlive the
    # mount namespace (and the bpffs) that `ip netns exec` gave the first command.
    made = in_netns(netns, sys.executable, "-c", SYNC_ONLY, name, str(PIN_ROOT))
    assert made.returncode == 0, made.stderr
    pin_dir = PIN_ROOT / name / f"netns-{os.stat(f'/run/netns/{netns}').st_ino}"
    assert (pin_dir / "lb_svc_names").exists()  # on the host's bpffs
    cli = [PYEBPFLB, "--datapath", name, "--pin-root", str(PIN_ROOT)]
    listed = in_netns(netns, *cli, "service", "list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert [s["name"] for s in json.loads(listed.stdout)] == ["default/web"]
    gone = in_netns(netns, sys.executable, "-c", CHECK_AND_DESTROY, name, str(PIN_ROOT))
    assert gone.returncode == 0, gone.stderr
    assert not (PIN_ROOT / name).exists()


def test_a_map_deleted_from_under_a_datapath_is_named_not_replaced() -> None:
    name = f"t{os.getpid()}-lost-map"
    with lb.Datapath(name, persist=True, pin_root=PIN_ROOT) as dp:
        dp.upsert(lb.Service("10.96.0.10", 80, name="default/web"))
    pin_dir = PIN_ROOT / name
    (pin_dir / "lb_svc_names").unlink()  # unpinned and unreferenced: the map is freed
    left = sorted(pin_dir.iterdir())
    try:
        for create in (False, True):  # never a fresh empty map in its place
            with pytest.raises(
                lb.IncompatibleDatapath,
                match=rf"datapath '{name}' is incomplete, .*: lb_svc_names: missing \(no pin "
                rf"under {pin_dir} and no attached program holds it\)$",
            ):
                lb.Datapath(name, persist=True, pin_root=PIN_ROOT, create=create)
            assert sorted(pin_dir.iterdir()) == left  # nothing changed
    finally:
        # `pyebpflb destroy` loads nothing: it removes what is left of an incomplete one.
        gone = subprocess.run(
            [PYEBPFLB, "--datapath", name, "--pin-root", str(PIN_ROOT), "destroy"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert gone.returncode == 0, gone.stderr
    assert f"{len(left)} pins gone" in gone.stdout
    assert not pin_dir.exists()


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


CONTROLLER = textwrap.dedent(
    """
    import sys, time
    import pyebpflb as lb
    name, pin_root, netns, start_at = sys.argv[1:5]
    dp = lb.Datapath(name, persist=True, pin_root=pin_root, netns=netns, create=False)
    while time.time() < float(start_at):
        pass
    for i in range(200):  # a controller adding a service as each is created (paced)
        new = lb.Service(f"10.97.1.{i + 1}", 80, name=f"ctl/s{i}",
                         backends=[lb.Backend(f"10.0.1.{i + 1}", 8080)])
        with dp.write_lock():  # read and sync as one change
            dp.sync([s for s in dp.services if s.name != new.name] + [new])
        time.sleep(0.01)
    dp.close()
    """
)


def manifest(first: int, count: int) -> str:
    """``count`` Services of namespace cli, each with one ready Pod."""
    objects = []
    for i in range(first, first + count):
        objects.append(
            f"""apiVersion: v1
kind: Service
metadata: {{name: s{i}, namespace: cli}}
spec: {{clusterIP: 10.97.2.{i + 1}, selector: {{app: s{i}}}, ports: [{{port: 80}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: p{i}, namespace: cli, labels: {{app: s{i}}}}}
spec: {{containers: [{{name: c}}]}}
status: {{podIP: 10.0.2.{i + 1}, phase: Running, conditions: [{{type: Ready, status: "True"}}]}}"""
        )
    return "\n---\n".join(objects)


def test_apply_racing_a_sync_loop_loses_no_update(pair: VethPair) -> None:
    name, netns = f"t{os.getpid()}-race", pair.right.netns
    with lb.Datapath(name, persist=True, pin_root=PIN_ROOT, netns=netns) as made:
        made.attach(pair.right.iface)
    start_at = str(time.time() + 1.0)
    controller = subprocess.Popen(
        [sys.executable, "-c", CONTROLLER, name, str(PIN_ROOT), netns, start_at],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        cli = [PYEBPFLB, "--datapath", name, "--netns", netns, "--pin-root", str(PIN_ROOT)]
        while time.time() < float(start_at):
            time.sleep(0.01)
        for first in range(0, 200, 50):  # a person applying four manifests meanwhile
            applied = subprocess.run(
                [*cli, "apply", "-f", "-"],
                input=manifest(first, 50),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert applied.returncode == 0, applied.stderr
        _, errors = controller.communicate(timeout=120)
        assert controller.returncode == 0, errors
    finally:
        controller.kill()
    with lb.Datapath(name, pin_root=PIN_ROOT, netns=netns, create=False) as dp:
        names = {s.name for s in dp.services}
        dp.destroy()
    assert len({n for n in names if n.startswith("ctl/")}) == 200
    assert len({n for n in names if n.startswith("cli/")}) == 200
