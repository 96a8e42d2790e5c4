"""A datapath's life from the command line (issue 13): every datapath on the host
listed with where it runs and where its state lives, orphans pruned, attach, detach
and destroy by name, and the environment's defaults. Each command is its own
process, as a person at a terminal runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import PIN_ROOT
from namespaces import VethPair, new_name, veth_pair
from pyroute2 import netns as pyroute2_netns

import pyebpflb as lb
from pyebpflb.datapath import LAYOUT_VERSION

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

PYEBPFLB = os.path.join(os.path.dirname(sys.executable), "pyebpflb")
MANIFEST = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec: {containers: [{name: web, ports: [{containerPort: 8080}]}]}
status: {podIP: 10.0.1.1, phase: Running, conditions: [{type: Ready, status: "True"}]}
"""


@pytest.fixture
def pair() -> Iterator[VethPair]:
    with veth_pair(subnet=78) as made:
        yield made


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYEBPFLB, "--pin-root", str(PIN_ROOT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        input=MANIFEST,
    )


def listed(*names: str) -> dict[str, dict[str, object]]:
    done = run("datapath", "list", "-o", "json")
    assert done.returncode == 0, done.stderr
    return {d["name"]: d for d in json.loads(done.stdout) if d["name"] in names}


def test_the_lifecycle_of_a_datapath_from_the_command_line(pair: VethPair) -> None:
    name, netns, iface = f"t{os.getpid()}-life", pair.right.netns, pair.right.iface
    env = {"PYEBPFLB_DATAPATH": name, "PYEBPFLB_NETNS": netns}
    applied = run("apply", "-f", "-", env=env)
    assert applied.returncode == 0, applied.stderr
    assert f"note: datapath {name} is attached to no interface" in applied.stderr
    assert listed(name)[name]["state"] == "pins only (attached nowhere)"
    for _ in range(2):  # idempotent
        attached = run("attach", iface, env=env)
        assert attached.returncode == 0, attached.stderr
    with lb.Datapath(name, pin_root=PIN_ROOT, netns=netns, create=False) as dp:
        assert dp.interfaces == [iface]
        assert [s.name for s in dp.services] == ["default/web"]
    found = listed(name)[name]
    assert found["netns"] == netns and found["interfaces"] == [iface]
    assert found["layout"] == LAYOUT_VERSION and found["state"] == "pins and attached programs"
    assert found["netns_id"] == os.stat(f"/run/netns/{netns}").st_ino
    status = run("status", env=env)
    assert status.returncode == 0, status.stderr
    assert f"layout     {LAYOUT_VERSION}\n" in status.stdout
    assert "state      pins and attached programs in " in status.stdout
    assert "writer     none (unlocked)" in status.stdout
    detached = run("detach", iface, env=env)
    assert detached.returncode == 0, detached.stderr
    assert "attached nowhere now, its state is pinned" in detached.stdout
    again = run("detach", iface, env=env)
    assert again.returncode != 0 and "this datapath is not attached there" in again.stderr
    destroyed = run("destroy", env=env)
    assert destroyed.returncode == 0, destroyed.stderr
    assert "pins gone" in destroyed.stdout
    assert name not in listed(name)
    missing = run("destroy", env=env)
    assert (
        missing.returncode != 0 and f"no datapath {name!r} in network namespace" in missing.stderr
    )


def test_status_warns_about_maps_whose_pins_are_missing(pair: VethPair) -> None:
    name, netns = f"t{os.getpid()}-unpinned", pair.right.netns
    dp = lb.Datapath(name, persist=True, pin_root=PIN_ROOT, netns=netns)
    try:
        dp.attach(pair.right.iface)
        # The programs hold the map, so it lives on (and is found through them);
        # its pin is what is gone.
        inode = os.stat(f"/run/netns/{netns}").st_ino
        (PIN_ROOT / name / f"netns-{inode}" / "lb_affinity").unlink()
        status = run("--datapath", name, "--netns", netns, "status")
        assert status.returncode == 0, status.stderr
        assert "warning    1 maps have no pin: lb_affinity" in status.stderr
        assert listed(name)[name]["missing_pins"] == ["lb_affinity"]
    finally:
        dp.destroy()


def test_datapath_list_finds_orphans_and_prune_removes_them() -> None:
    name, netns = f"t{os.getpid()}-orphan", new_name("gone")
    pyroute2_netns.create(netns)
    try:
        inode = os.stat(f"/run/netns/{netns}").st_ino
        with lb.Datapath(name, persist=True, pin_root=PIN_ROOT, netns=netns) as dp:
            dp.upsert(lb.Service("10.96.0.10", 80, name="default/web"))
        assert listed(name)[name]["netns"] == netns
    finally:
        pyroute2_netns.remove(netns)
    orphan = listed(name)[name]
    assert orphan["orphan"] is True and orphan["netns_id"] is None
    assert orphan["pin_dir"] == str(PIN_ROOT / name / f"netns-{inode}")
    pruned = run("datapath", "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert f"orphan {name}: {len(orphan['pins'])} pins removed" in pruned.stdout
    assert name not in listed(name) and not (PIN_ROOT / name).exists()
    os.unlink(f"/run/pyebpflb/{name}@netns-{inode}.lock")  # the writer lock of the gone one
