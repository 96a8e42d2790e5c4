"""Host-reachable services: a local process's connect() to a ClusterIP through
socket-level balancing, against connecting to the backend directly and against
kube-proxy's iptables rules for the same local path (its OUTPUT chain jumps to
KUBE-SERVICES too), at N services, interleaved in rounds."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pyebpflb as lb
from bench import kubeproxy
from pyebpflb._bpf import fs
from pyebpflb.testing.sandbox import Sandbox

# Runs in the node's namespace, in the measured cgroup: seconds per connect().
LOOP = """
import json, socket, struct, sys, time
linger = struct.pack("ii", 1, 0)
out = []
for _ in range(int(sys.argv[3])):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    started = time.perf_counter()
    s.connect((sys.argv[1], int(sys.argv[2])))
    out.append(time.perf_counter() - started)
    s.close()
print(json.dumps(out))
"""

OUTPUT_JUMP = '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'


def _connects(netns: str, cgroup: pathlib.Path, address: str, port: int, count: int) -> Any:
    def enter() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", LOOP, address, str(port), str(count)],
        preexec_fn=enter,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"connects to {address}:{port} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def measure(
    sandbox: Sandbox, wanted: list[lb.Service], samples: int, rounds: int
) -> dict[str, list[float]]:
    """Connect latencies from the load balancer's own namespace (the node): "direct" to
    the backend, "socket" to the VIP through pyebpflb's cgroup programs, "iptables" to
    the VIP through kube-proxy's rules (PREROUTING and OUTPUT)."""
    last = wanted[-1]
    backend = str(last.backends[0].address)
    rules = kubeproxy.iptables_rules(wanted).replace(
        "-A PREROUTING", OUTPUT_JUMP + "\n-A PREROUTING", 1
    )
    cgroup = pathlib.Path(fs.cgroup2_root()) / f"pyebpflb-bench-{os.getpid()}"
    cgroup.mkdir()
    found: dict[str, list[float]] = {"direct": [], "socket": [], "iptables": []}
    per_round = max(1, samples // rounds)
    # A node has a route for the service range (its default route): connect() looks one
    # up before OUTPUT's DNAT re-routes to the backend. The socket path needs none.
    route = ["ip", "-n", sandbox.lb.netns, "route", "add", "10.96.0.0/12", "dev", "be1"]
    subprocess.run(route, check=True)
    try:
        with lb.Datapath(f"bench-local-{os.getpid()}", netns=sandbox.lb.netns) as dp:
            dp.sync(wanted)
            order = list(found)
            for round_ in range(rounds):
                shift = round_ % len(order)
                for name in order[shift:] + order[:shift]:
                    print(f"  local connect round {round_ + 1}/{rounds} {name}", flush=True)
                    target = backend if name == "direct" else str(last.vip)
                    if name == "socket":
                        dp.attach_cgroup(cgroup)
                    elif name == "iptables":
                        kubeproxy.run_in(sandbox.lb.netns, ["iptables-legacy-restore"], rules)
                    try:
                        found[name] += _connects(
                            sandbox.lb.netns, cgroup, target, last.port, per_round
                        )
                    finally:
                        if name == "socket":
                            dp.detach_cgroup(cgroup)
                        elif name == "iptables":
                            kubeproxy.iptables_clear(sandbox.lb.netns)
    finally:
        cgroup.rmdir()
        subprocess.run([*route[:4], "del", *route[5:]], check=False)
    return found
