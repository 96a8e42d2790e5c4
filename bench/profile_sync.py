"""Where a sync's time goes: planning (Python) against writing (the kernel).

    .venv/bin/python -m bench.profile_sync 100000

Syncs N services of 3 backends into a fresh, unattached datapath (as root) and
prints the wall time with the time spent in ``plan.diff`` (all chunks) and in
the executor's writes (all chunks; these overlap planning from 20,000 services
on, so the two can add up to more than the whole). Not part of ``make bench``:
a tool for the numbers docs/decisions.md 29 and docs/performance.md quote.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import pyebpflb as lb
from pyebpflb import plan


def services(count: int) -> list[lb.Service]:
    return [
        lb.Service(
            vip=f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",
            port=80,
            name=f"bench/s{i}",
            backends=[
                lb.Backend(f"10.1.{(i * 3 + j) // 256 % 256}.{(i * 3 + j) % 256}", 8080)
                for j in range(3)
            ],
        )
        for i in range(count)
    ]


def main(argv: list[str]) -> int:
    count = int(argv[0]) if argv else 100_000
    spent = {"plan": 0.0, "write": 0.0}

    def timed(what: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                spent[what] += time.perf_counter() - started

        return wrapper

    wanted = services(count)
    diff = plan.diff
    plan.diff = timed("plan", diff)  # type: ignore[assignment]
    try:
        with lb.Datapath(
            f"profile-{os.getpid()}",
            max_services=max(65536, count),
            max_backends=max(262144, 3 * count),
        ) as dp:
            executor = dp._programmer._executor
            executor._forward = timed("write", executor._forward)  # type: ignore[method-assign]
            started = time.perf_counter()
            dp.sync(wanted)
            total = time.perf_counter() - started
    finally:
        plan.diff = diff  # type: ignore[assignment]
    print(
        f"sync of {count} services x 3 backends: {total:.3f} s; planning {spent['plan']:.3f} s "
        f"({spent['plan'] / count * 1e6:.1f} us a service), writing {spent['write']:.3f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
