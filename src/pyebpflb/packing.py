"""Packing map keys and values into bytes without a cffi call per field.

A :class:`Packer` is a :class:`struct.Struct` whose format is derived from the
C type's layout as cffi knows it (from ``csrc/include/pyebpflb/lb.h``): field
offsets, sizes and padding come from the header, never restated. Packing a
value is one C call; a batch of them is ``b"".join`` and one system call
(``Map.update_batch``). Programming 100,000 services writes 800,000 entries,
and a cffi ``ffi.new`` plus field stores per entry cost more than the kernel.

Pure: importing this needs the compiled binding but no kernel.
"""

from __future__ import annotations

import functools
import struct

from pyebpflb._bpf._libbpf import ffi

# struct's codes for the fixed-size integers of the headers (native byte order).
_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


class LayoutMismatch(Exception):
    """The fields a codec packs are not the C type's fields, in order."""


class Packer:
    """Packs the named fields of ``ctype`` positionally, in the order given.

    ``fields`` must be every field of the type except those starting with ``_``
    (padding, left zero), in header order: a codec states which value goes into
    which field, and a header change that moves fields fails at import with
    :class:`LayoutMismatch` instead of writing garbage. Integer fields take an
    ``int``; arrays and unions take ``bytes`` of at most their size (zero-padded).
    """

    def __init__(self, ctype: str, *fields: str) -> None:
        kind = ffi.typeof(ctype)
        layout = [(name, f) for name, f in kind.fields if not name.startswith("_")]
        if tuple(name for name, _ in layout) != fields:
            raise LayoutMismatch(
                f"{ctype} has fields {[n for n, _ in layout]}, the codec packs {list(fields)}"
            )
        fmt, at = "=", 0
        for _, field in layout:
            if field.offset > at:
                fmt += f"{field.offset - at}x"
            size = ffi.sizeof(field.type)
            primitive = field.type.kind == "primitive"
            fmt += _CODES[size] if primitive else f"{size}s"
            at = field.offset + size
        total = ffi.sizeof(kind)
        if total > at:
            fmt += f"{total - at}x"
        self.ctype = ctype
        self.fields = fields
        self._struct = struct.Struct(fmt)
        if self._struct.size != total:  # pragma: no cover - cffi and struct disagree
            raise LayoutMismatch(f"{ctype}: format {fmt} packs {self._struct.size} of {total}")
        self.pack = self._struct.pack
        self.size = total

    def __repr__(self) -> str:
        return f"<Packer {self.ctype} {self._struct.format!r}>"


U32 = struct.Struct("=I")


def u32(value: int) -> bytes:
    """A ``__u32`` key or value."""
    return U32.pack(value)


@functools.lru_cache(maxsize=64)
def _u32_array(count: int) -> struct.Struct:
    return struct.Struct(f"={count}I")


def u32s(values: list[int]) -> bytes:
    """``__u32`` keys or values packed end to end."""
    return _u32_array(len(values)).pack(*values)
