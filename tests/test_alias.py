"""The alias table behind weighted choice: exact shares."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyebpflb.alias import ONE, alias_table, shares


@given(st.lists(st.integers(min_value=1, max_value=65535), min_size=1, max_size=300))
def test_each_index_is_chosen_with_its_weights_share(weights: list[int]) -> None:
    table = alias_table(weights)
    assert len(table) == len(weights)
    total = sum(weights)
    for index, share in enumerate(shares(table, len(weights))):
        assert share == pytest.approx(weights[index] / total, abs=len(weights) / ONE + 1e-12)
    assert all(0 <= threshold < ONE for _, _, threshold in table)


def test_equal_weights_never_use_an_alias() -> None:
    assert alias_table([3, 3, 3]) == [(0, 0, ONE - 1), (1, 1, ONE - 1), (2, 2, ONE - 1)]


def test_no_weights_no_slots_and_zero_weights_are_refused() -> None:
    assert alias_table([]) == []
    with pytest.raises(ValueError, match=r"positive, got \[1, 0\]"):
        alias_table([1, 0])
