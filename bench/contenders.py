"""The contenders: what is loaded on the sandbox's load balancer while it is measured.

Only one is loaded at a time; `unload` leaves the namespace as it found it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pyebpflb as lb
from bench import kubeproxy
from pyebpflb.testing.sandbox import Sandbox


class Contender:
    name = ""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def load(self, services: Sequence[lb.Service]) -> float:
        """Program ``services`` from empty; seconds it took."""
        raise NotImplementedError

    def update(self, index: int, old: lb.Service, new: lb.Service) -> float:
        """Change one installed service; seconds it took."""
        raise NotImplementedError

    def unload(self) -> None:
        raise NotImplementedError


class Floor(Contender):
    """No load balancer: the client talks to a backend directly, through the same router."""

    name = "no LB (floor)"

    def load(self, services: Sequence[lb.Service]) -> float:
        return 0.0

    def update(self, index: int, old: lb.Service, new: lb.Service) -> float:
        return 0.0

    def unload(self) -> None:
        pass


class Ebpf(Contender):
    name = "pyebpflb"

    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__(sandbox)
        self.datapath: lb.Datapath | None = None

    def load(self, services: Sequence[lb.Service]) -> float:
        self.datapath = lb.Datapath(
            "bench",
            netns=self.sandbox.lb.netns,
            max_services=max(65536, len(services)),
            max_backends=max(262144, 3 * len(services)),
        )
        self.datapath.attach(self.sandbox.lb.iface)
        started = time.perf_counter()
        self.datapath.sync(services)
        return time.perf_counter() - started

    def update(self, index: int, old: lb.Service, new: lb.Service) -> float:
        assert self.datapath is not None
        started = time.perf_counter()
        self.datapath.upsert(new)
        return time.perf_counter() - started

    def unload(self) -> None:
        if self.datapath is not None:
            self.datapath.destroy()
            self.datapath = None


class Iptables(Contender):
    """kube-proxy's iptables mode, on the legacy (x_tables) backend it was built for."""

    name = "kube-proxy iptables"

    def load(self, services: Sequence[lb.Service]) -> float:
        rules = kubeproxy.iptables_rules(services)
        started = time.perf_counter()
        kubeproxy.run_in(self.sandbox.lb.netns, ["iptables-legacy-restore"], rules)
        return time.perf_counter() - started

    def update(self, index: int, old: lb.Service, new: lb.Service) -> float:
        rules = kubeproxy.iptables_update(index, old, new)
        started = time.perf_counter()
        kubeproxy.run_in(self.sandbox.lb.netns, ["iptables-legacy-restore", "--noflush"], rules)
        return time.perf_counter() - started

    def unload(self) -> None:
        kubeproxy.iptables_clear(self.sandbox.lb.netns)


class Nftables(Contender):
    name = "kube-proxy nftables"

    def load(self, services: Sequence[lb.Service]) -> float:
        rules = kubeproxy.nft_rules(services)
        started = time.perf_counter()
        kubeproxy.run_in(self.sandbox.lb.netns, ["nft", "-f", "-"], rules)
        return time.perf_counter() - started

    def update(self, index: int, old: lb.Service, new: lb.Service) -> float:
        rules = kubeproxy.nft_update(index, old, new)
        started = time.perf_counter()
        kubeproxy.run_in(self.sandbox.lb.netns, ["nft", "-f", "-"], rules)
        return time.perf_counter() - started

    def unload(self) -> None:
        kubeproxy.nft_clear(self.sandbox.lb.netns)
