"""Ring buffer delivery of events from the kernel."""

from __future__ import annotations

from typing import Any

import pytest
from packets import run
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pyebpflb._bpf import Object, RingBuffer
from pyebpflb._bpf._libbpf import lib

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel


def udp_packet(payload: bytes = b"x" * 18) -> Any:
    return Ether() / IP(src="10.248.9.1", dst="10.248.9.2") / UDP(sport=1000, dport=2000) / payload


def test_each_packet_run_delivers_one_typed_event(counter: Object) -> None:
    counter.map("counter_config")[0] = {"emit_events": 1}
    packet = udp_packet()
    events: list[Any] = []
    with RingBuffer(
        counter.map("counter_events"), events.append, event_type="struct pyebpflb_counter_event"
    ) as ring:
        for _ in range(3):
            run(counter.program("count_tc_ingress"), packet)
        assert ring.poll(timeout=1.0) == 3
    assert [e.len for e in events] == [len(packet)] * 3
    assert {e.hook for e in events} == {lib.PYEBPFLB_HOOK_TC_INGRESS}
    assert events[0].timestamp_ns <= events[1].timestamp_ns <= events[2].timestamp_ns


def test_poll_times_out_with_nothing_delivered(counter: Object) -> None:
    with RingBuffer(counter.map("counter_events"), lambda e: None) as ring:
        assert ring.poll(timeout=0.05) == 0


def test_untyped_consumer_gets_raw_bytes(counter: Object) -> None:
    counter.map("counter_config")[0] = {"emit_events": 1}
    got: list[bytes] = []
    run(counter.program("count_tc_egress"), udp_packet())
    with RingBuffer(counter.map("counter_events"), got.append) as ring:
        assert ring.consume() == 1
    assert len(got) == 1 and len(got[0]) == 24  # sizeof(struct pyebpflb_counter_event)


def test_exception_in_callback_comes_out_of_poll(counter: Object) -> None:
    counter.map("counter_config")[0] = {"emit_events": 1}
    run(counter.program("count_tc_ingress"), udp_packet())

    def explode(event: object) -> None:
        raise RuntimeError("consumer failed")

    with (
        RingBuffer(counter.map("counter_events"), explode) as ring,
        pytest.raises(RuntimeError, match="consumer failed"),
    ):
        ring.poll(timeout=1.0)


def test_ring_buffer_needs_a_ringbuf_map(counter: Object) -> None:
    with pytest.raises(ValueError, match="iface_counters is not a ring buffer"):
        RingBuffer(counter.map("iface_counters"), print)
