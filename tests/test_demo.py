"""`make demo` runs `pyebpflb demo`: it must tell its story and exit 0. The examples run too."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import namespaces
import pytest

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel


def test_demo_balances_survives_a_backend_removal_and_cleans_up() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pyebpflb", "demo"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "300 HTTP requests to 10.96.0.10:80" in text
    assert "300 HTTP requests to fd00:96::10:80" in text
    assert ", 0 failed" in text
    after = text.split("100 new requests after the change:")[1].split("services read back")[0]
    assert "my-app-2  0" in after
    assert "refused in" in text
    local = text.split("a process on the node itself")[1].split("network policy")[0]
    assert "translated at connect()" in local
    assert re.search(r"answered by my-app-1=\d+ my-app-3=\d+ peer 10\.96\.0\.10:80\b", local)
    policy = text.split("network policy my-app-source-ranges")[1]
    assert "10.90.0.2  answered by my-app-" in policy
    assert "10.90.0.3  no answer: dropped in tc" in policy
    assert "explain 10.90.0.3 -> 10.96.0.10:80 (a dry run in the kernel): dropped" in policy
    assert "denied by the default" in policy
    assert re.search(r"TRACE\s+forwarded tcp 10\.90\.0\.2:\d+ -> 10\.96\.0\.10:80 lb0", policy)
    assert re.search(r"DROP\s+dropped\s+tcp 10\.90\.0\.3:\d+ .*\(policy denied\)", policy)
    assert "namespaces removed" in text
    north = text.split("north-south:")[1]
    cluster, local = north.split("externalTrafficPolicy")[1:3]
    dsr = north.split("direct server")[1]
    # Cluster: node-2's pods saw node-1's address; Local: node-1's pods, the client's.
    assert re.search(r"node-2-pod-\d\s+\d+\s+10\.80\.1\.2", cluster)
    assert re.search(r"node-1-pod-\d\s+\d+\s+10\.70\.0\.2", cluster)
    assert "node-2-pod" not in local.split("health port")[0]
    assert (
        '31000 on node-1: 200 {"service": {"namespace": "default", "name": "my-app-service"}, '
        '"localEndpoints": 2' in local
    )
    assert (
        '31000 on node-2: 503 {"service": {"namespace": "default", "name": "my-app-service"}, '
        '"localEndpoints": 0' in local
    )  # no pod there: a cloud load balancer skips node-2
    assert re.search(r"node-2-pod-\d\s+\d+\s+10\.70\.0\.2", dsr)
    assert "nodeport" in north and "loadbalancer" in north
    assert "cluster namespaces removed" in text
    assert not [ns for ns in namespaces.netns.listnetns() if ns.startswith("pyebpflb-demo")]


def test_examples_run() -> None:
    root = pathlib.Path(__file__).resolve().parents[1] / "examples"
    for script, expect in (
        ("balance_a_service.py", "seen by the client as coming from 10.96.0.53"),
        ("count_traffic.py", "sent 1000 UDP datagrams"),
    ):
        out = subprocess.run(
            [sys.executable, str(root / script)], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert expect in out.stdout
