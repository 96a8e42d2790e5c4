"""Codecs that pack bytes (pyebpflb.packing): the bytes are what cffi lays out from
lb.h, and a codec whose fields differ from the header's is refused. Pure."""

from __future__ import annotations

import socket

import pytest

import pyebpflb as lb
from pyebpflb import maps
from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb.packing import LayoutMismatch, Packer


def cdata_bytes(ctype: str, fields: dict[str, object]) -> bytes:
    value = ffi.new(f"{ctype} *", fields)
    return bytes(ffi.buffer(value))


def test_a_backend_packs_as_the_header_lays_it_out() -> None:
    backend = lb.Backend("10.0.1.7", 8080, weight=3, state="terminating")
    packed = maps.backend_value(backend, service_id=9, position=2, usable=True, gens=3)
    expected = ffi.new("struct pyebpflb_backend *")
    ffi.memmove(expected.addr.bytes, bytes([10, 0, 1, 7]), 4)
    expected.port = socket.htons(8080)
    expected.family = lib.PYEBPFLB_IPV4
    expected.state = lib.PYEBPFLB_BACKEND_TERMINATING
    expected.service_id, expected.weight, expected.position, expected.usable = 9, 3, 2, 1
    expected.gens = 3
    assert packed == bytes(ffi.buffer(expected))


def test_service_keys_entries_and_slots_pack_as_cffi_does() -> None:
    svc = lb.Service("fd00::10", 443, protocol="udp", scheduler="maglev", affinity_timeout=30)
    key = ffi.from_buffer("struct pyebpflb_service_key *", maps.service_key(svc))
    assert bytes(ffi.buffer(key.vip.bytes, 16)) == svc.vip.packed
    assert (key.proto, key.family) == (17, lib.PYEBPFLB_IPV6)
    entry = maps.service_entry(5, 3, 1, svc)
    assert entry == cdata_bytes(
        "struct pyebpflb_service",
        {"id": 5, "count": 3, "gen": 1, "flags": lib.PYEBPFLB_SERVICE_MAGLEV,
         "affinity_timeout_s": 30},
    )  # fmt: skip
    keys, values = maps.slot_entries(5, 1, [(0, 1, 7), (1, 1, 2**32 - 1)], [11, 12])
    assert keys == cdata_bytes(
        "struct pyebpflb_slot_key", {"service_id": 5, "slot": (1 << 31) | 1}
    ) + cdata_bytes("struct pyebpflb_slot_key", {"service_id": 5, "slot": (1 << 31) | 2})
    assert values[:12] == cdata_bytes(
        "struct pyebpflb_slot", {"backend_id": 11, "alias_id": 12, "threshold": 7}
    )


def test_a_codec_naming_fields_out_of_order_is_refused() -> None:
    with pytest.raises(LayoutMismatch, match=r"has fields \['backend_id', 'alias_id'"):
        Packer("struct pyebpflb_slot", "alias_id", "backend_id", "threshold")
