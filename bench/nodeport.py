"""NodePort: an external client's new connections to a node's NodePort, through
pyebpflb and through kube-proxy's NodePort rules, at N services, interleaved.

Like with like: the node (the sandbox's load balancer) has N NodePort Services
(ports 20001..20000+N: a --service-node-port-range of 20000-32767, as 10,000
do not fit the default 30000-32767); the measured one, the last, has one
backend, which sees the node's address as the source whatever serves it:
kube-proxy masquerades NodePort traffic under externalTrafficPolicy Cluster
(KUBE-EXT -> KUBE-MARK-MASQ, POSTROUTING MASQUERADE), and pyebpflb SNATs it
because the backend is on another node (`Backend(node=...)`). The floor is the
client talking to the backend directly.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from typing import Any

import pyebpflb as lb
from bench import kubeproxy, measure
from bench.servers import PORT
from pyebpflb.testing.sandbox import Sandbox

FIRST_PORT = 20001
NODE = "bench-node"


def services(count: int, sandbox: Sandbox) -> list[lb.Service]:
    """N NodePort Services of 3 backends on another node; the last has one."""
    base = int(ipaddress.IPv4Address("10.96.0.0"))
    backends = [lb.Backend(b.ipv4, PORT, node="elsewhere") for b in sandbox.backends]
    wanted = [
        lb.Service(
            ipaddress.IPv4Address(base + i),
            80,
            name=f"bench/svc-{i}",
            backends=backends,
            node_port=FIRST_PORT + i - 1,
        )
        for i in range(1, count + 1)
    ]
    wanted[-1] = wanted[-1].with_backends(backends[:1])
    return wanted


def iptables_rules(wanted: Sequence[lb.Service]) -> str:
    """kube-proxy's iptables NodePort rules: KUBE-SERVICES' last rule sends local
    destinations to KUBE-NODEPORTS, one rule a port, to KUBE-EXT-*: masquerade, then
    the service's KUBE-SVC-*."""
    rules = kubeproxy.iptables_rules(wanted).splitlines()
    chains = [":KUBE-NODEPORTS - [0:0]"]
    extra = []
    for index, svc in enumerate(wanted):
        assert svc.node_port is not None
        name = kubeproxy.svc_port_name(index)
        proto = svc.protocol.value
        svc_chain = f"KUBE-SVC-{kubeproxy.chain_hash(name + proto)}"
        ext_chain = f"KUBE-EXT-{kubeproxy.chain_hash(name + proto)}"
        chains.append(f":{ext_chain} - [0:0]")
        extra += [
            f'-A KUBE-NODEPORTS -p {proto} -m comment --comment "{name}" -m {proto} '
            f"--dport {svc.node_port} -j {ext_chain}",
            f'-A {ext_chain} -m comment --comment "masquerade traffic for {name} external '
            'destinations" -j KUBE-MARK-MASQ',
            f"-A {ext_chain} -j {svc_chain}",
        ]
    extra.append(
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this '
        'must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS'
    )
    commit = rules.index("COMMIT")
    first_rule = next(i for i, line in enumerate(rules) if line.startswith("-A "))
    lines = [*rules[:first_rule], *chains, *rules[first_rule:commit], *extra, *rules[commit:]]
    return "\n".join(lines) + "\n"


def nft_rules(wanted: Sequence[lb.Service]) -> str:
    """kube-proxy's nftables NodePort rules: a `service-nodeports` verdict map looked
    up for local destinations, to per-service `external-*` chains that mark for
    masquerade and go to the service's chain."""
    base = kubeproxy.nft_rules(wanted).splitlines()
    close = base.index("}")
    lines = [
        *base[:close],
        "  map service-nodeports { type inet_proto . inet_service : verdict; }",
        "  chain nodeports { fib daddr type local ip daddr != 127.0.0.0/8 "
        "meta l4proto . th dport vmap @service-nodeports; }",
    ]
    elements = []
    for index, svc in enumerate(wanted):
        chain, _ = kubeproxy.nft_service(index, svc)
        external = chain.replace("service-", "external-", 1)
        lines.append(f"  chain {external} {{ jump mark-for-masquerade; goto {chain}; }}")
        elements.append(f"{svc.protocol.value} . {svc.node_port} : goto {external}")
    lines.append("}")
    # kube-proxy's services chain ends with the nodeports check.
    lines.append("add rule ip kube-proxy services jump nodeports")
    for start in range(0, len(elements), 2000):
        chunk = ", ".join(elements[start : start + 2000])
        lines.append(f"add element ip kube-proxy service-nodeports {{ {chunk} }}")
    lines += base[close + 1 :]
    return "\n".join(lines) + "\n"


class Contenders:
    """Load one contender at a time on the node."""

    def __init__(self, sandbox: Sandbox, wanted: list[lb.Service]) -> None:
        self.sandbox = sandbox
        self.wanted = wanted
        self.datapath: lb.Datapath | None = None

    def load(self, name: str) -> None:
        netns = self.sandbox.lb.netns
        if name == "pyebpflb":
            self.datapath = lb.Datapath(
                "bench-nodeport",
                netns=netns,
                node=lb.Node(NODE, [self.sandbox.lb.ipv4]),
                max_services=max(65536, 2 * len(self.wanted)),
                max_backends=max(262144, 6 * len(self.wanted)),
            )
            # The client's side, and the backends' (their answers to SNAT come back there).
            for iface in [self.sandbox.lb.iface, *(f"be{i + 1}" for i in range(3))]:
                self.datapath.attach(iface)
            self.datapath.sync(self.wanted)
        elif name == "kube-proxy iptables":
            kubeproxy.run_in(netns, ["iptables-legacy-restore"], iptables_rules(self.wanted))
        elif name == "kube-proxy nftables":
            kubeproxy.run_in(netns, ["nft", "-f", "-"], nft_rules(self.wanted))

    def unload(self, name: str) -> None:
        if name == "pyebpflb" and self.datapath is not None:
            self.datapath.destroy()
            self.datapath = None
        elif name == "kube-proxy iptables":
            kubeproxy.iptables_clear(self.sandbox.lb.netns)
        elif name == "kube-proxy nftables":
            kubeproxy.nft_clear(self.sandbox.lb.netns)


NAMES = ("no LB (floor)", "pyebpflb", "kube-proxy iptables", "kube-proxy nftables")


def run(sandbox: Sandbox, n: int, samples: int, rounds: int, wrk_seconds: int) -> dict[str, Any]:
    """Connect latencies and new-connection request rates of each contender."""
    wanted = services(n, sandbox)
    last = wanted[-1]
    assert last.node_port is not None
    node, backend = str(sandbox.lb.ipv4), str(last.backends[0].address)
    contenders = Contenders(sandbox, wanted)
    latency: dict[str, list[float]] = {name: [] for name in NAMES}
    rate: dict[str, list[float]] = {name: [] for name in NAMES}
    per_round = max(1, samples // rounds)
    started = time.monotonic()
    for round_ in range(rounds):
        shift = round_ % len(NAMES)
        for name in NAMES[shift:] + NAMES[:shift]:
            print(f"  NodePort N={n} round {round_ + 1}/{rounds} {name}", flush=True)
            target, port = (backend, PORT) if name == NAMES[0] else (node, last.node_port)
            contenders.load(name)
            try:
                latency[name] += measure.connect_latencies(sandbox, target, port, per_round)
                got, errors = measure.request_rate(
                    sandbox, target, port, wrk_seconds, keep_alive=False
                )
                if errors:
                    raise RuntimeError(f"wrk saw {errors} socket errors through {name}")
                rate[name].append(got)
            finally:
                contenders.unload(name)
    return {"n": n, "latency": latency, "rate": rate, "seconds": time.monotonic() - started}
