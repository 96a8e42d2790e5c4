"""Maglev lookup tables (Eisenbud et al., NSDI 2016), with weights.

A table of M slots (M prime) maps a flow's hash to a backend. Each backend
walks its own permutation of the slots, ``offset + j * skip (mod M)``, taking
turns to claim free slots; the permutation comes from a stable hash of the
backend's address and port, so the same backends give the same table in any
process on any host, and several load balancers agree on every flow. When a
backend leaves, mostly its own slots change hands.

The population loop runs in C (``csrc/maglev/maglev.c``): Python would need
tens of seconds for a thousand services at M=16381.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb.model import Backend

# The table sizes a datapath accepts: primes, each about twice the last.
TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
DEFAULT_TABLE_SIZE = 16381


def check_table_size(size: object) -> int:
    if isinstance(size, bool) or size not in TABLE_SIZES:
        allowed = ", ".join(str(s) for s in TABLE_SIZES)
        raise ValueError(f"maglev table size must be one of {allowed}; got {size!r}")
    assert isinstance(size, int)
    return size


def permutation(backend: Backend, size: int) -> tuple[int, int]:
    """(offset, skip) of ``backend``'s walk over a table of ``size`` slots.

    BLAKE2b of the packed address and the port: stable across processes,
    hosts and Python versions (unlike ``hash()``).
    """
    digest = hashlib.blake2b(
        backend.address.packed + backend.port.to_bytes(2, "big"), digest_size=16
    ).digest()
    first, second = int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")
    return first % size, second % (size - 1) + 1


def build(
    backends: Sequence[Backend], size: int, weights: Sequence[int] | None = None
) -> list[int]:
    """The table: for each slot, the index in ``backends`` of its backend.

    ``weights`` (0-65535, default 1 each) share the slots in proportion; a
    backend of weight 0 gets none. Slots are -1 when no backend has weight.
    """
    check_table_size(size)
    count = len(backends)
    weights = [1] * count if weights is None else list(weights)
    if len(weights) != count:
        raise ValueError(f"{count} backends but {len(weights)} weights")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 65535:
            raise ValueError(f"a weight must be an integer from 0 to 65535, got {weight!r}")
    walks = [permutation(b, size) for b in backends]
    table = ffi.new("int32_t[]", size)
    lib.pyebpflb_maglev_fill(
        ffi.new("uint32_t[]", [w[0] for w in walks] or [0]),
        ffi.new("uint32_t[]", [w[1] for w in walks] or [0]),
        ffi.new("uint32_t[]", weights or [0]),
        count,
        size,
        table,
        ffi.new("uint32_t[]", max(count, 1)),
        ffi.new("uint64_t[]", max(count, 1)),
    )
    return list(table)
