"""cgroup attachment through a BPF link."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from pyebpflb._bpf import CgroupLink, Object, fs
from pyebpflb._bpf._libbpf import lib

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

SEND = (
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
    "[s.sendto(b'x' * 10, ('127.0.0.1', 9)) for _ in range(int(__import__('sys').argv[1]))]"
)


@pytest.fixture
def cgroup() -> Iterator[pathlib.Path]:
    path = pathlib.Path(fs.cgroup2_root()) / f"pyebpflb-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


def run_in(cgroup: pathlib.Path, code: str, *args: str) -> None:
    def enter() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    subprocess.run([sys.executable, "-c", code, *args], preexec_fn=enter, check=True)


def cgroup_egress_packets(counter: Object) -> int:
    return sum(
        v.packets
        for key, per_cpu in counter.map("iface_counters").items()
        if key.hook == lib.PYEBPFLB_HOOK_CGROUP_EGRESS
        for v in per_cpu
    )


def test_cgroup_link_counts_the_cgroups_traffic_until_closed(
    cgroup: pathlib.Path, counter: Object
) -> None:
    with CgroupLink.attach(counter.program("count_cgroup_egress"), cgroup) as link:
        assert link.attached
        run_in(cgroup, SEND, "12")
        assert cgroup_egress_packets(counter) == 12
    assert not link.attached
    run_in(cgroup, SEND, "5")
    assert cgroup_egress_packets(counter) == 12


def test_missing_cgroup_directory_is_named(counter: Object) -> None:
    with pytest.raises(ValueError, match="no cgroup directory at '/nonexistent/cg'"):
        CgroupLink.attach(counter.program("count_cgroup_egress"), "/nonexistent/cg")
