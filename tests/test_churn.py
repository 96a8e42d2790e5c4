"""Hitless updates: a thousand backend changes under live traffic break nothing."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import PIN_ROOT

import pyebpflb as lb
from pyebpflb.testing.sandbox import BACKEND_PORT, Sandbox

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

VIP = "10.96.0.10"
CHANGES = 1000


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(backends=3, prefix="pyebpflb-churn") as built:
        yield built


def random_backends(rng: random.Random, sandbox: Sandbox) -> list[lb.Backend]:
    """Random weights and states for every backend, at least one taking new flows.

    Every backend stays in the service: one that leaves it is gone, and its
    connections are reset by design (``test_e2e.py``); one that only stops
    taking new flows (weight 0, terminating, maintenance) keeps them.
    """
    while True:
        chosen = [
            lb.Backend(
                host.ipv4,
                BACKEND_PORT,
                weight=rng.choice([0, 1, 1, 2, 5, 100]),
                state=rng.choice(["active", "active", "active", "terminating", "maintenance"]),
            )
            for host in sandbox.backends
        ]
        svc = lb.Service(vip=VIP, port=80, backends=chosen)
        if svc.usable_backends():
            return chosen


@pytest.mark.parametrize("scheduler", ["random", "maglev"])
def test_a_thousand_backend_changes_fail_no_connection(sandbox: Sandbox, scheduler: str) -> None:
    rng = random.Random(2026)
    name = f"t{os.getpid()}-churn-{scheduler}"
    with lb.Datapath(name, netns=sandbox.lb.netns, pin_root=PIN_ROOT) as dp:
        dp.attach(sandbox.lb.iface)
        start = lb.Service(
            vip=VIP,
            port=80,
            scheduler=scheduler,
            backends=[lb.Backend(h.ipv4, BACKEND_PORT) for h in sandbox.backends],
        )
        dp.sync([start])
        long_lived = [sandbox.connection(VIP, 80) for _ in range(4)]
        owners = [conn.get() for conn in long_lived]

        stop = threading.Event()
        opened, failures = [0], []

        def keep_opening() -> None:
            while not stop.is_set():
                try:
                    sandbox.http_get(VIP, 80, timeout=2)
                    opened[0] += 1
                except OSError as exc:
                    failures.append(repr(exc))

        opener = threading.Thread(target=keep_opening)
        opener.start()
        broken, long_lived_requests = [], 0
        try:
            for change in range(CHANGES):
                dp.upsert(start.with_backends(random_backends(rng, sandbox)))
                if change % 50 == 0:
                    for index, conn in enumerate(long_lived):
                        try:
                            if conn.get() != owners[index]:
                                broken.append(f"connection {index} changed backend")
                            long_lived_requests += 1
                        except OSError as exc:
                            broken.append(f"connection {index}: {exc!r}")
                time.sleep(0.004)  # pace the changes so connections interleave with them
        finally:
            stop.set()
            opener.join()
            for conn in long_lived:
                conn.close()
    print(
        f"\n{scheduler}: {CHANGES} changes, {opened[0]} new connections, {len(failures)} "
        f"failed; {len(long_lived)} long-lived connections, {long_lived_requests} requests "
        f"on them, {len(broken)} broken"
    )
    assert opened[0] > 100, "the opener made too few connections to say anything"
    assert failures == []
    assert broken == []
