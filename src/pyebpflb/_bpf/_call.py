"""Turning libbpf's return conventions into exceptions."""

from __future__ import annotations

from typing import Any

from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb.errors import from_errno


def check(ret: int, operation: str) -> int:
    """libbpf 1.x returns ``-errno`` from int functions; raise on it."""
    if ret < 0:
        raise from_errno(-ret, operation)
    return ret


def check_ptr(ptr: Any, operation: str) -> Any:
    """libbpf 1.x returns NULL and sets errno from pointer functions."""
    if ptr == ffi.NULL:
        raise from_errno(ffi.errno, operation)
    return ptr


def c_string(text: str) -> Any:
    """A NUL-terminated copy of ``text`` owned by the returned cdata."""
    return ffi.new("char[]", text.encode())


def object_info(fd: int, ctype: str, operation: str, info: Any = None) -> Any:
    """The kernel's ``ctype`` (struct bpf_map_info, bpf_prog_info) for ``fd``.

    Pass ``info`` pre-filled to ask for more (a program's map ids).
    """
    info = ffi.new(f"{ctype} *") if info is None else info
    size = ffi.new("__u32 *", ffi.sizeof(ctype))
    check(lib.bpf_obj_get_info_by_fd(fd, info, size), operation)
    return info
