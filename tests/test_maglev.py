"""Maglev tables: the properties the paper promises, checked on built tables."""

from __future__ import annotations

import collections
import hashlib
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyebpflb import Backend, maglev

M = 16381


def backends(count: int, start: int = 1) -> list[Backend]:
    return [Backend(f"10.{i // 250}.{i % 250 + 1}.9", 8080) for i in range(start, start + count)]


@settings(max_examples=40, deadline=None)
@given(count=st.integers(min_value=1, max_value=150), size=st.sampled_from([251, 2039, M]))
def test_every_slot_is_filled(count: int, size: int) -> None:
    table = maglev.build(backends(count), size)
    assert len(table) == size and min(table) >= 0 and max(table) < count


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.integers(min_value=1, max_value=65535), min_size=1, max_size=160))
def test_each_backend_gets_its_weighted_share_within_one_percent(weights: list[int]) -> None:
    size = M if len(weights) * 100 < M else 131071
    counts = collections.Counter(maglev.build(backends(len(weights)), size, weights))
    total = sum(weights)
    for index, weight in enumerate(weights):
        ideal = size * weight / total
        # 1% of the ideal, or the rounding of the last round (two slots).
        assert abs(counts[index] - ideal) <= max(0.01 * ideal, 2), (index, counts[index], ideal)


def test_weight_zero_gets_no_slot() -> None:
    counts = collections.Counter(maglev.build(backends(3), 251, [1, 0, 2]))
    assert counts[1] == 0 and counts[0] + counts[2] == 251


@settings(max_examples=30, deadline=None)
@given(count=st.integers(min_value=2, max_value=100), data=st.data())
def test_removing_a_backend_moves_its_slots_and_at_most_two_percent_of_the_others(
    count: int, data: st.DataObject
) -> None:
    members = backends(count)
    gone = data.draw(st.integers(min_value=0, max_value=count - 1))
    before = [members[i] for i in maglev.build(members, M)]
    rest = members[:gone] + members[gone + 1 :]
    after = [rest[i] for i in maglev.build(rest, M)]
    others = [(b, a) for b, a in zip(before, after, strict=True) if b != members[gone]]
    moved = sum(1 for b, a in others if b != a)
    assert all(a != members[gone] for a in after)
    assert moved <= 0.02 * len(others), f"{moved} of {len(others)} other slots moved"


def test_the_same_backends_give_the_same_table_in_another_process() -> None:
    code = textwrap.dedent(
        """
        import hashlib
        from pyebpflb import Backend, maglev
        members = [Backend(f"10.0.0.{i}", 80) for i in range(1, 11)]
        table = maglev.build(members, 16381, list(range(1, 11)))
        print(hashlib.sha256(repr(table).encode()).hexdigest())
        """
    )
    members = [Backend(f"10.0.0.{i}", 80) for i in range(1, 11)]
    here = hashlib.sha256(repr(maglev.build(members, M, list(range(1, 11)))).encode()).hexdigest()
    there = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    assert here == there


@pytest.mark.parametrize(
    ("size", "weights", "message"),
    [
        (16384, None, r"one of 251, 509, .* 131071; got 16384"),
        (True, None, "got True"),
        (251, [1, 1], "3 backends but 2 weights"),
        (251, [1, -1, 1], "from 0 to 65535, got -1"),
        (251, [1, 70000, 1], "got 70000"),
    ],
)
def test_bad_table_sizes_and_weights_are_named(
    size: object, weights: list[int] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        maglev.build(backends(3), size, weights)  # type: ignore[arg-type]
