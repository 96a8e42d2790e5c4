"""Map CRUD, iteration and batch operations on real kernel maps."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyebpflb._bpf import Map, MapType, Object, UpdateFlag, possible_cpus
from pyebpflb.errors import BpfError, MapFull, NotSupported

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel


@pytest.fixture
def hash_map() -> Iterator[Map]:
    with Map.create(
        MapType.HASH,
        key_size=8,
        value_size=16,
        max_entries=64,
        name="test_hash",
        key_type="struct pyebpflb_counter_key",
        value_type="struct pyebpflb_counter_value",
    ) as created:
        yield created


def key(ifindex: int) -> dict[str, int]:
    return {"ifindex": ifindex, "hook": 1}


def test_update_then_lookup_returns_the_struct(hash_map: Map) -> None:
    hash_map.update(key(7), {"packets": 3, "bytes": 300})
    value = hash_map.lookup(key(7))
    assert (value.packets, value.bytes) == (3, 300)


def test_lookup_of_absent_key_is_none_and_getitem_raises(hash_map: Map) -> None:
    assert hash_map.lookup(key(1)) is None
    with pytest.raises(KeyError):
        hash_map[key(1)]


def test_noexist_refuses_to_overwrite_and_exist_refuses_to_create(hash_map: Map) -> None:
    hash_map[key(1)] = {"packets": 1}
    with pytest.raises(BpfError) as exists:
        hash_map.update(key(1), {"packets": 2}, UpdateFlag.NOEXIST)
    assert exists.value.errno == 17  # EEXIST
    with pytest.raises(BpfError) as missing:
        hash_map.update(key(2), {"packets": 2}, UpdateFlag.EXIST)
    assert missing.value.errno == 2  # ENOENT
    assert hash_map[key(1)].packets == 1


def test_delete_removes_and_absent_delete_raises_keyerror(hash_map: Map) -> None:
    hash_map[key(1)] = {"packets": 1}
    del hash_map[key(1)]
    assert key(1) not in hash_map
    with pytest.raises(KeyError):
        hash_map.delete(key(1))


def test_iteration_sees_every_key_once(hash_map: Map) -> None:
    for i in range(1, 11):
        hash_map[key(i)] = {"packets": i, "bytes": 0}
    seen = {(k.ifindex, v.packets) for k, v in hash_map.items()}
    assert seen == {(i, i) for i in range(1, 11)}
    assert len(hash_map) == 10


def test_full_map_raises_mapfull_and_keeps_its_entries() -> None:
    with Map.create(
        MapType.HASH, key_size=4, value_size=4, max_entries=2, key_type="__u32", value_type="__u32"
    ) as small:
        small[1] = 10
        small[2] = 20
        with pytest.raises(MapFull):
            small[3] = 30
        assert dict(small.items()) == {1: 10, 2: 20}


def test_bytes_keys_must_have_the_exact_size(hash_map: Map) -> None:
    with pytest.raises(ValueError, match="key for map test_hash must be 8 bytes, got 3"):
        hash_map.lookup(b"abc")


def test_untyped_map_takes_and_gives_bytes() -> None:
    with Map.create(MapType.HASH, key_size=4, value_size=2, max_entries=4) as raw:
        raw[b"abcd"] = b"xy"
        assert raw[b"abcd"] == b"xy"
        assert list(raw.keys()) == [b"abcd"]


def test_a_type_that_does_not_fit_the_map_is_refused() -> None:
    with pytest.raises(ValueError, match="is 16 bytes but the key of map m is 4 bytes"):
        Map.create(
            MapType.HASH,
            key_size=4,
            value_size=4,
            max_entries=1,
            name="m",
            key_type="struct pyebpflb_counter_value",
        )


def test_batch_update_lookup_delete(hash_map: Map) -> None:
    keys = [key(i) for i in range(1, 41)]
    values = [{"packets": i, "bytes": 2 * i} for i in range(1, 41)]
    hash_map.update_batch(keys, values)
    got = {k.ifindex: (v.packets, v.bytes) for k, v in hash_map.lookup_batch(chunk=16)}
    assert got == {i: (i, 2 * i) for i in range(1, 41)}
    hash_map.delete_batch(keys[:30])
    assert sorted(k.ifindex for k in hash_map) == list(range(31, 41))


def test_batch_delete_of_absent_keys_raises_keyerror(hash_map: Map) -> None:
    with pytest.raises(KeyError):
        hash_map.delete_batch([key(99)])


def test_percpu_values_come_back_one_per_cpu(counter: Object) -> None:
    counters = counter.map("iface_counters")
    cpus = possible_cpus()
    counters.update(key(5), [{"packets": cpu, "bytes": 0} for cpu in range(cpus)])
    assert [v.packets for v in counters[key(5)]] == list(range(cpus))
    with pytest.raises(ValueError, match=f"needs {cpus} values"):
        counters.update(key(5), [{"packets": 1}] * (cpus + 1))


def test_batch_on_a_ring_buffer_is_not_supported(counter: Object) -> None:
    with pytest.raises(NotSupported, match="counter_events"):
        counter.map("counter_events").lookup_batch()
