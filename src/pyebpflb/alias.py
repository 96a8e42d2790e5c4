"""Walker's alias method: a weighted choice in O(1) for the datapath.

A table of n slots, one per backend: the datapath draws a slot uniformly,
then a second number; below the slot's threshold (out of 2^32) it takes the
slot's own backend, else the slot's alias. Built with exact integer
arithmetic (Vose's construction), so the probabilities are the weights'
shares up to 2^-32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

ONE = 1 << 32


def alias_table(weights: Sequence[int]) -> list[tuple[int, int, int]]:
    """(own index, alias index, threshold) per slot, for positive ``weights``."""
    count = len(weights)
    if count == 0:
        return []
    if weights.count(weights[0]) == count and weights[0] > 0:
        return list(_equal(count))
    if any(w <= 0 for w in weights):
        raise ValueError(f"alias weights must be positive, got {list(weights)}")
    total = sum(weights)
    # Each slot holds `total` units of probability mass (out of count * total).
    mass = [w * count for w in weights]
    own = [total] * count
    alias = list(range(count))
    small = [i for i, m in enumerate(mass) if m < total]
    large = [i for i, m in enumerate(mass) if m >= total]
    while small and large:
        short, tall = small.pop(), large.pop()
        own[short] = mass[short]
        alias[short] = tall
        mass[tall] -= total - mass[short]
        (small if mass[tall] < total else large).append(tall)
    return [
        (i, alias[i], min(ONE - 1, own[i] * ONE // total)) if own[i] < total else (i, i, ONE - 1)
        for i in range(count)
    ]


def shares(table: Sequence[tuple[int, int, int]], count: int) -> list[float]:
    """The probability of each index under ``table`` (for tests and reports)."""
    result = [0.0] * count
    for own, alias, threshold in table:
        result[own] += threshold / ONE / len(table)
        result[alias] += (ONE - threshold) / ONE / len(table)
    return result


@functools.lru_cache(maxsize=256)
def _equal(count: int) -> tuple[tuple[int, int, int], ...]:
    """Equal weights (the common case): every slot is its own, always."""
    return tuple((i, i, ONE - 1) for i in range(count))
