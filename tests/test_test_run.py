"""BPF_PROG_TEST_RUN on crafted packets."""

from __future__ import annotations

import pytest
from packets import run
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from pyebpflb._bpf import Object

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel


def test_counter_passes_the_packet_untouched_and_counts_each_repeat(counter: Object) -> None:
    packet = Ether() / IP(src="10.248.9.1", dst="10.248.9.2") / TCP(sport=40000, dport=80)
    verdict = run(counter.program("count_tc_ingress"), packet, repeat=1000)
    assert verdict.retval == -1  # TC_ACT_UNSPEC: counting never decides
    assert bytes(verdict.packet) == bytes(packet)
    assert verdict.packet[TCP].dport == 80
    totals = [
        (sum(v.packets for v in per_cpu), sum(v.bytes for v in per_cpu))
        for key, per_cpu in counter.map("iface_counters").items()
    ]
    assert totals == [(1000, 1000 * len(packet))]


def test_xdp_program_returns_xdp_pass(counter: Object) -> None:
    packet = Ether() / IP(dst="10.248.9.2") / TCP()
    assert run(counter.program("count_xdp"), packet).retval == 2  # XDP_PASS


def test_test_run_refuses_an_empty_packet_and_a_zero_repeat(counter: Object) -> None:
    prog = counter.program("count_tc_ingress")
    with pytest.raises(ValueError, match="at least one byte"):
        prog.test_run(b"")
    with pytest.raises(ValueError, match="repeat must be at least 1, got 0"):
        prog.test_run(b"\x00" * 64, repeat=0)
