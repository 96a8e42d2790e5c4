"""Opening and loading the shipped objects."""

from __future__ import annotations

import pytest

import pyebpflb as lb
from pyebpflb import objects
from pyebpflb._bpf import MapType, Object, ProgramType

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel


def test_shipped_counter_object_is_listed() -> None:
    assert "counter" in objects.available()


def test_counter_object_loads_every_program_and_map(counter: Object) -> None:
    assert set(counter.programs) == {
        "count_tc_ingress",
        "count_tc_egress",
        "count_xdp",
        "count_cgroup_ingress",
        "count_cgroup_egress",
    }
    assert counter.program("count_tc_ingress").type == ProgramType.SCHED_CLS
    assert counter.program("count_xdp").type == ProgramType.XDP
    assert counter.program("count_cgroup_egress").type == ProgramType.CGROUP_SKB
    assert counter.program("count_tc_ingress").id > 0
    assert counter.map("iface_counters").type == MapType.PERCPU_HASH
    assert counter.map("counter_events").type == MapType.RINGBUF


def test_maps_are_typed_by_the_shared_headers(counter: Object) -> None:
    counters = counter.map("iface_counters")
    assert counters.key_type == "struct pyebpflb_counter_key"
    assert counters.value_type == "struct pyebpflb_counter_value"
    assert counter.map("counter_config").key_type == "__u32"


def test_set_max_entries_before_load_sizes_the_kernel_map() -> None:
    with objects.open_object("counter") as obj:
        obj.set_max_entries("iface_counters", 4096)
        with obj.load() as loaded:
            assert loaded.map("iface_counters").max_entries == 4096


def test_load_consumes_the_open_object() -> None:
    opened = objects.open_object("counter")
    with opened.load() as loaded:
        assert not hasattr(loaded, "set_max_entries")  # a loaded object cannot be sized
        with pytest.raises(lb.DatapathClosed, match=r"was loaded: use what load\(\) returned"):
            opened.set_max_entries("iface_counters", 10)
    with pytest.raises(lb.DatapathClosed, match=r"object 'counter' is closed"):
        loaded.program("count_tc_ingress")


def test_unknown_program_names_the_ones_there_are(counter: Object) -> None:
    with pytest.raises(KeyError, match="count_tc_ingress"):
        counter.program("nope")


def test_unknown_shipped_object_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no shipped BPF object .nope.; available: .*counter"):
        objects.image("nope")


def test_garbage_elf_is_refused_with_the_libbpf_reason() -> None:
    from pyebpflb.errors import BpfError

    with pytest.raises(BpfError) as info:
        Object.open(b"\x7fELF this is not an object", "garbage")
    assert info.value.errno is not None and info.value.errno > 0
    assert "garbage" in str(info.value)
