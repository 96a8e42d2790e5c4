"""Balance a service over three backends, in a sandbox, with the public API.

Run as root: `.venv/bin/python examples/balance_a_service.py`. It builds the
sandbox (client, load balancer, backends in network namespaces), programs one
TCP and one UDP service, sends traffic from the client, and prints who
answered and what the kernel counted. Everything is removed at the end.
"""

from __future__ import annotations

import collections

import pyebpflb as lb
from pyebpflb.testing.sandbox import BACKEND_PORT, Sandbox


def main() -> None:
    with Sandbox(backends=3) as sandbox:
        web = lb.Service(
            vip="10.96.0.10",
            port=80,
            protocol="tcp",
            name="default/web",
            backends=[lb.Backend(b.ipv4, BACKEND_PORT) for b in sandbox.backends],
        )
        dns = lb.Service(
            vip="10.96.0.53",
            port=53,
            protocol="udp",
            name="kube-system/dns",
            backends=[lb.Backend(b.ipv4, BACKEND_PORT) for b in sandbox.backends[:2]],
        )
        # netns=: the datapath works in the load balancer's namespace from out here.
        with lb.Datapath("example", netns=sandbox.lb.netns) as dp:
            dp.attach(sandbox.lb.iface)
            dp.sync([web, dns])

            answers = collections.Counter(sandbox.http_get("10.96.0.10", 80) for _ in range(90))
            print("HTTP answers:", dict(answers))
            name, source = sandbox.udp_request("10.96.0.53", 53)
            print(f"UDP answer from {name}, seen by the client as coming from {source}")

            for svc in dp.services:
                stats = dp.stats(svc)
                print(f"{svc.label}: {stats.packets} packets")
                for backend, traffic in stats.backends.items():
                    print(f"  {backend}: {traffic.packets} packets, {traffic.bytes} bytes")


if __name__ == "__main__":
    main()
