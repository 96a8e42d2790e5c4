"""pyebpflb.k8s.Watcher and `pyebpflb agent` against the stand-in API server
(pyebpflb.testing.apiserver) through the real `kubernetes` client and a real
kubeconfig, programming a real datapath in the sandbox, checked with real traffic."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import PIN_ROOT

import pyebpflb as lb
from pyebpflb import k8s
from pyebpflb.k8s.watch import api_client
from pyebpflb.testing.apiserver import ApiServer
from pyebpflb.testing.sandbox import BACKEND_PORT, Sandbox

pytestmark = pytest.mark.kernel

VIP = "10.96.0.10"
PYEBPFLB = str(pathlib.Path(sys.executable).parent / "pyebpflb")


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(backends=3) as built:
        yield built


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer(bookmark_interval=0.3) as server:
        yield server


@pytest.fixture
def dp(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[lb.Datapath]:
    name = f"t{os.getpid()}-{request.node.name}"[:60]
    with lb.Datapath(name, netns=sandbox.lb.netns, pin_root=PIN_ROOT) as datapath:
        datapath.attach(sandbox.lb.iface)
        yield datapath


def service(name: str = "web", cluster_ip: str = VIP) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80,
                                                     "targetPort": 8080}]},
    }  # fmt: skip


def endpointslice(sandbox: Sandbox, states: dict[int, dict[str, bool]],
                  owner: str = "web") -> dict[str, Any]:  # fmt: skip
    """Backend index -> its conditions."""
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": f"{owner}-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": owner}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [str(sandbox.backends[i].ipv4)], "conditions": c}
                      for i, c in states.items()],
    }  # fmt: skip


READY = {"ready": True}


def answers(sandbox: Sandbox, vip: str = VIP, count: int = 24) -> set[str]:
    return {sandbox.http_get(vip, 80) for _ in range(count)}


def eventually(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Until ``check()`` is truthy (errors count as not yet); fails naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:
            last = exc
        time.sleep(0.05)
    pytest.fail(f"{what}: not within {timeout} s (last: {last!r})")


@contextmanager
def following(dp: lb.Datapath, api: ApiServer, tmp_path: pathlib.Path,
              **options: Any) -> Iterator[k8s.Watcher]:  # fmt: skip
    client = api_client(api.kubeconfig(tmp_path / "kubeconfig"))
    proxy = k8s.ServiceProxy(
        dp, min_sync_period=0, network_policy=options.pop("network_policy", False)
    )
    watcher = k8s.Watcher(proxy, client, timeout_seconds=2, backoff=(0.1, 0.5), **options)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        yield watcher
    finally:
        stop.set()
        thread.join(timeout=15)
        client.close()
    assert not thread.is_alive(), "the watch loop did not stop"


class Traffic:
    """New connections to the VIP, one after another in a thread, every failure kept:
    a moment where the Service has no backend would show as one."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox, self.answers, self.failures = sandbox, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sandbox.http_get(VIP, 80, timeout=1.0)
                self.answers += 1
            except Exception as exc:
                self.failures.append(repr(exc))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def test_services_and_slices_through_the_watch_are_followed_by_traffic(
    sandbox: Sandbox, api: ApiServer, dp: lb.Datapath, tmp_path: pathlib.Path
) -> None:
    api.apply(service(), endpointslice(sandbox, {0: READY}))
    with following(dp, api, tmp_path) as watcher:
        eventually(lambda: answers(sandbox) == {"backend-1"}, "the listed Service answers")
        # Scaled up through the watch.
        api.apply(endpointslice(sandbox, {0: READY, 1: READY}))
        eventually(lambda: answers(sandbox) == {"backend-1", "backend-2"}, "scaled up")
        # Its backend terminating but serving: the open connection goes on, new ones go
        # to the ready endpoint (kube-proxy's CategorizeEndpoints).
        with sandbox.connection(VIP, 80) as open_conn:
            first = open_conn.get()
            other = 1 if first == "backend-1" else 0
            leaving = 1 - other
            api.apply(endpointslice(sandbox, {leaving: {"ready": False, "serving": True,
                                                        "terminating": True},
                                              other: READY}))  # fmt: skip
            eventually(lambda: answers(sandbox) == {f"backend-{other + 1}"}, "terminating")
            assert open_conn.get() == first
        # Watches end after timeoutSeconds and are made again from the last version
        # (no relist): wait for one of those, then delete.
        eventually(lambda: watcher.counts["watches"] >= 4, "watches made again")
        api.delete("Service", "shop", "web")
        eventually(lambda: dp.services == [], "the deleted Service is gone")
        assert watcher.counts["lists"] == 2 and watcher.counts["gone"] == 0


def test_gone_and_dropped_watches_lose_no_event_and_no_backend(
    sandbox: Sandbox, api: ApiServer, dp: lb.Datapath, tmp_path: pathlib.Path
) -> None:
    api.apply(service(), endpointslice(sandbox, {0: READY}))
    with following(dp, api, tmp_path) as watcher:
        eventually(lambda: answers(sandbox) == {"backend-1"}, "the listed Service answers")
        api.wait_for_watches(2)
        with Traffic(sandbox) as traffic:
            # Dropped connections, and a change made while the watches are down (their
            # reconnections refused): the new watch from the last version delivers it.
            api.fail(503, count=1000)
            assert api.drop_watches() == 2
            api.apply(endpointslice(sandbox, {0: READY, 1: READY}))
            eventually(lambda: watcher.counts["errors"] >= 2, "reconnections refused")
            api.heal()
            eventually(lambda: answers(sandbox) == {"backend-1", "backend-2"}, "not lost")
            assert watcher.counts["gone"] == 0 and watcher.counts["lists"] == 2
            # The history compacted while the watches were down: 410 Gone, relist; the
            # change made in between is in the list.
            api.fail(503, count=1000)
            api.drop_watches()
            # (backend-1 terminating, not removed: a removed backend's flows end at once,
            # decision 8, and one in flight would fail.)
            leaving = {"ready": False, "serving": True, "terminating": True}
            api.apply(endpointslice(sandbox, {0: leaving, 1: READY}))
            api.compact()
            api.heal()
            eventually(lambda: answers(sandbox) == {"backend-2"}, "relisted after 410")
            assert watcher.counts["gone"] == 2 and watcher.counts["lists"] == 4
        assert traffic.failures == [] and traffic.answers > 0


def test_a_malformed_object_is_reported_and_skipped_while_the_rest_are_programmed(
    sandbox: Sandbox, api: ApiServer, dp: lb.Datapath, tmp_path: pathlib.Path
) -> None:
    api.apply(
        service(),
        endpointslice(sandbox, {0: READY}),
        service("broken", "10.96.0.300"),
        endpointslice(sandbox, {1: READY}, owner="broken"),
    )
    with following(dp, api, tmp_path):
        eventually(lambda: answers(sandbox) == {"backend-1"}, "the good Service answers")
        (event,) = eventually(lambda: api.events, "a Warning Event posted")
        assert event["reason"] == "FailedToProgram" and event["type"] == "Warning"
        assert event["involvedObject"]["name"] == "broken"
        assert "'10.96.0.300' is not an IP address" in event["message"]
        assert [s.name for s in dp.services] == ["shop/web"]
        # Fixed: programmed.
        api.apply(service("broken", "10.96.0.11"))
        eventually(lambda: answers(sandbox, "10.96.0.11") == {"backend-2"}, "the fixed one")


def pod(sandbox: Sandbox, index: int, labels: dict[str, str]) -> dict[str, Any]:
    backend = sandbox.backends[index]
    return {
        "kind": "Pod",
        "metadata": {"name": backend.name, "namespace": "shop", "labels": labels},
        "status": {"phase": "Running", "podIP": str(backend.ipv4)},
    }


def isolated(sandbox: Sandbox, index: int) -> bool:
    """Is backend ``index`` unreachable from the client (its SYN dropped)?"""
    try:
        sandbox.http_get(str(sandbox.backends[index].ipv4), BACKEND_PORT, timeout=0.5)
    except TimeoutError:
        return True
    return False


def test_network_policies_pods_and_namespaces_through_the_watch_are_enforced(
    sandbox: Sandbox, api: ApiServer, dp: lb.Datapath, tmp_path: pathlib.Path
) -> None:
    """ServiceProxy(network_policy=True) behind the Watcher: a NetworkPolicy listed with
    its Pods isolates the pod it selects; a label change through the watch moves the
    isolation to another pod; deleting it opens them all. The Service and a policy of
    the datapath's own (no NetworkPolicy's) are left alone throughout."""
    mine = lb.Policy("mine", [lb.Rule("deny", "192.0.2.0/24")], "allow")
    dp.set_policies([mine])
    api.apply(
        service(), endpointslice(sandbox, {2: READY}),
        {"kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}},
        pod(sandbox, 0, {"app": "web"}), pod(sandbox, 1, {"app": "db"}),
        {"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
         "metadata": {"name": "web-closed", "namespace": "shop"},
         "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": []}},
    )  # fmt: skip
    with following(dp, api, tmp_path, network_policy=True) as watcher:
        eventually(lambda: isolated(sandbox, 0), "the selected pod isolated")
        assert not isolated(sandbox, 1) and answers(sandbox) == {"backend-3"}
        assert [p.name for p in dp.policies] == ["mine", "shop/web-closed"]
        # Relabelled through the watch: backend-2 in, backend-1 out.
        api.apply(pod(sandbox, 0, {}), pod(sandbox, 1, {"app": "web"}))
        eventually(lambda: isolated(sandbox, 1) and not isolated(sandbox, 0), "moved")
        api.delete("NetworkPolicy", "shop", "web-closed")
        eventually(lambda: [p.name for p in dp.policies] == ["mine"], "the policy removed")
        assert not isolated(sandbox, 1)
        assert [s.name for s in dp.services] == ["shop/web"]
        assert watcher.counts["lists"] == 5  # Services, slices, Pods, Namespaces, policies


def agent(sandbox: Sandbox, name: str, kubeconfig: str) -> subprocess.Popen[str]:
    """`pyebpflb agent` under `ip netns exec`, as a hostNetwork pod runs it; returns once
    it says it follows the API server."""
    process = subprocess.Popen(
        ["ip", "netns", "exec", sandbox.lb.netns, PYEBPFLB, "--datapath", name,
         "--pin-root", str(PIN_ROOT), "agent", "--kubeconfig", kubeconfig,
         "--node-name", "node-1", "--interfaces", sandbox.lb.iface, "--cgroup", "",
         "--min-sync-period", "0", "--network-policy",
         "--watch-timeout", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("agent:"):
        process.kill()
        pytest.fail(f"the agent did not start: {line}{process.communicate()[1]}")
    return process


def fetch(sandbox: Sandbox, port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:PORT/PATH in the node's namespace: (status, body)."""
    import http.client

    from pyebpflb._bpf.netns import entered

    with entered(sandbox.lb.netns):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.connect()  # the socket is made here, in the namespace
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    return out


def test_restarting_the_agent_keeps_an_open_connection_and_catches_up(
    sandbox: Sandbox, tmp_path: pathlib.Path
) -> None:
    # In the node's namespace, where the agent under `ip netns exec` reaches it.
    with ApiServer(netns=sandbox.lb.netns, bookmark_interval=0.3) as api:
        restart_the_agent(sandbox, api, tmp_path)


def restart_the_agent(sandbox: Sandbox, api: ApiServer, tmp_path: pathlib.Path) -> None:
    name = f"t{os.getpid()}-agent"
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    api.apply(
        {"kind": "Node", "metadata": {"name": "node-1", "labels": {k8s.ZONE_LABEL: "zone-a"}},
         "status": {"addresses": [{"type": "InternalIP", "address": str(sandbox.lb.ipv4)}]}},
        service(), endpointslice(sandbox, {0: READY, 1: READY}),
        service("old", "10.96.0.11"), endpointslice(sandbox, {2: READY}, owner="old"),
        # --network-policy: backend-3 admits the clients' network only (the tests' client).
        pod(sandbox, 2, {"app": "old"}),
        {"kind": "NetworkPolicy", "metadata": {"name": "old-from-clients", "namespace": "shop"},
         "spec": {"podSelector": {"matchLabels": {"app": "old"}},
                  "ingress": [{"from": [{"ipBlock": {"cidr": "10.90.0.0/24"}}]}]}},
    )  # fmt: skip
    first = agent(sandbox, name, kubeconfig)
    try:
        eventually(lambda: answers(sandbox) == {"backend-1", "backend-2"}, "the agent syncs")
        # kube-proxy's ports in the node's namespace: metrics, and the node's health.
        metrics = eventually(lambda: fetch(sandbox, 10249, "/metrics"), "metrics served")
        assert re.search(r'pyebpflb_service_packets_total\{[^}]*service="shop/web"', metrics[1])
        assert re.search(r"^pyebpflb_k8s_services_programmed 2\.0$", metrics[1], re.M)
        # Services, EndpointSlices, and with --network-policy Pods, Namespaces, policies.
        assert re.search(r"^pyebpflb_k8s_lists_total 5\.0$", metrics[1], re.M)
        assert re.search(r"^pyebpflb_k8s_network_policies_in_force 1\.0$", metrics[1], re.M)
        with lb.Datapath(name, netns=sandbox.lb.netns, pin_root=PIN_ROOT,
                         create=False) as look:  # fmt: skip
            eventually(lambda: [p.name for p in look.policies] == ["shop/old-from-clients"],
                       "the NetworkPolicy installed")  # fmt: skip
        health = eventually(lambda: fetch(sandbox, 10256, "/healthz"), "health served")
        assert health[0] == 200 and '"nodeEligible": true' in health[1]
        with sandbox.connection(VIP, 80) as open_conn:
            backend = open_conn.get()
            assert "kept (pinned, attached)" in stop(first)
            # No agent: the datapath goes on, the open connection and new ones too.
            assert open_conn.get() == backend
            assert answers(sandbox) == {"backend-1", "backend-2"}
            # Changes while it is down: one Service deleted, the other scaled, the
            # NetworkPolicy deleted.
            api.delete("Service", "shop", "old")
            api.delete("NetworkPolicy", "shop", "old-from-clients")
            api.apply(endpointslice(sandbox, {0: READY, 1: READY, 2: READY}))
            second = agent(sandbox, name, kubeconfig)
            try:
                eventually(lambda: len(answers(sandbox, count=40)) == 3, "caught up")
                with lb.Datapath(name, netns=sandbox.lb.netns, pin_root=PIN_ROOT,
                                 create=False) as look:  # fmt: skip
                    eventually(lambda: [s.name for s in look.services] == ["shop/web"],
                               "the Service deleted meanwhile is removed")  # fmt: skip
                    eventually(lambda: look.policies == [],
                               "the NetworkPolicy deleted meanwhile is removed")  # fmt: skip
                    assert look.node is not None and look.node.zone == "zone-a"
                assert open_conn.get() == backend  # never broken
            finally:
                stop(second)
    finally:
        if first.poll() is None:
            first.kill()
        with lb.Datapath(name, netns=sandbox.lb.netns, pin_root=PIN_ROOT, create=False) as dp:
            dp.destroy()


def test_the_asyncio_twin_follows_and_stops_when_cancelled(
    sandbox: Sandbox, api: ApiServer, dp: lb.Datapath, tmp_path: pathlib.Path
) -> None:
    import asyncio

    api.apply(service(), endpointslice(sandbox, {2: READY}))
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")

    async def main() -> None:
        task = asyncio.create_task(
            k8s.arun(dp, kubeconfig=kubeconfig, min_sync_period=0, timeout_seconds=2)
        )
        deadline = time.monotonic() + 15
        while not dp.services and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert answers(sandbox) == {"backend-3"}
    # The loop ended and closed its watches (the server sees it at its next write).
    eventually(lambda: api.open_watches() == 0, "no watch left open")


def test_the_kopf_example_follows_the_cluster(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    """examples/kopf_service_proxy.py, run by `kopf run` as its users run it, with kopf's
    own watches (and discovery) against the stand-in API server."""
    example = pathlib.Path(__file__).parents[1] / "examples" / "kopf_service_proxy.py"
    name = f"t{os.getpid()}-kopf"
    with ApiServer(netns=sandbox.lb.netns, bookmark_interval=0.3) as api:
        api.apply(service(), endpointslice(sandbox, {0: READY}))
        env = {**os.environ, "KUBECONFIG": api.kubeconfig(tmp_path / "kubeconfig"),
               "NODE_NAME": "node-1", "IFACE": sandbox.lb.iface, "PYEBPFLB_DATAPATH": name,
               "PYEBPFLB_PIN_ROOT": str(PIN_ROOT)}  # fmt: skip
        operator = subprocess.Popen(
            ["ip", "netns", "exec", sandbox.lb.netns, sys.executable, "-m", "kopf", "run",
             "--standalone", "--all-namespaces", str(example)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            eventually(lambda: answers(sandbox) == {"backend-1"}, "the operator programs")
            api.apply(endpointslice(sandbox, {0: READY, 2: READY}))
            eventually(lambda: answers(sandbox) == {"backend-1", "backend-3"}, "kopf's event")
        finally:
            operator.terminate()
            out = operator.communicate(timeout=60)[0]
            with lb.Datapath(name, netns=sandbox.lb.netns, pin_root=PIN_ROOT,
                             create=False) as dp:  # fmt: skip
                dp.destroy()
        assert operator.returncode == 0, out[-3000:]
        assert "Activity 'stop' succeeded" in out
