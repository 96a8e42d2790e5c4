"""What the running kernel supports, asked of the kernel itself (libbpf probes)."""

from __future__ import annotations

import functools

from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb._bpf.map import MapType
from pyebpflb._bpf.program import ProgramType
from pyebpflb.errors import NotSupported, from_errno


@functools.cache
def has_program_type(prog_type: ProgramType) -> bool:
    ret = lib.libbpf_probe_bpf_prog_type(int(prog_type), ffi.NULL)
    if ret < 0:
        raise from_errno(-ret, f"probe program type {prog_type.name}")
    return bool(ret)


@functools.cache
def has_map_type(map_type: MapType) -> bool:
    ret = lib.libbpf_probe_bpf_map_type(int(map_type), ffi.NULL)
    if ret < 0:
        raise from_errno(-ret, f"probe map type {map_type.name}")
    return bool(ret)


def require_program_type(prog_type: ProgramType) -> None:
    if not has_program_type(prog_type):
        raise NotSupported(f"this kernel cannot load {prog_type.name} programs")


def require_map_type(map_type: MapType) -> None:
    if not has_map_type(map_type):
        raise NotSupported(f"this kernel has no {map_type.name} maps")
