"""`python -m bench`: pyebpflb against kube-proxy (iptables, nftables), in one run.

Builds a sandbox (client, load balancer, 3 backends running nginx), and for
each N services of 3 backends measures every contender, one loaded at a time,
in rounds that rotate the order so machine noise hits all alike. Writes
docs/performance.md (and PNG plots next to it).
"""

from __future__ import annotations

import argparse
import ipaddress
import pathlib
import statistics
import sys
import time
from typing import Any

import pyebpflb as lb
from bench import local, measure, netpol, nodeport, report
from bench.contenders import Contender, Ebpf, Floor, Iptables, Nftables
from bench.servers import PORT, Nginx
from pyebpflb.testing.sandbox import Sandbox, _sysctl

ROOT = pathlib.Path(__file__).resolve().parents[1]


def services(count: int, sandbox: Sandbox) -> list[lb.Service]:
    """VIPs 10.96.0.1, 10.96.0.2, ...: the last one is measured (a rule list's worst case).

    Every service has the 3 backends except the measured one, whose only backend is the
    one the floor talks to: like with like. (Spread over three nginx processes on two
    cores, the contenders were measured against a floor that keeps one busy, and every
    load balancer looked 40 % slower than the floor with keep-alive.)
    """
    base = int(ipaddress.IPv4Address("10.96.0.0"))
    backends = [lb.Backend(b.ipv4, PORT) for b in sandbox.backends]
    wanted = [
        lb.Service(
            vip=ipaddress.IPv4Address(base + i), port=80, name=f"bench/svc-{i}", backends=backends
        )
        for i in range(1, count + 1)
    ]
    wanted[-1] = wanted[-1].with_backends(backends[:1])
    return wanted


def tune(sandbox: Sandbox) -> None:
    """Load-test settings, the same for every contender: the client may use all ports, and
    the backends keep no TIME_WAIT. Otherwise tens of thousands of connections a second
    from one client address reuse ports within seconds, and a reused tuple meets the
    TIME_WAIT of a connection made through another contender, with other TCP timestamps;
    the backend refuses it and the client waits a second for its SYN retry."""
    _sysctl(sandbox.client.netns, "net.ipv4.ip_local_port_range", "1024 65535")
    for backend in sandbox.backends:
        _sysctl(backend.netns, "net.ipv4.tcp_max_tw_buckets", "0")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny N, few samples: a quick check")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--sizes", default="1,1000,10000", help="N services for every contender")
    parser.add_argument("--ebpf-only", type=int, default=100_000, help="N for pyebpflb alone")
    parser.add_argument("--samples", type=int, default=2000, help="connects per contender and N")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--wrk-seconds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=100_000, help="BPF_PROG_TEST_RUN repeats")
    parser.add_argument("--flows", type=int, default=20_000, help="new flows for CT creation")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.ebpf_only, args.samples, args.rounds = "1,10", 100, 40, 2
        args.wrk_seconds, args.repeat, args.flows = 1, 1000, 100
    args.sizes = [int(n) for n in str(args.sizes).split(",")]
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": measure.machine(),
        "args": vars(args).copy(),
        "latency": {},
        "rate": {},
        "program": {},
        "update": {},
    }
    started = time.monotonic()
    with Sandbox(backends=3, prefix="pyebpflb-bench") as sandbox, Nginx(sandbox):
        tune(sandbox)
        floor_target = str(sandbox.backends[0].ipv4)
        contenders: list[Contender] = [
            Floor(sandbox),
            Iptables(sandbox),
            Nftables(sandbox),
            Ebpf(sandbox),
        ]
        for n in args.sizes:
            measure_size(args, sandbox, contenders, n, floor_target, results)
        measure_size(
            args,
            sandbox,
            [Floor(sandbox), Ebpf(sandbox)],
            args.ebpf_only,
            floor_target,
            results,
            rate=False,
        )
        results["port_reuse"] = measure_port_reuse(args, sandbox)
        results["local"] = local.measure(
            sandbox, services(args.sizes[-1], sandbox), args.samples, args.rounds
        )
        results["local_services"] = args.sizes[-1]
        results["nodeport"] = nodeport.run(
            sandbox, args.sizes[-1], args.samples, args.rounds, args.wrk_seconds
        )
    results["cost"] = measure_costs(args)
    results["maglev"] = measure_maglev(args)
    results["policy"] = measure_policy(args)
    results["netpol"] = netpol.run(args)
    results["memory"] = measure_memory(10 if args.smoke else 10_000)
    results["seconds"] = time.monotonic() - started
    return results


def measure_size(
    args: argparse.Namespace,
    sandbox: Sandbox,
    contenders: list[Contender],
    n: int,
    floor_target: str,
    results: dict[str, Any],
    *,
    rate: bool = True,
) -> None:
    wanted = services(n, sandbox)
    last = wanted[-1]
    changed = last.with_backends([*last.backends, lb.Backend(sandbox.backends[1].ipv4, PORT)])
    per_round = max(1, args.samples // args.rounds)
    for round_ in range(args.rounds):
        shift = round_ % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            key = (contender.name, n)
            target = floor_target if isinstance(contender, Floor) else str(last.vip)
            print(f"  N={n:<6} round {round_ + 1}/{args.rounds} {contender.name}", flush=True)
            try:
                results["program"].setdefault(key, []).append(contender.load(wanted))
                results["latency"].setdefault(key, []).extend(
                    measure.connect_latencies(sandbox, target, 80, per_round)
                )
                if rate and round_ == 0:
                    results["rate"][key] = {
                        mode: measure.request_rate(
                            sandbox, target, 80, args.wrk_seconds, keep_alive=mode == "keep-alive"
                        )
                        for mode in ("new connection", "keep-alive")
                    }
                if not isinstance(contender, Floor):
                    results["update"].setdefault(key, []).append(
                        contender.update(n - 1, last, changed)
                    )
            finally:
                contender.unload()


def measure_port_reuse(args: argparse.Namespace, sandbox: Sandbox) -> dict[str, Any]:
    """Issue 12's port-reuse mix against every load balancer: two VIPs of the same two
    backends, and those backends directly, from 40 source ports, closed with RST."""
    first, second = sandbox.backends[:2]
    members = [lb.Backend(b.ipv4, PORT) for b in (first, second)]
    vips = ["10.97.0.10", "10.97.0.11"]
    wanted = [
        lb.Service(v, 80, name=f"bench/mix-{i}", backends=members) for i, v in enumerate(vips)
    ]
    targets = [
        (vips[0], None),
        (str(first.ipv4), first.name),
        (vips[1], None),
        (str(second.ipv4), second.name),
    ]
    rounds = 20 if args.smoke else 250
    result = {}
    for contender in (Iptables(sandbox), Nftables(sandbox), Ebpf(sandbox)):
        print(f"  port-reuse mix {contender.name}", flush=True)
        try:
            contender.load(wanted)
            answers, failures = measure.port_reuse(sandbox, targets, 80, rounds)
        finally:
            contender.unload()
        result[contender.name] = {
            "answers": answers,
            "failures": failures[:5],
            "failed": len(failures),
        }
    return result


def measure_costs(args: argparse.Namespace) -> dict[str, Any]:
    """Per-packet nanoseconds (BPF_PROG_TEST_RUN) at 1 service and at the largest N."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    def tcp(dst: str, sport: int) -> bytes:
        return bytes(Ether() / IP(src="10.1.0.5", dst=dst) / TCP(sport=sport, dport=80, flags="A"))

    costs: dict[str, Any] = {}
    with measure.empty_program() as empty:
        program = empty.program("empty")
        costs["empty"] = measure.packet_cost(program, tcp("10.96.0.1", 1000), args.repeat)
        costs["empty (one run each)"] = measure.new_flow_cost(
            program, lambda i: tcp("10.96.0.1", 1024 + i % 60000), args.flows
        )
    for n in (1, args.ebpf_only):
        base = int(ipaddress.IPv4Address("10.96.0.0"))
        wanted = [
            lb.Service(
                vip=ipaddress.IPv4Address(base + i),
                port=80,
                backends=[lb.Backend(f"10.91.{b}.2", 80) for b in (1, 2, 3)],
            )
            for i in range(1, n)
        ]
        # BPF_PROG_TEST_RUN runs its repeats on one buffer, so after the first run
        # a translated packet would no longer be for the VIP. A service whose only
        # backend is its own VIP:port translates the packet into itself: every
        # repeat does the whole conntrack-hit path, rewrites included.
        mirror = lb.Service(vip="10.95.0.1", port=80, backends=[lb.Backend("10.95.0.1", 80)])
        with lb.Datapath(
            "bench-cost", max_services=max(65536, n), max_backends=max(262144, 3 * n)
        ) as dp:
            dp.sync([*wanted, mirror])
            ingress = dp._object.program("lb_ingress")
            ingress.test_run(tcp("10.95.0.1", 999))  # creates the flow the next runs hit
            # ... and the backend's answer confirms it: established flows are in lb_ct.
            answer = (
                Ether() / IP(src="10.95.0.1", dst="10.1.0.5") / TCP(sport=80, dport=999, flags="SA")
            )
            dp._object.program("lb_egress").test_run(bytes(answer))
            costs[("conntrack hit", n)] = measure.packet_cost(
                ingress, tcp("10.95.0.1", 999), args.repeat
            )
            costs[("non-service", n)] = measure.packet_cost(
                ingress, tcp("10.200.0.1", 999), args.repeat
            )
            vip = str((wanted or [mirror])[-1].vip)
            costs[("new flow (one run each)", n)] = measure.new_flow_cost(
                ingress, lambda i, vip=vip: tcp(vip, 1024 + i % 60000), args.flows
            )
            # What one run costs before any flow work: the same program on packets for
            # no service, each run on its own (a cold start per BPF_PROG_TEST_RUN call).
            costs[("non-service (one run each)", n)] = measure.new_flow_cost(
                ingress, lambda i: tcp("10.200.0.1", 1024 + i % 60000), args.flows
            )
    return costs


def measure_maglev(args: argparse.Namespace) -> dict[str, Any]:
    """Maglev: table build time, and a new flow's kernel cost against random selection."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    from pyebpflb import maglev

    services_count = 20 if args.smoke else 1000
    members = [lb.Backend(f"10.91.{i // 250}.{i % 250 + 1}", 80) for i in range(10)]
    started = time.perf_counter()
    for _ in range(services_count):
        maglev.build(members, maglev.DEFAULT_TABLE_SIZE)
    build = time.perf_counter() - started

    def tcp(sport: int) -> bytes:
        return bytes(Ether() / IP(src="10.1.0.5", dst="10.96.0.10") / TCP(sport=sport, dport=80))

    new_flow = {}
    for scheduler in ("random", "maglev"):
        svc = lb.Service(vip="10.96.0.10", port=80, scheduler=scheduler, backends=members)
        with lb.Datapath("bench-maglev") as dp:
            dp.sync([svc])
            ingress = dp._object.program("lb_ingress")
            new_flow[scheduler] = measure.new_flow_cost(
                ingress, lambda i: tcp(1024 + i % 60000), args.flows
            )
    return {
        "services": services_count,
        "backends": len(members),
        "size": maglev.DEFAULT_TABLE_SIZE,
        "build seconds": build,
        "new flow": new_flow,
    }


def policy_rules(count: int, per_address: int = 1) -> list[lb.Rule]:
    """``count`` rules, the measured packet's (10.1.0.5, TCP 80) among them: /32s and
    /24s of 10.100.0.0/14, allow and deny, single ports and ranges, ``per_address``
    rules on distinct ports per CIDR (more than 4 ranges put a CIDR's verdicts in
    the second trie)."""
    rules = [lb.Rule("allow", "10.1.0.5/32", "tcp", 80)]
    rules += [lb.Rule("deny", "10.1.0.5/32", "tcp", 100 + j) for j in range(per_address - 1)]
    for i in range((count - len(rules)) // per_address):
        length = 32 if i % 4 else 24
        address = ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.100.0.0")) + i * 256)
        network = ipaddress.IPv4Network((address, length), strict=False)
        for j in range(per_address):
            ports = 1000 + 10 * j + i % 5 if i % 2 else (2000 + 10 * j, 2005 + 10 * j + i % 3)
            rules.append(lb.Rule("deny" if (i + j) % 3 == 0 else "allow", network, "tcp", ports))
    return rules


def measure_policy(args: argparse.Namespace) -> dict[str, Any]:
    """Per-packet cost under policy with 1 and with many rules (BPF_PROG_TEST_RUN), the
    two datapaths measured in alternation; and the time to install the rules."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    def tcp(dst: str) -> bytes:
        return bytes(Ether() / IP(src="10.1.0.5", dst=dst) / TCP(sport=999, dport=80, flags="A"))

    many = 100 if args.smoke else 10_000
    mirror = lb.Service(vip="10.95.0.1", port=80, backends=[lb.Backend("10.95.0.1", 80)])
    cases = {
        "no policy": [],
        "1 rule": policy_rules(1),
        f"{many} rules": policy_rules(many),
        f"{many} rules, 5 ranges per address": policy_rules(many, per_address=5),
    }
    results: dict[str, Any] = {"rules": many, "ns": {}, "sync seconds": {}}
    datapaths = {}
    try:
        for label, rules in cases.items():
            dp = datapaths[label] = lb.Datapath(f"bench-policy-{len(datapaths)}")
            started = time.perf_counter()
            dp.sync([mirror], [lb.Policy("bench", rules, default="deny")] if rules else [])
            results["sync seconds"][label] = time.perf_counter() - started
            ingress = dp._object.program("lb_ingress")
            ingress.test_run(tcp("10.95.0.1"))  # the flow the conntrack-hit runs hit
        samples: dict[tuple[str, str], list[float]] = {}
        for _ in range(3 if args.smoke else 7):
            for label, dp in datapaths.items():
                ingress = dp._object.program("lb_ingress")
                for what, dst in (("conntrack hit", "10.95.0.1"), ("non-service", "10.200.0.1")):
                    samples.setdefault((what, label), []).append(
                        measure.packet_cost(ingress, tcp(dst), args.repeat)
                    )
        results["ns"] = {key: statistics.median(v) for key, v in samples.items()}
    finally:
        for dp in datapaths.values():
            dp.close()
    return results


def measure_memory(n: int) -> dict[str, Any]:
    """Kernel memory per service, backend and conntrack entry, from the maps' memlock."""

    def memlocks(dp: lb.Datapath) -> dict[str, int]:
        return {name: measure.memlock(m) for name, m in dp._object.maps.items()}

    with lb.Datapath("bench-memory") as dp:
        empty = memlocks(dp)
        dp.sync(
            [
                lb.Service(
                    vip=ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.96.0.0")) + i),
                    port=80,
                    backends=[lb.Backend(f"10.91.{b}.2", 80) for b in (1, 2, 3)],
                )
                for i in range(1, n + 1)
            ]
        )
        full = memlocks(dp)
        ct = dp._object.map("lb_ct")
        grown = {name: full[name] - empty[name] for name in full}
        return {
            "services": n,
            "per service": sum(grown[m] for m in ("lb_services", "lb_svc_stats", "lb_svc_names"))
            / n,
            "per backend": sum(grown[m] for m in ("lb_backends", "lb_be_stats", "lb_slots"))
            / (3 * n),
            "per conntrack entry": full["lb_ct"] / ct.max_entries,
            "total at default sizes, empty": sum(empty.values()),
            "by map": full,
        }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    print(
        f"pyebpflb bench: sizes {args.sizes} (+{args.ebpf_only} for pyebpflb), "
        f"{args.samples} connects each",
        flush=True,
    )
    results = run(args)
    report.write(results, args.out)
    print(f"wrote {args.out} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
