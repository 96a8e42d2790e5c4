"""BPF maps: typed lookup, update, delete, iteration and batch operations.

A :class:`Map` is a file descriptor plus what is needed to read it: key and
value sizes, and optionally the C types (from ``csrc/include``) to decode them
into cffi structs. Keys and values may be given as ``bytes`` of the exact
size, as a cffi cdata of the right type, or, for typed maps, as anything
``ffi.new`` accepts (an ``int``, a ``dict`` of fields, a list).
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Iterator, Sequence
from typing import Any

from pyebpflb._bpf import fs
from pyebpflb._bpf._call import c_string, check, object_info
from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb._bpf.codec import Codec
from pyebpflb.errors import DatapathClosed, NotSupported


class MapType(enum.IntEnum):
    HASH = lib.BPF_MAP_TYPE_HASH
    ARRAY = lib.BPF_MAP_TYPE_ARRAY
    PERCPU_HASH = lib.BPF_MAP_TYPE_PERCPU_HASH
    PERCPU_ARRAY = lib.BPF_MAP_TYPE_PERCPU_ARRAY
    LRU_HASH = lib.BPF_MAP_TYPE_LRU_HASH
    LRU_PERCPU_HASH = lib.BPF_MAP_TYPE_LRU_PERCPU_HASH
    LPM_TRIE = lib.BPF_MAP_TYPE_LPM_TRIE
    RINGBUF = lib.BPF_MAP_TYPE_RINGBUF
    ARRAY_OF_MAPS = lib.BPF_MAP_TYPE_ARRAY_OF_MAPS
    HASH_OF_MAPS = lib.BPF_MAP_TYPE_HASH_OF_MAPS


class UpdateFlag(enum.IntEnum):
    """``flags`` of an update: create or replace, create only, replace only."""

    ANY = lib.BPF_ANY
    NOEXIST = lib.BPF_NOEXIST
    EXIST = lib.BPF_EXIST


_PERCPU = {MapType.PERCPU_HASH, MapType.PERCPU_ARRAY, MapType.LRU_PERCPU_HASH}


def possible_cpus() -> int:
    """Number of possible CPUs: the number of slots in a per-CPU value."""
    return check(lib.libbpf_num_possible_cpus(), "count possible CPUs")


class Map:
    """An open BPF map. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        fd: int,
        *,
        name: str,
        map_type: int,
        key_size: int,
        value_size: int,
        max_entries: int,
        key_type: str | None = None,
        value_type: str | None = None,
        flags: int = 0,
        owns_fd: bool = True,
    ) -> None:
        self._fd = fd
        self.name = name
        self.type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.flags = flags
        self._owns_fd = owns_fd
        self.percpu = map_type in _PERCPU
        codec = Codec(
            name, key_size, value_size, key_type, value_type, possible_cpus() if self.percpu else 0
        )
        self.key_type, self.value_type = codec.key_type, codec.value_type
        self._cpus, self._stride = codec.cpus, codec.stride
        self._key, self._value, self._pack = codec.key, codec.value, codec.pack
        self._decode, self._decode_value = codec.decode, codec.decode_value

    # -- construction -------------------------------------------------
    @classmethod
    def create(
        cls,
        map_type: MapType,
        *,
        key_size: int,
        value_size: int,
        max_entries: int,
        name: str = "",
        key_type: str | None = None,
        value_type: str | None = None,
        flags: int = 0,
    ) -> Map:
        """Create a new map in the kernel (not part of any object)."""
        opts = ffi.new("struct bpf_map_create_opts *")
        opts.sz = ffi.sizeof("struct bpf_map_create_opts")
        opts.map_flags = flags
        fd = check(
            lib.bpf_map_create(
                int(map_type), c_string(name[:15]), key_size, value_size, max_entries, opts
            ),
            f"create {map_type.name} map {name!r}",
        )
        return cls(
            fd,
            name=name,
            map_type=int(map_type),
            key_size=key_size,
            value_size=value_size,
            max_entries=max_entries,
            key_type=key_type,
            value_type=value_type,
            flags=flags,
        )

    @classmethod
    def from_fd(cls, fd: int, *, key_type: str | None = None, value_type: str | None = None) -> Map:
        """Wrap a map fd; the new object owns ``fd`` and closes it."""
        try:
            info = object_info(fd, "struct bpf_map_info", f"read info of map fd {fd}")
        except BaseException:
            os.close(fd)
            raise
        return cls(
            fd,
            name=ffi.string(info.name).decode(),
            map_type=info.type,
            key_size=info.key_size,
            value_size=info.value_size,
            max_entries=info.max_entries,
            key_type=key_type,
            value_type=value_type,
            flags=info.map_flags,
        )

    @classmethod
    def from_pinned(
        cls,
        path: str | os.PathLike[str],
        *,
        key_type: str | None = None,
        value_type: str | None = None,
    ) -> Map:
        """Open a map pinned on a bpffs at ``path``."""
        fd = check(lib.bpf_obj_get(c_string(os.fspath(path))), f"open pinned map {path}")
        return cls.from_fd(fd, key_type=key_type, value_type=value_type)

    @classmethod
    def from_id(cls, map_id: int, **types: str | None) -> Map:
        """Open a map by its kernel id (as shown by ``bpftool map``)."""
        fd = check(lib.bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")
        return cls.from_fd(fd, **types)

    # -- identity -------------------------------------------------------
    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise DatapathClosed(f"map {self.name!r} is closed")
        return self._fd

    @property
    def id(self) -> int:
        """The kernel's id of this map (as in ``bpftool map``)."""
        return fs.object_id(self.fd)

    def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin the map at ``path`` on a bpffs, so it outlives this process."""
        fs.pin(self.fd, path, f"map {self.name}")

    def unpin(self, path: str | os.PathLike[str]) -> None:
        """Remove this map's pin at ``path`` (the map lives on while it is open)."""
        fs.unpin(self.fd, path, f"map {self.name}")

    # -- element operations -----------------------------------------------
    def lookup(self, key: Any) -> Any:
        """The value for ``key``, or ``None`` when the key is absent.

        Per-CPU maps give a list with one value per possible CPU.
        """
        out = ffi.new("char[]", self._stride * self._cpus)
        ret = lib.bpf_map_lookup_elem(self.fd, self._key(key), out)
        if ret == -errno.ENOENT:
            return None
        check(ret, f"look up in map {self.name}")
        return self._decode_value(out, 0)

    def __getitem__(self, key: Any) -> Any:
        value = self.lookup(key)
        if value is None:
            raise KeyError(key)
        return value

    def update(self, key: Any, value: Any, flags: UpdateFlag = UpdateFlag.ANY) -> None:
        check(
            lib.bpf_map_update_elem(self.fd, self._key(key), self._value(value), int(flags)),
            f"update map {self.name}",
        )

    def __setitem__(self, key: Any, value: Any) -> None:
        self.update(key, value)

    def delete(self, key: Any) -> None:
        """Remove ``key``; :class:`KeyError` when it is absent."""
        ret = lib.bpf_map_delete_elem(self.fd, self._key(key))
        if ret == -errno.ENOENT:
            raise KeyError(key)
        check(ret, f"delete from map {self.name}")

    def __delitem__(self, key: Any) -> None:
        self.delete(key)

    def __contains__(self, key: Any) -> bool:
        return self.lookup(key) is not None

    def keys(self) -> Iterator[Any]:
        """Iterate the keys. Concurrent kernel writes may add or drop keys."""
        prev = ffi.NULL
        while True:
            nxt = ffi.new("char[]", self.key_size)
            ret = lib.bpf_map_get_next_key(self.fd, prev, nxt)
            if ret == -errno.ENOENT:
                return
            check(ret, f"iterate map {self.name}")
            yield self._decode(nxt, 0, self.key_size, self.key_type)
            prev = nxt

    __iter__ = keys

    def items(self) -> Iterator[tuple[Any, Any]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted between the two calls
                yield key, value

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    # -- batch operations ------------------------------------------------
    def update_batch(
        self, keys: Sequence[Any], values: Sequence[Any], flags: UpdateFlag = UpdateFlag.ANY
    ) -> None:
        """Write many entries in one system call (kernel >= 5.6)."""
        if len(keys) != len(values):
            raise ValueError(f"update_batch got {len(keys)} keys but {len(values)} values")
        if not keys:
            return
        key_buf = self._pack(keys, self.key_size, self._key)
        value_buf = self._pack(values, self._stride * self._cpus, self._value)
        count = ffi.new("__u32 *", len(keys))
        opts = _batch_opts(int(flags))
        self._batch_call(
            lib.bpf_map_update_batch(self.fd, key_buf, value_buf, count, opts), "update"
        )

    def update_batch_packed(self, keys: Any, values: Any, count: int) -> None:
        """Write ``count`` entries from already packed cdata arrays of keys and values
        (for large arrays, e.g. whole lookup tables, where encoding each is too slow)."""
        if ffi.sizeof(keys) < count * self.key_size or ffi.sizeof(values) < count * self._stride:
            raise ValueError(f"packed buffers for {count} entries of map {self.name} are short")
        done = ffi.new("__u32 *", count)
        self._batch_call(
            lib.bpf_map_update_batch(self.fd, keys, values, done, _batch_opts(0)), "update"
        )

    def delete_batch(self, keys: Sequence[Any]) -> None:
        """Remove many keys in one system call; all must exist."""
        if not keys:
            return
        key_buf = self._pack(keys, self.key_size, self._key)
        count = ffi.new("__u32 *", len(keys))
        ret = lib.bpf_map_delete_batch(self.fd, key_buf, count, _batch_opts(0))
        if ret == -errno.ENOENT:
            raise KeyError(f"{len(keys) - count[0]} of the keys are not in map {self.name}")
        self._batch_call(ret, "delete")

    def delete_batch_packed(self, keys: Any, count: int) -> None:
        """Remove ``count`` keys packed end to end in ``keys``; all must exist."""
        if ffi.sizeof(keys) < count * self.key_size:
            raise ValueError(f"packed keys for {count} entries of map {self.name} are short")
        done = ffi.new("__u32 *", count)
        ret = lib.bpf_map_delete_batch(self.fd, keys, done, _batch_opts(0))
        if ret == -errno.ENOENT:
            raise KeyError(f"{count - done[0]} of the keys are not in map {self.name}")
        self._batch_call(ret, "delete")

    def lookup_batch(self, chunk: int = 256) -> list[tuple[Any, Any]]:
        """Read all entries, ``chunk`` per system call."""
        result: list[tuple[Any, Any]] = []
        # The kernel's batch token is opaque; a key-sized buffer is large
        # enough for hash maps, and arrays use a 4-byte index.
        token_size = max(self.key_size, 4)
        in_batch = ffi.NULL
        out_batch = ffi.new("char[]", token_size)
        while True:
            keys = ffi.new("char[]", self.key_size * chunk)
            values = ffi.new("char[]", self._stride * self._cpus * chunk)
            count = ffi.new("__u32 *", chunk)
            ret = lib.bpf_map_lookup_batch(
                self.fd, in_batch, out_batch, keys, values, count, _batch_opts(0)
            )
            if ret < 0 and ret != -errno.ENOENT:
                self._batch_call(ret, "look up")
            for i in range(count[0]):
                key = self._decode(keys, i * self.key_size, self.key_size, self.key_type)
                value = self._decode_value(values, i * self._stride * self._cpus)
                result.append((key, value))
            if ret == -errno.ENOENT:  # the last chunk
                return result
            in_batch, out_batch = out_batch, ffi.new("char[]", token_size)

    def _batch_call(self, ret: int, what: str) -> None:
        if ret in (-_KERNEL_ENOTSUPP, -errno.EOPNOTSUPP):
            raise NotSupported(
                f"batch {what} on map {self.name} ({_type_name(self.type)}) is not supported "
                "by this kernel; use the per-element operations"
            )
        check(ret, f"batch {what} map {self.name}")

    # -- lifetime ------------------------------------------------------------
    def close(self) -> None:
        if self._fd >= 0 and self._owns_fd:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        kind = _type_name(self.type)
        return f"<Map {self.name!r} {kind} max_entries={self.max_entries} {state}>"


# The kernel's ENOTSUPP (524), which user space's errno module does not name.
_KERNEL_ENOTSUPP = 524


def _type_name(map_type: int) -> str:
    try:
        return MapType(map_type).name
    except ValueError:
        return f"type {map_type}"


def _batch_opts(elem_flags: int) -> Any:
    opts = ffi.new("struct bpf_map_batch_opts *")
    opts.sz = ffi.sizeof("struct bpf_map_batch_opts")
    opts.elem_flags = elem_flags
    return opts


__all__ = ["Map", "MapType", "UpdateFlag", "possible_cpus"]
