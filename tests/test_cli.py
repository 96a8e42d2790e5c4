"""The `pyebpflb` command against a live, persisted datapath in the sandbox,
every command in both output formats."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PIN_ROOT

import pyebpflb as lb
from pyebpflb.cli import main_group
from pyebpflb.testing.sandbox import BACKEND_PORT, Sandbox

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

NAME = f"cli-{os.getpid()}"

MANIFEST = (
    """\
apiVersion: v1
kind: Service
metadata:
  name: my-app-service
  namespace: default
spec:
  clusterIP: 10.96.0.10
  selector:
    app: my-app
  ports:
  - name: web
    protocol: TCP
    port: 80
    targetPort: http
---
"""
    + "".join(
        f"""apiVersion: v1
kind: Pod
metadata:
  name: my-app-{i}
  namespace: default
  labels:
    app: my-app
spec:
  containers:
  - name: app
    image: my-app:1
    ports:
    - name: http
      containerPort: {BACKEND_PORT}
status:
  podIP: 10.91.{i}.2
  conditions:
  - type: Ready
    status: "True"
---
"""
        for i in (1, 2)
    )
    + """\
apiVersion: v1
kind: Pod
metadata:
  name: other
  labels:
    app: other
spec:
  containers:
  - name: other
    image: other:1
status:
  podIP: 10.91.9.9
"""
)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(backends=2, prefix="pyebpflb-cli") as built:
        yield built


@pytest.fixture(scope="module")
def dp(sandbox: Sandbox) -> Iterator[lb.Datapath]:
    with lb.Datapath(NAME, netns=sandbox.lb.netns, pin_root=PIN_ROOT) as datapath:
        datapath.attach(sandbox.lb.iface)
        yield datapath


def cli(sandbox: Sandbox, *args: str, ok: bool = True) -> str:
    result = CliRunner().invoke(
        main_group,
        ["--datapath", NAME, "--netns", sandbox.lb.netns, "--pin-root", str(PIN_ROOT), *args],
        catch_exceptions=False,
    )
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
    return result.output


def command(sandbox: Sandbox, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pyebpflb",
        "--datapath",
        NAME,
        "--netns",
        sandbox.lb.netns,
        "--pin-root",
        str(PIN_ROOT),
        *args,
    ]


@pytest.fixture
def applied(sandbox: Sandbox, dp: lb.Datapath, tmp_path: Path) -> Path:
    manifest = tmp_path / "my-app.yaml"
    manifest.write_text(MANIFEST)
    dp.sync([], [])
    cli(sandbox, "apply", "-f", str(manifest))
    return manifest


def test_apply_makes_the_vip_answer_from_the_pods(
    sandbox: Sandbox, dp: lb.Datapath, applied: Path
) -> None:
    assert {sandbox.http_get("10.96.0.10", 80) for _ in range(30)} == {
        b.name for b in sandbox.backends
    }
    (svc,) = dp.services
    assert svc.name == "default/my-app-service"
    assert sorted(str(b) for b in svc.backends) == [f"10.91.{i}.2:{BACKEND_PORT}" for i in (1, 2)]


def test_a_manifest_with_an_error_changes_nothing(
    sandbox: Sandbox, dp: lb.Datapath, applied: Path, tmp_path: Path
) -> None:
    before = dp.services
    bad = tmp_path / "bad.yaml"
    bad.write_text(MANIFEST.replace("clusterIP: 10.96.0.10", "clusterIP: 10.96.0.300"))
    out = cli(sandbox, "apply", "-f", str(bad), ok=False)
    assert "spec.clusterIP '10.96.0.300' is not an IP address" in out
    assert "nothing was applied" in out
    headless = tmp_path / "headless.yaml"
    headless.write_text(MANIFEST.replace("clusterIP: 10.96.0.10", "clusterIP: None"))
    # kube-proxy does not proxy a headless Service: skipped, said so, nothing changed.
    out = cli(sandbox, "apply", "-f", str(headless))
    assert "skipped Service default/my-app-service: headless" in out
    assert dp.services == before
    out = cli(sandbox, "delete", "-f", str(applied))
    assert "service default/my-app-service (10.96.0.10:80/tcp) deleted" in out
    assert dp.services == []
    again = json.loads(cli(sandbox, "apply", "-f", str(applied), "-o", "json"))
    assert [s["name"] for s in again] == ["default/my-app-service"]
    assert len(again[0]["backends"]) == 2
    gone = json.loads(cli(sandbox, "delete", "-f", str(applied), "-o", "json"))
    assert [s["vip"] for s in gone] == ["10.96.0.10"]


def test_status(sandbox: Sandbox, dp: lb.Datapath, applied: Path) -> None:
    out = cli(sandbox, "status")
    assert re.search(rf"{sandbox.lb.iface}\s+tc ingress\s+lb_ingress\s+\d+", out)
    assert re.search(rf"{sandbox.lb.iface}\s+tc egress\s+lb_egress\s+\d+", out)
    assert re.search(r"lb_services\s+1 \(", out)
    assert "libbpf     1." in out
    data = json.loads(cli(sandbox, "status", "-o", "json"))
    assert data["services"] == 1 and data["features"]["ring buffer"] is True
    assert {a["hook"] for a in data["attached"]} == {"tc ingress", "tc egress"}


def test_service_and_backend_lists(sandbox: Sandbox, dp: lb.Datapath, applied: Path) -> None:
    sandbox.http_get("10.96.0.10", 80)
    out = cli(sandbox, "service", "list")
    assert re.search(r"default/my-app-service\s+10\.96\.0\.10:80/tcp\s+random\s+2", out)
    data = json.loads(cli(sandbox, "service", "list", "-o", "json"))
    assert data[0]["vip"] == "10.96.0.10" and len(data[0]["backends"]) == 2
    got = json.loads(cli(sandbox, "service", "get", "default/my-app-service", "-o", "json"))
    assert got[0]["packets"] == dp.stats(dp.services[0]).packets > 0
    assert got[0]["reply_packets"] == dp.stats(dp.services[0]).replies.packets > 0
    assert sum(b["reply_packets"] for b in got[0]["backends"]) == got[0]["reply_packets"]
    assert "10.91.1.2:8080" in cli(sandbox, "service", "get", "default/my-app-service")
    assert "no service named 'nope'" in cli(sandbox, "service", "get", "nope", ok=False)
    out = cli(sandbox, "backend", "list")
    assert re.search(r"10\.91\.1\.2:8080\s+default/my-app-service\s+1\s+active", out)
    backends = json.loads(cli(sandbox, "backend", "list", "-o", "json"))
    assert sum(b["packets"] for b in backends) == got[0]["packets"]


def test_ct_list_and_flush(sandbox: Sandbox, dp: lb.Datapath, applied: Path) -> None:
    dp.flush_conntrack()
    with sandbox.connection("10.96.0.10", 80) as conn:
        conn.get()
        out = cli(sandbox, "ct", "list")
        flows = json.loads(cli(sandbox, "ct", "list", "-o", "json"))
    assert re.search(
        rf"service\s+tcp\s+{sandbox.client.ipv4}:\d+ -> 10\.96\.0\.10:80\s+10\.91", out
    )
    service = next(f for f in flows if f["kind"] == "service")
    assert service["service"] == "default/my-app-service"
    assert service["expires_in"] > 3600  # established: 6 h
    assert {f["kind"] for f in flows} == {"service", "reply"}
    flushed = json.loads(cli(sandbox, "ct", "flush", "-o", "json"))["flushed"]
    assert flushed >= 2  # the connection's two entries (its close may still be in flight)
    assert re.match(r"flushed \d+ conntrack entries", cli(sandbox, "ct", "flush"))


def test_ct_stats_and_gc(sandbox: Sandbox, dp: lb.Datapath, applied: Path) -> None:
    dp.flush_conntrack()
    before = {t["table"]: t for t in json.loads(cli(sandbox, "ct", "stats", "-o", "json"))}
    with sandbox.connection("10.96.0.10", 80) as conn:
        conn.get()
        tables = {t["table"]: t for t in json.loads(cli(sandbox, "ct", "stats", "-o", "json"))}
        out = cli(sandbox, "ct", "stats")
    assert set(tables) == {"tcp", "tcp_syn", "udp"}
    assert tables["tcp_syn"]["created"] == before["tcp_syn"]["created"] + 1
    assert tables["tcp_syn"]["confirmed"] == before["tcp_syn"]["confirmed"] + 1
    assert tables["tcp"]["entries"] >= 2  # the answered connection, both halves
    assert re.search(r"^tcp\s+\d+ \(\d+\.\d%\)\s+262144", out, re.M)
    assert re.match(r"collected \d+ dead conntrack entries", cli(sandbox, "ct", "gc"))
    assert "conntrack:" in cli(sandbox, "status")


def test_bpf_map_list(sandbox: Sandbox, dp: lb.Datapath, applied: Path) -> None:
    out = cli(sandbox, "bpf", "map", "list")
    assert re.search(r"lb_services\s+hash\s+1 \(", out)
    assert re.search(r"lb_pol_cidrs\s+lpm_trie", out)
    maps = {m["name"]: m for m in json.loads(cli(sandbox, "bpf", "map", "list", "-o", "json"))}
    assert maps["lb_backends"]["entries"] == 2
    assert maps["lb_events"]["type"] == "ringbuf"


def test_explain_agrees_with_a_connection(sandbox: Sandbox, dp: lb.Datapath, applied: Path) -> None:
    answered = sandbox.http_get("10.96.0.10", 80, source_port=43000)
    out = json.loads(
        cli(
            sandbox,
            "explain",
            "--src",
            f"{sandbox.client.ipv4}:43000",
            "--dst",
            "10.96.0.10:80",
            "-o",
            "json",
        )
    )
    # The connection closed (FIN): its entry still says where it went.
    backend = next(b for b in sandbox.backends if b.name == answered)
    assert out["backend"] == f"{backend.ipv4}:{BACKEND_PORT}"
    assert out["verdict"] == "forwarded"
    text = cli(sandbox, "explain", "--src", "10.90.0.2", "--dst", "10.96.0.10:80")
    assert "verdict  forwarded" in text and "policy   no policy" in text
    dp.upsert_policy(lb.Policy("deny-client", [lb.Rule("deny", "10.90.0.2/32")]))
    try:
        text = cli(sandbox, "explain", "--src", "10.90.0.2", "--dst", "10.96.0.10:80")
        assert "verdict  dropped (policy denied)" in text
        assert "denied by policy 'deny-client' rule 0" in text
    finally:
        dp.remove_policy("deny-client")
    assert "dst must be IP:PORT" in cli(
        sandbox, "explain", "--src", "10.90.0.2", "--dst", "10.96.0.10", ok=False
    )


def test_monitor(sandbox: Sandbox, dp: lb.Datapath, applied: Path) -> None:
    dp.upsert(lb.Service("10.96.0.20", 80, name="default/no-pods"))
    for output in ("table", "json"):
        watcher = subprocess.Popen(
            command(sandbox, "monitor", "--timeout", "5", "-o", output),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert watcher.stderr is not None
            assert "# reading the flow events" in watcher.stderr.readline()  # it reads now
            # A second reader would take half of the events: it is refused, naming the first.
            second = subprocess.run(
                command(sandbox, "monitor", "--timeout", "1"),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert second.returncode != 0
            assert f"already has a monitor: pid {watcher.pid} (" in second.stderr
            sandbox.http_get("10.96.0.10", 80)
            with pytest.raises(ConnectionRefusedError):
                sandbox.http_get("10.96.0.20", 80)
            out, err = watcher.communicate(timeout=20)
        finally:
            watcher.kill()
        assert watcher.returncode == 0, err
        seen = len(out.splitlines())
        # The summary counts what this monitor saw, not the datapath's running total.
        assert seen >= 2 and f"# this monitor read {seen} events, showed {seen};" in err, err
        if output == "table":
            assert re.search(r"TRACE\s+forwarded\s+tcp .* -> 10\.96\.0\.10:80 lb0 ingress", out)
            assert "(no backend)" in out
        else:
            events = [json.loads(line) for line in out.splitlines()]
            assert any(
                e["type"] == "trace" and e["service"] == "default/my-app-service" for e in events
            )
            assert any(e["drop_reason"] == "no backend" for e in events)


def test_metrics_report_the_counters(sandbox: Sandbox, dp: lb.Datapath, applied: Path) -> None:
    for _ in range(3):
        sandbox.http_get("10.96.0.10", 80)
    port = 19000 + os.getpid() % 1000
    server = subprocess.Popen(
        command(sandbox, "metrics", "--port", str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert "serving metrics" in server.stdout.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    finally:
        server.terminate()
        server.wait(timeout=10)
    svc = dp.services[0]
    stats = dp.stats(svc)
    line = re.search(
        r'^pyebpflb_service_packets_total\{[^}]*service="default/my-app-service"[^}]*\} (\S+)$',
        text,
        re.M,
    )
    assert line is not None and float(line.group(1)) == stats.packets
    assert 'pyebpflb_drops_total{datapath="' in text
    assert re.search(r'pyebpflb_map_entries\{datapath="[^"]+",map="lb_services"\} 1\.0', text)
    assert 'pyebpflb_events_total{datapath="' in text
    assert re.search(r'pyebpflb_conntrack_max_entries\{datapath="[^"]+",table="tcp"\} 262144', text)
    assert 'pyebpflb_conntrack_created_total{datapath="' in text


def test_missing_datapath(sandbox: Sandbox) -> None:
    result = CliRunner().invoke(
        main_group, ["--datapath", "nope", "--pin-root", str(PIN_ROOT), "service", "list"]
    )
    assert result.exit_code == 1
    assert "no datapath 'nope'" in result.output
    assert not (PIN_ROOT / "nope").exists()


def test_apply_of_services_alone_keeps_their_endpoints_as_kubectl_does(
    sandbox: Sandbox, dp: lb.Datapath, applied: Path, tmp_path: Path
) -> None:
    """`kubectl get svc -A -o yaml` holds Services, not their Pods or EndpointSlices:
    applying it changes the Services and leaves their backends alone (a Service's
    endpoints are not in its spec); --replace-endpoints says the manifest is all."""
    only = tmp_path / "services.yaml"
    only.write_text(MANIFEST.split("---")[0].replace("port: 80", "port: 80\n    nodePort: 30080")
                    .replace("  clusterIP:", "  type: NodePort\n  clusterIP:"))  # fmt: skip
    out = cli(sandbox, "apply", "-f", str(only))
    assert "service default/my-app-service (10.96.0.10:80/tcp): 2 backends" in out
    (svc,) = dp.services
    assert svc.node_port == 30080 and len(svc.backends) == 2
    assert sandbox.http_get("10.96.0.10", 80).startswith("backend-")
    out = cli(sandbox, "apply", "-f", str(only), "--replace-endpoints")
    assert "service default/my-app-service (10.96.0.10:80/tcp): 0 backends" in out
    assert dp.services[0].backends == ()


NETWORK_POLICY = """\
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: only-from-client
  namespace: default
spec:
  podSelector:
    matchLabels: {app: my-app}
  ingress:
  - from:
    - ipBlock: {cidr: 10.90.0.0/24, except: [10.90.0.3/32]}
"""


def test_apply_and_delete_of_a_network_policy(
    sandbox: Sandbox, dp: lb.Datapath, applied: Path, tmp_path: Path
) -> None:
    """`apply -f` of a NetworkPolicy with the Pods it selects: a policy for those pods
    (10.91.1.2, 10.91.2.2, not the other pod), enforced; `delete -f` removes it."""
    manifest = tmp_path / "with-policy.yaml"
    manifest.write_text(MANIFEST + NETWORK_POLICY)
    out = cli(sandbox, "apply", "-f", str(manifest))
    assert "networkpolicy default/only-from-client: 1 policies for 2 endpoints" in out
    (installed,) = dp.policies
    assert installed.name == "default/only-from-client" and installed.default.value == "deny"
    assert [str(s) for s in installed.subjects] == ["10.91.1.2/32", "10.91.2.2/32"]
    assert sandbox.http_get("10.96.0.10", 80) in {b.name for b in sandbox.backends}
    # Applying it again, changed: replaced, not added to.
    manifest.write_text(MANIFEST + NETWORK_POLICY.replace("{app: my-app}", "{app: other}"))
    cli(sandbox, "apply", "-f", str(manifest))
    assert [str(s) for p in dp.policies for s in p.subjects] == ["10.91.9.9/32"]
    out = cli(sandbox, "delete", "-f", str(manifest))
    assert "networkpolicy default/only-from-client deleted" in out
    assert dp.policies == [] and dp.services == []
