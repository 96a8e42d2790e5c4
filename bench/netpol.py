"""`python -m bench.netpol`: Kubernetes NetworkPolicy at scale, against one policy.

A cluster of 5,000 pods (50 namespaces of 100 pods, 20 apps of 5 pods each, spread
over 10 nodes) and 1,000 NetworkPolicies (one per app: ingress from the app before it
on TCP 8080 and from 10.0.0.0/8 except the pod network on 443; egress to the app after
it on 8080 and to DNS in kube-system), translated by pyebpflb.k8s.network_policies and
installed in a real (unattached) datapath. Measured:

- the ingress program's per-packet cost (BPF_PROG_TEST_RUN) for a packet into a
  selected pod, against a datapath holding one NetworkPolicy over one pod, the two
  measured in alternating rounds; and the same two with a cluster-wide policy of the
  datapath's own (a blocklist of 100 /24s, for every endpoint) added to each, with the
  lookup entries each holds;
- the time from one pod's label change to the policy in force: translation, compile,
  kernel writes (``Datapath.set_policies``), several changes, median.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import statistics
import time
from typing import Any

import pyebpflb as lb
from bench import measure
from pyebpflb import k8s

POD_NET = ipaddress.IPv4Network("10.128.0.0/16")
NODES = 10
APPS = 20
NAME = "kubernetes.io/metadata.name"


def pod_ip(number: int) -> str:
    return str(POD_NET.network_address + 256 + number)


def cluster(namespaces: int, pods: int) -> list[dict[str, Any]]:
    """Namespaces, their pods and one NetworkPolicy per app."""
    objects: list[dict[str, Any]] = [{"kind": "Namespace", "metadata": {"name": "kube-system"}}]
    objects.append(_pod("kube-system", "coredns", {"k8s-app": "kube-dns"}, 0, 0))
    number = 1
    for n in range(namespaces):
        namespace = f"ns-{n}"
        objects.append({"kind": "Namespace", "metadata": {"name": namespace}})
        for p in range(pods):
            labels = {"app": f"app-{p % APPS}"}
            objects.append(_pod(namespace, f"pod-{p}", labels, number, number % NODES))
            number += 1
        for app in range(APPS):
            objects.append(_policy(namespace, app))
    return objects


def _pod(namespace: str, name: str, labels: dict[str, str], number: int, node: int) -> Any:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": pod_ip(number), "hostIP": f"10.0.0.{node + 1}"},
    }


def _policy(namespace: str, app: int) -> Any:
    before, after = f"app-{(app - 1) % APPS}", f"app-{(app + 1) % APPS}"
    return {
        "kind": "NetworkPolicy",
        "metadata": {"name": f"app-{app}", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": f"app-{app}"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": before}}}],
                 "ports": [{"port": "http"}]},
                {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [str(POD_NET)]}}],
                 "ports": [{"port": 443}]},
            ],
            "egress": [
                {"to": [{"podSelector": {"matchLabels": {"app": after}}}],
                 "ports": [{"port": 8080}]},
                {"to": [{"namespaceSelector": {"matchLabels": {NAME: "kube-system"}},
                         "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                 "ports": [{"port": 53, "protocol": "UDP"}]},
            ],
        },
    }  # fmt: skip


def one_policy() -> list[dict[str, Any]]:
    """The same two pods as the measured packet's (pod-0 of app-0, pod-1 of app-1) and
    one NetworkPolicy, app-1's, selecting pod-1."""
    objects = cluster(1, 2)
    return [o for o in objects if o["kind"] != "NetworkPolicy"] + [_policy("ns-0", 1)]


def packet(dst: str, src: str) -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    return bytes(Ether() / IP(src=src, dst=dst) / TCP(sport=999, dport=8080, flags="S"))


def blocklist() -> lb.Policy:
    """A cluster-wide policy of the datapath's own (for every endpoint): 100 /24s denied."""
    return lb.Policy("blocklist", [lb.Rule("deny", f"192.168.{i}.0/24") for i in range(100)])


def install(
    name: str, objects: list[dict[str, Any]], *extra: lb.Policy
) -> tuple[lb.Datapath, float, Any]:
    dp = lb.Datapath(name, max_policy_entries=1 << 18)
    began = time.perf_counter()
    done = k8s.network_policies(objects)
    assert not done.problems, done.problems[:3]
    dp.sync([], [*done.policies, *extra])
    return dp, time.perf_counter() - began, done


def entries(dp: lb.Datapath) -> int:
    """The policy lookup entries the datapath holds (both tries of classes)."""
    return sum(len(dp._object.map(name)) for name in ("lb_pol_cidrs", "lb_pol_ports"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    namespaces, pods = (2, 20) if args.smoke else (50, 100)
    objects = cluster(namespaces, pods)
    results: dict[str, Any] = {"pods": namespaces * pods, "ns": {}}
    datapaths: dict[str, lb.Datapath] = {}
    try:
        big, results["install seconds"], done = install("bench-netpol-many", objects)
        datapaths["many"] = big
        results["policies"] = len([o for o in objects if o["kind"] == "NetworkPolicy"])
        results["pyebpflb policies"] = len(done.policies)
        results["rules"] = sum(len(p.rules) for p in done.policies)
        datapaths["one"], _, _ = install("bench-netpol-one", one_policy())
        datapaths["many+blocklist"], results["blocklist install seconds"], _ = install(
            "bench-netpol-many-bl", objects, blocklist()
        )
        datapaths["one+blocklist"], _, _ = install("bench-netpol-one-bl", one_policy(), blocklist())
        results["entries"] = {label: entries(dp) for label, dp in datapaths.items()}
        # Into pod-1 (app-1 of ns-0) from pod-0 (app-0, allowed), and from a stranger.
        allowed, refused = packet(pod_ip(2), pod_ip(1)), packet(pod_ip(2), "10.200.0.1")
        samples: dict[tuple[str, str], list[float]] = {}
        for _ in range(3 if args.smoke else max(args.rounds, 7)):
            for label, dp in datapaths.items():
                ingress = dp._object.program("lb_ingress")
                for what, data in (("allowed", allowed), ("denied", refused)):
                    samples.setdefault((what, label), []).append(
                        measure.packet_cost(ingress, data, args.repeat)
                    )
        results["ns"] = {f"{w} {label}": statistics.median(v) for (w, label), v in samples.items()}
        results["recompile ms"] = recompile(big, objects, 3 if args.smoke else 9)
    finally:
        for dp in datapaths.values():
            dp.destroy()
    return results


def recompile(dp: lb.Datapath, objects: list[dict[str, Any]], changes: int) -> dict[str, Any]:
    """One pod relabelled into another app, back and forth, as the agent follows it: a
    NetworkPolicyTranslator fed the Pod's MODIFIED event, then Datapath.set_policies; the
    time of each part."""
    translator = k8s.NetworkPolicyTranslator()
    for obj in objects:
        kind = obj["kind"]
        feed = {"Pod": translator.on_pod, "Namespace": translator.on_namespace}
        feed.get(kind, translator.on_network_policy)("ADDED", obj)
    dp.set_policies(translator.result().policies)
    (pod,) = [o for o in objects if o["kind"] == "Pod" and o["metadata"]["name"] == "pod-3"
              and o["metadata"]["namespace"] == "ns-0"]  # fmt: skip
    spent: dict[str, list[float]] = {"translate": [], "install": []}
    for i in range(changes):
        pod = copy.deepcopy(pod)
        pod["metadata"]["labels"] = {"app": "app-7" if i % 2 == 0 else "app-3"}
        began = time.perf_counter()
        translator.on_pod("MODIFIED", pod)
        done = translator.result()
        translated = time.perf_counter()
        dp.set_policies(done.policies)
        spent["translate"].append((translated - began) * 1000)
        spent["install"].append((time.perf_counter() - translated) * 1000)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.netpol", description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeat", type=int, default=100_000, help="BPF_PROG_TEST_RUN repeats")
    parser.add_argument("--rounds", type=int, default=7, help="rounds alternating the datapaths")
    args = parser.parse_args()
    from bench.report import _netpol

    print("\n".join(_netpol(run(args))))


if __name__ == "__main__":
    main()
