"""A writer killed with SIGKILL in the middle of a 10,000-service sync (issue 13):
packets see the old services or the new ones, never a mix, and the next writer
finishes or undoes the change and completes its own sync, leaving nothing behind."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import PIN_ROOT

import pyebpflb as lb
from pyebpflb._bpf import Map, ffi
from pyebpflb._bpf._libbpf import lib
from pyebpflb.testing.sandbox import BACKEND_PORT, LB_IFACE, Sandbox

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

SERVICES = 10_000
# Where the kill lands: while the writer plans (nothing written yet), once its change
# is open (invisible writes), once packets read the new services (the other map
# being levelled, the old entries cleaned up), after it finished.
KILL_AT = ("planning", "open", "flipped", "done")

WRITER = textwrap.dedent(
    """
    import sys
    import pyebpflb as lb
    name, netns, pin_root, backend = sys.argv[1:5]
    with lb.Datapath(name, persist=True, netns=netns, pin_root=pin_root, create=False) as dp:
        wanted = [lb.Service(s.vip, s.port, name=s.name, backends=[lb.Backend(backend, 8080)])
                  for s in dp.services]
        print("syncing", flush=True)
        dp.sync(wanted)
    print("done", flush=True)
    """
)


def vip(i: int) -> str:
    return f"10.100.{i // 250}.{i % 250 + 1}"


def old_services(sandbox: Sandbox) -> list[lb.Service]:
    backends = [lb.Backend(b.ipv4, BACKEND_PORT) for b in sandbox.backends[:2]]
    return [lb.Service(vip(i), 80, name=f"crash/s{i}", backends=backends) for i in range(SERVICES)]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(backends=3) as built:
        yield built


def service_map(config: Map) -> int:
    return int(ffi.from_buffer("struct pyebpflb_lb_config *", config[0]).service_map)


def wait_for(config: Map, done: Callable[[int], bool]) -> None:
    """Poll lb_config (a few µs a read) until ``done(service_map)``."""
    deadline = time.monotonic() + 60
    while not done(service_map(config)):
        assert time.monotonic() < deadline, "the writer never got there"


def flipped_from(before: int, value: int) -> bool:
    return bool((value ^ before) & lib.PYEBPFLB_SERVICE_MAP_ALT)


def test_a_sync_killed_anywhere_leaves_old_or_new_services_and_the_next_sync_completes(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"t{os.getpid()}-crash"
    dp = lb.Datapath(name, persist=True, netns=sandbox.lb.netns, pin_root=PIN_ROOT)
    old_names = {sandbox.backends[0].name, sandbox.backends[1].name}
    new_name = sandbox.backends[2].name
    outcomes: list[str] = []
    repaired: list[bool] = []
    try:
        dp.attach(LB_IFACE)
        for point in KILL_AT:
            dp.sync(old_services(sandbox))
            config = Map.from_pinned(os.path.join(dp.pin_dir, "lb_config"))
            before = service_map(config)
            writer = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WRITER,
                    name,
                    sandbox.lb.netns,
                    str(PIN_ROOT),
                    str(sandbox.backends[2].ipv4),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                assert writer.stdout is not None
                assert writer.stdout.readline() == "syncing\n", writer.communicate()
                if point == "open":
                    wait_for(config, lambda value: bool(value & lib.PYEBPFLB_CHANGE_OPEN))
                elif point == "flipped":
                    wait_for(config, functools.partial(flipped_from, before))
                elif point == "done":
                    assert writer.stdout.readline() == "done\n", writer.stderr
                writer.send_signal(signal.SIGKILL)
                writer.wait(timeout=60)
            finally:
                writer.kill()
                config.close()
            # What packets see: every service old, or every service new.
            with lb.Datapath(
                name, netns=sandbox.lb.netns, pin_root=PIN_ROOT, create=False, pin=False
            ) as look:
                installed = look.services
                sets = {tuple(b.address for b in s.backends) for s in installed}
            assert len(installed) == SERVICES and len(sets) == 1, sets
            state = "new" if sets == {(sandbox.backends[2].ipv4,)} else "old"
            answers = {sandbox.http_get(vip(i), 80) for i in (0, SERVICES // 2, SERVICES - 1)}
            assert answers <= ({new_name} if state == "new" else old_names), (point, answers)
            outcomes.append(state)
            # The next writer finishes or undoes the change, then completes its own.
            caplog.clear()
            dp.sync(old_services(sandbox)[: SERVICES // 2])
            repaired.append("finished a change its writer left open" in caplog.text)
            assert len(dp.services) == SERVICES // 2
            counts = {m.name: m.entries for m in dp.maps()}
            assert counts["lb_services"] == counts["lb_services_alt"] == SERVICES // 2
            assert counts["lb_backends"] == SERVICES  # two each: nothing left over
            assert counts["lb_svc_names"] == SERVICES // 2
            assert sandbox.http_get(vip(0), 80) in old_names
        print(f"killed at {KILL_AT}: {outcomes}, change left open: {repaired}")
        assert outcomes[0] == "old" and outcomes[2:] == ["new", "new"]
        assert repaired[0] is False and repaired[1] is True and repaired[3] is False
    finally:
        dp.destroy()
