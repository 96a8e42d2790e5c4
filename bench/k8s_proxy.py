"""`python -m bench.k8s_proxy [N ...]`: what following a cluster costs in user space.

For N Services (one port, one EndpointSlice of 3 endpoints each) fed to a
pyebpflb.k8s.ServiceProxy over a real (unattached) datapath, the time of: the initial
sync, a sync after one slice changed, and a sync after a relist of both kinds that
returned the same objects (what a 410 Gone costs), with the datapath writes each made.
Not a comparison with kube-proxy (bench/__main__.py has those, for the datapath); a
table to see that one change costs one Service's work and a relist writes nothing.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from typing import Any

import pyebpflb as lb
from pyebpflb import k8s


def objects(count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    base = int(ipaddress.IPv4Address("10.96.0.0"))
    services, slices = [], []
    for i in range(count):
        name = f"svc-{i}"
        services.append({
            "metadata": {"name": name, "namespace": "bench", "resourceVersion": str(i)},
            "spec": {"clusterIP": str(ipaddress.IPv4Address(base + 1 + i)),
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        })  # fmt: skip
        slices.append(endpointslice(name, i, 3))
    return services, slices


def endpointslice(name: str, i: int, endpoints: int) -> dict[str, Any]:
    return {
        "metadata": {"name": f"{name}-abcde", "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [f"10.{64 + i // 65536}.{i // 256 % 256}.{e}"],
                       "conditions": {"ready": True}} for e in range(1, endpoints + 1)],
    }  # fmt: skip


class Counting:
    """The datapath, counting the writes a sync makes."""

    def __init__(self, datapath: lb.Datapath) -> None:
        self.datapath, self.writes = datapath, 0
        self.node = datapath.node

    @property
    def services(self) -> list[lb.Service]:
        return self.datapath.services

    def upsert(self, service: lb.Service, **options: Any) -> None:
        self.writes += 1
        self.datapath.upsert(service, **options)

    def sync(self, services: list[lb.Service]) -> None:
        self.writes += 1
        self.datapath.sync(services)

    def remove(self, service: lb.Service) -> bool:
        self.writes += 1
        return self.datapath.remove(service)


def timed(proxy: k8s.ServiceProxy, counting: Counting) -> tuple[float, int]:
    counting.writes = 0
    began = time.perf_counter()
    assert proxy.sync(force=True)
    return time.perf_counter() - began, counting.writes


def main(counts: list[int]) -> None:
    print(f"{'services':>9} {'initial sync':>14} {'one slice changed':>18} {'relist, same':>14}")
    for count in counts:
        services, slices = objects(count)
        with lb.Datapath("bench-k8s", pin=False, max_services=4 * count + 16) as dp:
            counting = Counting(dp)
            proxy = k8s.ServiceProxy(counting, min_sync_period=0)
            proxy.replace_all(services, slices)
            first = timed(proxy, counting)
            proxy.on_endpointslice("MODIFIED", endpointslice("svc-0", 0, 4))
            one = timed(proxy, counting)
            proxy.replace_all(services, [endpointslice("svc-0", 0, 4), *slices[1:]])
            relist = timed(proxy, counting)
        cells = [f"{s * 1000:9.1f} ms ({w})" for s, w in (first, one, relist)]
        print(f"{count:>9} {cells[0]:>14} {cells[1]:>18} {cells[2]:>14}")
    print("(writes to the datapath in brackets: upserts and removals, or one whole sync)")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1000, 10000])
