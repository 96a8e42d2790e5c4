"""Between Python values and the bytes of a map's keys and values: bytes, cdata,
ints, typed structs (from BTF), per-CPU values, and batches packed end to end."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from pyebpflb._bpf._libbpf import ffi

_LITTLE = ffi.cast("__u16 *", ffi.new("char[]", b"\x01\x00"))[0] == 1


class Codec:
    """The encoding of one map's keys and values. ``cpus`` > 0: a per-CPU map, whose
    values hold one slot per possible CPU, each 8-byte aligned."""

    def __init__(
        self,
        name: str,
        key_size: int,
        value_size: int,
        key_type: str | None,
        value_type: str | None,
        cpus: int,
    ) -> None:
        self.name = name
        self.key_size = key_size
        self.value_size = value_size
        self.key_type = _checked_type(key_type, key_size, name, "key")
        self.value_type = _checked_type(value_type, value_size, name, "value")
        self.percpu = cpus > 0
        self.cpus = cpus if self.percpu else 1
        self.stride = (value_size + 7) & ~7 if self.percpu else value_size

    def key(self, key: Any) -> Any:
        return self.encode(key, self.key_size, self.key_type, "key")

    def value(self, value: Any) -> Any:
        if not self.percpu:
            return self.encode(value, self.value_size, self.value_type, "value")
        # A per-CPU update writes every CPU's slot: a list gives one value per
        # CPU, a single value is copied to all of them.
        per_cpu = value if isinstance(value, list) else [value] * self.cpus
        if len(per_cpu) != self.cpus:
            raise ValueError(
                f"per-CPU map {self.name} needs {self.cpus} values (one per possible CPU), "
                f"got {len(per_cpu)}"
            )
        buf = ffi.new("char[]", self.stride * self.cpus)
        for cpu, item in enumerate(per_cpu):
            encoded = self.encode(item, self.value_size, self.value_type, "value")
            ffi.memmove(buf + cpu * self.stride, encoded, self.value_size)
        return buf

    def encode(self, obj: Any, size: int, ctype: str | None, what: str) -> Any:
        if isinstance(obj, (bytes, bytearray)):
            if len(obj) != size:
                raise ValueError(f"{what} for map {self.name} must be {size} bytes, got {len(obj)}")
            return ffi.from_buffer(obj)
        if isinstance(obj, ffi.CData):
            ctype_of = ffi.typeof(obj)
            pointer = ctype_of.kind == "pointer"
            actual = ffi.sizeof(ctype_of.item) if pointer else ffi.sizeof(obj)
            if actual != size:
                raise ValueError(
                    f"{what} for map {self.name} must be {size} bytes, got a {actual}-byte "
                    f"{ctype_of.cname}"
                )
            return obj if pointer else ffi.addressof(obj)
        if ctype is not None:
            return ffi.new(f"{ctype} *", obj)
        if isinstance(obj, int):
            return ffi.from_buffer(obj.to_bytes(size, "little" if _LITTLE else "big"))
        raise TypeError(
            f"{what} for untyped map {self.name} must be bytes or int, got {type(obj).__name__}"
        )

    def pack(self, items: Iterable[Any], size: int, encode: Any) -> Any:
        items = list(items)
        # Already packed (pyebpflb.packing): one join, no cffi call per item.
        if items and type(items[0]) is bytes and all(len(i) == size for i in items):
            with contextlib.suppress(TypeError):  # not all bytes after all
                return ffi.from_buffer(b"".join(items))
        buf = ffi.new("char[]", size * len(items))
        # Batches are usually cdata pointers of one type, of exactly the element
        # size: checked once by type, they are copied without encoding each.
        fast = _pointer_of_size(items[0], size) if items else None
        for i, item in enumerate(items):
            if fast is None or ffi.typeof(item) is not fast:
                item = encode(item)
            ffi.memmove(buf + i * size, item, size)
        return buf

    def decode(self, buf: Any, offset: int, size: int, ctype: str | None) -> Any:
        if ctype is None:
            return bytes(ffi.buffer(buf + offset, size))
        out = ffi.new(f"{ctype} *")
        ffi.memmove(out, buf + offset, size)
        kind = ffi.typeof(out).item.kind
        return out[0] if kind == "primitive" else out

    def decode_value(self, buf: Any, offset: int) -> Any:
        if not self.percpu:
            return self.decode(buf, offset, self.value_size, self.value_type)
        return [
            self.decode(buf, offset + cpu * self.stride, self.value_size, self.value_type)
            for cpu in range(self.cpus)
        ]


def _checked_type(ctype: str | None, size: int, name: str, what: str) -> str | None:
    if ctype is None:
        return None
    try:
        actual = ffi.sizeof(ctype)
    except ffi.error as exc:
        raise ValueError(f"unknown C type {ctype!r} for the {what} of map {name}") from exc
    if actual != size:
        raise ValueError(
            f"C type {ctype!r} is {actual} bytes but the {what} of map {name} is {size} bytes"
        )
    return ctype


def _pointer_of_size(item: Any, size: int) -> Any:
    """The cdata pointer type of ``item`` if it points at exactly ``size`` bytes."""
    if not isinstance(item, ffi.CData):
        return None
    kind = ffi.typeof(item)
    if kind.kind != "pointer" or kind.item.kind not in ("struct", "primitive"):
        return None
    return kind if ffi.sizeof(kind.item) == size else None
