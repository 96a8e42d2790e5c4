"""BPF objects: open an ELF from memory (:class:`OpenObject`), configure its maps,
load it (:class:`LoadedObject`)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping
from typing import Any

import attrs

from pyebpflb._bpf import fs, log
from pyebpflb._bpf._call import c_string, check
from pyebpflb._bpf._libbpf import ffi, lib
from pyebpflb._bpf.map import Map
from pyebpflb._bpf.program import Program
from pyebpflb.errors import (
    BpfError,
    DatapathClosed,
    LoadError,
    MissingPrivilege,
    VerifierError,
)


@attrs.frozen
class MapSpec:
    """What a map of an opened object will be: compared with a map it is to reuse."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int

    def differences(self, existing: Map) -> list[str]:
        """How ``existing`` differs from this spec, in words (empty: compatible).
        max_entries is not compared: a datapath keeps the size it was made with."""
        found = []
        for field, have in (
            ("type", existing.type),
            ("key_size", existing.key_size),
            ("value_size", existing.value_size),
            ("flags", existing.flags),
        ):
            want = getattr(self, field)
            if have != want:
                found.append(f"{self.name}: {field} {have}, this version needs {want}")
        return found


class OpenObject:
    """A BPF object file, opened from bytes and not loaded yet: its maps can be sized,
    pinned or replaced by existing maps. :meth:`load` consumes it and returns the
    :class:`LoadedObject`; this one is of no further use (as in libbpf-rs, where
    ``OpenObject::load`` takes ``self``), so "used before load" cannot be written.
    """

    def __init__(self, obj: Any, name: str, buffer: Any) -> None:
        self._obj = obj
        self.name = name
        # libbpf keeps pointers into the ELF image until close.
        self._buffer = buffer
        self._keep: list[Any] = []
        self._types: dict[str, tuple[int, int]] = {}  # reused maps: this object's BTF type ids
        self.pin_dir: str | None = None

    @classmethod
    def open(
        cls, data: bytes, name: str, *, pin_dir: str | os.PathLike[str] | None = None
    ) -> OpenObject:
        """Open the ELF image ``data``; nothing reaches the kernel yet.

        With ``pin_dir``, every map of the object is pinned there by name on
        load, and a map already pinned there is reused instead of created.
        """
        buffer = ffi.from_buffer(data)
        opts = ffi.new("struct bpf_object_open_opts *")
        opts.sz = ffi.sizeof("struct bpf_object_open_opts")
        object_name = c_string(name)
        opts.object_name = object_name
        with log.capture() as lines:
            obj = lib.bpf_object__open_mem(buffer, len(data), opts)
        if obj == ffi.NULL:
            err = ffi.errno
            said = " ".join(line.strip() for line in lines[-3:])
            raise BpfError(err, f"open BPF object {name!r}", f"libbpf said: {said}" if said else "")
        self = cls(obj, name, buffer)
        self._keep.append(object_name)
        if pin_dir is not None:
            try:
                self._set_pin_dir(os.fspath(pin_dir))
            except BaseException:
                self.close()
                raise
        return self

    def _set_pin_dir(self, pin_dir: str) -> None:
        self.pin_dir = pin_dir
        for bpf_map in _libbpf_maps(self._live()):
            if not lib.bpf_map__is_internal(bpf_map):
                path = os.path.join(pin_dir, _map_name(bpf_map))
                check(lib.bpf_map__set_pin_path(bpf_map, c_string(path)), f"set pin path {path}")

    def _live(self) -> Any:
        if self._obj is None:
            raise DatapathClosed(
                f"object {self.name!r} is closed or was loaded: use what load() returned"
            )
        return self._obj

    def _libbpf_map(self, name: str) -> Any:
        for bpf_map in _libbpf_maps(self._live()):
            if _map_name(bpf_map) == name:
                return bpf_map
        known = ", ".join(sorted(self.map_names()))
        raise KeyError(f"object {self.name!r} has no map {name!r}; it has: {known}")

    def map_names(self) -> list[str]:
        return [_map_name(m) for m in _libbpf_maps(self._live())]

    def map_spec(self, name: str) -> MapSpec:
        bpf_map = self._libbpf_map(name)
        return MapSpec(
            name,
            lib.bpf_map__type(bpf_map),
            lib.bpf_map__key_size(bpf_map),
            lib.bpf_map__value_size(bpf_map),
            lib.bpf_map__max_entries(bpf_map),
            lib.bpf_map__map_flags(bpf_map),
        )

    def set_max_entries(self, map_name: str, max_entries: int) -> None:
        """Size a map before load."""
        if max_entries < 1:
            raise ValueError(
                f"max_entries of map {map_name!r} must be at least 1, got {max_entries}"
            )
        check(
            lib.bpf_map__set_max_entries(self._libbpf_map(map_name), max_entries),
            f"set max_entries of map {map_name}",
        )

    def reuse_map(self, map_name: str, existing: Map) -> None:
        """Use ``existing`` (e.g. a pinned map) instead of creating ``map_name``. The map
        keeps this object's key and value types: libbpf takes the BTF type ids of the
        reused map's creator, which another build numbers differently."""
        libbpf_map = self._libbpf_map(map_name)
        self._types[map_name] = (
            lib.bpf_map__btf_key_type_id(libbpf_map),
            lib.bpf_map__btf_value_type_id(libbpf_map),
        )
        check(
            lib.bpf_map__reuse_fd(self._libbpf_map(map_name), existing.fd),
            f"reuse map fd {existing.fd} for {map_name}",
        )

    def load(self) -> LoadedObject:
        """Load every program and create (or reuse) every map. On success the
        returned object owns everything; on failure this one is closed."""
        obj = self._live()
        try:
            if self.pin_dir is not None:
                fs.ensure_bpffs(os.path.dirname(self.pin_dir.rstrip("/")) or "/")
                os.makedirs(self.pin_dir, mode=0o700, exist_ok=True)
            with log.capture() as lines:
                ret = lib.bpf_object__load(obj)
            if ret < 0:
                raise _load_error(-ret, self.name, "".join(lines))
        except BaseException:
            self.close()
            raise
        self._obj = None
        return LoadedObject(obj, self.name, self._buffer, self._keep, self.pin_dir, self._types)

    def close(self) -> None:
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> OpenObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "opened" if self._obj is not None else "closed or loaded"
        return f"<OpenObject {self.name!r} {state}>"


class LoadedObject:
    """A loaded BPF object: its programs and maps are in the kernel, reachable through
    :attr:`programs` and :attr:`maps`. Closing it closes its fds: programs stay in
    the kernel only while something else holds them (a tc filter, an XDP hook, a pin).
    """

    def __init__(
        self,
        obj: Any,
        name: str,
        buffer: Any,
        keep: list[Any],
        pin_dir: str | None,
        types: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        self._obj = obj
        self.name = name
        self._buffer = buffer
        self._keep = keep
        self.pin_dir = pin_dir
        btf = lib.bpf_object__btf(obj)
        self.maps: dict[str, Map] = {}
        for bpf_map in _libbpf_maps(obj):
            map_name = _map_name(bpf_map)
            key_size, value_size = lib.bpf_map__key_size(bpf_map), lib.bpf_map__value_size(bpf_map)
            key_id, value_id = (types or {}).get(
                map_name,
                (lib.bpf_map__btf_key_type_id(bpf_map), lib.bpf_map__btf_value_type_id(bpf_map)),
            )
            self.maps[map_name] = Map(
                lib.bpf_map__fd(bpf_map),
                name=map_name,
                map_type=lib.bpf_map__type(bpf_map),
                key_size=key_size,
                value_size=value_size,
                max_entries=lib.bpf_map__max_entries(bpf_map),
                key_type=_c_type(btf, key_id, key_size),
                value_type=_c_type(btf, value_id, value_size),
                flags=lib.bpf_map__map_flags(bpf_map),
                owns_fd=False,
            )
        self.programs: dict[str, Program] = {}
        prog = lib.bpf_object__next_program(obj, ffi.NULL)
        while prog != ffi.NULL:
            prog_name = ffi.string(lib.bpf_program__name(prog)).decode()
            self.programs[prog_name] = Program(
                lib.bpf_program__fd(prog),
                prog_name,
                ffi.string(lib.bpf_program__section_name(prog)).decode(),
                lib.bpf_program__type(prog),
                prog,
            )
            prog = lib.bpf_object__next_program(obj, prog)

    def unpin_maps(self) -> None:
        """Remove the pins this object's maps have under ``pin_dir`` (and the folder, if empty)."""
        if self.pin_dir is None:
            return
        for bpf_map in _libbpf_maps(self._live()):
            if lib.bpf_map__is_pinned(bpf_map):
                check(lib.bpf_map__unpin(bpf_map, ffi.NULL), f"unpin map {_map_name(bpf_map)}")
        with contextlib.suppress(OSError):  # not empty: somebody else pinned there too
            os.rmdir(self.pin_dir)

    def _live(self) -> Any:
        if self._obj is None:
            raise DatapathClosed(f"object {self.name!r} is closed")
        return self._obj

    def program(self, name: str) -> Program:
        self._live()
        try:
            return self.programs[name]
        except KeyError:
            raise KeyError(_missing("program", name, self.name, self.programs)) from None

    def map(self, name: str) -> Map:
        try:
            return self.maps[name]
        except KeyError:
            self._live()
            raise KeyError(_missing("map", name, self.name, self.maps)) from None

    @property
    def closed(self) -> bool:
        return self._obj is None

    def close(self) -> None:
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
            self._obj = None
            for bpf_map in self.maps.values():
                bpf_map.close()
            self.maps = {}
            self.programs = {}

    def __enter__(self) -> LoadedObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._obj is None else "loaded"
        return (
            f"<LoadedObject {self.name!r} {state} programs={list(self.programs)} "
            f"maps={list(self.maps)}>"
        )


# The name most code opens objects by: an object starts opened.
Object = OpenObject


def _libbpf_maps(obj: Any) -> list[Any]:
    result = []
    bpf_map = lib.bpf_object__next_map(obj, ffi.NULL)
    while bpf_map != ffi.NULL:
        result.append(bpf_map)
        bpf_map = lib.bpf_object__next_map(obj, bpf_map)
    return result


def _map_name(bpf_map: Any) -> str:
    return str(ffi.string(lib.bpf_map__name(bpf_map)).decode())


def _load_error(err: int, name: str, text: str) -> BpfError:
    operation = f"load BPF object {name!r}"
    if err == errno.EPERM:
        return MissingPrivilege(err, operation)
    # libbpf frames the verifier's output with these markers.
    if "BEGIN PROG LOAD LOG" in text or "program load failed" in text:
        return VerifierError(err, operation, text)
    return LoadError(err, operation, text)


def _missing(kind: str, name: str, obj: str, known: Mapping[str, object]) -> str:
    return f"object {obj!r} has no {kind} {name!r}; it has: {', '.join(sorted(known)) or 'none'}"


def _c_type(btf: Any, type_id: int, size: int) -> str | None:
    """The cffi type name of a BTF type, when cffi knows a type of that name and size.

    This is how maps come out typed by the structs of ``csrc/include``: the
    BPF object's BTF names the key and value types, and the binding was built
    from the same headers.
    """
    if btf == ffi.NULL or type_id == 0:
        return None
    btf_type = lib.btf__type_by_id(btf, type_id)
    if btf_type == ffi.NULL:
        return None
    name = ffi.string(lib.btf__name_by_offset(btf, btf_type.name_off)).decode()
    kind = lib.btf_kind(btf_type)
    if kind == lib.BTF_KIND_STRUCT:
        name = f"struct {name}"
    elif kind == lib.BTF_KIND_UNION:
        name = f"union {name}"
    elif kind not in (lib.BTF_KIND_TYPEDEF, lib.BTF_KIND_INT):
        return None
    try:
        return name if ffi.sizeof(name) == size else None
    except ffi.error:
        return None
