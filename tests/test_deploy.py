"""deploy/: the manifests validate against Kubernetes' OpenAPI schemas (offline, the
kubernetes-validate package, strict: no unknown field), and say what the agent needs:
flags it has, permissions for every request the watch loop makes."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import uuid
from typing import Any

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from pyebpflb._bpf import fs
from pyebpflb.cli import main_group

DEPLOY = pathlib.Path(__file__).parents[1] / "deploy"
# The oldest Kubernetes release still supported upstream when this was written, and
# the newest the validator knows.
VERSIONS = ("1.31.0", kubernetes_validate.latest_version())


def documents() -> list[dict[str, Any]]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        found.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return found


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    kinds = []
    for document in documents():
        kubernetes_validate.validate(document, version, strict=True)
        kinds.append(document["kind"])
    assert sorted(kinds) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "ServiceAccount",
    ]


def test_a_broken_manifest_is_caught() -> None:
    """The validation can fail: an unknown field and a wrong type are refused."""
    (daemonset,) = by_kind("DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, VERSIONS[0], strict=True)
    (daemonset,) = by_kind("DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, VERSIONS[0], strict=True)


def test_the_daemonset_runs_the_agent_as_a_node_proxy_must_run() -> None:
    (daemonset,) = by_kind("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    (agent,) = pod["containers"]
    assert agent["command"] == ["pyebpflb", "agent"]
    caps = agent["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and {"BPF", "NET_ADMIN"} <= set(caps["add"])
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert volumes["bpffs"] == "/sys/fs/bpf" == mounts["bpffs"]  # pins outlive the pod
    assert volumes["cgroup"] == "/sys/fs/cgroup"
    assert "--cgroup=" + mounts["cgroup"] in agent["args"]
    # Every flag it passes is one `pyebpflb agent` has; the env vars it sets are read.
    usage = CliRunner().invoke(main_group, ["agent", "--help"]).output
    for arg in agent["args"]:
        assert arg.split("=")[0] in usage, arg
    env = {e["name"] for e in agent["env"]}
    assert {"NODE_NAME", "PYEBPFLB_API_SERVER"} <= env
    assert "NODE_NAME" in usage and "PYEBPFLB_API_SERVER" in usage
    for variable in re.findall(r"\$\((\w+)\)", " ".join(agent["args"])):
        assert variable in env, variable
    probes = (agent["livenessProbe"]["httpGet"], agent["readinessProbe"]["httpGet"])
    assert {p["path"] for p in probes} == {"/livez", "/healthz"}
    assert {p["port"] for p in probes} == {10256}
    assert "--health-port=10256" in agent["args"]
    assert pod["serviceAccountName"] == by_kind("ServiceAccount")[0]["metadata"]["name"]


def allowed(group: str, resource: str, verb: str) -> bool:
    (role,) = by_kind("ClusterRole")
    return any(
        group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
        for rule in role["rules"]
    )


def test_rbac_allows_every_request_the_agent_makes_and_no_write_to_services() -> None:
    for group, resource, verb in [
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "nodes", "get"),
        ("", "events", "create"),
    ]:
        assert allowed(group, resource, verb), (group, resource, verb)
    for verb in ("create", "update", "patch", "delete"):
        assert not allowed("", "services", verb)
    (binding,) = by_kind("ClusterRoleBinding")
    (account,) = by_kind("ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "pyebpflb", "namespace": "kube-system"}
    ]
    assert account["metadata"] == {
        "name": "pyebpflb",
        "namespace": "kube-system",
        "labels": {"app.kubernetes.io/name": "pyebpflb"},
    }


def test_the_container_build_installs_the_wheel_with_the_kubernetes_client() -> None:
    build = (DEPLOY / "Containerfile").read_text()
    assert re.search(r"^FROM debian:12", build, re.M)
    assert "[kubernetes]" in build and "pyebpflb-*.whl" in build
    assert "libbpf1" in build  # the binding links Debian 12's libbpf 1.1


# What the agent does to the node at start, run with a capability set only.
AGENT_START = """
import sys
import pyebpflb as lb
name, pin_root, iface, cgroup = sys.argv[1:]
dp = lb.Datapath(name, pin_root=pin_root, persist=True, node=lb.Node("node-1"))
dp.attach(iface)
dp.attach_cgroup(cgroup)
dp.upsert(lb.Service("10.96.0.10", 80, name="shop/web", backends=[lb.Backend("10.0.0.1", 80)]))
dp.close()
"""


@pytest.mark.kernel
def test_the_daemonsets_capabilities_are_enough_and_each_is_needed(
    tmp_path: pathlib.Path,
) -> None:
    """The agent's start (load, pin, attach at tc and to a cgroup, program a service)
    under exactly the capabilities the DaemonSet adds (setpriv's bounding set, as root
    as in the pod), then without each one: refused."""
    from conftest import PIN_ROOT

    import pyebpflb as lb

    (daemonset,) = by_kind("DaemonSet")
    (agent,) = daemonset["spec"]["template"]["spec"]["containers"]
    caps = [c.lower() for c in agent["securityContext"]["capabilities"]["add"]]
    tag = uuid.uuid4().hex[:6]
    iface, name = f"pyebcap{tag}"[:15], f"t{os.getpid()}-caps"
    cgroup = pathlib.Path(fs.cgroup2_root()) / f"pyebpflb-test-caps-{tag}"
    subprocess.run(["ip", "link", "add", iface, "type", "veth", "peer", "name", iface + "p"],
                   check=True)  # fmt: skip
    cgroup.mkdir()

    def start(allowed: list[str]) -> subprocess.CompletedProcess[str]:
        bounding = ",".join(["-all", *(f"+{c}" for c in allowed)])
        return subprocess.run(
            ["setpriv", f"--bounding-set={bounding}", sys.executable, "-c", AGENT_START,
             name, str(PIN_ROOT), iface, str(cgroup)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    try:
        done = start(caps)
        assert done.returncode == 0, done.stderr[-2000:]
        with lb.Datapath(name, pin_root=PIN_ROOT, create=False) as dp:
            assert [s.name for s in dp.services] == ["shop/web"]
            assert dp.interfaces == [iface] and dp.cgroups == [f"/{cgroup.name}"]
            dp.destroy()
        for missing in caps:
            refused = start([c for c in caps if c != missing])
            assert refused.returncode != 0, f"{missing} is not needed"
            assert "Operation not permitted" in refused.stderr or "Permission denied" in (
                refused.stderr
            ), refused.stderr[-2000:]
            # And the failed start left nothing behind.
            with pytest.raises(lb.NotFound):
                lb.Datapath(name, pin_root=PIN_ROOT, create=False)
    finally:
        subprocess.run(["ip", "link", "del", iface], capture_output=True)
        subprocess.run(
            [sys.executable, "-m", "pyebpflb", "--datapath", name, "--pin-root", str(PIN_ROOT),
             "destroy"], capture_output=True,
        )  # fmt: skip
        cgroup.rmdir()
