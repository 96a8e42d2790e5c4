"""Running programs on scapy-built packets through BPF_PROG_TEST_RUN."""

from __future__ import annotations

from typing import Any, NamedTuple

from scapy.layers.l2 import Ether

from pyebpflb._bpf import Program


class Verdict(NamedTuple):
    retval: int
    packet: Any  # scapy Ether of what the program left
    duration_ns: int


def run(program: Program, packet: Any, *, repeat: int = 1) -> Verdict:
    """Run ``program`` once (or ``repeat`` times) on ``packet``; parse what comes out."""
    result = program.test_run(bytes(packet), repeat=repeat)
    return Verdict(result.retval, Ether(result.data), result.duration_ns)
