"""The story `make demo` tells: a Kubernetes service balanced in the kernel.

The classic example: ``my-app-service`` (port 80) selects the three pods
labelled ``app: my-app`` on containerPort 8080. A sandbox of network
namespaces plays the cluster: a client, a node running the datapath, three
pods with real servers. Requests go to the VIP; the datapath picks a pod per
connection, rewrites the packets in tc, and translates the answers back.
"""

from __future__ import annotations

import collections
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from pyebpflb._bpf import fs
from pyebpflb.datapath import Datapath
from pyebpflb.health import HealthServer
from pyebpflb.model import Backend, Node, Policy, Rule, Service
from pyebpflb.testing.cluster import Cluster
from pyebpflb.testing.sandbox import BACKEND_PORT, Sandbox

VIP4, VIP6 = "10.96.0.10", "fd00:96::10"
SECOND_CLIENT = "10.90.0.3"
REQUESTS = 300


def _table(rows: Sequence[Sequence[str]], out: Callable[[str], None]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        out(("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip())
        if n == 0:
            out("  " + "  ".join("-" * width for width in widths))


def _spread(sandbox: Sandbox, vip: str, count: int) -> collections.Counter[str]:
    return collections.Counter(sandbox.http_get(vip, 80) for _ in range(count))


def _policy(sandbox: Sandbox, dp: Datapath, service: Service, out: Callable[[str], None]) -> None:
    """loadBalancerSourceRanges: only the first client may reach the service."""
    second = sandbox.add_client_address(SECOND_CLIENT)
    allowed = f"{sandbox.client.ipv4}/32"
    policy = Policy(
        "my-app-source-ranges",
        [Rule("allow", allowed, service=service.name)],
        default="deny",
    )
    dp.upsert_policy(policy)
    out(
        f"\nnetwork policy {policy.name}: ingress allows {allowed} to {service.name} "
        "(like loadBalancerSourceRanges), denies the rest"
    )
    for source in (sandbox.client.ipv4, second):
        answer = dp.explain(str(source), f"{VIP4}:80")
        said = answer.to_dict()
        decided = (
            f"policy {answer.policy!r} rule {answer.rule}"
            if answer.rule is not None
            else "the default"
        )
        out(
            f"  explain {source} -> {VIP4}:80 (a dry run in the kernel): {said['verdict']}"
            f"{' to ' + str(answer.backend) if answer.backend else ''}, "
            f"{said['policy_verdict']} by {decided}"
        )
    monitor = dp.open_monitor(types=["trace", "drop"])
    rows = [("client", "request to " + VIP4 + ":80")]
    for source in (sandbox.client.ipv4, second):
        try:
            rows.append(
                (
                    str(source),
                    "answered by " + sandbox.http_get(VIP4, 80, source=source, timeout=1.0),
                )
            )
        except TimeoutError:
            rows.append((str(source), "no answer: dropped in tc"))
    _table(rows, out)
    try:
        events = list(monitor.events(0.2))
    finally:
        monitor.close()
    out("  flow events of those requests (Datapath.monitor, `pyebpflb monitor`):")
    for event in events[:4]:
        out(f"    {event}")
    stats = dp.policy_stats(policy)
    out(
        f"  rule 0 matched {stats[0].packets} packets; "
        f"drops for 'policy denied': {dp.drops()['policy denied'].packets}"
    )
    dp.remove_policy(policy)


def run(out: Callable[[str], None] = print) -> int:
    out("pyebpflb demo: a Kubernetes service, load balanced by eBPF in the kernel\n")
    names = ["my-app-1", "my-app-2", "my-app-3"]
    with Sandbox(backends=3, prefix="pyebpflb-demo", names=names) as sandbox:
        pods = {host.name: host for host in sandbox.backends}
        _show_sandbox(sandbox, out)

        def my_app(family: int, members: list[str], terminating: str = "") -> Service:
            return Service(
                vip=VIP4 if family == 4 else VIP6,
                port=80,
                protocol="tcp",
                name="default/my-app-service",
                backends=[
                    Backend(
                        pods[p].address(family),
                        BACKEND_PORT,
                        state="terminating" if p == terminating else "active",
                    )
                    for p in members
                ],
            )

        with Datapath(f"demo-{os.getpid()}", netns=sandbox.lb.netns) as dp:
            dp.attach(sandbox.lb.iface)
            dp.sync([my_app(4, list(pods)), my_app(6, list(pods))])
            out(
                "\nservice default/my-app-service: port 80 -> targetPort 8080 of the pods "
                f"selected by app=my-app\n  VIPs {VIP4} and {VIP6}, programmed with one "
                "Datapath.sync()"
            )
            for vip in (VIP4, VIP6):
                out(f"\n{REQUESTS} HTTP requests to {vip}:80, a new TCP connection each:")
                _show_spread(sandbox, vip, REQUESTS, out)
            remaining = ["my-app-1", "my-app-3"]
            draining = [my_app(f, list(pods), terminating="my-app-2") for f in (4, 6)]
            failures = _remove_a_pod_live(
                sandbox, dp, draining, [my_app(4, remaining), my_app(6, remaining)], out
            )
            _show_services(dp, out)
            _show_counters(dp, out)
            _show_refusal(sandbox, dp, out)
            failures += _node_local(sandbox, dp, out)
            _policy(sandbox, dp, my_app(4, remaining), out)
        out("\ndatapath detached, maps unpinned, namespaces removed")
    failures += _north_south(out)
    if failures:
        out(f"FAILED: {failures[:3]}")
        return 1
    return 0


def _show_sandbox(sandbox: Sandbox, out: Callable[[str], None]) -> None:
    out("sandbox (network namespaces joined by veth pairs):")
    out(
        f"  client {sandbox.client.ipv4} -> node {sandbox.lb.ipv4} (datapath on tc of "
        f"{sandbox.lb.iface}) -> pods:"
    )
    for host in sandbox.backends:
        out(
            f"    pod {host.name:<9} app=my-app  {host.ipv4}:{BACKEND_PORT}  "
            f"[{host.ipv6}]:{BACKEND_PORT}"
        )


def _show_spread(sandbox: Sandbox, vip: str, requests: int, out: Callable[[str], None]) -> None:
    spread = _spread(sandbox, vip, requests)
    pods = [host.name for host in sandbox.backends]
    _table([("pod", "answered"), *((pod, str(spread[pod])) for pod in pods)], out)


def _remove_a_pod_live(
    sandbox: Sandbox,
    dp: Datapath,
    draining: list[Service],
    services: list[Service],
    out: Callable[[str], None],
) -> list[str]:
    """As Kubernetes deletes a pod while a client keeps asking: its endpoint turns
    terminating (``draining``: no new flows, live ones finish), then leaves
    (``services``). The failures."""
    out(
        "\npod my-app-2 goes away, live, while a client keeps sending: its endpoint turns"
        " terminating (no new flows; live ones finish), then leaves the service"
    )
    failures: list[str] = []
    answered: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            try:
                answered[sandbox.http_get(VIP4, 80)] += 1
            except OSError as exc:
                failures.append(repr(exc))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    time.sleep(0.2)
    started = time.monotonic()
    dp.sync(draining)
    took = time.monotonic() - started
    time.sleep(0.2)  # its last connections end (a pod's grace period)
    started = time.monotonic()
    dp.sync(services)
    took += time.monotonic() - started
    time.sleep(0.2)
    stop.set()
    asker.join()
    out(
        f"  two updates applied in {took * 1000:.1f} ms; {sum(answered.values())} requests "
        f"during the change, {len(failures)} failed"
    )
    out("  100 new requests after the change:")
    _show_spread(sandbox, VIP4, 100, out)
    return failures


def _show_services(dp: Datapath, out: Callable[[str], None]) -> None:
    out("\nservices read back from the kernel maps:")
    rows: list[tuple[str, ...]] = [("name", "vip", "port", "proto", "backends")]
    for svc in dp.services:
        backends = ", ".join(str(b) for b in svc.backends)
        rows.append((svc.name, str(svc.vip), str(svc.port), svc.protocol.value, backends))
    _table(rows, out)


def _show_counters(dp: Datapath, out: Callable[[str], None]) -> None:
    out("\ncounters (per-CPU in the kernel, summed):")
    rows = [("service / backend", "packets", "bytes")]
    for svc in dp.services:
        stats = dp.stats(svc)
        rows.append((f"{svc.name} {svc.vip}", str(stats.packets), str(stats.bytes)))
        for backend, traffic in stats.backends.items():
            rows.append((f"  -> {backend}", str(traffic.packets), str(traffic.bytes)))
    _table(rows, out)


NODE_LOCAL = """
import collections, socket, sys
seen, peers = collections.Counter(), set()
for _ in range(int(sys.argv[2])):
    with socket.create_connection((sys.argv[1], 80), timeout=3) as s:
        peers.add("%s:%d" % s.getpeername())
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    seen[data.decode().split("\\r\\n\\r\\n")[-1].strip()] += 1
print(" ".join(f"{k}={v}" for k, v in sorted(seen.items())), "peer", ",".join(sorted(peers)))
"""


def _node_local(sandbox: Sandbox, dp: Datapath, out: Callable[[str], None]) -> list[str]:
    """A process on the node itself (kubelet, a hostNetwork pod) calls the service:
    its path to the pods crosses no attached interface, so the socket programs
    translate it at connect()."""
    cgroup = pathlib.Path(fs.cgroup2_root()) / f"pyebpflb-demo-{os.getpid()}"
    cgroup.mkdir()
    try:
        dp.attach_cgroup(cgroup)

        def enter() -> None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        done = subprocess.run(
            ["ip", "netns", "exec", sandbox.lb.netns, sys.executable, "-c", NODE_LOCAL, VIP4, "30"],
            preexec_fn=enter,
            capture_output=True,
            text=True,
            timeout=60,
        )
        dp.detach_cgroup(cgroup)
    finally:
        cgroup.rmdir()
    out(
        f"\na process on the node itself (namespace {sandbox.lb.netns}, cgroup {cgroup.name}): "
        f"30 connections to {VIP4}:80, translated at connect() by the cgroup programs "
        "(no tc program on its path)"
    )
    if done.returncode != 0:
        out(f"  FAILED: {done.stderr.strip()}")
        return [done.stderr.strip()]
    out(f"  answered by {done.stdout.strip()} (getpeername() shows the VIP)")
    return []


def _show_refusal(sandbox: Sandbox, dp: Datapath, out: Callable[[str], None]) -> None:
    dp.upsert(Service(vip="10.96.0.20", port=80, name="default/no-pods-yet"))
    started = time.monotonic()
    try:
        sandbox.http_get("10.96.0.20", 80, timeout=5)
        refused = "answered?!"
    except ConnectionRefusedError:
        refused = f"refused in {(time.monotonic() - started) * 1000:.1f} ms"
    out(
        f"\na service with no endpoints (default/no-pods-yet, 10.96.0.20:80): {refused}"
        f" (a TCP reset from the datapath; drops: {dp.drops()['no backend'].packets})"
    )


LB_IP = "10.99.0.1"


def _north_south(out: Callable[[str], None]) -> list[str]:
    """NodePort and LoadBalancer from outside the cluster: two nodes, each with its own
    datapath, an external client behind a router."""
    out(
        "\nnorth-south: a cluster of two nodes (each with two pods and its own datapath "
        "on its link to the router), an external client 10.70.0.2 behind the router; "
        f"the router sends the load-balancer IP {LB_IP} to node-1"
    )
    failures: list[str] = []
    with Cluster(nodes=2, pods=2, prefix="pyebpflb-demo") as cluster:
        subprocess.run(
            ["ip", "-n", cluster.router.netns, "route", "add", LB_IP, "via", "10.80.1.2"],
            check=True,
        )
        pods = [Backend(p.ipv4, BACKEND_PORT, node=n.name) for n in cluster.nodes for p in n.pods]
        dps = []
        try:
            for node in cluster.nodes:
                dp = Datapath(
                    f"demo-{node.name}-{os.getpid()}",
                    netns=node.netns,
                    node=Node(node.name, [node.host.ipv4]),
                )
                dps.append(dp)
                dp.attach("eth0")

            def my_app(on: Sequence[Backend] = pods, **north_south: object) -> Service:
                return Service(
                    VIP4, 80, name="default/my-app-service", backends=on, node_port=30080,
                    load_balancer_ips=[LB_IP], **north_south,  # type: ignore[arg-type]
                )  # fmt: skip

            first = [b for b in pods if b.node == "node-1"]
            for title, service in (
                ("externalTrafficPolicy Cluster: any pod; one on the other node is reached "
                 "by SNAT to node-1's address", my_app()),
                ("externalTrafficPolicy Local, pods on node-1 only: node-1's pods, the "
                 "client's address kept", my_app(first, external_traffic_policy="local",
                                                  health_check_node_port=31000)),
                ("direct server return: the other node's pods answer the client themselves, "
                 "from the frontend's address", my_app(forwarding="dsr")),
            ):  # fmt: skip
                for dp in dps:
                    dp.sync([service])
                out(f"\n{title}; 24 requests to 10.80.1.2:30080 (node-1's NodePort):")
                seen: collections.Counter[str] = collections.Counter()
                for _ in range(24):
                    try:
                        seen[cluster.http_get("10.80.1.2", 30080, path="/peer")] += 1
                    except OSError as exc:
                        failures.append(f"NodePort: {exc}")
                rows = [["pod", "connections", "client address the pod saw"]]
                for answer, n in sorted(seen.items()):
                    pod, peer = answer.split()
                    rows.append([pod, str(n), peer])
                _table(rows, out)
                if service.health_check_node_port:
                    with HealthServer(dps[0], port=None), HealthServer(dps[1], port=None):
                        for node in cluster.nodes:
                            status, answer = _status(cluster, str(node.host.ipv4), 31000)
                            out(f"  health port 31000 on {node.name}: {status} {answer}")
            answer = cluster.http_get(LB_IP, 80)
            out(f"\nthe load-balancer IP {LB_IP}:80 answers too: {answer}")
            frontends = ", ".join(f.label.split("(")[1].rstrip(")") for f in dps[0].frontends)
            out(f"node-1's datapath holds one entry per frontend: {frontends}")
        finally:
            for dp in dps:
                dp.destroy()
    out("datapaths destroyed, cluster namespaces removed")
    return failures


def _status(cluster: Cluster, address: str, port: int) -> tuple[int, str]:
    """GET / from the external client: the HTTP status and the body."""
    with cluster.client.socket(4) as sock:
        sock.settimeout(2)
        sock.connect((address, port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body.strip()
